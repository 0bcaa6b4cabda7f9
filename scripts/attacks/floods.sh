#!/usr/bin/env bash
# Attack campaign (README "The attacks, before and after"), outside `make test` for its length: one HTTP/2
# connection with 5,000 concurrent health checks (h2load, Debian nghttp2-client), then 2,000 silent TCP
# connections, against the release binary with its defaults (`make build` first). Prints RSS figures.
set -u
cd "$(dirname "$0")/../.."
TMP=$(mktemp -d)
source tests/lib/server.sh
start_server
ADDR=$GRPC_ADDR
echo "idle: RSS $(server_rss_mib) MiB, peak $(server_peak_mib) MiB"
# A health check as a gRPC message: 5-byte frame header + empty HealthCheckRequest.
printf '\x00\x00\x00\x00\x00' > "$TMP/empty.bin"
h2load -c1 -m5000 -n50000 -d "$TMP/empty.bin" -H 'content-type: application/grpc' -H 'te: trailers' \
  "http://$ADDR/grpc.health.v1.Health/Check" 2>&1 | grep -E "requests:|status codes|finished in"
echo "after h2load -c1 -m5000 (50,000 health checks): RSS $(server_rss_mib) MiB, peak $(server_peak_mib) MiB"
# 2,000 silent TCP connections.
python3 - "$ADDR" <<'PY'
import socket, sys, time
host, port = sys.argv[1].rsplit(":", 1)
socks, failed = [], 0
for _ in range(2000):
    s = socket.socket(); s.settimeout(2)
    try:
        s.connect((host, int(port))); socks.append(s)
    except OSError:
        failed += 1
print(f"opened {len(socks)} silent connections ({failed} connects failed)")
time.sleep(40)
closed = 0
for s in socks:
    s.setblocking(False)
    try:
        d = s.recv(65536)
        # The server's HTTP/2 preface (SETTINGS) may be waiting; read again to see EOF.
        while d:
            d = s.recv(65536)
        closed += 1
    except BlockingIOError:
        pass
    except OSError:
        closed += 1
print(f"after 40 s: {closed} of {len(socks)} closed by the server")
PY
echo "after the silent flood: RSS $(server_rss_mib) MiB, peak $(server_peak_mib) MiB"
curl -s "http://$METRICS_ADDR/metrics" | grep '^fmnist_connections' 
