#!/usr/bin/env python3
"""Hostile clients, round 2 (issue #27): each attack of the issue against the release binary, with its default
settings, on loopback, and whether the server held (scripts/attacks/README.md has the criteria and the BEFORE
table).

Each case starts a fresh server (ephemeral ports, `memory_budget=` read from its log), then, while the attack
runs, a polite caller (one Classify of tests/fixtures/png/ankle-boot-0.png every 0.5 s, each on its own
connection, 2 s deadline) and a health probe (GET /v2/health/live every 0.5 s, new connection, 2 s timeout).
A case passes when the server's peak RSS (VmHWM) stays within its logged memory budget, the polite caller is
served on >= 95 % of its calls, every health probe answers within 2 s, the server is still running, and the
case's own checks hold. One summary line per case.

    python3 scripts/attacks/round2.py --list
    python3 scripts/attacks/round2.py --case slowloris [--case ...] [--hold 45]
    python3 scripts/attacks/round2.py --all [--quick] [--json out.json] [--markdown]

$ROUND2_RUST_LOG, when set, is the server's RUST_LOG (default info), e.g. "info,fmnist_serve::transport=debug" to
see every handshake evicted. The binary is $FMNIST_BIN, else --bin, else target/release/fmnist (`make build`); ONNX Runtime from .ort/
(`make ort`), as tests/lib/server.sh runs it. Standard library only: HTTP/2, HPACK and protobuf are hand-made
(wire.py).
"""

import argparse
import json
import os
import re
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import wire  # noqa: E402
from wire import H2, MiB, grpc_frame, grpc_messages, pb_bytes, pb_fields, pb_varint, varint  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
LIMIT = 16 * MiB  # --max-message-bytes and the REST body limit, at their defaults
CLASSIFY = "/fashion_mnist.v1.Classifier/Classify"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
INFER_REST = "/v2/models/cnn/infer"
POLITE_PNG = os.path.join(ROOT, "tests/fixtures/png/ankle-boot-0.png")

# --------------------------------------------------------------------------------------------------------------
# The server


