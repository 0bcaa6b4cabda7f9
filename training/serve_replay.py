"""Replays 28x28 images through a real `fmnist` server and reads its drift metrics back: what
training/drift_reference.py measures a model's reference with, and what tests/drift.py replays streams with.

Standard library only (the training and test environments both have it): the server is started from its
release binary on ephemeral ports, images go to the Open Inference Protocol's REST route as UINT8 tensors, and
`/metrics` is parsed for the fmnist_* families the drift signals use.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(models_dir: Path, models: list[str], extra: list[str] | None = None, binary: Path | None = None):
    """A real server on ephemeral ports serving `models`; yields (http base URL, metrics URL, process)."""
    binary = binary or REPO / "target/release/fmnist"
    port, metrics_port = free_port(), free_port()
    cmd = [str(binary), "serve", "--listen", f"127.0.0.1:{port}", "--metrics-listen", f"127.0.0.1:{metrics_port}",
           "--models-dir", str(models_dir), "--models", ",".join(models), "--default-model", models[0],
           "--model-poll-s", "0", *(extra or [])]
    env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "warn"))
    env.setdefault("ORT_DYLIB_PATH", str(REPO / ".ort/libonnxruntime.so.1.31.1"))
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
            try:
                with urllib.request.urlopen(base + "/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError("server not ready in 120 s")
            time.sleep(0.2)
        yield base, f"http://127.0.0.1:{metrics_port}/metrics", proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def classify(base: str, model: str, images: list[bytes], batch: int = 64) -> list[str]:
    """Sends 784-byte images (28x28, light garment on 0) in calls of `batch`; returns each image's reason."""
    reasons: list[str] = []
    for start in range(0, len(images), batch):
        chunk = images[start:start + batch]
        data = [v for image in chunk for v in image]
        body = json.dumps({"inputs": [{"name": "raw", "datatype": "UINT8", "shape": [len(chunk), 28, 28],
                                       "data": data}]}).encode()
        req = urllib.request.Request(f"{base}/v2/models/{model}/infer", data=body,
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            answer = json.load(r)
        out = {o["name"]: o for o in answer["outputs"]}
        reasons.extend(out["reason"]["data"])
    return reasons


def scrape(metrics_url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics: {(name, sorted labels): value}."""
    with urllib.request.urlopen(metrics_url, timeout=10) as r:
        text = r.read().decode()
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = SAMPLE.match(line)
        if not m:
            continue
        labels = tuple(sorted(LABEL.findall(m.group(3) or "")))
        samples[(m.group(1), labels)] = float(m.group(4))
    return samples


def delta(after: dict, before: dict, name_prefix: str = "fmnist_") -> dict:
    """after - before for the counters and histogram series whose names start with `name_prefix`."""
    return {k: v - before.get(k, 0.0) for k, v in after.items() if k[0].startswith(name_prefix)}


def select(samples: dict, name: str, **labels: str) -> dict:
    """The samples of `name` whose labels include `labels`, keyed by their full label dict."""
    out = {}
    for (n, ls), v in samples.items():
        d = dict(ls)
        if n == name and all(d.get(k) == val for k, val in labels.items()):
            out[ls] = v
    return out


def signals(d: dict, model: str, version: str, classes: list[str]) -> dict:
    """The drift signals of `model` `version` over a delta of two scrapes: the same numbers the reference
    states and the alert rules compute (docs/drift.md)."""
    lab = {"model": model, "version": version}
    reasons = {dict(k)["reason"]: v for k, v in select(d, "fmnist_images_total", **lab).items()}
    total = sum(reasons.values())
    by_class = {dict(k)["class"]: v for k, v in select(d, "fmnist_predicted_class_total", **lab).items()}
    seen = sum(by_class.values())

    def mean(family: str):
        s = sum(select(d, f"{family}_sum", **lab).values())
        c = sum(select(d, f"{family}_count", **lab).values())
        return s / c if c else None

    return {
        "images": int(total),
        "reasons": {r: (n / total if total else 0.0) for r, n in sorted(reasons.items())},
        "classes": [max(by_class.get(c, 0.0) / seen if seen else 0.0, 0.001) for c in classes],
        "top_probability_mean": mean("fmnist_top_probability"),
        "ood_margin_mean": mean("fmnist_ood_margin"),
        "brightness_mean": mean("fmnist_input_brightness"),
        "contrast_mean": mean("fmnist_input_contrast"),
    }
