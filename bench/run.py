"""make bench: the in-process ceiling, the service end to end over gRPC, and two Python peers on the same load,
in one run on this machine, written to bench/results/<cpu-slug>.json and .md.

  1. ceiling   examples/ceiling.rs: fmnist_serve::model::Model alone (the server's session and options),
               2 intra-op threads, batch 1..128.
  2. service   the release server (`fmnist serve`, shipped defaults), driven by examples/loadgen.rs: C closed-loop
               callers (1, 8, 64, 256, 1024) over 4 HTTP/2 connections, single raw images, single PNGs, 16 and
               64 raw images per call. The average formed batch comes from the server's /metrics, CPU and peak RSS from /proc.
  3. peers     (a) bench/peers/python_server.py: grpcio + ThreadPoolExecutor, onnxruntime once per request;
               (b) MLServer 1.7.1 with adaptive batching and a custom onnxruntime runtime (bench/peers/mlserver);
               (c) Triton 2.x (nvidia-pytriton 0.7.0's tritonserver) with its dynamic batcher and a Python backend
               model calling onnxruntime (bench/peers/triton), from bench/.venv-triton; skipped, with the reason
               printed and recorded, where run.sh could not make that venv.
               Same load generator, same images, same model file.

Everything shares the machine's cores with the load generator, so compare ratios from one run. Each
measurement also records how busy the whole machine was: a window where other processes took more than
--max-foreign-cores is measured again (up to --retries times) and flagged if it stays disturbed.

    bench/.venv/bin/python bench/run.py [--seconds 5] [--quick] [--servers fmnist,python,mlserver,triton]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
TMP = BENCH / "results/tmp"
RELEASE = REPO / "target/release"
VENV_BIN = Path(sys.executable).parent
FMNIST_PATH = "/fashion_mnist.v1.Classifier/Classify"
OIP_PATH = "/inference.GRPCInferenceService/ModelInfer"
MODES = {"raw": 1, "png": 1, "multi16": 16, "multi64": 64}


def lscpu() -> dict:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"}).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    return {k: fields.get(k) for k in ["Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket",
                                       "CPU max MHz", "L2 cache", "L3 cache", "Hypervisor vendor", "Flags"]}


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown-cpu"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def v2_model_ready(http_port, model):
    """Whether an Open Inference Protocol server on this HTTP port reports `model` ready."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/models/{model}/ready", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def served_file(model: str) -> Path:
    """The ONNX file of `model`'s newest version in models/, the one `fmnist serve` answers with by default (and
    examples/ceiling runs): the peers load this file, so every server runs the same graph, garment head included."""
    versions = [d for d in (REPO / "models" / model).iterdir() if d.name.isdigit() and (d / "model.json").exists()]
    return max(versions, key=lambda d: int(d.name)) / "model.onnx"


def ms(latency: float | None, width: int = 0) -> str:
    """A latency in ms as the tables show it; "-" when no call ended in the window (the load generator's null)."""
    return f"{latency:{width}.2f}" if latency is not None else "-".rjust(width)


def wait_for(predicate, what: str, proc: subprocess.Popen, log: Path, timeout: float = 120.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise RuntimeError(f"{what} not ready after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Server:
    """A server under test: how to start it, where to send what, where its batch-size histogram is."""

    def __init__(self, key: str, label: str, model: str, protocol: str):
        self.key, self.label, self.model, self.protocol = key, label, model, protocol
        self.proc: subprocess.Popen | None = None
        self.addr = ""
        self.metrics: str | None = None
        self.batch_metric = "fmnist_batch_size_images"

    def unavailable(self) -> str | None:
        """Why this server cannot run on this machine (its row is then skipped), or None."""
        return None

    def pids(self) -> list[int]:
        """The processes whose CPU time and peak RSS are the server's."""
        return [self.proc.pid]

    @property
    def path(self) -> str:
        return FMNIST_PATH if self.protocol == "fmnist" else OIP_PATH

    def bodies(self, mode: str) -> Path:
        return TMP / "bodies" / f"{self.protocol}-{self.model}-{mode}.bin"

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        if self.proc:
            stop(self.proc)
            self.proc = None


class Fmnist(Server):
    def __init__(self, key: str, label: str, model: str, extra: list[str], env: dict | None = None,
                 protocol: str = "fmnist"):
        super().__init__(key, label, model, protocol)
        self.extra, self.env = extra, env or {}

    def start(self) -> None:
        log = TMP / f"{self.key}.log"
        # The shipped defaults (RUST_LOG unset = info, as `make run` has it); only the ports are ephemeral.
        env = {k: v for k, v in os.environ.items() if not k.startswith("FMNIST_") and k != "RUST_LOG"}
        env.update(self.env)
        self.proc = subprocess.Popen(
            [str(RELEASE / "fmnist"), "serve", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
             *self.extra],
            cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)

        def ready():
            text = log.read_text()
            if "serving" not in text:
                return None
            return re.search(r"grpc=([0-9.:]+)", text), re.search(r"metrics=([0-9.:]+)", text)

        grpc, metrics = wait_for(ready, "fmnist serve", self.proc, log)
        self.addr, self.metrics = grpc.group(1), metrics.group(1)


class PythonPeer(Server):
    def __init__(self, workers: int):
        super().__init__("python", f"Python grpcio peer ({workers} threads, no batching)", "cnn", "fmnist")
        self.workers = workers

    def start(self) -> None:
        log = TMP / "python.log"
        port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, str(BENCH / "peers/python_server.py"), "--port", str(port), "--model",
             str(served_file("cnn")), "--workers", str(self.workers)],
            cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT)
        wait_for(lambda: "serving" in log.read_text(), "python peer", self.proc, log)
        self.addr = f"127.0.0.1:{port}"


