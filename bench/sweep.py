"""The measurements behind the service's defaults: the same server under different `fmnist serve` flags (ONNX
Runtime threads and spinning, batch size, batch delay), interleaved in one run so every configuration sees the
same machine, plus the in-process ceiling under the same ONNX Runtime options. Writes
bench/results/<cpu-slug>-sweep.{json,md}.

    bench/.venv/bin/python bench/sweep.py                      # the committed sweep (about 6 min)
    bench/.venv/bin/python bench/sweep.py --rounds 1 --seconds 2 --configs baseline,spin   # a quick look

Each configuration is measured `--rounds` times in rotation (A B C A B C ...) and the median is reported, so a
burst of foreign load hits one sample, not one configuration.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402

# name -> extra `fmnist serve` flags (on top of the shipped defaults); NAME=value items are environment variables
CONFIGS = {
    "baseline": [],
    "spin": ["--ort-spinning", "true"],
    "threads1": ["--ort-threads", "1"],
    "batch32": ["--max-batch-size", "32"],
    "batch128": ["--max-batch-size", "128"],
    "delay250us": ["--max-batch-delay-us", "250"],
    "delay1ms": ["--max-batch-delay-us", "1000"],
    # the per-call "call finished" line, DEBUG since performance round 2 (#17), switched back on
    "log-calls": ["RUST_LOG=info,fmnist_serve::grpc::layers=debug"],
    # spans exported over OTLP (to a port nobody listens on: spans are made, batched and dropped on export)
    "otlp": ["--otlp-endpoint", "http://127.0.0.1:9"],
    # one tokio worker instead of one per core: fewer threads competing with ONNX Runtime's on a small machine
    "workers1": ["TOKIO_WORKER_THREADS=1"],
}
# the ceiling under the ONNX Runtime options the configurations vary
CEILING = {
    "threads2": [],
    "threads2-spin": ["--spinning"],
    "threads1": ["--threads-override", "1"],
    "opt-extended": ["--optimization", "extended"],
    "opt-basic": ["--optimization", "basic"],
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--loads", default="raw:1,raw:64,raw:256,png:64,multi16:8",
                    help="mode:concurrency pairs")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=2.5)
    ap.add_argument("--warmup", type=float, default=0.7)
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--retries", type=int, default=1)
    ap.add_argument("--max-foreign-cores", type=float, default=0.15)
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--no-ceiling", action="store_true")
    ap.add_argument("--out", type=Path, default=run.BENCH / "results")
    a = ap.parse_args()
    run.TMP.mkdir(parents=True, exist_ok=True)
    started = time.time()
    cpu = run.lscpu()
    subprocess.run([sys.executable, str(run.BENCH / "encode_requests.py"), "--out", str(run.TMP / "bodies"),
                    "--model", a.model], check=True)

    ceiling = {}
    if not a.no_ceiling:
        for name, extra in CEILING.items():
            threads = 2
            if "--threads-override" in extra:
                threads = int(extra[extra.index("--threads-override") + 1])
                extra = []
            print(f"ceiling {name}", flush=True)
            ceiling[name] = run.ceiling(a.model, [1, 16, 64], 2.0, threads, extra)

    loads = [(m, int(c)) for m, c in (x.split(":") for x in a.loads.split(","))]
    names = a.configs.split(",")
    samples: dict[str, dict[str, list[dict]]] = {n: {f"{m}:{c}": [] for m, c in loads} for n in names}
    models_flag = ["--models", a.model, "--default-model", a.model]
    for rnd in range(a.rounds):
        for name in names:
            print(f"round {rnd + 1}/{a.rounds}: {name}", flush=True)
            flags = [f for f in CONFIGS[name] if "=" not in f]
            env = dict(f.split("=", 1) for f in CONFIGS[name] if "=" in f)
            server = run.Fmnist(f"sweep-{name}", name, a.model, models_flag + flags, env)
            for mode in dict.fromkeys(m for m, _ in loads):
                try:
                    rows = run.measure(server, [mode], [c for m, c in loads if m == mode], a)
                except RuntimeError as e:
                    print(f"  {name} {mode}: {e}", flush=True)
                    continue
                for r in rows:
                    samples[name][f"{mode}:{r['concurrency']}"].append(r)

    def med(rows, key):
        values = [r[key] for r in rows if r.get(key) is not None]
        return statistics.median(values) if values else None

    table = []
    for name in names:
        for load, rows in samples[name].items():
            if not rows:
                continue
            table.append({"config": name, "flags": " ".join(CONFIGS[name]), "load": load, "samples": len(rows),
                          **{k: med(rows, k) for k in ["images_per_s", "latency_p50_ms", "latency_p99_ms",
                                                       "batch_avg", "server_cpu_cores", "server_peak_rss_kb"]},
                          "disturbed": sum(bool(r.get("disturbed")) for r in rows)})
    result = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpu": cpu["Model name"],
              "model": a.model, "seconds": a.seconds, "rounds": a.rounds, "ceiling": ceiling, "sweep": table,
              "raw": samples, "elapsed_s": round(time.time() - started)}
    lines = [f"# Sweep: {cpu['Model name']}, model {a.model}", "",
             f"{result['date']}; median of {a.rounds} rotated rounds, {a.seconds} s windows.", ""]
    if ceiling:
        lines += ["## Ceiling under ONNX Runtime options (images/s; p50 ms per run)", "",
                  "| options | batch 1 | batch 16 | batch 64 |", "|---|---:|---:|---:|"]
        for name, rows in ceiling.items():
            cells = [f"{r['images_per_s']:.0f} ({r['latency_p50_ms']:.2f} ms)" for r in rows]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Service under `fmnist serve` flags", "",
              "| config | flags | load | img/s | p50 ms | p99 ms | batch | server CPU | peak RSS MB | disturbed |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for t in table:
        lines.append(f"| {t['config']} | `{t['flags'] or '(defaults)'}` | {t['load']} | {t['images_per_s']:.0f} | "
                     f"{t['latency_p50_ms']:.2f} | {t['latency_p99_ms']:.2f} | {t['batch_avg'] or 0:.1f} | "
                     f"{t['server_cpu_cores']:.2f} | {t['server_peak_rss_kb'] / 1024:.0f} |"
                     + f" {t['disturbed']} |")
    a.out.mkdir(parents=True, exist_ok=True)
    stem = a.out / f"{run.slug(cpu['Model name'] or '')}-sweep"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"written {stem}.json and .md in {result['elapsed_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
