#!/usr/bin/env python3
"""Paired A/B of servers: every server runs at once, and short windows of the same load go to each in turn,
several times, so that the host's drift (on this project's 2-vCPU VMs, up to 55% within an hour) falls on every
side alike. Prints, per load, each server's median images/s and the median, lowest and highest ratio to the first
server over the pairs of windows next to each other.

Run on a quiet machine, after `make bench` has written the request bodies (bench/results/tmp/bodies/) and, for
Triton, its virtual environment (bench/.venv-triton):

    python3 bench/paired.py --server 'off=--ort-spinning false' --server 'run=--ort-spinning run' \\
        [--models cnn-int8,cnn] [--loads raw:1,raw:4,raw:64,multi16:1,multi16:64] [--pairs 6] [--seconds 2.5]

A server is `LABEL=FLAGS` (`fmnist serve` with these flags, driven through `Classify`; leading `NAME=VALUE`
words set its environment), `LABEL/oip=FLAGS` (the same, driven through the Open Inference Protocol's `ModelInfer`
with the bodies MLServer and Triton get), or `triton` (bench/run.py's Triton peer, model cnn only):

    python3 bench/paired.py --models cnn --server 'classify=' --server 'infer/oip=' --server triton

Only the server being measured is loaded; the others idle beside it (an idle server costs no CPU here: nothing
spins between runs unless a setting asks it to, and then that is part of what is measured).
"""

import argparse
import json
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402  (bench/run.py: the servers and the load generator, as make bench runs them)


def server(spec: str, model: str) -> run.Server:
    """A server of `spec` (see the module's text) serving `model` by default."""
    if spec == "triton":
        if model != "cnn":
            sys.exit("the Triton peer serves cnn only: --models cnn")
        return run.TritonPeer(run.BENCH / ".venv-triton", run.TRITON_BATCH, run.TRITON_DELAY_US, run.TRITON_THREADS)
    label, _, flags = spec.partition("=")
    label, _, protocol = label.partition("/")
    if protocol not in ("", "oip"):
        sys.exit(f"{spec}: the protocol after / is oip or nothing")
    words = shlex.split(flags)
    env = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):  # leading NAME=VALUE: the server's environment
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    return run.Fmnist(f"paired-{label}", label, model, ["--default-model", model, *words], env=env,
                      protocol="oip" if protocol else "fmnist")


def window(server: run.Server, mode: str, concurrency: int, seconds: float) -> dict:
    load = argparse.Namespace(connections=1 if concurrency == 1 else 4, warmup=0.5, seconds=seconds)
    return run.loadgen(server, mode, concurrency, load)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server", action="append", required=True, help="LABEL=FLAGS; the first is the baseline")
    p.add_argument("--models", default="cnn-int8,cnn")
    p.add_argument("--loads", default="raw:1,raw:4,raw:64,multi16:1,multi16:64")
    p.add_argument("--pairs", type=int, default=6)
    p.add_argument("--seconds", type=float, default=2.5)
    p.add_argument("--json", type=Path, help="also write every window here")
    args = p.parse_args()
    labels = [spec.partition("=")[0] for spec in args.server]
    loads = [(mode, int(c)) for mode, c in (load.split(":") for load in args.loads.split(","))]
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model_name = re.search(r"Model name:\s*(.+)", cpu)
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, lscpu \"{model_name.group(1) if model_name else '?'}\", "
          f"{args.pairs} pairs of {args.seconds} s windows per load; servers: "
          + "; ".join(f"{label}: {spec.partition('=')[2] or '(defaults)'}" for label, spec in zip(labels, args.server)),
          flush=True)
    record = []
    for model in args.models.split(","):
        running = {label: server(spec, model) for label, spec in zip(labels, args.server)}
        try:
            for label, srv in running.items():
                if why := srv.unavailable():
                    sys.exit(f"{label}: {why}")
                srv.start()
            for mode, concurrency in loads:
                rates: dict[str, list[float]] = {label: [] for label in labels}
                cpu_us: dict[str, list[float]] = {label: [] for label in labels}
                p50: dict[str, list[float]] = {label: [] for label in labels}
                for i in range(args.pairs):
                    # Each pass starts with a different server, so none always follows the same one.
                    order = labels[i % len(labels):] + labels[: i % len(labels)]
                    for label in order:
                        r = window(running[label], mode, concurrency, args.seconds)
                        rates[label].append(r["images_per_s"])
                        cpu_us[label].append(r["server_cpu_cores"] / max(r["images_per_s"], 1e-9) * 1e6)
                        p50[label].append(r["latency_p50_ms"])
                        record.append({"model": model, "mode": mode, "concurrency": concurrency, "pass": i,
                                       "server": label, **{k: r[k] for k in ("images_per_s", "server_cpu_cores",
                                                                              "latency_p50_ms", "machine_busy_cores")}})
                base = labels[0]
                cells = []
                for label in labels:
                    cell = f"{label} {statistics.median(rates[label]):7.0f} img/s p50 {statistics.median(p50[label]):.3f} ms " \
                           f"{statistics.median(cpu_us[label]):5.0f} us/img"
                    if label != base:
                        ratios = [a / b for a, b in zip(rates[label], rates[base])]
                        cell += f" x{statistics.median(ratios):.3f} [{min(ratios):.2f}-{max(ratios):.2f}]"
                    cells.append(cell)
                print(f"{model:8s} {mode:7s} C={concurrency:<4d} " + " | ".join(cells), flush=True)
        finally:
            for srv in running.values():
                srv.stop()
    if args.json:
        args.json.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