class MLServerPeer(Server):
    def __init__(self, max_batch_size: int, max_batch_time: float):
        super().__init__("mlserver", f"MLServer 1.7.1 (adaptive batching {max_batch_size} / "
                         f"{max_batch_time * 1e3:g} ms)", "cnn", "oip")
        self.max_batch_size, self.max_batch_time = max_batch_size, max_batch_time
        self.batch_metric = "fmnist_batch_images"

    def start(self) -> None:
        root = TMP / "mlserver"
        shutil.rmtree(root, ignore_errors=True)
        (root / "cnn").mkdir(parents=True)
        http, grpc, metrics = free_port(), free_port(), free_port()
        (root / "settings.json").write_text(json.dumps({
            "debug": False, "host": "127.0.0.1", "http_port": http, "grpc_port": grpc, "metrics_port": metrics,
            # In-process: with parallel_workers >= 1, MLServer 1.7.1 fails to load a custom runtime
            # ("no current event loop").
            "parallel_workers": 0, "logging_level": "WARNING",
        }))
        (root / "cnn/model-settings.json").write_text(json.dumps({
            "name": "cnn", "implementation": "runtime.OnnxClassifier",
            "max_batch_size": self.max_batch_size, "max_batch_time": self.max_batch_time,
            "parameters": {"uri": str(served_file("cnn"))},
        }))
        log = TMP / "mlserver.log"
        env = {**os.environ, "PYTHONPATH": f"{BENCH / 'peers/mlserver'}:{BENCH / 'peers'}"}
        self.proc = subprocess.Popen([str(VENV_BIN / "mlserver"), "start", str(root)], cwd=root,
                                     stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)

        wait_for(lambda: v2_model_ready(http, "cnn"), "mlserver", self.proc, log, timeout=180)
        self.addr, self.metrics = f"127.0.0.1:{grpc}", f"127.0.0.1:{metrics}"


def children(pid: int) -> list[int]:
    """Direct child processes of pid (from /proc/<pid>/task/*/children)."""
    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            kids += [int(k) for k in task.read_text().split()]
        except OSError:
            pass
    return sorted(set(kids))