class Server:
    """The binary under test, as tests/lib/server.sh starts it: ephemeral ports, RUST_LOG=info, the FP32 model
    as default (so answers do not depend on the CPU), run from the repository root (models/, .ort/). No other
    FMNIST_* variable reaches it: every case runs the binary's defaults unless it says otherwise."""

    def __init__(self, binary, args, log_dir):
        self.log_path = os.path.join(log_dir, "server.log")
        env = {k: v for k, v in os.environ.items() if not k.startswith("FMNIST_")}
        env.update(RUST_LOG=os.environ.get("ROUND2_RUST_LOG", "info"), FMNIST_DEFAULT_MODEL="cnn")
        self.log = open(self.log_path, "wb")
        cmd = [binary, "serve", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", *args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while True:
            text = self.read_log()
            if re.search(r"\bserving\b", text):
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server did not start ({' '.join(cmd)}):\n{text[-3000:]}")
            time.sleep(0.1)
        self.addr = self._addr(r"grpc=([0-9.]+):(\d+)", text)
        self.metrics_addr = self._addr(r"metrics=([0-9.]+):(\d+)", text)
        budget = re.search(r"memory_budget=(\d+) MiB", text)
        self.budget_mib = int(budget.group(1)) if budget else None

    @staticmethod
    def _addr(pattern, text):
        m = re.search(pattern, text)
        if not m:
            raise RuntimeError(f"no address in the server log:\n{text[-3000:]}")
        return (m.group(1), int(m.group(2)))

    def read_log(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def log_size(self):
        return os.path.getsize(self.log_path)

    def _status_kb(self, key):
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        return int(line.split()[1])
        except OSError:
            return None
        return None

    def rss_mib(self):
        kb = self._status_kb("VmRSS")
        return None if kb is None else kb / 1024

    def peak_mib(self):
        kb = self._status_kb("VmHWM")
        return None if kb is None else kb / 1024

    def alive(self):
        return self.proc.poll() is None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.log.close()


# --------------------------------------------------------------------------------------------------------------
# Requests


def classify_png_message(png):
    return pb_bytes(1, pb_bytes(1, png))


def grpc_call(addr, path, message, timeout, headers=()):
    """One unary call on a new connection: (grpc-status or None, Stream or None, seconds, error)."""
    t0 = time.monotonic()
    conn = None
    try:
        conn = H2(addr, timeout=timeout, keep_data=True, connect_timeout=timeout)
    except OSError as e:  # refused, or not even the TCP handshake within the timeout (accept queue full)
        return None, None, time.monotonic() - t0, "connect " + type(e).__name__
    try:
        deadline = t0 + timeout
        sid = conn.request(path, grpc_frame(message), headers=headers, deadline=deadline)
        conn.wait(sid, deadline)
        st = conn.streams[sid]
        return st.grpc_status(), st, time.monotonic() - t0, None if st.ended else "no answer"
    except (OSError, EOFError, wire.H2Error, ValueError, IndexError) as e:
        return None, None, time.monotonic() - t0, type(e).__name__
    finally:
        if conn is not None:
            conn.close()


def http1_post(addr, path, body, timeout, content_type="application/json"):
    """A POST on a new HTTP/1.1 connection: (status or None, headers, body, seconds, error)."""
    t0 = time.monotonic()
    head = (f"POST {path} HTTP/1.1\r\nHost: fmnist\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    try:
        with socket.create_connection(addr, timeout=timeout) as s:
            try:
                s.sendall(head)
                s.sendall(body)
            except OSError:
                pass  # answered (and closed) before the body was all sent: read the answer
            buf = bytearray()
            deadline = t0 + timeout
            while b"\r\n\r\n" not in buf and time.monotonic() < deadline:
                s.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
            head_bytes, _, rest = bytes(buf).partition(b"\r\n\r\n")
            lines = head_bytes.split(b"\r\n")
            status = int(lines[0].split()[1]) if lines[0].startswith(b"HTTP/") else None
            headers = {}
            for line in lines[1:]:
                k, _, v = line.partition(b":")
                headers[k.strip().lower().decode()] = v.strip().decode(errors="replace")
            return status, headers, rest, time.monotonic() - t0, None if status else "no answer"
    except (OSError, ValueError, IndexError) as e:
        return None, {}, b"", time.monotonic() - t0, type(e).__name__


def count(values):
    out = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return ", ".join(f"{k}: {n}" for k, n in sorted(out.items(), key=lambda kv: str(kv[0])))


def run_threads(targets):
    threads = [threading.Thread(target=t, daemon=True) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def run_for_hold(ctx, worker, n):
    """`n` threads of `worker`, which loops until ctx.stop is set: set after --hold seconds."""
    def stop_after_hold():
        ctx.stop.wait(ctx.args.hold)
        ctx.stop.set()

    run_threads([worker] * n + [stop_after_hold])


# --------------------------------------------------------------------------------------------------------------
# The probes that run beside every attack


class Probes:
    def __init__(self, server, args):
        self.server, self.args = server, args
        self.stop_event = threading.Event()
        self.polite, self.health, self.rss = [], [], []
        self.workers = []
        self.lock = threading.Lock()
        self.polite_message = classify_png_message(open(args.png, "rb").read())

    def start(self):
        self.loops = [threading.Thread(target=f, daemon=True) for f in (self._polite_loop, self._health_loop,
                                                                        self._monitor_loop)]
        for t in self.loops:
            t.start()

    def stop(self):
        self.stop_event.set()
        for t in self.loops:
            t.join()
        for t in list(self.workers):
            t.join()

    def _spawn(self, target):
        t = threading.Thread(target=target, daemon=True)
        t.start()
        with self.lock:
            self.workers.append(t)

    def _polite_loop(self):
        while not self.stop_event.is_set():
            self._spawn(self._polite_one)
            self.stop_event.wait(self.args.polite_interval)

    def _polite_one(self):
        deadline = self.args.polite_deadline
        status, st, seconds, error = grpc_call(
            self.server.addr, CLASSIFY, self.polite_message, deadline + 1.0,
            headers=[("grpc-timeout", f"{int(deadline * 1000)}m")])
        served = False
        if status == "0" and st is not None:
            messages = grpc_messages(st.data)
            served = bool(messages) and any(f == 1 for f, _, _ in pb_fields(messages[0]))
        why = "ok" if served else (error or f"grpc-status {status}")
        with self.lock:
            self.polite.append((served, seconds, why))

    def _health_loop(self):
        while not self.stop_event.is_set():
            self._spawn(self._health_one)
            self.stop_event.wait(self.args.health_interval)

    def _health_one(self):
        request = b"GET /v2/health/live HTTP/1.1\r\nHost: fmnist\r\nConnection: close\r\n\r\n"
        timeout = self.args.health_timeout
        try:
            status, _, _, seconds = wire.http1_exchange(self.server.addr, request, timeout, read_body=False)
            ok = status == 200 and seconds <= timeout
        except OSError:
            ok, seconds = False, timeout
        with self.lock:
            self.health.append((ok, min(seconds, timeout)))

    def _monitor_loop(self):
        while not self.stop_event.is_set():
            rss = self.server.rss_mib()
            if rss is not None:
                self.rss.append(rss)
            self.stop_event.wait(0.2)


# --------------------------------------------------------------------------------------------------------------
# The attacks. Each gets a context (server, args, stop event) and returns a dict: `notes` (a line for the
# summary) and `checks` ([(name, ok, detail)]), the case's own criteria beside memory, polite caller and health.


def padded_json(head, element, tail, size=LIMIT):
    """head + element,element,...,element + tail, padded with spaces to exactly `size` bytes; and the count."""
    n = (size - len(head) - len(tail) + 1) // (len(element) + 1)
    body = head + b",".join([element] * n) + tail
    return body + b" " * (size - len(body)), n


def rest_rounds(ctx, body, at_once, rounds):
    results = []

    def one():
        status, headers, _, seconds, error = http1_post(ctx.server.addr, INFER_REST, body, timeout=120)
        results.append((status or error, seconds))

    for _ in range(rounds):
        run_threads([one] * at_once)
    statuses = count(r[0] for r in results)
    slowest = max(r[1] for r in results)
    return {"notes": f"{len(results)} calls ({statuses}), slowest {slowest:.1f} s", "checks": []}


def case_rest_nested_json(ctx):
    body, n = padded_json(b'{"inputs":[{"name":"raw","datatype":"UINT8","shape":[1,28,28],"data":[', b"[0]",
                          b"]}]}")
    return rest_rounds(ctx, body, at_once=4, rounds=3)


def case_rest_flat_json(ctx):
    body, n = padded_json(b'{"inputs":[{"name":"image","datatype":"FP32","shape":[1,1,28,28],"data":[', b"0",
                          b"]}]}")
    return rest_rounds(ctx, body, at_once=4, rounds=1)


def packed(values):
    return b"".join(varint(v) for v in values)


def infer_tensor(name, datatype, shape_bytes, contents=None):
    t = pb_bytes(1, name) + pb_bytes(2, datatype) + pb_bytes(3, shape_bytes)
    if contents is not None:
        t += pb_bytes(5, contents)
    return t


def grpc_concurrent(ctx, path, message, connections, per_connection, timeout=120):
    """`connections` connections, each sending `per_connection` copies of `message` at once; returns
    [(grpc-status or error, Stream or None, seconds)]."""
    results = []
    body = grpc_frame(message)

    def one_connection():
        t0 = time.monotonic()
        conn = None
        try:
            conn = H2(ctx.server.addr, timeout=timeout)
            sids = [conn.request(path, body, deadline=t0 + timeout) for _ in range(per_connection)]
            conn.wait(sids, t0 + timeout)
            for sid in sids:
                st = conn.streams[sid]
                results.append((st.grpc_status() or ("reset" if st.reset is not None else "no answer"), st,
                                time.monotonic() - t0))
        except (OSError, EOFError, wire.H2Error) as e:
            results.append((type(e).__name__, None, time.monotonic() - t0))
        finally:
            if conn is not None:
                conn.close()

    run_threads([one_connection] * connections)
    return results


GRPC_CODES = {"0": "OK", "1": "CANCELLED", "3": "INVALID_ARGUMENT", "4": "DEADLINE_EXCEEDED",
              "8": "RESOURCE_EXHAUSTED", "13": "INTERNAL", "14": "UNAVAILABLE"}


def grpc_notes(results):
    statuses = count(GRPC_CODES.get(r[0], r[0]) for r in results)
    return f"{len(results)} calls ({statuses}), slowest {max(r[2] for r in results):.1f} s"


def case_grpc_empty_bytes(ctx):
    n = 8_000_000
    tensor = infer_tensor(b"encoded", b"BYTES", packed([n]), pb_bytes(8, b"") * n)
    message = pb_bytes(1, b"cnn") + pb_bytes(5, tensor)
    assert len(message) <= LIMIT
    results = grpc_concurrent(ctx, MODEL_INFER, message, connections=4, per_connection=1)
    return {"notes": f"{n:,} empty BYTES elements, {len(message) / MiB:.1f} MiB: " + grpc_notes(results),
            "checks": []}


def fill_to_limit(build):
    """build(k) -> message growing by one byte per k; the largest k whose message fits the limit (64 bytes
    spare for the varint lengths)."""
    k = LIMIT - 64 - len(build(0))
    while len(build(k)) > LIMIT - 16:
        k -= 1
    return build(k)


def echo_checks(ctx, results, log_before):
    calls = len(results)
    log_bytes = ctx.server.log_size() - log_before
    per_call = log_bytes / max(calls, 1)
    lengths = [r[1].header("grpc-message") for r in results if r[1] is not None]
    lengths = [h for h in lengths if h is not None]
    longest = max(lengths, key=lambda h: h.length) if lengths else None
    header_bytes = max((r[1].header_bytes for r in results if r[1] is not None), default=0)
    msg_len = longest.length if longest else 0
    approx = "" if (longest is None or longest.exact) else "~"
    notes = (f"{grpc_notes(results)}; log {per_call / 1024:,.1f} KiB per call; longest grpc-message "
             f"{approx}{msg_len:,} bytes (header block {header_bytes:,} bytes on the wire)")
    checks = [
        ("log per call <= %d KiB" % (ctx.args.max_log_per_call // 1024), per_call <= ctx.args.max_log_per_call,
         f"{per_call:,.0f} bytes"),
        ("grpc-message <= %d bytes" % ctx.args.max_grpc_message, msg_len <= ctx.args.max_grpc_message,
         f"{approx}{msg_len:,} bytes"),
    ]
    return {"notes": notes, "checks": checks}


def case_grpc_huge_shape(ctx):
    # The raw input's shape as 16 MiB of packed 1s: 16.7 million dimensions, no pixels.
    message = fill_to_limit(lambda k: pb_bytes(1, b"cnn") + pb_bytes(5, infer_tensor(b"raw", b"UINT8", b"\x01" * k)))
    log_before = ctx.server.log_size()
    results = grpc_concurrent(ctx, MODEL_INFER, message, connections=4, per_connection=2)
    return echo_checks(ctx, results, log_before)


def case_grpc_huge_param(ctx):
    # A valid one-image call whose `min_confidence` parameter is a 16 MiB string.
    pixels = bytes(784)
    tensor = infer_tensor(b"raw", b"UINT8", packed([1, 28, 28]))

    def build(k):
        param = pb_bytes(1, b"min_confidence") + pb_bytes(2, pb_bytes(3, b"x" * k))
        return pb_bytes(1, b"cnn") + pb_bytes(4, param) + pb_bytes(5, tensor) + pb_bytes(7, pixels)

    message = fill_to_limit(build)
    log_before = ctx.server.log_size()
    results = grpc_concurrent(ctx, MODEL_INFER, message, connections=4, per_connection=2)
    return echo_checks(ctx, results, log_before)


def case_classify_empty_images(ctx):
    n = 8_000_000
    message = pb_bytes(1, b"") * n
    results = grpc_concurrent(ctx, CLASSIFY, message, connections=3, per_connection=1)
    return {"notes": f"{n:,} empty images, {len(message) / MiB:.1f} MiB: " + grpc_notes(results), "checks": []}


def run_holders(ctx, n, one, sent_all, release):
    """Runs `one` on `n` threads that open their streams and then hold them (`hold_streams`): waits until all
    have sent, notes the server's peak, holds for --hold seconds and lets them go. The seconds the sending took
    and the peak RSS (MiB) when all had sent."""
    threads = [threading.Thread(target=one, daemon=True) for _ in range(n)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    try:
        sent_all.wait(timeout=180)
    except threading.BrokenBarrierError:
        pass
    send_s = time.monotonic() - t0
    peak_sending = ctx.server.peak_mib()
    ctx.stop.wait(ctx.args.hold)
    release.set()
    for t in threads:
        t.join()
    return send_s, peak_sending


def hold_streams(conn, sids, sent_all, release, stats, lock, tally):
    """The second half of a thread that opened `sids` on `conn`: waits for every thread to have sent, then
    keeps the connection alive (acknowledging the server's PINGs) until `release`; `tally(stream)` adds a
    stream's outcome to `stats` under `lock` at the end."""
    try:
        sent_all.wait()
    except threading.BrokenBarrierError:
        pass
    if conn is None:
        return
    try:
        conn.sock.settimeout(1.0)
        while not release.is_set():
            try:
                conn.pump()
            except socket.timeout:
                pass
    except (OSError, EOFError, wire.H2Error) as e:
        with lock:
            stats["errors"].append("closed by server: " + type(e).__name__)
    finally:
        with lock:
            for sid in sids:
                tally(conn.streams[sid])
            stats["pings"] += conn.pings_answered
        conn.close()


def hold_calls(ctx, connections, open_streams, tally, counters=None, **h2_options):
    """`connections` threads, each opening streams on one connection (H2 options such as receive_window=0) with
    `open_streams(conn, sids)`, which appends each stream id as it opens it, then holding them (`run_holders`);
    `tally(stats, stream)` counts each stream's outcome into the case's own `counters` (their starting values).
    Returns the stats ("opened", "errors", "pings" and the counters), the seconds the sending took and the
    server's peak RSS (MiB) when all had sent."""
    sent_all = threading.Barrier(connections + 1)
    stats = {"opened": 0, "errors": [], "pings": 0, **(counters or {})}
    lock = threading.Lock()
    release = threading.Event()

    def one():
        conn = None
        sids = []
        try:
            conn = H2(ctx.server.addr, keep_data=False, timeout=30, **h2_options)
            open_streams(conn, sids)
            with lock:
                stats["opened"] += len(sids)
        except (OSError, EOFError, wire.H2Error) as e:
            with lock:
                stats["errors"].append(type(e).__name__)
        hold_streams(conn, sids, sent_all, release, stats, lock, lambda st: tally(stats, st))

    send_s, peak_sending = run_holders(ctx, connections, one, sent_all, release)
    return stats, send_s, peak_sending


def tally_codes(stats, st):
    """A `tally` for `hold_calls`: each stream's gRPC status, by name, into stats["codes"]."""
    stats["codes"].append(GRPC_CODES.get(st.grpc_status(), st.grpc_status() or "none"))


def requests(path, body, n, end_stream=True):
    """An `open_streams` for `hold_calls`: `n` calls of `body` to `path`."""
    def open_streams(conn, sids):
        deadline = time.monotonic() + 120
        for _ in range(n):
            sids.append(conn.request(path, body, end_stream=end_stream, deadline=deadline))
    return open_streams


def case_decoded_varints(ctx):
    """ModelInfer calls whose tensor holds 50,176 values (64 images' worth) as one-byte varints in
    `int64_contents`: 50 kB on the wire, up to 16 bytes each once decoded (8-byte values in a Vec that grew by
    doubling), 800 kB; prost decodes the field whatever the datatype says. Each message is whole but the end
    of its stream held back, so the server keeps the decoded message until the body grace ends; many at once,
    over connections that answer pings."""
    args = ctx.args
    pixels = 64 * 784
    contents = pb_bytes(3, bytes(pixels))  # int64_contents, packed: 0 is a one-byte varint
    tensor = infer_tensor(b"raw", b"UINT8", packed([64, 28, 28]), contents)
    body = grpc_frame(pb_bytes(1, b"cnn") + pb_bytes(5, tensor))

    stats, send_s, peak_sending = hold_calls(
        ctx, args.varint_connections, requests(MODEL_INFER, body, args.varint_streams, end_stream=False), tally_codes,
        counters={"codes": []})
    notes = (f"{args.varint_connections} conns x {args.varint_streams} streams, {len(body) / 1e3:.0f} kB each "
             f"({pixels:,} one-byte varints): {stats['opened']:,} sent in {send_s:.1f} s, peak {peak_sending:.0f} MiB "
             f"when all were sent; statuses {count(stats['codes'])}; "
             f"client errors: {count(stats['errors']) or 'none'}")
    return {"notes": notes, "checks": []}


def case_slow_reader(ctx):
    """Connections that open 100 Classify streams each and never let the server send the answers (SETTINGS
    INITIAL_WINDOW_SIZE = 0, no WINDOW_UPDATE), answering the server's keepalive pings so that nothing is idle.
    Each call: 64 uniform raw images (rejected LOW_CONTRAST, so no inference) with return_model_input: the
    largest answer the cheapest call gets, about 60 KB."""
    args = ctx.args
    images = args.slow_reader_images
    message = pb_bytes(1, pb_bytes(2, bytes(784))) * images + pb_varint(5, 1)

    def tally(stats, st):
        stats["answered"] += bool(st.header_blocks)
        stats["ended"] += st.ended

    stats, send_s, peak_sending = hold_calls(
        ctx, args.slow_reader_connections, requests(CLASSIFY, grpc_frame(message), args.slow_reader_streams), tally,
        counters={"answered": 0, "ended": 0}, receive_window=0)
    answered, ended = stats["answered"], stats["ended"]
    notes = (f"{args.slow_reader_connections} conns x {args.slow_reader_streams} streams x {images} images: "
             f"{stats['opened']:,} calls sent in {send_s:.0f} s; {answered:,} answered, {answered - ended:,} answers "
             f"held unread for {args.hold:.0f} s, {ended:,} ended (errors or resets); peak "
             f"{peak_sending:.0f} MiB when all were sent; {stats['pings']} server pings answered; "
             f"client errors: {count(stats['errors']) or 'none'}")
    return {"notes": notes, "checks": []}


def case_reflection_streams(ctx):
    """#35 row 1: reflection streams (bidirectional) whose requests carry an unknown field of 600 kB, never
    ended, their answers read; 9 connections x 12 streams, held. The server once kept every such message charged
    until its stream ended (the shared pool, 56 MiB, full), and refused every call above the small calls' reserve
    meanwhile. Read from /metrics halfway through the hold, the charge must be back under 1 MiB."""
    args = ctx.args
    message = pb_bytes(7, b"") + pb_bytes(15, bytes(600_000))  # list_services, and an unknown field
    path = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"

    def tally(stats, st):
        stats["answered"] += bool(st.header_blocks)

    held = metric_later(ctx, args.hold / 2, "fmnist_request_bytes_in_flight")
    stats, send_s, peak_sending = hold_calls(
        ctx, args.reflection_connections, requests(path, grpc_frame(message), args.reflection_streams,
                                                   end_stream=False), tally, counters={"answered": 0})
    notes = (f"{args.reflection_connections} conns x {args.reflection_streams} streams, "
             f"{len(message) / 1e3:.0f} kB request each, never ended: {stats['opened']:,} opened in {send_s:.1f} s, "
             f"{stats['answered']:,} answered; peak {peak_sending:.0f} MiB when all were sent; request bytes "
             f"charged halfway through the hold: {held['value']}; client errors: {count(stats['errors']) or 'none'}")
    # Read messages are done with: streams left open must not keep the account (64 MiB) from everyone else. The
    # polite caller's one PNG would still pass through the small calls' reserve; a call above 256 KiB would not.
    try:
        charged = float(held["value"])
    except ValueError:
        charged = None
    return {"notes": notes, "checks": [("open streams hold no request bytes (<= 1 MiB charged halfway through)",
                                        charged is not None and charged <= MiB, f"{held['value']} bytes")]}


def case_packed_zeros(ctx):
    """#35 row 2: ModelInfer with 8 inputs, each holding 50,176 packed zeros in two 64-bit content fields
    (`int64_contents`, `uint64_contents`; 803 kB on the wire, 6.4 MB once decoded), 2 connections x 40 streams,
    the end of each stream held back."""
    args = ctx.args
    zeros = bytes(64 * 784)
    tensor = infer_tensor(b"raw", b"UINT8", packed([64, 28, 28]), pb_bytes(3, zeros) + pb_bytes(5, zeros))
    body = grpc_frame(pb_bytes(1, b"cnn") + pb_bytes(5, tensor) * 8)

    stats, send_s, peak_sending = hold_calls(
        ctx, 2, requests(MODEL_INFER, body, 40, end_stream=False), tally_codes, counters={"codes": []})
    notes = (f"2 conns x 40 streams, {len(body) / 1e3:.0f} kB each: {stats['opened']:,} sent in {send_s:.1f} s, peak "
             f"{peak_sending:.0f} MiB when all were sent; statuses {count(stats['codes'])}; "
             f"client errors: {count(stats['errors']) or 'none'}")
    return {"notes": notes, "checks": []}


def case_watch_under_pressure(ctx):
    """#35 row 8, with --max-connections 8: one connection keeps a health Watch open (as client-side balancers
    do) while 7 connections that never call are reopened as soon as they are evicted, and the polite caller needs
    a slot every 0.5 s. A Watch used to count as idle from its start, so its connection was the first evicted."""
    args = ctx.args
    watch = H2(ctx.server.addr, timeout=5)
    sid = watch.request("/grpc.health.v1.Health/Watch", grpc_frame(b""))
    reopened = [0]

    def idle_holder():
        while not ctx.stop.is_set():
            try:
                conn = H2(ctx.server.addr, timeout=1)
                conn.sock.settimeout(0.5)
                while not ctx.stop.is_set():
                    try:
                        conn.pump()
                    except socket.timeout:
                        pass
            except (OSError, EOFError, wire.H2Error):
                reopened[0] += 1
                ctx.stop.wait(0.05)

    threads = [threading.Thread(target=idle_holder, daemon=True) for _ in range(7)]
    for t in threads:
        t.start()
    error = None
    deadline = time.monotonic() + args.hold
    watch.sock.settimeout(0.5)
    try:
        while time.monotonic() < deadline and not watch.streams[sid].ended:
            try:
                watch.pump()
            except socket.timeout:
                pass
    except (OSError, EOFError, wire.H2Error) as e:
        error = type(e).__name__
    ctx.stop.set()
    for t in threads:
        t.join()
    st = watch.streams[sid]
    open_at_end = error is None and not st.ended
    messages = len(grpc_messages(st.data)) if st.data else 0
    watch.close()
    notes = (f"Watch held {args.hold:.0f} s beside 7 idle connections (evicted and reopened {reopened[0]:,} times): "
             f"{messages} health message(s) received, stream {'open' if open_at_end else 'ended'} at the end; "
             f"connection error: {error or 'none'}")
    return {"notes": notes, "checks": [("the Watch's connection kept", open_at_end, error or ("open" if open_at_end
                                                                                              else "stream ended"))]}


def tls_files():
    """A self-signed certificate for localhost and its key, made once per run with openssl: (cert, key)."""
    if not hasattr(tls_files, "paths"):
        folder = tempfile.mkdtemp(prefix="round2-tls-")
        cert, key = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-keyout", key, "-out", cert, "-days", "1", "-subj", "/CN=localhost",
                        "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
        tls_files.paths = (cert, key)
    return tls_files.paths


def case_tls_silent_sockets(ctx):
    """#35 row 5, with TLS on and --max-connections 8: 8 TCP sockets that connect and never start their TLS
    handshake, reopened as soon as they are closed, for --hold seconds. Every polite call (a new TLS connection
    each) needs one of the 8 slots: a handshake that does not start must be evictable (it once waited 9.5 s, and
    an established client was evicted instead)."""
    args = ctx.args
    opened = [0]

    def silent():
        while not ctx.stop.is_set():
            try:
                with socket.create_connection(ctx.server.addr, timeout=5) as s:
                    opened[0] += 1
                    s.settimeout(0.5)
                    while not ctx.stop.is_set():
                        try:
                            if not s.recv(1024):
                                break  # closed by the server: open another
                        except socket.timeout:
                            pass
            except OSError:
                ctx.stop.wait(0.05)

    run_for_hold(ctx, silent, 8)
    return {"notes": f"8 silent TCP sockets for {args.hold:.0f} s, {opened[0]:,} opened in all (each closed by the "
                     "server and reopened)", "checks": []}


def case_many_instances(ctx):
    """#35 row 9, with --instances 8 --ort-threads 1: the process loads 8 sessions of each model (it idled at 312
    MiB while the logged budget stayed 712 MiB, as if one were loaded). 16 callers keep every instance busy with
    64-image calls; the budget must name its model-sessions term and hold the peak."""
    args = ctx.args
    message = pb_bytes(1, pb_bytes(1, open(args.png, "rb").read())) * 64
    codes, lock = [], threading.Lock()

    def one():
        while not ctx.stop.is_set():
            status, _, _, error = grpc_call(ctx.server.addr, CLASSIFY, message, 30)
            with lock:
                codes.append(GRPC_CODES.get(status, status) if status is not None else error)

    run_for_hold(ctx, one, 16)
    sessions = re.search(r"model sessions (\d+)", ctx.server.read_log())
    notes = (f"16 callers x 64 PNGs for {args.hold:.0f} s: {len(codes):,} calls ({count(codes)}); budget term "
             f"model sessions {sessions.group(1) if sessions else 'missing'} MiB")
    return {"notes": notes, "checks": [("the budget counts the sessions loaded", sessions is not None and
                                        int(sessions.group(1)) >= 8 * 16, sessions.group(0) if sessions else "none")]}


def case_rest_shape_string(ctx):
    """#35 row 3: REST infer bodies whose `shape` is a 16 MiB string of one character that JSON escapes as six
    (serde's "invalid type" message once quoted it whole: a 58.7 MB 400), from HTTP/1.1 clients that send the
    whole body and never read the answer, held. Checks that one such client, reading at last, gets a short
    error."""
    args = ctx.args
    head = b'{"inputs":[{"name":"raw","datatype":"UINT8","shape":"'
    tail = b'","data":[0]}]}'
    body = head + b"\\u0001" * ((LIMIT - len(head) - len(tail)) // 6) + tail
    request = (f"POST {INFER_REST} HTTP/1.1\r\nHost: fmnist\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    sockets, errors = [], []

    def one():
        try:
            s = socket.create_connection(ctx.server.addr, timeout=60)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # reads nothing; keep what the kernel takes small
            s.sendall(request)
            sockets.append(s)
        except OSError as e:
            errors.append(type(e).__name__)

    t0 = time.monotonic()
    run_threads([one] * args.shape_clients)
    send_s = time.monotonic() - t0
    peak_sending = ctx.server.peak_mib()
    ctx.stop.wait(args.hold)
    answer = b""
    if sockets:  # the first client reads its answer at last
        s = sockets[0]
        s.settimeout(10)
        try:
            while b"\r\n\r\n" not in answer or len(answer) < answer.find(b"\r\n\r\n") + 4 + int(
                    (re.search(rb"content-length: *(\d+)", answer.lower()) or [0, b"0"])[1]):
                chunk = s.recv(65536)
                if not chunk:
                    break
                answer += chunk
        except OSError as e:
            errors.append("reading: " + type(e).__name__)
    for s in sockets:
        s.close()
    status = answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/") else "none"
    size = len(answer)
    notes = (f"{len(sockets)} clients sent {len(body) / MiB:.0f} MiB each in {send_s:.1f} s, read nothing for "
             f"{args.hold:.0f} s; peak {peak_sending:.0f} MiB when all had sent; the first, reading at last: "
             f"{status}, {size:,} bytes; client errors: {count(errors) or 'none'}")
    return {"notes": notes, "checks": [("the 400 quotes the value briefly", status == "400" and size < 4096,
                                        f"{status}, {size:,} bytes")]}


def case_busy_connections(ctx):
    """#35 row 4, with --max-connections 8: 8 HTTP/2 connections, each making a cheap call (a health check) every
    0.5 s, so that none has been idle for a second; a new client must still get a connection (the polite caller
    opens one per call)."""
    args = ctx.args
    calls, errors = [], []
    check = "/grpc.health.v1.Health/Check"

    def one():
        try:
            conn = H2(ctx.server.addr, timeout=10)
        except OSError as e:
            errors.append("connect " + type(e).__name__)
            return
        try:
            while not ctx.stop.is_set():
                sid = conn.request(check, grpc_frame(b""), deadline=time.monotonic() + 5)
                conn.wait(sid, time.monotonic() + 5)
                calls.append(conn.streams[sid].grpc_status())
                ctx.stop.wait(0.5)
        except (OSError, EOFError, wire.H2Error) as e:
            errors.append(type(e).__name__)
        finally:
            conn.close()

    run_for_hold(ctx, one, args.busy_connections)
    notes = (f"{args.busy_connections} connections x a health check every 0.5 s for {args.hold:.0f} s: "
             f"{len(calls):,} calls ({count(calls)}); connections ended: {count(errors) or 'none'}")
    return {"notes": notes, "checks": []}


def case_slow_upload(ctx):
    """#35 row 6: on one HTTP/2 connection, one stream uploads a 600 kB Classify at 400 bytes/s, below
    --min-request-body-rate (1,024 by default; the issue's 100 kB/s broke the limit of its day), while the same
    connection makes a polite call at 2.5, 6 and 10 s: the limit ends the slow stream alone; the connection and
    its other calls carry on (behind Envoy or an ingress, one connection carries many users)."""
    images = b"".join(pb_bytes(1, pb_bytes(2, bytes(784))) for _ in range(765))  # about 600 kB
    body = grpc_frame(images)
    conn = H2(ctx.server.addr, timeout=30)
    slow = conn.request(CLASSIFY, b"", end_stream=False)
    other = []
    t0 = time.monotonic()
    sent = 0
    polite = grpc_frame(classify_png_message(open(ctx.args.png, "rb").read()))
    marks = [2.5, 6.0, 10.0]
    error = None

    def polite_call():
        """The next mark's call on the slow stream's connection."""
        marks.pop(0)
        sid = conn.request(CLASSIFY, polite, deadline=time.monotonic() + 5)
        conn.wait(sid, time.monotonic() + 5)
        other.append(conn.streams[sid].grpc_status())

    try:
        while sent < len(body) and not conn.streams[slow].ended and time.monotonic() - t0 < 12:
            chunk = body[sent : sent + 40]
            conn.send_data(slow, chunk, end_stream=sent + len(chunk) == len(body))
            sent += len(chunk)
            conn.sock.settimeout(0.1)
            try:
                conn.pump()
            except socket.timeout:
                pass
            if marks and time.monotonic() - t0 >= marks[0]:
                polite_call()
            time.sleep(0.1)
        while marks:  # the slow stream ended early: the other calls still go on this connection
            polite_call()
    except (OSError, EOFError, wire.H2Error) as e:
        error = type(e).__name__
    finally:
        slow_status = conn.streams[slow].grpc_status() or ("reset" if conn.streams[slow].ended else "open")
        conn.close()
    others_ok = len(other) == 3 and all(s == "0" for s in other)
    slow_ended = conn.streams[slow].ended and slow_status != "0"
    notes = (f"slow stream: {sent / 1e3:.0f} of {len(body) / 1e3:.0f} kB sent in {time.monotonic() - t0:.1f} s, "
             f"ended {GRPC_CODES.get(slow_status, slow_status)}; the connection's other calls: "
             f"{[GRPC_CODES.get(s, s) for s in other]}; connection error: {error or 'none'}")
    return {"notes": notes, "checks": [("the connection's other calls served", others_ok and error is None,
                                        f"{other}, {error or 'no error'}"),
                                       ("the slow stream ended by the server", slow_ended, slow_status)]}


def case_header_flood(ctx):
    """Connections that open 100 Classify streams each and send headers only, never a body, answering the
    server's pings. Each connection first puts one 3,890-byte header into the server's HPACK table
    (literal with incremental indexing); every stream then names it `--header-refs` times (one byte each),
    so a header block of a few dozen bytes decodes to a list of refs x 3,927 bytes (issue #35: 200 x 100
    such streams held ~15 KiB each, 415 MiB, against a 16 KiB list limit). The streams' failures must not
    flood the log (the issue: 20,000 WARN lines, one per failed call): at most 10 "call failed" lines a second
    while the case runs (the server allows 5 a second per peer, and every stream here comes from one)."""
    args = ctx.args
    started = time.monotonic()
    big = b"a" * 3890
    first = b"\x40" + wire._hpack_int(5, 7) + b"x-pad" + wire._hpack_int(len(big), 7) + big
    ref = wire._hpack_int(62, 7, 0x80)  # the first dynamic entry

    def open_streams(conn, sids):
        fields = [(":method", "POST"), (":scheme", "http"), (":path", CLASSIFY), (":authority", conn.authority),
                  ("content-type", "application/grpc"), ("te", "trailers")]
        for i in range(args.header_flood_streams):
            sid = conn.next_id
            conn.next_id += 2
            conn.streams[sid] = wire.Stream(conn.peer_initial_window)
            block = wire.hpack_encode(fields) + (first if i == 0 else b"") + ref * (args.header_refs - (i == 0))
            conn.sock.sendall(wire.frame(wire.HEADERS, wire.END_HEADERS, sid, block))
            sids.append(sid)

    def tally(stats, st):
        stats["ended"] += st.ended
        stats["refused"] += st.grpc_status() == "8"

    stats, send_s, peak_sending = hold_calls(ctx, args.header_flood_connections, open_streams, tally,
                                             counters={"ended": 0, "refused": 0})
    notes = (f"{args.header_flood_connections} conns x {args.header_flood_streams} header-only streams x "
             f"{args.header_refs} references to a 3,927-byte HPACK entry: {stats['opened']:,} streams opened in "
             f"{send_s:.0f} s, {stats['ended']:,} ended by the server ({stats['refused']:,} RESOURCE_EXHAUSTED); "
             f"peak {peak_sending:.0f} MiB when all were sent; {stats['pings']} server pings answered; "
             f"client errors: {count(stats['errors']) or 'none'}")
    # Lines written by the end of the hold (and a second more for what was still on its way).
    time.sleep(1.0)
    seconds = time.monotonic() - started
    failed_lines = sum(" WARN " in line and "call failed" in line for line in ctx.server.read_log().splitlines())
    return {"notes": notes + f"; {failed_lines:,} 'call failed' WARN lines in {seconds:.0f} s",
            "checks": [("failed calls logged at most 10 a second", failed_lines <= 10 * seconds,
                        f"{failed_lines:,} lines in {seconds:.0f} s")]}


def iccp_png(profile_bytes):
    """The polite caller's 28x28 PNG with an iCCP chunk whose zlib stream inflates to `profile_bytes`."""
    png = open(POLITE_PNG, "rb").read()
    chunks, i = [], 8
    while i < len(png):
        n = struct.unpack(">I", png[i : i + 4])[0]
        chunks.append((png[i + 4 : i + 8], png[i + 8 : i + 8 + n]))
        i += 12 + n

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    iccp = b"bomb\x00\x00" + zlib.compress(b"\x00" * profile_bytes, 9)
    out = png[:8] + chunk(*chunks[0]) + chunk(b"iCCP", iccp)
    for kind, data in chunks[1:]:
        if kind not in (b"iCCP", b"sRGB"):
            out += chunk(kind, data)
    return out


def case_iccp_bomb(ctx):
    args = ctx.args
    png = iccp_png(args.iccp_bytes)
    message = pb_bytes(1, pb_bytes(1, png)) * 64
    results = []
    lock = threading.Lock()
    end = time.monotonic() + args.bomb_seconds

    def caller():
        conn = None
        try:
            conn = H2(ctx.server.addr, timeout=120)
            while time.monotonic() < end and not ctx.stop.is_set():
                t0 = time.monotonic()
                sid = conn.request(CLASSIFY, grpc_frame(message), deadline=t0 + 120)
                conn.wait(sid, t0 + 120)
                st = conn.streams.pop(sid)
                reasons = ""
                if st.grpc_status() == "0":
                    msgs = grpc_messages(st.data)
                    if msgs:
                        results_ = [pb_fields(v) for f, _, v in pb_fields(msgs[0]) if f == 1]
                        reasons = count(next((v for f, _, v in r if f == 3), 0) for r in results_)
                with lock:
                    results.append((st.grpc_status() or "no answer", reasons, time.monotonic() - t0))
        except (OSError, EOFError, wire.H2Error) as e:
            with lock:
                results.append((type(e).__name__, "", 0.0))
        finally:
            if conn is not None:
                conn.close()

    run_threads([caller] * args.bomb_callers)
    reasons = results[0][1] if results else ""
    notes = (f"PNG {len(png) / 1024:.0f} KB, iCCP inflating to {args.iccp_bytes / MiB:.0f} MiB; "
             f"{args.bomb_callers} callers x 64 images for {args.bomb_seconds:.0f} s: {grpc_notes(results)}; "
             f"first answer's reasons {{{reasons}}} (1 = ACCEPTED, 6 = UNDECODABLE, 8 = TOO_LARGE)")
    return {"notes": notes, "checks": []}


def scrape_later(ctx, delay, read):
    """Scrapes /metrics `delay` seconds from now, on a timer thread, and hands the body to `read` (`None` when the
    scrape failed)."""
    def scrape():
        request = b"GET /metrics HTTP/1.1\r\nHost: fmnist\r\n\r\n"
        try:
            _, _, body, _ = wire.http1_exchange(ctx.server.metrics_addr, request, 5.0)
        except OSError:
            body = None
        read(body)

    t = threading.Timer(max(0.0, delay), scrape)
    t.daemon = True
    t.start()


def metric_later(ctx, delay, name):
    """Reads one unlabelled metric `name` from /metrics `delay` seconds from now; the returned dict gets "value"."""
    out = {"value": "?"}

    def read(body):
        if body is None:
            out["value"] = "no scrape"
            return
        m = re.search(rb"^" + name.encode() + rb" (\S+)", body, re.M)
        out["value"] = m.group(1).decode() if m else "?"

    scrape_later(ctx, delay, read)
    return out


def gauge_later(ctx, delay):
    """Reads the server's connection metrics from /metrics `delay` seconds from now (the metrics port is not
    attacked in rows 8-10); the returned dict gets "open" and "closed" (closes by cause)."""
    out = {"open": "?", "closed": ""}

    def read(body):
        if body is None:
            out["open"] = "no scrape"
            return
        m = re.search(rb"^fmnist_connections_open (\S+)", body, re.M)
        out["open"] = m.group(1).decode() if m else "?"
        closed = re.findall(rb'^fmnist_connections_closed_total\{cause="([^"]+)"\} (\S+)', body, re.M)
        out["closed"] = ", ".join(f"{c.decode()}: {n.decode()}" for c, n in closed)

    scrape_later(ctx, delay, read)
    return out


def gauge_notes(gauge, hold):
    return (f"; server gauge at {max(0.0, hold - 2):.0f} s: fmnist_connections_open {gauge['open']}, closed "
            f"{{{gauge['closed'] or 'none'}}}")


def h2_swarm(ctx, n, ping_every):
    """`n` HTTP/2 connections that make no call: SETTINGS, SETTINGS/PING acknowledgements, and a PING of their
    own every `ping_every` seconds."""
    stats = {"accepted": 0, "pings_answered": 0, "goaway": 0}

    def opening(conn):
        conn["frames"] = wire.FrameReader()
        return wire.client_hello(65535)

    def on_data(conn, data):
        out = b""
        for kind, flags, _, payload in conn["frames"].feed(data):
            if kind == wire.SETTINGS and not flags & wire.ACK:
                if not conn.get("accepted"):
                    conn["accepted"] = True
                    stats["accepted"] += 1
                out += wire.frame(wire.SETTINGS, wire.ACK, 0)
            elif kind == wire.PING and not flags & wire.ACK:
                out += wire.ping_frame(payload, ack=True)
                stats["pings_answered"] += 1
            elif kind == wire.GOAWAY:
                stats["goaway"] += 1
        return out

    swarm = wire.Swarm(ctx.server.addr, n, opening=opening, tick=lambda conn: wire.ping_frame(),
                       interval=ping_every, on_data=on_data)
    gauge = gauge_later(ctx, ctx.args.hold - 2)
    swarm.run(ctx.args.hold, ctx.stop)
    notes = (f"{n} pinging HTTP/2 connections for {ctx.args.hold:.0f} s: {swarm.connects} TCP connects, "
             f"{stats['accepted']} got the server's SETTINGS (served), {swarm.closed_by_server} closed by the "
             f"server, {stats['goaway']} GOAWAYs, {stats['pings_answered']} server pings answered" + gauge_notes(gauge, ctx.args.hold))
    return {"notes": notes, "checks": []}


def case_h2_idle_pings(ctx):
    return h2_swarm(ctx, ctx.args.slot_sockets, ping_every=5.0)


def drip(text):
    """A tick that sends the next byte of `text`, then 'a' forever (a header value that never ends)."""

    def tick(conn):
        k = conn.get("sent", 0)
        conn["sent"] = k + 1
        return text[k : k + 1] if k < len(text) else b"a"

    return tick


def answers_seen(stats):
    def on_data(conn, data):
        if conn.get("seen") is None:
            conn["seen"] = bytearray()
        buf = conn["seen"]
        if len(buf) < 4096:
            buf += data
            if b"\r\n\r\n" in buf and not conn.get("counted"):
                conn["counted"] = True
                head = bytes(buf).split(b"\r\n\r\n")[0].split(b"\r\n")
                status = head[0].split(b" ")[1].decode() if head[0].startswith(b"HTTP/") else "?"
                ctype = next((h.split(b":", 1)[1].strip().decode() for h in head[1:]
                              if h.lower().startswith(b"content-type:")), "-")
                key = f"{status} {ctype}"
                stats[key] = stats.get(key, 0) + 1
        return b""

    return on_data


def slot_notes(swarm, what, hold, answers):
    answered = ", ".join(f"{k}: {v}" for k, v in sorted(answers.items())) or "none"
    return (f"{what} for {hold:.0f} s: {swarm.connects} TCP connects, at most {swarm.max_open} open at once "
            f"(client side), {swarm.closed_by_server} closed by the server; answers seen: {answered}")


def case_slowloris(ctx):
    answers = {}
    head = b"GET /v2/health/live HTTP/1.1\r\nHost: fmnist\r\nX-Slow: "
    swarm = wire.Swarm(ctx.server.addr, ctx.args.slot_sockets, opening=lambda conn: drip(head)(conn),
                       tick=drip(head), interval=1.0, on_data=answers_seen(answers))
    gauge = gauge_later(ctx, ctx.args.hold - 2)
    swarm.run(ctx.args.hold, ctx.stop)
    return {"notes": slot_notes(swarm, f"{ctx.args.slot_sockets} HTTP/1.1 heads at 1 byte/s", ctx.args.hold,
                                answers) + gauge_notes(gauge, ctx.args.hold), "checks": []}


def case_slow_chunks(ctx):
    answers = {}
    head = (f"POST {INFER_REST} HTTP/1.1\r\nHost: fmnist\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n1\r\n{\r\n").encode()
    swarm = wire.Swarm(ctx.server.addr, ctx.args.slot_sockets, opening=lambda conn: head,
                       tick=lambda conn: b"1\r\n \r\n", interval=2.0, on_data=answers_seen(answers))
    gauge = gauge_later(ctx, ctx.args.hold - 2)
    swarm.run(ctx.args.hold, ctx.stop)
    return {"notes": slot_notes(swarm, f"{ctx.args.slot_sockets} chunked REST bodies at 1 byte/2 s", ctx.args.hold,
                                answers) + gauge_notes(gauge, ctx.args.hold), "checks": []}


def metrics_scrapes(ctx, attack):
    """Runs `attack` (a Swarm on the metrics port) while scraping /metrics every second, each scrape on its own
    connection with Prometheus' default 10 s timeout."""
    scrapes = []
    lock = threading.Lock()
    done = threading.Event()
    request = b"GET /metrics HTTP/1.1\r\nHost: fmnist\r\n\r\n"
    timeout = ctx.args.scrape_timeout

    def scrape():
        try:
            status, _, body, seconds = wire.http1_exchange(ctx.server.metrics_addr, request, timeout)
            ok = status == 200 and b"fmnist_" in body
        except OSError:
            ok, seconds = False, timeout
        with lock:
            scrapes.append((ok, seconds if ok else timeout))

    workers = []

    def loop():
        while not done.is_set():
            t = threading.Thread(target=scrape, daemon=True)
            t.start()
            workers.append(t)
            done.wait(1.0)

    scraper = threading.Thread(target=loop, daemon=True)
    scraper.start()
    attack.run(ctx.args.hold, ctx.stop)
    done.set()
    scraper.join()
    for t in workers:
        t.join()
    failed = sum(1 for ok, _ in scrapes if not ok)
    p50 = statistics.median(s for _, s in scrapes) if scrapes else float("inf")
    checks = [
        ("scrapes failed = 0", failed == 0, f"{failed} of {len(scrapes)}"),
        ("scrape p50 <= %.1f s" % ctx.args.scrape_p50_max, p50 <= ctx.args.scrape_p50_max, f"{p50:.2f} s"),
    ]
    notes = (f"scrapes: {len(scrapes) - failed}/{len(scrapes)} answered within {timeout:.0f} s, p50 {p50:.2f} s, "
             f"max {max((s for _, s in scrapes), default=0):.2f} s; attacker: {attack.connects} TCP connects, "
             f"{attack.closed_by_server} closed by the server")
    return {"notes": notes, "checks": checks}


def case_metrics_slow(ctx):
    head = b"GET /metrics HTTP/1.1\r\nHost: fmnist\r\nX-Slow: "
    swarm = wire.Swarm(ctx.server.metrics_addr, 40, opening=lambda conn: drip(head)(conn), tick=drip(head),
                       interval=1.0)
    return metrics_scrapes(ctx, swarm)


def case_metrics_silent(ctx):
    swarm = wire.Swarm(ctx.server.metrics_addr, 175, interval=3600.0)
    return metrics_scrapes(ctx, swarm)


def judge_rest_error(status, ctype, body):
    """An HTTP error status with a JSON body {"error": ...}."""
    try:
        parsed = json.loads(body.decode() or "null")
    except (ValueError, UnicodeDecodeError):
        parsed = None
    ok = status is not None and status >= 400 and ctype.startswith("application/json") and \
        isinstance(parsed, dict) and "error" in parsed
    return ok, f"HTTP {status} {ctype or '(no content-type)'} body {body[:80]!r}"


def case_rest_timeout(ctx):
    """A REST call that outlives --request-timeout-s (set to 2 s here): its body arrives a byte every 0.5 s."""
    addr = ctx.server.addr
    limit = ctx.args.request_timeout + 8.0
    checks, notes = [], []

    # HTTP/1.1
    t0 = time.monotonic()
    status, ctype, body = None, "", b""
    with socket.create_connection(addr, timeout=limit) as s:
        s.sendall((f"POST {INFER_REST} HTTP/1.1\r\nHost: fmnist\r\nContent-Type: application/json\r\n"
                   "Content-Length: 1000\r\n\r\n{").encode())
        buf = bytearray()
        s.settimeout(0.5)
        while time.monotonic() - t0 < limit:
            try:
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
                if b"\r\n\r\n" in buf:
                    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
                    lines = head.split(b"\r\n")
                    hdrs = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(b":") for ln in lines[1:])}
                    want = int(hdrs.get(b"content-length", b"0") or 0)
                    if len(rest) >= want or time.monotonic() - t0 > limit:
                        status = int(lines[0].split()[1])
                        ctype = hdrs.get(b"content-type", b"").decode()
                        body = rest[:want] if want else rest
                        break
            except socket.timeout:
                try:
                    s.sendall(b" ")
                except OSError:
                    pass
    seconds = time.monotonic() - t0
    ok, detail = judge_rest_error(status, ctype, body)
    checks.append(("HTTP/1.1 timeout answer is an HTTP error with JSON", ok, detail))
    notes.append(f"HTTP/1.1 after {seconds:.1f} s: {detail}")

    # HTTP/2, the same REST route
    t0 = time.monotonic()
    conn = H2(addr, timeout=limit)
    try:
        sid = conn.request(INFER_REST, b"{", content_type="application/json", end_stream=False)
        st = conn.streams[sid]
        while not st.ended and time.monotonic() - t0 < limit:
            conn.wait(sid, time.monotonic() + 0.5)
            if not st.ended and not st.header_blocks:
                conn.send_data(sid, b" ", end_stream=False)
        status_h = st.header(":status")
        ctype_h = st.header("content-type")
        status = int(status_h.value) if status_h else None
        ctype = ctype_h.value.decode() if ctype_h else ""
        grpc = st.grpc_status()
        ok, detail = judge_rest_error(status, ctype, bytes(st.data))
        if grpc is not None:
            detail += f", grpc-status {grpc}"
    except (OSError, EOFError, wire.H2Error) as e:
        ok, detail = False, type(e).__name__
    finally:
        conn.close()
    checks.append(("HTTP/2 timeout answer is an HTTP error with JSON", ok, detail))
    notes.append(f"HTTP/2 after {time.monotonic() - t0:.1f} s: {detail}")
    return {"notes": "; ".join(notes), "checks": checks}


def case_baseline(ctx):
    ctx.stop.wait(min(ctx.args.hold, 10.0))
    return {"notes": "no attack: the probes alone", "checks": []}


class Case:
    def __init__(self, name, row, what, fn, server_args=lambda args: [], tls=False):
        self.name, self.row, self.what, self.fn, self.server_args = name, row, what, fn, server_args
        # The server runs with TLS (a certificate made for the run) and the probes speak it.
        self.tls = tls


CASES = [
    Case("baseline", "-", "no attack (the probes alone; tells whether the machine itself is too busy)", case_baseline),
    Case("rest-nested-json", "1", "REST infer, 16 MiB JSON bodies shaped [[0],[0],...], 4 at once, 3 rounds",
         case_rest_nested_json),
    Case("rest-flat-json", "2", "REST infer, 16 MiB flat FP32 JSON bodies, 4 at once", case_rest_flat_json),
    Case("grpc-empty-bytes", "3", "ModelInfer with 8 million empty BYTES elements (16 MB), 4 at once",
         case_grpc_empty_bytes),
    Case("grpc-huge-shape", "4a", "ModelInfer whose shape is 16 MiB of dimensions, 4 connections x 2",
         case_grpc_huge_shape),
    Case("grpc-huge-param", "4b", "ModelInfer whose min_confidence is a 16 MiB string, 4 connections x 2",
         case_grpc_huge_param),
    Case("classify-empty-images", "5", "Classify with 8 million empty images (16 MB), 3 calls at once",
         case_classify_empty_images),
    Case("slow-reader", "6", "250 connections x 100 answered Classify streams, receive window 0, held",
         case_slow_reader),
    Case("header-flood", "13", "200 connections x 100 header-only streams, HPACK-referenced lists, held",
         case_header_flood),
    Case("decoded-varints", "14", "ModelInfer of 50,176 one-byte int64 varints (800 kB decoded), end of stream "
         "held, 24 connections x 50", case_decoded_varints),
    Case("reflection-streams", "35.1", "9 connections x 12 reflection streams, 600 kB requests, never ended, held",
         case_reflection_streams),
    Case("packed-zeros", "35.2", "ModelInfer, 8 inputs x 2 packed 64-bit fields of 50,176 zeros (803 kB), "
         "2 connections x 40 streams, end of stream held", case_packed_zeros),
    Case("rest-shape-string", "35.3", "REST infer with a 16 MiB escaped `shape` string, 12 HTTP/1.1 clients that "
         "never read, held", case_rest_shape_string),
    Case("busy-connections", "35.4", "--max-connections 8: 8 HTTP/2 connections, a health check on each every "
         "0.5 s; new clients must get in", case_busy_connections,
         server_args=lambda args: ["--max-connections", str(args.busy_connections)]),
    Case("slow-upload", "35.6", "one stream uploads 600 kB at 400 B/s; the same connection's other calls",
         case_slow_upload),
    Case("tls-silent-sockets", "35.5", "TLS, --max-connections 8: 8 silent TCP sockets reopened when closed; "
         "new TLS clients must get in", case_tls_silent_sockets,
         server_args=lambda args: ["--max-connections", "8", "--tls-cert", tls_files()[0], "--tls-key", tls_files()[1]],
         tls=True),
    Case("watch-under-pressure", "35.8", "--max-connections 8: a health Watch beside 7 idle connections reopened "
         "when evicted; the Watch's connection must stay", case_watch_under_pressure,
         server_args=lambda args: ["--max-connections", "8"]),
    Case("many-instances", "35.9", "--instances 8 --ort-threads 1: 16 callers of 64 PNGs; the budget counts the "
         "sessions", case_many_instances, server_args=lambda args: ["--instances", "8", "--ort-threads", "1"]),
    Case("iccp-bomb", "7", "28x28 PNGs whose iCCP inflates to 48 MiB, 64 per call, 8 callers", case_iccp_bomb),
    Case("h2-idle-pings", "8", "300 HTTP/2 connections that only ping and answer pings, held", case_h2_idle_pings),
    Case("slowloris", "9", "300 HTTP/1.1 request heads at one byte per second, reconnecting", case_slowloris),
    Case("slow-chunks", "10", "300 chunked REST bodies at one byte per 2 s, reconnecting", case_slow_chunks),
    Case("metrics-slow", "11a", "metrics port: 40 request heads at one byte per second, reconnecting",
         case_metrics_slow),
    Case("metrics-silent", "11b", "metrics port: 175 silent connections, reconnecting", case_metrics_silent),
    Case("rest-timeout", "12", "a REST call past --request-timeout-s (2 s here) gets an HTTP error with JSON",
         case_rest_timeout, server_args=lambda args: ["--request-timeout-s", str(int(args.request_timeout))]),
]
BY_NAME = {c.name: c for c in CASES}


# --------------------------------------------------------------------------------------------------------------
# Running a case


class Context:
    def __init__(self, server, args):
        self.server, self.args = server, args
        self.stop = threading.Event()


def run_case(case, args):
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix=f"round2-{case.name}-") as log_dir:
        server = Server(args.bin, case.server_args(args) + args.server_arg, log_dir)
        if case.tls:  # the probes (and the attack's own H2 connections) speak TLS to this server
            import ssl

            wire.TLS = ssl.create_default_context(cafile=tls_files()[0])
        idle = server.rss_mib()
        probes = Probes(server, args)
        ctx = Context(server, args)
        probes.start()
        time.sleep(1.0)
        t0 = time.monotonic()
        error = None
        try:
            out = case.fn(ctx)
        except Exception as e:  # an attack that breaks is reported, not fatal to the run
            import traceback

            traceback.print_exc()
            out, error = {"notes": "", "checks": []}, f"{type(e).__name__}: {e}"
        attack_s = time.monotonic() - t0
        time.sleep(1.0)
        probes.stop()
        peak = server.peak_mib()
        alive = server.alive()
        if args.keep_logs:
            kept = os.path.join(args.keep_logs, f"{case.name}.log")
            os.makedirs(args.keep_logs, exist_ok=True)
            with open(server.log_path, "rb") as src, open(kept, "wb") as dst:
                dst.write(src.read())
        server.stop()
        wire.TLS = None

    polite_served = sum(1 for ok, _, _ in probes.polite if ok)
    polite_total = len(probes.polite)
    polite_why = count(why for ok, _, why in probes.polite if not ok)
    health_max = max((s for _, s in probes.health), default=0.0)
    health_failed = sum(1 for ok, _ in probes.health if not ok)
    budget = server.budget_mib
    checks = [
        ("server alive", alive, "running" if alive else "exited"),
        ("peak RSS <= budget", peak is not None and budget is not None and peak <= budget,
         f"{peak or 0:.0f} of {budget} MiB"),
        ("polite >= %.0f%%" % (100 * args.polite_min), polite_total > 0 and polite_served >= args.polite_min *
         polite_total, f"{polite_served}/{polite_total}" + (f" (failed: {polite_why})" if polite_why else "")),
        ("health answered within %.1f s" % args.health_timeout, health_failed == 0,
         f"{health_failed} of {len(probes.health)} failed, max {health_max:.2f} s"),
    ] + out["checks"]
    if error:
        checks.append(("attack ran", False, error))
    passed = all(ok for _, ok, _ in checks)
    failed = [f"{name} ({detail})" for name, ok, detail in checks if not ok]
    result = {
        "case": case.name, "row": case.row, "what": case.what, "peak_rss_mib": round(peak or 0),
        "idle_rss_mib": round(idle or 0), "max_sampled_rss_mib": round(max(probes.rss, default=0)),
        "budget_mib": budget, "polite_served": polite_served, "polite_total": polite_total,
        "polite_failures": polite_why, "health_max_s": round(health_max, 2), "health_failed": health_failed,
        "health_total": len(probes.health), "alive": alive, "attack_s": round(attack_s, 1),
        "loadavg_1m_at_start": round(load, 2), "notes": out["notes"],
        "checks": [{"check": n, "ok": ok, "detail": d} for n, ok, d in checks],
        "result": "PASS" if passed else "FAIL", "failed": failed,
    }
    line = (f"round2 {case.name:<22} peak {result['peak_rss_mib']:>5} MiB  budget {budget} MiB  polite "
            f"{polite_served}/{polite_total}  health max {health_max:.2f} s ({health_failed} failed)  "
            f"{result['result']}")
    if failed:
        line += "  <- " + "; ".join(failed)
    print(line, flush=True)
    print(f"    {case.what}; {out['notes']}; idle {result['idle_rss_mib']} MiB, load {load:.2f}", flush=True)
    return result


def markdown(results, args):
    rows = ["| row | case | peak RSS MiB (budget) | polite served | health max (failed) | result | notes |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        rows.append(f"| {r['row']} | `{r['case']}` | {r['peak_rss_mib']} ({r['budget_mib']}) | "
                    f"{r['polite_served']}/{r['polite_total']} | {r['health_max_s']:.2f} s ({r['health_failed']}) | "
                    f"**{r['result']}** | {r['notes']} |")
    return "\n".join(rows)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", action="append", default=[], help="a case to run (repeatable); see --list")
    p.add_argument("--all", action="store_true", help="every case, in order")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--bin", default=os.environ.get("FMNIST_BIN", "target/release/fmnist"),
                   help="server binary (default $FMNIST_BIN, else target/release/fmnist)")
    p.add_argument("--server-arg", action="append", default=[],
                   help="extra argument for every server started (repeatable), e.g. --server-arg=--max-connections=128")
    p.add_argument("--hold", type=float, default=45.0, help="seconds the holding attacks hold (rows 6, 8-11)")
    p.add_argument("--quick", action="store_true", help="shorter holds (15 s) and bomb runs (10 s)")
    p.add_argument("--png", default=POLITE_PNG, help="the polite caller's image")
    p.add_argument("--polite-interval", type=float, default=0.5)
    p.add_argument("--polite-deadline", type=float, default=2.0, help="the polite call's grpc-timeout (s)")
    p.add_argument("--polite-min", type=float, default=0.95, help="fraction of polite calls that must be served")
    p.add_argument("--health-interval", type=float, default=0.5)
    p.add_argument("--health-timeout", type=float, default=2.0)
    p.add_argument("--slow-reader-connections", type=int, default=250)
    p.add_argument("--slow-reader-streams", type=int, default=100)
    p.add_argument("--slow-reader-images", type=int, default=64)
    p.add_argument("--header-flood-connections", type=int, default=200)
    p.add_argument("--header-flood-streams", type=int, default=100)
    p.add_argument("--header-refs", type=int, default=2,
                   help="references per stream to the 3,927-byte entry: 2 (8,173 bytes with the other fields) fits the server's 8 KiB list "
                        "limit; 4 (16 kB) fit the 16 KiB limit before it")
    p.add_argument("--varint-connections", type=int, default=24)
    p.add_argument("--varint-streams", type=int, default=50)
    p.add_argument("--reflection-connections", type=int, default=9)
    p.add_argument("--reflection-streams", type=int, default=12)
    p.add_argument("--shape-clients", type=int, default=12)
    p.add_argument("--busy-connections", type=int, default=8)
    p.add_argument("--iccp-bytes", type=int, default=48 * MiB, help="what the iCCP profile inflates to")
    p.add_argument("--bomb-callers", type=int, default=8)
    p.add_argument("--bomb-seconds", type=float, default=20.0)
    p.add_argument("--slot-sockets", type=int, default=300, help="sockets of rows 8-10 (cap: 256)")
    p.add_argument("--scrape-timeout", type=float, default=10.0)
    p.add_argument("--scrape-p50-max", type=float, default=1.0)
    p.add_argument("--request-timeout", type=float, default=2.0, help="--request-timeout-s of row 12's server")
    p.add_argument("--max-log-per-call", type=int, default=16 * 1024, help="row 4: log bytes per call allowed")
    p.add_argument("--max-grpc-message", type=int, default=4096, help="row 4: grpc-message bytes allowed")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--markdown", action="store_true", help="print a markdown table at the end")
    p.add_argument("--keep-logs", help="copy each case's server log into this folder")
    args = p.parse_args()

    if args.list:
        for c in CASES:
            print(f"{c.name:<22} row {c.row:<4} {c.what}")
        return 0
    if args.quick:
        args.hold, args.bomb_seconds = min(args.hold, 15.0), min(args.bomb_seconds, 10.0)
    names = [c.name for c in CASES] if args.all else args.case
    unknown = [n for n in names if n not in BY_NAME]
    if not names or unknown:
        p.error(f"unknown case(s) {unknown}; see --list" if unknown else "name a --case, or --all")
    args.bin = os.path.abspath(os.path.join(ROOT, args.bin)) if not os.path.isabs(args.bin) else args.bin
    if not os.access(args.bin, os.X_OK):
        p.error(f"no server binary at {args.bin} (`make build`, or set FMNIST_BIN)")
    threading.stack_size(512 * 1024)
    print(f"round2: binary {args.bin}, CPU {cpu_model()}, {os.cpu_count()} CPUs, "
          f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}", flush=True)
    results = [run_case(BY_NAME[n], args) for n in names]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"binary": args.bin, "cpu": cpu_model(), "date": time.strftime("%Y-%m-%d"),
                       "argv": sys.argv[1:], "results": results}, f, indent=1)
    if args.markdown:
        print(markdown(results, args))
    passed = sum(r["result"] == "PASS" for r in results)
    print(f"round2: {passed} of {len(results)} cases passed", flush=True)
    return 0 if passed == len(results) else 1


def cpu_model():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        m = re.search(r"Model name:\s*(.+)", out)
        return m.group(1).strip() if m else "?"
    except OSError:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
