"""Scale-out on loopback: replicas of the release server under load from real grpcio clients.

Test A (spread): 3 replicas behind a per-connection balancer, the way a ClusterIP Service balances (kube-proxy in
IPVS round-robin mode). Clients keep one HTTP/2 connection each, as gRPC clients do, so only the server's
connection age (GOAWAY at --max-connection-age-s) moves them: the calls each replica answers (its own /metrics)
are within 15% of an even share, and a 4th replica added later reaches its share within one connection age.

Test A' (per call): clients that balance per call (clients/python/classify.py's channel over every replica, as over
a headless Service) spread their calls within 15% of even.

Test B (drain): SIGTERM one of 3 replicas under per-call-balanced load: the clients move to the other two, with no
failed call, and the replica exits 0.

Every call of every test must succeed. Run by tests/scale_out.sh (part of make test).
"""

import asyncio
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "clients" / "python"))
import classify as client  # noqa: E402  the example client: its channel is what users copy
from fashion_mnist.v1 import classifier_pb2 as pb  # noqa: E402
from fashion_mnist.v1 import classifier_pb2_grpc as pb_grpc  # noqa: E402

AGE_S = 3.0  # --max-connection-age-s of every replica; each process draws its own within +-10%
TOLERANCE = 0.15  # per-replica calls within 15% of an even share
CONNECTIONS = 36  # client connections through the balancer: enough that one moving connection is ~3% of a share
# The first test-set image of the committed fixture, as raw 28x28 pixels, and its label.
IMAGE = pb.Image(raw=(ROOT / "tests/fixtures/test-images.u8").read_bytes()[:784])
LABEL = (ROOT / "tests/fixtures/test-labels.u8").read_bytes()[0]


def fail(message):
    print(f"FAIL: {message}")
    sys.exit(1)


def ok(message):
    print(f"ok - {message}")


class Replica:
    """One release-server process on ephemeral ports, serving the CNN."""

    def __init__(self, name):
        self.name = name
        self.log = tempfile.NamedTemporaryFile(prefix=f"fmnist-{name}-", suffix=".log", delete=False)
        self.process = subprocess.Popen(
            [str(ROOT / "target/release/fmnist"), "serve", "--listen", "127.0.0.1:0", "--metrics-listen",
             "127.0.0.1:0", "--models-dir", str(ROOT / "models"), "--models", "cnn", "--default-model", "cnn",
             "--model-poll-s", "0", "--ort-threads", "1", "--max-connection-age-s", str(int(AGE_S)),
             "--drain-timeout-s", "10"],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, env={"RUST_LOG": "info", "PATH": "/usr/bin:/bin"})
        self.grpc = self.metrics = None

    def wait_serving(self):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            text = Path(self.log.name).read_text()
            if "serving" in text.split("listening", 1)[-1]:
                self.grpc = re.search(r"grpc=([0-9.:]+)", text).group(1)
                self.metrics = re.search(r"metrics=([0-9.:]+)", text).group(1)
                return self
            if self.process.poll() is not None:
                fail(f"{self.name} exited: {text}")
            time.sleep(0.05)
        fail(f"{self.name} not serving after 60 s")

    def answered(self):
        """Classify calls this replica answered with OK, from its own /metrics."""
        with urllib.request.urlopen(f"http://{self.metrics}/metrics", timeout=5) as r:
            text = r.read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("fmnist_requests_total{") and 'rpc="Classify"' in line and 'code="Ok"' in line)

    def connections(self):
        """gRPC connections this replica holds now, from its own /metrics."""
        with urllib.request.urlopen(f"http://{self.metrics}/metrics", timeout=5) as r:
            text = r.read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("fmnist_connections_open "))

    def log_text(self):
        return Path(self.log.name).read_text()

    def stop(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        Path(self.log.name).unlink(missing_ok=True)


class ConnectionBalancer:
    """A TCP balancer that places each new connection on the next backend, round-robin, and leaves it there for the
    connection's life: what kube-proxy does for a ClusterIP Service (in IPVS rr mode), which cannot run here."""

    def __init__(self):
        self.backends, self._next = [], 0
        self.placed = {}
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        threading.Thread(target=self._run, args=(ready,), daemon=True).start()
        ready.wait()

    def _run(self, ready):
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._connection, "127.0.0.1", 0))
        self.addr = "127.0.0.1:%d" % self.server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    def add(self, backend):
        self.loop.call_soon_threadsafe(self.backends.append, backend)

    async def _connection(self, reader, writer):
        backend = self.backends[self._next % len(self.backends)]
        self._next += 1
        self.placed[backend] = self.placed.get(backend, 0) + 1
        host, port = backend.rsplit(":", 1)
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(host, int(port))
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer))

    @staticmethod
    async def _pipe(reader, writer):
        try:
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()


class Load:
    """Closed-loop callers, each on its own channel, sending one raw test image per call until stopped."""

    def __init__(self, channels):
        self.channels = channels
        self.calls = 0
        self.failures = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(c,), daemon=True) for c in channels]
        for t in self.threads:
            t.start()

    def _run(self, channel):
        stub = pb_grpc.ClassifierStub(channel)
        request = pb.ClassifyRequest(images=[IMAGE])
        while not self._stop.is_set():
            try:
                response = stub.Classify(request, timeout=10)
                assert response.results[0].prediction.class_id == LABEL, response
                with self._lock:
                    self.calls += 1
            except grpc.RpcError as e:
                with self._lock:
                    self.failures.append(f"{e.code().name}: {e.details()}")

    def stop(self):
        self._stop.set()
        for t in self.threads:
            t.join()
        for c in self.channels:
            c.close()


