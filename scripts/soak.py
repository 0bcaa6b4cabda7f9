#!/usr/bin/env python3
"""Soak run: a real server on loopback under mixed valid and invalid traffic for --minutes, RSS sampled every
--sample-s; reports whether memory grows. Run with the tools venv after `make build tools`:

    PYTHON=.venv-tools/bin/python bash clients/python/generate.sh
    .venv-tools/bin/python scripts/soak.py --minutes 60

Traffic per caller, in a loop: raw fixture images (1 and 16 per call), PNG fixture images, a multi-image call
with a corrupt PNG, empty and oversized requests (INVALID_ARGUMENT), an unknown model, a blank image and a
decompression bomb. Prints a JSON summary; exit status 1 when the server died or RSS grew more than 20%
between the second and the last quarter of the run (the first quarter is warm-up).
"""
import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "clients/python/generated"))
import grpc  # noqa: E402
from fashion_mnist.v1 import classifier_pb2 as pb, classifier_pb2_grpc as rpc  # noqa: E402


def rss_kb(pid: int) -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1))


def requests():
    pixels = (ROOT / "tests/fixtures/test-images.u8").read_bytes()
    raw = [pixels[i * 784 : (i + 1) * 784] for i in range(len(pixels) // 784)]
    pngs = [p.read_bytes() for p in sorted((ROOT / "tests/fixtures/png").glob("*.png"))]
    bomb = bytearray(pngs[0])
    return [
        pb.ClassifyRequest(images=[pb.Image(raw=raw[0])]),
        pb.ClassifyRequest(images=[pb.Image(raw=r) for r in raw[:16]]),
        pb.ClassifyRequest(images=[pb.Image(encoded=p) for p in pngs]),
        pb.ClassifyRequest(images=[pb.Image(encoded=pngs[0][:40]), pb.Image(raw=raw[1][:100]), pb.Image(raw=bytes(784))]),
        pb.ClassifyRequest(images=[]),
        pb.ClassifyRequest(images=[pb.Image(raw=raw[2])] * 65),
        pb.ClassifyRequest(images=[pb.Image(raw=raw[3])], model="nope"),
        pb.ClassifyRequest(images=[pb.Image(encoded=bytes(bomb[:16]) + (50000).to_bytes(4, "big") * 2 + bytes(bomb[24:]))]),
    ]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=60)
    p.add_argument("--callers", type=int, default=8)
    p.add_argument("--sample-s", type=float, default=10)
    a = p.parse_args()
    server = subprocess.Popen([str(ROOT / "target/release/fmnist"), "serve", "--listen", "127.0.0.1:0",
                               "--metrics-listen", "127.0.0.1:0"], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "RUST_LOG": "warn,fmnist_serve=info"})
    addr = None
    for line in server.stdout:
        m = re.search(r"grpc=(\S+)", line)
        addr = addr or (m and m.group(1))
        if " serving" in line:
            break
    threading.Thread(target=lambda: [None for _ in server.stdout], daemon=True).start()
    stub = rpc.ClassifierStub(grpc.insecure_channel(addr))
    reqs = requests()
    codes: dict[str, int] = {}
    lock = threading.Lock()
    end = time.time() + a.minutes * 60

    def caller(k: int) -> None:
        i = k
        while time.time() < end:
            try:
                stub.Classify(reqs[i % len(reqs)], timeout=10)
                code = "OK"
            except grpc.RpcError as e:
                code = e.code().name
            with lock:
                codes[code] = codes.get(code, 0) + 1
            i += 1

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(a.callers)]
    for t in threads:
        t.start()
    samples = []
    started = time.time()
    while time.time() < end and server.poll() is None:
        samples.append((round(time.time() - started), rss_kb(server.pid)))
        time.sleep(a.sample_s)
    for t in threads:
        t.join()
    alive = server.poll() is None
    server.terminate()
    server.wait(timeout=30)
    # The second quarter is the baseline: the first holds allocator and thread-pool warm-up.
    q = max(1, len(samples) // 4)
    first, last = sum(s for _, s in samples[q : 2 * q]) / q, sum(s for _, s in samples[-q:]) / q
    summary = {"minutes": a.minutes, "callers": a.callers, "calls": codes, "alive": alive,
               "rss_kb_second_quarter": round(first), "rss_kb_last_quarter": round(last),
               "rss_kb_peak": max(s for _, s in samples), "growth": round(last / first - 1, 4), "samples": samples}
    print(json.dumps(summary))
    return 0 if alive and last <= first * 1.2 else 1


if __name__ == "__main__":
    sys.exit(main())
