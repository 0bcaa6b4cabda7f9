#!/usr/bin/env python3
"""Paired A/B of server settings: every server runs at once, and short windows of the same load go to each in
turn, several times, so that the host's drift (on this project's 2-vCPU VMs, up to 55% within an hour) falls on
every side alike. Prints, per load, each server's median images/s and the median, lowest and highest ratio to the
first server over the pairs of windows next to each other.

Run on a quiet machine, after `make bench` has written the request bodies (bench/results/tmp/bodies/):

    python3 bench/paired.py --server 'off=--ort-spinning false' --server 'run=--ort-spinning run' \\
        [--models cnn-int8,cnn] [--loads raw:1,raw:4,raw:64,multi16:1,multi16:64] [--pairs 6] [--seconds 2.5]

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

REPO = Path(__file__).resolve().parent.parent
BIN = REPO / "target/release/fmnist"
LOADGEN = REPO / "target/release/examples/loadgen"
BODIES = REPO / "bench/results/tmp/bodies"
IMAGES = {"raw": 1, "png": 1, "multi16": 16, "multi64": 64}


def start(label: str, flags: list[str], model: str) -> tuple[subprocess.Popen, str, str]:
    log = Path(f"/tmp/paired-{label}.log")
    proc = subprocess.Popen(
        [str(BIN), "serve", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--default-model", model,
         *flags], cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT)
    for _ in range(300):
        text = log.read_text()
        if "serving" in text:
            grpc = re.search(r"grpc=([0-9.:]+)", text)
            metrics = re.search(r"metrics=([0-9.:]+)", text)
            if grpc and metrics:
                return proc, grpc.group(1), metrics.group(1)
        if proc.poll() is not None:
            sys.exit(f"server {label} stopped:\n{text}")
        time.sleep(0.1)
    sys.exit(f"server {label} did not start:\n{log.read_text()}")


def window(addr: str, metrics: str, pid: int, model: str, mode: str, concurrency: int, seconds: float) -> dict:
    out = subprocess.run(
        [str(LOADGEN), "--addr", addr, "--path", "/fashion_mnist.v1.Classifier/Classify",
         "--bodies", str(BODIES / f"fmnist-{model}-{mode}.bin"), "--images-per-request", str(IMAGES[mode]),
         "--concurrency", str(concurrency), "--connections", "1" if concurrency == 1 else "4",
         "--seconds", str(seconds), "--warmup", "0.5", "--server-pid", str(pid), "--metrics", metrics],
        capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server", action="append", required=True, help="LABEL=FLAGS; the first is the baseline")
    p.add_argument("--models", default="cnn-int8,cnn")
    p.add_argument("--loads", default="raw:1,raw:4,raw:64,multi16:1,multi16:64")
    p.add_argument("--pairs", type=int, default=6)
    p.add_argument("--seconds", type=float, default=2.5)
    p.add_argument("--json", type=Path, help="also write every window here")
    args = p.parse_args()
    servers = [(s.split("=", 1)[0], shlex.split(s.split("=", 1)[1] if "=" in s else "")) for s in args.server]
    labels = [label for label, _ in servers]
    loads = [(mode, int(c)) for mode, c in (load.split(":") for load in args.loads.split(","))]
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model_name = re.search(r"Model name:\s*(.+)", cpu)
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, lscpu \"{model_name.group(1) if model_name else '?'}\", "
          f"{args.pairs} pairs of {args.seconds} s windows per load; servers: "
          + "; ".join(f"{label}: {' '.join(flags) or '(defaults)'}" for label, flags in servers), flush=True)
    record = []
    for model in args.models.split(","):
        running = {label: start(label, flags, model) for label, flags in servers}
        try:
            for mode, concurrency in loads:
                rates: dict[str, list[float]] = {label: [] for label in labels}
                cpu_us: dict[str, list[float]] = {label: [] for label in labels}
                p50: dict[str, list[float]] = {label: [] for label in labels}
                for i in range(args.pairs):
                    # Each pass starts with a different server, so none always follows the same one.
                    order = labels[i % len(labels):] + labels[: i % len(labels)]
                    for label in order:
                        proc, addr, metrics = running[label]
                        r = window(addr, metrics, proc.pid, model, mode, concurrency, args.seconds)
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
            for proc, _, _ in running.values():
                proc.send_signal(2)
                proc.wait()
    if args.json:
        args.json.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
