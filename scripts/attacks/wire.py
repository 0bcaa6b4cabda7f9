"""Wire pieces for the attack scripts, Python standard library only (nothing to install): a protobuf encoder
and a minimal decoder, HPACK (RFC 7541: literal-without-indexing encoding; a full decoder with Huffman and the
dynamic table, since the server's h2 always Huffman-encodes), a blocking HTTP/2 client with flow control in
both directions (so a caller can also set its receive window to 0 and never read), gRPC framing, a one-shot
HTTP/1.1 exchange, and a single-threaded socket swarm for slot-holding attacks (reconnecting when closed).
"""

import errno
import selectors
import socket
import struct
import time

MiB = 1 << 20

# --------------------------------------------------------------------------------------------------------------
# Protobuf


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def pb_bytes(field, payload):
    """A length-delimited field (bytes, string, embedded message, packed repeated)."""
    return varint(field << 3 | 2) + varint(len(payload)) + payload


def pb_varint(field, n):
    return varint(field << 3) + varint(n)


def pb_float(field, x):
    return varint(field << 3 | 5) + struct.pack("<f", x)


def read_varint(buf, i):
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


def pb_fields(buf):
    """[(field, wire type, value)] of one message; value is an int, or bytes for the other wire types."""
    out, i = [], 0
    while i < len(buf):
        key, i = read_varint(buf, i)
        field, wt = key >> 3, key & 7
        if wt == 0:
            value, i = read_varint(buf, i)
        elif wt == 1:
            value, i = bytes(buf[i : i + 8]), i + 8
        elif wt == 2:
            n, i = read_varint(buf, i)
            value, i = bytes(buf[i : i + n]), i + n
        elif wt == 5:
            value, i = bytes(buf[i : i + 4]), i + 4
        else:
            raise ValueError(f"wire type {wt}")
        out.append((field, wt, value))
    return out


def grpc_frame(message):
    """A gRPC length-prefixed message, uncompressed."""
    return b"\0" + struct.pack(">I", len(message)) + message


def grpc_messages(data):
    out, i = [], 0
    while i + 5 <= len(data):
        n = struct.unpack(">I", data[i + 1 : i + 5])[0]
        out.append(bytes(data[i + 5 : i + 5 + n]))
        i += 5 + n
    return out


# --------------------------------------------------------------------------------------------------------------
# HPACK

STATIC_TABLE = [
    (":authority", ""), (":method", "GET"), (":method", "POST"), (":path", "/"), (":path", "/index.html"),
    (":scheme", "http"), (":scheme", "https"), (":status", "200"), (":status", "204"), (":status", "206"),
    (":status", "304"), (":status", "400"), (":status", "404"), (":status", "500"), ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"), ("accept-language", ""), ("accept-ranges", ""), ("accept", ""),
    ("access-control-allow-origin", ""), ("age", ""), ("allow", ""), ("authorization", ""),
    ("cache-control", ""), ("content-disposition", ""), ("content-encoding", ""), ("content-language", ""),
    ("content-length", ""), ("content-location", ""), ("content-range", ""), ("content-type", ""),
    ("cookie", ""), ("date", ""), ("etag", ""), ("expect", ""), ("expires", ""), ("from", ""), ("host", ""),
    ("if-match", ""), ("if-modified-since", ""), ("if-none-match", ""), ("if-range", ""),
    ("if-unmodified-since", ""), ("last-modified", ""), ("link", ""), ("location", ""), ("max-forwards", ""),
    ("proxy-authenticate", ""), ("proxy-authorization", ""), ("range", ""), ("referer", ""), ("refresh", ""),
    ("retry-after", ""), ("server", ""), ("set-cookie", ""), ("strict-transport-security", ""),
    ("transfer-encoding", ""), ("user-agent", ""), ("vary", ""), ("via", ""), ("www-authenticate", ""),
]
STATIC_TABLE = [(n.encode(), v.encode()) for n, v in STATIC_TABLE]