def answered_during(replicas, seconds):
    before = [r.answered() for r in replicas]
    time.sleep(seconds)
    return [r.answered() - b for r, b in zip(replicas, before)]


def held_during(replicas, seconds):
    """The connections each replica held, averaged over `seconds`: where the balancer put the clients, which
    does not depend on how fast each replica gets the CPU (calls answered do, on a busy machine: issue #37)."""
    samples, until = [], time.monotonic() + seconds
    while time.monotonic() < until:
        samples.append([r.connections() for r in replicas])
        time.sleep(0.2)
    return [sum(column) / len(samples) for column in zip(*samples)]


def check_even(counts, what, unit="calls"):
    mean = sum(counts) / len(counts)
    worst = max(abs(c - mean) / mean for c in counts) if mean else 1.0
    shown = ", ".join(f"{c:.1f}" if unit == "connections" else f"{c:.0f}" for c in counts)
    if worst > TOLERANCE:
        fail(f"{what}: {unit} per replica {shown}: {worst:.0%} off an even share (allowed {TOLERANCE:.0%})")
    ok(f"{what}: {unit} per replica {shown}, at most {worst:.1%} off an even share")
    return worst


def info_calls(replicas, before):
    """The calls each replica answered since `before`: shown, not checked (they follow the CPU each replica
    got as much as the connections it held)."""
    now = [r.answered() for r in replicas]
    print(f"   (calls answered meanwhile per replica: {', '.join(f'{n - b:.0f}' for n, b in zip(now, before))})",
          flush=True)


def test_spread_through_a_connection_balancer(replicas):
    balancer = ConnectionBalancer()
    for r in replicas[:3]:
        balancer.add(r.grpc)
    # Own subchannel pools: otherwise grpc-core shares one connection among channels with the same target.
    channels = [grpc.insecure_channel(balancer.addr, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(CONNECTIONS)]
    load = Load(channels)
    time.sleep(1.0)
    calls = [r.answered() for r in replicas[:3]]
    check_even(held_during(replicas[:3], 2 * AGE_S), f"A: {CONNECTIONS} connections through a per-connection balancer "
               "(held, averaged over two connection ages)", unit="connections")
    info_calls(replicas[:3], calls)

    # A replica added now gets only new connections: the existing ones reach it once their age sends them back
    # through the balancer. Within one age (+10% jitter) every connection has been renewed.
    replicas[3].wait_serving()
    balancer.add(replicas[3].grpc)
    added = time.monotonic()
    time.sleep(AGE_S * 1.1 + 0.3)
    within = time.monotonic() - added
    calls = [r.answered() for r in replicas]
    counts = held_during(replicas, 2 * AGE_S)
    info_calls(replicas, calls)
    load.stop()
    check_even(counts, f"A: a 4th replica, {within:.1f} s (one connection age) after it was added (held, averaged)",
               unit="connections")
    if load.failures:
        fail(f"A: {len(load.failures)} of {load.calls + len(load.failures)} calls failed: {load.failures[:3]}")
    ok(f"A: {load.calls} calls, 0 failed, {sum(balancer.placed.values())} connections placed "
       f"({', '.join(str(balancer.placed.get(r.grpc, 0)) for r in replicas)} per replica)")


def test_per_call_balancing_and_drain(replicas):
    three = replicas[:3]
    target = ",".join(r.grpc for r in three)
    load = Load([client.open_channel(target) for _ in range(4)])
    time.sleep(0.5)
    check_even(answered_during(three, 2.0), "A': 4 clients balancing per call over 3 replicas")

    draining = three[0]
    draining.process.send_signal(signal.SIGTERM)
    stopped = time.monotonic()
    try:
        status = draining.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        fail(f"B: the SIGTERMed replica still runs after 15 s: {draining.log_text()}")
    drained_in = time.monotonic() - stopped
    after = answered_during(three[1:], 2.0)
    load.stop()
    if status != 0:
        fail(f"B: the SIGTERMed replica exited {status}: {draining.log_text()}")
    if min(after) == 0:
        fail(f"B: after the drain, calls per remaining replica {after}")
    if load.failures:
        fail(f"B: {len(load.failures)} of {load.calls + len(load.failures)} calls failed during the drain: "
             f"{load.failures[:3]}")
    ok(f"B: SIGTERM under load: the replica drained and exited 0 in {drained_in:.1f} s, the other two took "
       f"{after[0]:.0f} and {after[1]:.0f} calls in the next 2 s; {load.calls} calls, 0 failed")


def main():
    replicas = [Replica(f"replica-{i}") for i in range(4)]
    try:
        for r in replicas[:3]:
            r.wait_serving()
        test_spread_through_a_connection_balancer(replicas)
        test_per_call_balancing_and_drain(replicas)
    finally:
        for r in replicas:
            r.stop()


if __name__ == "__main__":
    main()