class TritonPeer(Server):
    """Peer (c): Triton Inference Server, the `tritonserver` binary of PyPI's nvidia-pytriton 0.7.0 (in its own
    virtual environment, bench/.venv-triton, made by run.sh from pyenv's Python 3.12.1), run directly on a model
    repository written here: bench/peers/triton/model.py (Python backend, onnxruntime) with Triton's dynamic
    batcher. Its KServe v2 gRPC endpoint gets the same ModelInferRequest bodies as MLServer and this service's
    GRPCInferenceService. The model runs in a separate process (the Python backend's stub), so the server's
    CPU time and peak RSS are tritonserver's and the stub's, summed."""

    LABEL = "Triton 2.x, Python backend + ORT"

    def __init__(self, venv: Path, max_batch_size: int, delay_us: int, threads: int):
        super().__init__("triton", f"{self.LABEL} (nvidia-pytriton 0.7.0's tritonserver; dynamic batcher "
                         f"{max_batch_size} / {delay_us} µs; 1 CPU instance, {threads} intra-op threads)",
                         "cnn", "oip")
        self.venv, self.max_batch_size, self.delay_us, self.threads = venv, max_batch_size, delay_us, threads
        # Images per model execution over executions: Triton's own counters.
        self.batch_metric = "nv_inference_count/nv_inference_exec_count"
        self.version: str | None = None

    def _python(self) -> dict | None:
        """The venv's Python: version and the folder of its libpython (the backend stub links against it)."""
        py = self.venv / "bin/python"
        if not py.exists():
            return None
        out = subprocess.run([str(py), "-c", "import json, sys, sysconfig; print(json.dumps({'version': "
                              "'%d.%d' % sys.version_info[:2], 'libdir': sysconfig.get_config_var('LIBDIR'), "
                              "'site': sysconfig.get_path('purelib')}))"], capture_output=True, text=True)
        return json.loads(out.stdout) if out.returncode == 0 else None

    def unavailable(self) -> str | None:
        reason = self.venv / ".unavailable"
        if reason.exists():  # run.sh could not make the venv, and wrote why
            return reason.read_text().strip()
        info = self._python()
        if info is None:
            return f"no Python in {self.venv} (bench/run.sh makes it from pyenv's 3.12.1)"
        root = Path(info["site"]) / "pytriton/tritonserver"
        if not (root / "bin/tritonserver").exists():
            return f"no tritonserver in {root} (nvidia-pytriton 0.7.0 not installed in {self.venv})"
        if not (root / "python_backend_stubs" / info["version"] / "triton_python_backend_stub").exists():
            return f"nvidia-pytriton has no Python backend stub for Python {info['version']}"
        if not (Path(info["libdir"]) / f"libpython{info['version']}.so.1.0").exists():
            return f"no libpython{info['version']}.so.1.0 in {info['libdir']} (the backend stub needs it)"
        self._info, self._root = info, root
        return None

    def start(self) -> None:
        why = self.unavailable()
        if why:
            raise RuntimeError(f"Triton peer unavailable: {why}")
        info, root = self._info, self._root
        work = TMP / "triton"
        shutil.rmtree(work, ignore_errors=True)
        # The backend directory pytriton itself assembles: the Python backend plus the stub built for the venv's
        # Python version.
        backend = work / "backends/python"
        backend.mkdir(parents=True)
        for f in ["libtriton_python.so", "triton_python_backend_utils.py"]:
            shutil.copy(root / "backends/python" / f, backend / f)
        shutil.copy(root / "python_backend_stubs" / info["version"] / "triton_python_backend_stub",
                    backend / "triton_python_backend_stub")
        model = work / "models/cnn"
        (model / "1").mkdir(parents=True)
        shutil.copy(BENCH / "peers/triton/model.py", model / "1/model.py")
        params = {"onnx_path": served_file("cnn"), "intra_op_threads": self.threads,
                  "peers_dir": BENCH / "peers"}
        (model / "config.pbtxt").write_text(TRITON_CONFIG.format(
            max_batch_size=self.max_batch_size, delay_us=self.delay_us,
            parameters="\n".join(f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}'
                                 for k, v in params.items())))
        http, grpc, metrics = free_port(), free_port(), free_port()
        libs = Path(info["site"]) / "nvidia_pytriton.libs"
        ld_path = [info["libdir"], str(libs), os.environ.get("LD_LIBRARY_PATH")]
        env = {**os.environ, "LD_LIBRARY_PATH": ":".join(filter(None, ld_path)),
               # The stub's embedded interpreter finds the venv (numpy, onnxruntime) through its python on PATH.
               "PATH": f"{self.venv / 'bin'}:{os.environ['PATH']}"}
        log = TMP / "triton.log"
        self.proc = subprocess.Popen(
            [str(root / "bin/tritonserver"), f"--model-repository={work / 'models'}",
             f"--backend-directory={work / 'backends'}", "--http-address=127.0.0.1", f"--http-port={http}",
             "--grpc-address=127.0.0.1", f"--grpc-port={grpc}", "--metrics-address=127.0.0.1",
             f"--metrics-port={metrics}", "--allow-gpu-metrics=false", "--strict-readiness=true",
             "--exit-on-error=true", "--log-verbose=0"],
            cwd=work, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)

        wait_for(lambda: v2_model_ready(http, "cnn"), "tritonserver", self.proc, log, timeout=180)
        version = re.search(r"server_version\s*\|\s*([0-9.]+)", log.read_text())
        self.version = version.group(1) if version else None
        self.addr, self.metrics = f"127.0.0.1:{grpc}", f"127.0.0.1:{metrics}"

    def pids(self) -> list[int]:
        return [self.proc.pid, *children(self.proc.pid)]

    def bodies(self, mode: str) -> Path:
        # Raw and 16/call: the very bodies MLServer and fmnist-oip get. PNG: the same, with shape [1, 1].
        return TMP / "bodies" / f"{self.protocol}-{self.model}-{mode}{'-batched' if mode == 'png' else ''}.bin"


# Triton's dynamic_batching max_queue_delay_microseconds. Triton's docs ("Recommended Configuration Process" of
# the dynamic batcher) start from dynamic_batching { } (no delay: batches as large as what is queued, up to
# max_batch_size) and raise the delay only while throughput still rises; bench/README.md "Triton" has the runs.
TRITON_DELAY_US = 0
# Triton's max_batch_size (this service's --max-batch-size) and its model's onnxruntime intra-op threads.
TRITON_BATCH, TRITON_THREADS = 64, 2