# Code lengths of the 256 byte symbols and EOS (RFC 7541 Appendix B); the code is canonical, so the codes
# follow from the lengths (checked against h2's ENCODE_CODES table).
HUFFMAN_LENGTHS = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 30, 28, 28, 28, 28,
    28, 28, 28, 28, 28, 6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, 5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 7,
    8, 15, 6, 12, 10, 13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19,
    13, 14, 6, 15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6, 6, 5, 6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13,
    28, 20, 22, 20, 20, 22, 22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23, 24, 24, 22, 23, 24, 23, 23, 23, 23, 21,
    22, 23, 22, 23, 23, 24, 22, 21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, 21, 21, 22, 21, 23,
    22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23, 26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25,
    19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, 20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25,
    25, 24, 24, 26, 23, 26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, 30,
]


def huffman_codes():
    order = sorted(range(257), key=lambda s: (HUFFMAN_LENGTHS[s], s))
    codes, code, prev = [0] * 257, 0, HUFFMAN_LENGTHS[order[0]]
    for k, s in enumerate(order):
        if k:
            code = (code + 1) << (HUFFMAN_LENGTHS[s] - prev)
        codes[s], prev = code, HUFFMAN_LENGTHS[s]
    return codes


_HUFFMAN_ROWS = None


def _huffman_rows():
    """A byte-at-a-time decoder: rows[state][byte] = (next state, decoded bytes); states are the code tree's
    inner nodes. Built once, on first use (about half a second)."""
    global _HUFFMAN_ROWS
    if _HUFFMAN_ROWS is None:
        codes = huffman_codes()
        kids = [[None, None]]
        for s in range(256):
            node, length = 0, HUFFMAN_LENGTHS[s]
            for k in range(length - 1, -1, -1):
                bit = (codes[s] >> k) & 1
                if k == 0:
                    kids[node][bit] = -(s + 1)
                else:
                    if kids[node][bit] is None:
                        kids.append([None, None])
                        kids[node][bit] = len(kids) - 1
                    node = kids[node][bit]
        rows = []
        for state in range(len(kids)):
            row = []
            for byte in range(256):
                node, out = state, bytearray()
                for k in range(7, -1, -1):
                    nxt = kids[node][(byte >> k) & 1]
                    if nxt is None:  # the EOS path: only padding may end there
                        node = 0
                        break
                    if nxt < 0:
                        out.append(-nxt - 1)
                        node = 0
                    else:
                        node = nxt
                row.append((node, bytes(out)))
            rows.append(row)
        _HUFFMAN_ROWS = rows
    return _HUFFMAN_ROWS


def huffman_decode(data):
    rows, state, out = _huffman_rows(), 0, []
    for b in data:
        state, piece = rows[state][b]
        if piece:
            out.append(piece)
    return b"".join(out)


# Huffman strings longer than this are decoded only this far; their decoded length is extrapolated (a 48 MiB
# grpc-message would take a minute of pure Python).
HUFFMAN_DECODE_CAP = 1 * MiB


class Header:
    __slots__ = ("name", "value", "length", "exact")

    def __init__(self, name, value, length, exact):
        self.name, self.value, self.length, self.exact = name, value, length, exact

    def __repr__(self):
        return f"{self.name.decode()}: {self.value[:80]!r} ({'' if self.exact else '~'}{self.length} bytes)"