# The Triton model: the ModelInferRequest bodies' inputs ("raw" UINT8 [n, 28, 28], "encoded" BYTES [n]; one of
# them per request), Triton's dynamic batcher, one model instance on the CPU (as the other servers run one model
# session).
TRITON_CONFIG = """name: "cnn"
backend: "python"
max_batch_size: {max_batch_size}
input [
  {{ name: "raw" data_type: TYPE_UINT8 dims: [ 28, 28 ] optional: true }},
  {{ name: "encoded" data_type: TYPE_STRING dims: [ 1 ] reshape: {{ shape: [ ] }} optional: true }}
]
output [ {{ name: "probabilities" data_type: TYPE_FP32 dims: [ 10 ] }} ]
dynamic_batching {{ max_queue_delay_microseconds: {delay_us} }}
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
{parameters}
"""


def loadgen(server: Server, mode: str, concurrency: int, a) -> dict:
    cmd = [str(RELEASE / "examples/loadgen"), "--addr", server.addr, "--path", server.path,
           "--bodies", str(server.bodies(mode)), "--images-per-request", str(MODES[mode]),
           "--concurrency", str(concurrency), "--connections", str(a.connections),
           "--warmup", str(a.warmup), "--seconds", str(a.seconds),
           "--server-pid", ",".join(map(str, server.pids())),
           "--batch-metric", server.batch_metric]
    if server.metrics:
        cmd += ["--metrics", server.metrics]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"loadgen failed: {out.stderr}")
    r = json.loads(out.stdout)
    r["foreign_cores"] = (r["machine_busy_cores"] or 0) - (r["server_cpu_cores"] or 0) - (r["loadgen_cpu_cores"] or 0)
    return r


def measure(server: Server, modes: list[str], concurrencies: list[int], a) -> list[dict]:
    rows = []
    for mode in modes:
        server.start()  # a fresh process per mode: its peak RSS belongs to this load
        try:
            for c in concurrencies:
                for attempt in range(a.retries + 1):
                    r = loadgen(server, mode, c, a)
                    r["disturbed"] = r["foreign_cores"] > a.max_foreign_cores
                    if not r["disturbed"]:
                        break
                    print(f"    (other processes took {r['foreign_cores']:.2f} cores: measuring again)", flush=True)
                r.update(server=server.key, label=server.label, model=server.model, mode=mode, attempts=attempt + 1)
                rows.append(r)
                batch = f"{r['batch_avg']:.1f}" if r["batch_avg"] else "-"
                print(f"  {server.key:12} {mode:8} C={c:<4} {r['images_per_s']:8.0f} img/s  p50 "
                      f"{ms(r['latency_p50_ms'], 7)} ms  p99 {ms(r['latency_p99_ms'], 7)} ms  batch {batch:>5}  "
                      f"cpu {r['server_cpu_cores']:.2f}+{r['loadgen_cpu_cores']:.2f}  rss "
                      f"{(r['server_peak_rss_kb'] or 0) / 1024:.0f} MB  shed {r['shed']}  errors {r['errors']}"
                      + ("  DISTURBED" if r["disturbed"] else ""), flush=True)
                if r["errors"]:
                    print(f"    first error: {r['first_error']}", flush=True)
        finally:
            server.stop()
    return rows


def ceiling(model: str, batches: list[int], seconds: float, threads: int, extra: list[str] = (),
            repeats: int = 1) -> list[dict]:
    """images/s and latency of Model::run per batch size; with repeats, the best of them per batch size (the
    ceiling is what the model does when nothing else interferes)."""
    # The best layout of the cores: one session with `threads` intra-op threads, or `threads` sessions of one
    # thread side by side (the server's --instances); the rate is the better of the two per batch size, and
    # `p50_min_ms` the lower latency of one run (which one session of `threads` threads usually has).
    layouts = [(1, threads)] + ([(threads, 1)] if threads > 1 else [])
    best: dict[int, dict] = {}
    p50: dict[int, float] = {}
    for _ in range(repeats):
        for sessions, per_session in layouts:
            for r in _ceiling_once(model, batches, seconds, per_session, [*extra, "--sessions", str(sessions)]):
                b = r["batch"]
                p50[b] = min(p50.get(b, float("inf")), r["latency_p50_ms"])
                if b not in best or r["images_per_s"] > best[b]["images_per_s"]:
                    best[b] = r
    for b, r in best.items():
        r["p50_min_ms"] = p50[b]
    return [best[b] for b in sorted(best)]


def _ceiling_once(model: str, batches: list[int], seconds: float, threads: int, extra: list[str]) -> list[dict]:
    out = subprocess.run([str(RELEASE / "examples/ceiling"), "--model", model, "--threads", str(threads),
                          "--batches", ",".join(map(str, batches)), "--seconds", str(seconds), *extra],
                         cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"ceiling failed: {out.stderr}")
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    for r in rows:
        print(f"  ceiling {model:9} {r.get('layout', '1x' + str(threads)):>4} batch {r['batch']:4}  "
              f"{r['images_per_s']:8.0f} img/s  "
              f"p50 {r['latency_p50_ms']:.3f} ms", flush=True)
    return rows


def criterion(a) -> list[dict]:
    """The preprocessing micro-benchmarks (benches/preprocess.rs), with short timings; medians from criterion's
    estimates.json files."""
    out = subprocess.run(["cargo", "bench", "--bench", "preprocess", "--", "--warm-up-time", "1",
                          "--measurement-time", str(a.criterion_seconds)], cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        print(f"  criterion failed: {out.stderr[-2000:]}", flush=True)
        return []
    rows = []
    root = REPO / "target/criterion"
    for est in sorted(root.glob("*/*/new/estimates.json")):
        group, name = est.parent.parent.parent.name, est.parent.parent.name
        if group not in ("preprocess", "validate"):
            continue
        e = json.loads(est.read_text())
        rows.append({"group": group, "name": name, "median_us": e["median"]["point_estimate"] / 1e3,
                     "mean_us": e["mean"]["point_estimate"] / 1e3})
        print(f"  {group}/{name}: {rows[-1]['median_us']:.2f} µs", flush=True)
    return rows


def interpolate(ceil: list[dict], batch: float) -> float:
    """Ceiling images/s at a fractional batch size: linear in log2(batch) between measured sizes."""
    import math

    pts = sorted((r["batch"], r["images_per_s"]) for r in ceil)
    if batch <= pts[0][0]:
        return pts[0][1]
    for (b0, v0), (b1, v1) in zip(pts, pts[1:]):
        if b0 <= batch <= b1:
            t = (math.log2(batch) - math.log2(b0)) / (math.log2(b1) - math.log2(b0))
            return v0 + t * (v1 - v0)
    return pts[-1][1]


def find(rows, server, mode, c):
    return next((r for r in rows if r["server"] == server and r["mode"] == mode and r["concurrency"] == c), None)


def targets(result: dict) -> list[dict]:
    rows, ceil = result["service"], result["ceiling"]
    checks = []
    ours = find(rows, "fmnist", "raw", 64)
    cnn_ceiling = [r for r in ceil if r["model"] == "cnn"]
    # The share of the ceiling the service reaches at the batch it formed (#17's targets).
    for mode, c, share in [("raw", 64, 0.90), ("multi16", 8, 0.95)]:
        r = find(rows, "fmnist", mode, c)
        if r and cnn_ceiling and r["batch_avg"]:
            at = interpolate(cnn_ceiling, r["batch_avg"])
            checks.append({"target": f"service img/s at C={c} ({mode}) >= {share:.0%} of the ceiling at the formed "
                                     "batch",
                           "measured": f"{r['images_per_s']:.0f} / {at:.0f} at batch {r['batch_avg']:.1f} = "
                                       f"{r['images_per_s'] / at * 100:.0f}%",
                           "met": r["images_per_s"] >= share * at})
    for peer, factor in [("python", 2.5), ("mlserver", 3.5)]:
        p = find(rows, peer, "raw", 64)
        if ours and p:
            ratio = ours["images_per_s"] / p["images_per_s"]
            checks.append({"target": f"C=64 (raw) throughput >= {factor}x {peer}",
                           "measured": f"{ours['images_per_s']:.0f} / {p['images_per_s']:.0f} = {ratio:.2f}x",
                           "met": ratio >= factor})
    # The Open Inference Protocol path: as fast as our own protocol, and 4x MLServer on the very same bodies.
    oip = find(rows, "fmnist-oip", "raw", 64)
    if ours and oip:
        ratio = oip["images_per_s"] / ours["images_per_s"]
        checks.append({"target": "C=64 (raw) OIP ModelInfer >= 95% of Classify",
                       "measured": f"{oip['images_per_s']:.0f} / {ours['images_per_s']:.0f} = {ratio * 100:.0f}%",
                       "met": ratio >= 0.95})
    mls = find(rows, "mlserver", "raw", 64)
    if oip and mls:
        ratio = oip["images_per_s"] / mls["images_per_s"]
        checks.append({"target": "C=64 (raw) OIP throughput >= 4x MLServer (same ModelInfer bodies)",
                       "measured": f"{oip['images_per_s']:.0f} / {mls['images_per_s']:.0f} = {ratio:.2f}x",
                       "met": ratio >= 4.0})
    # Triton (Python backend + ORT): this service ahead at every C and mode, on the same ModelInfer bodies.
    vs = triton_ratios(rows)
    if vs:
        worst = min(vs, key=lambda v: v["oip_ratio"])
        checks.append({"target": "OIP ModelInfer ahead of Triton (Python backend + ORT) at every C and mode",
                       "measured": f"{worst['oip_ratio']:.2f}x at the closest ({worst['mode']}, C={worst['c']}: "
                                   f"{worst['oip']:.0f} / {worst['triton']:.0f} img/s); "
                                   f"{max(v['oip_ratio'] for v in vs):.2f}x at the widest",
                       "met": worst["oip_ratio"] > 1.0})
    one = find(rows, "fmnist", "raw", 1)
    b1 = next((r for r in cnn_ceiling if r["batch"] == 1), None)
    if one and b1:
        checks.append({"target": "C=1 p50 <= in-process batch-1 p50 + 0.15 ms",
                       "measured": f"{one['latency_p50_ms']:.3f} ms vs {b1.get('p50_min_ms', b1['latency_p50_ms']):.3f}"
                                   " + 0.15 ms",
                       "met": one["latency_p50_ms"] <= b1.get("p50_min_ms", b1["latency_p50_ms"]) + 0.15})
    # The serving work per single-image call (#34): the server's CPU per call with a model that costs ORT next
    # to nothing, so everything measured is HTTP/2, protobuf, the codec, admission, hand-offs, spans and metrics.
    for c in (1, 64):
        noop = find(rows, "fmnist-noop", "raw", c)
        if noop and noop["images_per_s"]:
            us = noop["server_cpu_cores"] / noop["images_per_s"] * 1e6
            checks.append({"target": f"serving work per single-image call at C={c} <= 15 us of server CPU "
                                     "(no-op model)",
                           "measured": f"{us:.0f} us ({noop['server_cpu_cores']:.2f} cores at "
                                       f"{noop['images_per_s']:.0f} calls/s)",
                           "met": us <= 15})
    # Goodput under overload: 16 images per call with four times the callers the queue holds.
    peak, over = find(rows, "fmnist", "multi16", 64), find(rows, "fmnist", "multi16", 256)
    if peak and over and peak["images_per_s"] > 0:
        ratio = over["images_per_s"] / peak["images_per_s"]
        checks.append({"target": "16 images per call: goodput at C=256 >= 90% of C=64",
                       "measured": f"{over['images_per_s']:.0f} / {peak['images_per_s']:.0f} = {ratio:.0%} "
                                   f"({over['shed']} calls refused)",
                       "met": ratio >= 0.90})
    ours_rows = [r for r in rows if r["server"] == "fmnist"]
    if ours_rows:
        top = max(r["concurrency"] for r in ours_rows)
        peaks = [r["server_peak_rss_kb"] / 1024 for r in ours_rows if r["concurrency"] == top]
        checks.append({"target": f"server peak RSS <= 150 MB at C={top:,} (every mode)",
                       "measured": f"{max(peaks):.0f} MB", "met": max(peaks) <= 150})
    return checks


def triton_ratios(rows) -> list[dict]:
    """This service's img/s over Triton's, per mode and C where both ran: ModelInfer (the same bodies) and
    Classify."""
    out = []
    for t in (r for r in rows if r["server"] == "triton"):
        oip = find(rows, "fmnist-oip", t["mode"], t["concurrency"])
        ours = find(rows, "fmnist", t["mode"], t["concurrency"])
        if oip and t["images_per_s"] > 0:
            out.append({"mode": t["mode"], "c": t["concurrency"], "triton": t["images_per_s"],
                        "oip": oip["images_per_s"], "oip_ratio": oip["images_per_s"] / t["images_per_s"],
                        "classify": ours["images_per_s"] if ours else None,
                        "classify_ratio": ours["images_per_s"] / t["images_per_s"] if ours else None})
    return out


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# Benchmark: {m['cpu']}", "",
             f"{result['date']}, {m['cpus']} CPUs ({m['hypervisor'] or 'bare metal'}), Linux {m['kernel']}, "
             f"ONNX Runtime {result['ort']}, {result['rustc']}. Measured window {result['seconds']} s after "
             f"{result['warmup']} s warm-up per row; the load generator runs on the same cores.", "",
             "## Ceiling: ONNX Runtime alone (fmnist_serve::model::Model; per batch size the better layout of one "
             "session of 2 intra-op threads or 2 sessions of 1, side by side)", "",
             "| model | batch | layout (sessions x threads) | images/s | CPU µs per image | p50 ms per run | p99 ms per run |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for r in result["ceiling"]:
        cpu = f"{r['cpu_us_per_image']:.0f}" if "cpu_us_per_image" in r else "-"
        lines.append(f"| {r['model']} | {r['batch']} | {r.get('layout', '1x2')} | {r['images_per_s']:.0f} | {cpu} | "
                     f"{r['latency_p50_ms']:.3f} | {r['latency_p99_ms']:.3f} |")
    lines += ["", "## End to end over gRPC", "",
              "C closed-loop callers over 4 HTTP/2 connections (1 for C=1). img/s = images classified per second; "
              "latency per call; batch = average images per ONNX Runtime run in the window; CPU in cores "
              "(server + load generator); peak RSS = the server's VmHWM since its start (one process per mode); "
              "shed = calls answered RESOURCE_EXHAUSTED (queue full; the caller backs off 10 ms), not counted in "
              "img/s or latency. A call counts in the window it ends in. The Triton rows' CPU and peak RSS are "
              "tritonserver's and its Python backend stub's, summed.", "",
              "| server | model | mode | C | calls/s | img/s | p50 ms | p90 ms | p99 ms | batch | CPU | server CPU µs per image | peak RSS MB | shed | errors |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["service"]:
        batch = f"{r['batch_avg']:.1f}" if r["batch_avg"] else ("per call" if r["server"] == "python" else "-")
        flag = " (disturbed)" if r.get("disturbed") else ""
        lines.append(
            f"| {r['server']} | {r['model']} | {r['mode']} | {r['concurrency']} | {r['requests_per_s']:.0f} | "
            f"{r['images_per_s']:.0f} | {ms(r['latency_p50_ms'])} | {ms(r['latency_p90_ms'])} | "
            f"{ms(r['latency_p99_ms'])} | {batch} | {r['server_cpu_cores']:.2f} + {r['loadgen_cpu_cores']:.2f} | "
            f"{r['server_cpu_cores'] / r['images_per_s'] * 1e6 if r['images_per_s'] else 0:.0f} | "
            f"{r['server_peak_rss_kb'] / 1024:.0f} | {r.get('shed', 0)} | {r['errors']}{flag} |")
    lines += ["", "Servers: " + "; ".join(f"`{k}` = {v}" for k, v in result["servers"].items())]
    for key, why in result.get("skipped", {}).items():
        lines += ["", f"Skipped `{key}`: {why}"]
    vs = triton_ratios(result["service"])
    if vs:
        version = result.get("triton_version")
        lines += ["", f"## This service vs Triton{f' {version}' if version else ''} (Python backend + ORT)", "",
                  "img/s of this service over Triton's, same run; ModelInfer = the very bodies Triton gets.", "",
                  "| mode | C | Triton img/s | ModelInfer img/s | ratio | Classify img/s | ratio |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for v in vs:
            cl = (f"{v['classify']:.0f} | {v['classify_ratio']:.2f}x" if v["classify"] else "- | -")
            lines.append(f"| {v['mode']} | {v['c']} | {v['triton']:.0f} | {v['oip']:.0f} | {v['oip_ratio']:.2f}x | "
                         f"{cl} |")
    lines += ["", "## Targets (ratios from this run)", "", "| target | measured | met |", "|---|---|---|"]
    for t in result["targets"]:
        lines.append(f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else '**no**'} |")
    if result.get("criterion"):
        lines += ["", "## Preprocessing and validation (criterion, benches/preprocess.rs)", "",
                  "| benchmark | median µs |", "|---|---:|"]
        for r in result["criterion"]:
            lines.append(f"| {r['group']}/{r['name']} | {r['median_us']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0, help="measured window per row")
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--quick", action="store_true", help="2 s windows, C = 1 and 64 only, no criterion")
    ap.add_argument("--servers", default="fmnist,fmnist-oip,fmnist-int8,fmnist-noop,python,mlserver,triton")
    ap.add_argument("--modes", default="raw,png,multi16,multi64")
    ap.add_argument("--concurrency", default="1,8,64,256,1024")
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--ceiling-batches", default="1,8,16,32,64,128")
    ap.add_argument("--ceiling-seconds", type=float, default=2.0)
    ap.add_argument("--ceiling-repeats", type=int, default=3, help="best of N per batch size")
    ap.add_argument("--ceiling-into", type=Path,
                    help="measure only the ceiling again into this results JSON (recomputes targets and tables)")
    ap.add_argument("--criterion-seconds", type=float, default=2.0)
    ap.add_argument("--no-criterion", action="store_true")
    ap.add_argument("--python-workers", type=int, default=8)
    ap.add_argument("--mlserver-batch", type=int, default=64)
    ap.add_argument("--mlserver-batch-time-ms", type=float, default=2.0)
    ap.add_argument("--triton-venv", type=Path, default=BENCH / ".venv-triton",
                    help="the venv with nvidia-pytriton 0.7.0 (bench/run.sh makes it)")
    ap.add_argument("--triton-batch", type=int, default=TRITON_BATCH, help="Triton's max_batch_size")
    ap.add_argument("--triton-delay-us", type=int, default=TRITON_DELAY_US,
                    help="Triton's dynamic_batching max_queue_delay_microseconds")
    ap.add_argument("--triton-threads", type=int, default=TRITON_THREADS, help="onnxruntime intra-op threads in the Triton model")
    ap.add_argument("--retries", type=int, default=2)
    ap.add_argument("--max-foreign-cores", type=float, default=0.15,
                    help="CPU other processes may take during a window before it is measured again")
    ap.add_argument("--serve-args", default="", help="extra flags for `fmnist serve` (experiments)")
    ap.add_argument("--out", type=Path, default=BENCH / "results")
    ap.add_argument("--name", help="results file name (default: the CPU model)")
    a = ap.parse_args()
    if a.quick:
        a.seconds, a.concurrency, a.no_criterion, a.ceiling_seconds = 2.0, "1,64", True, 1.5
    if a.ceiling_into:
        result = json.loads(a.ceiling_into.read_text())
        batches = [int(b) for b in a.ceiling_batches.split(",")]
        result["ceiling"] = [r for m in dict.fromkeys(r["model"] for r in result["ceiling"])
                             for r in ceiling(m, batches, a.ceiling_seconds, 2, repeats=a.ceiling_repeats)]
        result["targets"] = targets(result)
        a.ceiling_into.write_text(json.dumps(result, indent=1) + "\n")
        a.ceiling_into.with_suffix(".md").write_text(markdown(result))
        print(markdown(result))
        return 0
    concurrencies = [int(c) for c in a.concurrency.split(",")]
    modes = a.modes.split(",")
    TMP.mkdir(parents=True, exist_ok=True)
    started = time.time()

    cpu = lscpu()
    has_int8 = (REPO / "models/cnn-int8/1/model.json").exists()
    models = ["cnn"] + (["cnn-int8"] if has_int8 else [])
    subprocess.run([sys.executable, str(BENCH / "encode_requests.py"), "--out", str(TMP / "bodies"),
                    *sum((["--model", m] for m in models), [])], check=True)

    serve_extra = a.serve_args.split()
    registry = {
        "fmnist": Fmnist("fmnist", "this service, `fmnist serve` defaults", "cnn", serve_extra),
        "fmnist-oip": Fmnist("fmnist-oip", "this service over the Open Inference Protocol (ModelInfer, the bodies "
                             "MLServer gets)", "cnn", serve_extra, protocol="oip"),
        "fmnist-int8": Fmnist("fmnist-int8", "this service, requests naming model cnn-int8", "cnn-int8",
                              ["--models", "cnn,cnn-int8,dense"] + serve_extra),
        # The serving work alone: the same path and bodies, a model ORT runs in microseconds (bench/noop_model.py).
        "fmnist-noop": Fmnist("fmnist-noop", "this service with a no-op model of cnn's contract (bench/noop-models): "
                              "its CPU per call is the serving work", "cnn",
                              ["--models-dir", str(BENCH / "noop-models"), "--models", "cnn",
                               "--default-model", "cnn"] + serve_extra),
        "python": PythonPeer(a.python_workers),
        "mlserver": MLServerPeer(a.mlserver_batch, a.mlserver_batch_time_ms / 1e3),
        "triton": TritonPeer(a.triton_venv.resolve(), a.triton_batch, a.triton_delay_us, a.triton_threads),
    }
    wanted = [s for s in a.servers.split(",") if s != "fmnist-int8" or has_int8]
    skipped = {}
    for key in dict.fromkeys(wanted):
        why = registry[key].unavailable()
        if why:
            print(f"skipping {key} ({registry[key].label}): {why}", flush=True)
            skipped[key] = why
    wanted = [s for s in wanted if s not in skipped]

    ort_version = subprocess.run([sys.executable, "-c", "import onnxruntime; print(onnxruntime.__version__)"],
                                 capture_output=True, text=True).stdout.strip()
    result = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu["Model name"], "cpus": cpu["CPU(s)"], "hypervisor": cpu["Hypervisor vendor"],
                    "kernel": platform.release(), "lscpu": cpu},
        "ort": ort_version,
        "rustc": subprocess.run(["rustc", "--version"], capture_output=True, text=True).stdout.strip(),
        "seconds": a.seconds, "warmup": a.warmup, "connections": a.connections,
        "servers": {k: registry[k].label for k in wanted},
        "ceiling": [], "service": [],
    }
    if skipped:
        result["skipped"] = skipped
    print(f"ceiling ({cpu['Model name']}, {cpu['CPU(s)']} CPUs)", flush=True)
    batches = [int(b) for b in a.ceiling_batches.split(",")]
    for model in models:
        result["ceiling"] += ceiling(model, batches, a.ceiling_seconds, 2, repeats=a.ceiling_repeats)
    print("end to end", flush=True)
    for key in wanted:
        result["service"] += measure(registry[key], modes, concurrencies, a)
        if key == "triton" and registry[key].version:
            result["triton_version"] = registry[key].version
    if not a.no_criterion:
        print("criterion", flush=True)
        result["criterion"] = criterion(a)
    result["targets"] = targets(result)
    result["elapsed_s"] = round(time.time() - started)

    a.out.mkdir(parents=True, exist_ok=True)
    name = a.name or slug(cpu["Model name"] or "")
    (a.out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (a.out / f"{name}.md").write_text(markdown(result))
    print(f"\n{markdown(result)}\nwritten {a.out / name}.json and .md in {result['elapsed_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