class HpackDecoder:
    def __init__(self):
        self.dynamic, self.size, self.max_size = [], 0, 4096

    @staticmethod
    def _int(buf, i, prefix):
        mask = (1 << prefix) - 1
        value = buf[i] & mask
        i += 1
        if value < mask:
            return value, i
        shift = 0
        while True:
            b = buf[i]
            i += 1
            value += (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return value, i

    def _str(self, buf, i):
        """(value, decoded length, exact, next index)."""
        huffman = buf[i] & 0x80
        n, i = self._int(buf, i, 7)
        raw = buf[i : i + n]
        i += n
        if not huffman:
            return bytes(raw), n, True, i
        if n <= HUFFMAN_DECODE_CAP:
            value = huffman_decode(raw)
            return value, len(value), True, i
        prefix = huffman_decode(raw[:HUFFMAN_DECODE_CAP])
        return prefix[:4096], int(len(prefix) * n / HUFFMAN_DECODE_CAP), False, i

    def _entry(self, index):
        if index <= 0:
            raise ValueError("HPACK index 0")
        if index <= len(STATIC_TABLE):
            name, value = STATIC_TABLE[index - 1]
            return Header(name, value, len(value), True)
        return self.dynamic[index - len(STATIC_TABLE) - 1]

    def _add(self, header):
        size = len(header.name) + header.length + 32
        while self.dynamic and self.size + size > self.max_size:
            old = self.dynamic.pop()
            self.size -= len(old.name) + old.length + 32
        if size <= self.max_size:
            self.dynamic.insert(0, header)
            self.size += size

    def decode(self, block):
        headers, i = [], 0
        while i < len(block):
            b = block[i]
            if b & 0x80:  # indexed
                index, i = self._int(block, i, 7)
                headers.append(self._entry(index))
                continue
            if b & 0xE0 == 0x20:  # dynamic table size update
                self.max_size, i = self._int(block, i, 5)
                while self.dynamic and self.size > self.max_size:
                    old = self.dynamic.pop()
                    self.size -= len(old.name) + old.length + 32
                continue
            indexing = b & 0xC0 == 0x40
            index, i = self._int(block, i, 6 if indexing else 4)
            if index:
                name = self._entry(index).name
            else:
                name, _, _, i = self._str(block, i)
            value, length, exact, i = self._str(block, i)
            header = Header(name, value, length, exact)
            headers.append(header)
            if indexing:
                self._add(header)
        return headers


def _hpack_int(value, prefix, first=0):
    mask = (1 << prefix) - 1
    if value < mask:
        return bytes([first | value])
    out = bytearray([first | mask])
    value -= mask
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def hpack_encode(headers):
    """Every field as a literal without indexing, new name, no Huffman: nothing for the decoder to remember."""
    out = bytearray()
    for name, value in headers:
        name = name.encode() if isinstance(name, str) else name
        value = value.encode() if isinstance(value, str) else value
        out += b"\x00" + _hpack_int(len(name), 7) + name + _hpack_int(len(value), 7) + value
    return bytes(out)


# --------------------------------------------------------------------------------------------------------------
# HTTP/2

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
SETTINGS_ENABLE_PUSH, SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_FRAME_SIZE = 2, 4, 5


def frame(kind, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def ping_frame(payload=b"attacker", ack=False):
    return frame(PING, ACK if ack else 0, 0, payload)


def client_hello(receive_window):
    """Preface and SETTINGS (no push, the given stream receive window), and, for a window above the default,
    a WINDOW_UPDATE that opens the connection window as wide."""
    settings = struct.pack(">HI", SETTINGS_ENABLE_PUSH, 0) + struct.pack(
        ">HI", SETTINGS_INITIAL_WINDOW_SIZE, receive_window
    )
    out = PREFACE + frame(SETTINGS, 0, 0, settings)
    if receive_window > 65535:
        out += frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", receive_window - 65535))
    return out


class Stream:
    def __init__(self, send_window):
        self.send_window = send_window
        self.header_blocks = []  # decoded header lists, in order (response headers, then trailers)
        self.header_bytes = 0  # encoded size of every header block received
        self.data = bytearray()
        self.data_bytes = 0
        self.ended = False
        self.reset = None

    def header(self, name):
        """The last value of `name` in any header block, as a Header, or None."""
        name = name.encode()
        found = None
        for block in self.header_blocks:
            for h in block:
                if h.name == name:
                    found = h
        return found

    def grpc_status(self):
        h = self.header("grpc-status")
        return None if h is None else h.value.decode(errors="replace")


class H2Error(Exception):
    pass


# When set (an ssl.SSLContext), H2 and http1_exchange speak TLS: round2.py's TLS case sets it for its probes.
TLS = None


def connect(addr, timeout, alpn):
    """A TCP connection to `addr`, wrapped in TLS (offering `alpn`) when `TLS` is set."""
    sock = socket.create_connection(addr, timeout=timeout)
    if TLS is None:
        return sock
    TLS.set_alpn_protocols([alpn])
    try:
        return TLS.wrap_socket(sock, server_hostname="localhost")
    except BaseException:
        sock.close()
        raise


class H2:
    """One HTTP/2 connection, driven from one thread: `request` sends a call (respecting the server's flow
    control windows), `wait` reads frames until the call ends. SETTINGS and PINGs are acknowledged as they
    arrive. `receive_window=0` makes a client that never lets the server send DATA."""

    def __init__(self, addr, receive_window=16 * MiB, timeout=10.0, keep_data=True, connect_timeout=None):
        self.sock = connect(addr, connect_timeout or timeout, "h2")
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(timeout)
        self.authority = f"{addr[0]}:{addr[1]}"
        self.receive_window = receive_window
        self.keep_data = keep_data
        self.buf = bytearray()
        self.hpack = HpackDecoder()
        self.send_conn, self.peer_initial_window, self.max_frame = 65535, 65535, 16384
        self.streams, self.next_id = {}, 1
        self.goaway = None
        self.settings_seen = False
        self.pings_answered = 0
        self.closed = False
        self.sock.sendall(client_hello(receive_window))

    def close(self):
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass

    # reading
    def _fill(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(max(1 << 18, n - len(self.buf)))
            if not chunk:
                self.closed = True
                raise EOFError("the server closed the connection")
            self.buf += chunk

    def _frame(self):
        self._fill(9)
        length = int.from_bytes(self.buf[0:3], "big")
        kind, flags = self.buf[3], self.buf[4]
        stream = int.from_bytes(self.buf[5:9], "big") & 0x7FFFFFFF
        self._fill(9 + length)
        payload = bytes(self.buf[9 : 9 + length])
        del self.buf[: 9 + length]
        return kind, flags, stream, payload

    def pump(self):
        """Reads and handles one frame (socket timeout: socket.timeout)."""
        kind, flags, sid, payload = self._frame()
        st = self.streams.get(sid)
        if kind == DATA:
            if flags & PADDED:
                payload = payload[1 : len(payload) - payload[0]]
            if st is not None:
                st.data_bytes += len(payload)
                if self.keep_data:
                    st.data += payload
                if flags & END_STREAM:
                    st.ended = True
            if payload and self.receive_window > 0:
                updates = frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", len(payload)))
                if st is not None and not st.ended:
                    updates += frame(WINDOW_UPDATE, 0, sid, struct.pack(">I", len(payload)))
                self.sock.sendall(updates)
        elif kind == HEADERS:
            end_stream = flags & END_STREAM
            if flags & PADDED:
                pad = payload[0]
                payload = payload[1 : len(payload) - pad]
            if flags & PRIORITY_FLAG:
                payload = payload[5:]
            block = bytearray(payload)
            while not flags & END_HEADERS:
                kind2, flags, _, more = self._frame()
                if kind2 != CONTINUATION:
                    raise H2Error(f"frame type {kind2} inside a header block")
                block += more
            decoded = self.hpack.decode(block)
            if st is not None:
                st.header_blocks.append(decoded)
                st.header_bytes += len(block)
                if end_stream:
                    st.ended = True
        elif kind == RST_STREAM:
            if st is not None:
                st.reset = struct.unpack(">I", payload[:4])[0]
                st.ended = True
        elif kind == SETTINGS:
            if not flags & ACK:
                for k in range(0, len(payload), 6):
                    ident, value = struct.unpack(">HI", payload[k : k + 6])
                    if ident == SETTINGS_INITIAL_WINDOW_SIZE:
                        delta = value - self.peer_initial_window
                        self.peer_initial_window = value
                        for s in self.streams.values():
                            s.send_window += delta
                    elif ident == SETTINGS_MAX_FRAME_SIZE:
                        self.max_frame = value
                self.settings_seen = True
                self.sock.sendall(frame(SETTINGS, ACK, 0))
        elif kind == PING:
            if not flags & ACK:
                self.sock.sendall(ping_frame(payload, ack=True))
                self.pings_answered += 1
        elif kind == GOAWAY:
            last, code = struct.unpack(">II", payload[:8])
            self.goaway = (last & 0x7FFFFFFF, code, payload[8:200])
        elif kind == WINDOW_UPDATE:
            increment = struct.unpack(">I", payload[:4])[0] & 0x7FFFFFFF
            if sid == 0:
                self.send_conn += increment
            elif st is not None:
                st.send_window += increment
        return kind, sid

    # writing
    def request(self, path, body, headers=(), content_type="application/grpc", end_stream=True, deadline=None):
        """Opens a stream and sends its headers and body (all of it, as the windows allow); returns its id."""
        sid = self.next_id
        self.next_id += 2
        st = self.streams[sid] = Stream(self.peer_initial_window)
        fields = [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", self.authority),
                  ("content-type", content_type)]
        if content_type.startswith("application/grpc"):
            fields.append(("te", "trailers"))
        fields += list(headers)
        no_body = end_stream and not body
        self.sock.sendall(frame(HEADERS, END_HEADERS | (END_STREAM if no_body else 0), sid, hpack_encode(fields)))
        if body:
            self.send_data(sid, body, end_stream, deadline)
        return sid

    def send_data(self, sid, body, end_stream=True, deadline=None):
        st = self.streams[sid]
        view, off = memoryview(body), 0
        while off < len(body):
            if st.ended:  # refused or reset mid-body: stop sending
                return False
            room = min(self.send_conn, st.send_window, self.max_frame)
            if room <= 0:
                if deadline is not None and time.monotonic() > deadline:
                    raise socket.timeout("no flow-control window before the deadline")
                self.pump()
                continue
            n = min(room, len(body) - off)
            last = off + n == len(body)
            self.sock.sendall(frame(DATA, END_STREAM if last and end_stream else 0, sid, bytes(view[off : off + n])))
            off += n
            self.send_conn -= n
            st.send_window -= n
        return True

    def wait(self, sids, deadline):
        """Reads frames until every stream in `sids` ended, or `deadline` (monotonic); True when all ended."""
        sids = [sids] if isinstance(sids, int) else list(sids)
        timeout = self.sock.gettimeout()
        try:
            while not all(self.streams[s].ended for s in sids):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.sock.settimeout(min(left, 5.0))
                try:
                    self.pump()
                except socket.timeout:
                    continue
            return True
        finally:
            self.sock.settimeout(timeout)


# --------------------------------------------------------------------------------------------------------------
# HTTP/1.1


def http1_exchange(addr, request, timeout, read_body=True):
    """Sends `request` (bytes) on a new connection and reads the response head (and its Content-Length body).
    Returns (status or None, headers dict, body, seconds). Raises OSError/socket.timeout on failure."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    with connect(addr, timeout, "http/1.1") as s:
        s.sendall(request)
        buf = bytearray()
        while b"\r\n\r\n" not in buf:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
        head, _, body = bytes(buf).partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = None
        if lines and lines[0].startswith(b"HTTP/"):
            status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(b":")
            headers[k.strip().lower().decode(errors="replace")] = v.strip().decode(errors="replace")
        if read_body and "content-length" in headers:
            want = int(headers["content-length"])
            body = bytearray(body)
            while len(body) < want:
                s.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = s.recv(65536)
                if not chunk:
                    break
                body += chunk
            body = bytes(body)
        return status, headers, body, time.monotonic() - t0


# --------------------------------------------------------------------------------------------------------------
# Slot-holding swarm


class Swarm:
    """`n` sockets to `addr`, driven by one thread with a selector. Each socket gets `opening()` when it
    connects and `tick(conn)` every `interval` seconds (bytes to send, or b""); received bytes go to
    `on_data(conn, data)`, which may return bytes to send. A socket the server closes is reopened at once (at
    most every 0.1 s): an attacker that reconnects. `conn` is a dict the callbacks may keep state in."""

    def __init__(self, addr, n, opening=lambda conn: b"", tick=None, interval=1.0, on_data=None):
        self.addr, self.n = addr, n
        self.opening, self.tick, self.interval, self.on_data = opening, tick, interval, on_data
        self.sel = selectors.DefaultSelector()
        self.conns = []
        self.connects = self.closed_by_server = self.connect_failures = 0
        self.max_open = 0

    def _open(self, conn):
        for key in [k for k in conn if k != "id"]:  # per-socket state starts afresh on every reconnect
            del conn[key]
        s = socket.socket()
        s.setblocking(False)
        err = s.connect_ex(self.addr)
        if err not in (0, errno.EINPROGRESS):
            s.close()
            self.connect_failures += 1
            conn["retry_at"] = time.monotonic() + 0.5
            return
        conn.update(sock=s, state="connecting", since=time.monotonic(), next_tick=time.monotonic() + self.interval,
                    pending=b"")
        self.sel.register(s, selectors.EVENT_WRITE, conn)

    def _drop(self, conn, by_server):
        s = conn.get("sock")
        if s is not None:
            try:
                self.sel.unregister(s)
            except (KeyError, ValueError):
                pass
            s.close()
        if by_server:
            self.closed_by_server += 1
        conn.update(sock=None, state="closed", retry_at=time.monotonic() + 0.1)

    def _send(self, conn, data):
        data = conn["pending"] + data
        if not data:
            return
        try:
            n = conn["sock"].send(data)
        except BlockingIOError:
            n = 0
        except OSError:
            self._drop(conn, True)
            return
        conn["pending"] = data[n:]

    def run(self, seconds, stop=None):
        for k in range(self.n):
            conn = {"id": k}
            self.conns.append(conn)
            self._open(conn)
        end = time.monotonic() + seconds
        while time.monotonic() < end and not (stop and stop.is_set()):
            now = time.monotonic()
            for conn in self.conns:
                if conn.get("sock") is None and now >= conn.get("retry_at", 0):
                    self._open(conn)
                elif conn.get("state") == "open" and now >= conn["next_tick"]:
                    conn["next_tick"] = now + self.interval
                    if self.tick:
                        self._send(conn, self.tick(conn))
            self.max_open = max(self.max_open, sum(1 for c in self.conns if c.get("state") == "open"))
            for key, events in self.sel.select(timeout=0.05):
                conn = key.data
                s = conn.get("sock")
                if s is None or s is not key.fileobj:
                    continue
                if conn["state"] == "connecting":
                    err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        self.connect_failures += 1
                        self._drop(conn, False)
                        continue
                    self.connects += 1
                    conn["state"] = "open"
                    self.sel.modify(s, selectors.EVENT_READ, conn)
                    self._send(conn, self.opening(conn))
                    continue
                try:
                    data = s.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    self._drop(conn, True)
                    continue
                if not data:
                    self._drop(conn, True)
                    continue
                if self.on_data:
                    reply = self.on_data(conn, data)
                    if reply and conn.get("sock") is not None:
                        self._send(conn, reply)
        for conn in self.conns:
            if conn.get("sock") is not None:
                self._drop(conn, False)
        self.sel.close()


class FrameReader:
    """Splits a byte stream into HTTP/2 frames (for the swarm's HTTP/2 sockets)."""

    def __init__(self):
        self.buf = bytearray()

    def feed(self, data):
        self.buf += data
        frames = []
        while len(self.buf) >= 9:
            length = int.from_bytes(self.buf[0:3], "big")
            if len(self.buf) < 9 + length:
                break
            frames.append((self.buf[3], self.buf[4], int.from_bytes(self.buf[5:9], "big") & 0x7FFFFFFF,
                           bytes(self.buf[9 : 9 + length])))
            del self.buf[: 9 + length]
        return frames
