#!/usr/bin/env bash
# Attack campaign: 30 gRPC-Web uploads over HTTP/1.1 that declare 16 MiB, send up to 15 MiB and stall, against
# the release binary with its defaults (`make build` first; grpcurl from `make tools`). Prints RSS figures, when
# the server closed them, and how a polite client fared meanwhile.
set -u
cd "$(dirname "$0")/../.."
source tests/lib/server.sh
start_server
ADDR=$GRPC_ADDR
echo "idle: RSS $(server_rss_mib) MiB"
python3 - "$ADDR" <<'PY'
import socket, sys, time, threading
host, port = sys.argv[1].rsplit(":", 1)
head = (f"POST /fashion_mnist.v1.Classifier/Classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/grpc-web\r\n"
        f"Content-Length: {16 << 20}\r\n\r\n").encode()
chunk = b"\0" * (1 << 20)
results = []
def upload():
    s = socket.create_connection((host, int(port)))
    s.sendall(head)
    sent = 0
    try:
        for _ in range(15):
            s.sendall(chunk); sent += 1
    except OSError:
        pass
    t0 = time.time()
    s.settimeout(60)
    try:
        while s.recv(65536):
            pass
    except OSError:
        pass
    results.append((sent, time.time() - t0))
threads = [threading.Thread(target=upload) for _ in range(30)]
[t.start() for t in threads]
# Meanwhile a polite client: 20 one-image calls with grpcurl, on its own connections, while the uploads stall.
import base64, subprocess
time.sleep(3)
pixels = base64.b64encode(open("tests/fixtures/test-images.u8", "rb").read()[:784]).decode()
served = 0
for _ in range(20):
    out = subprocess.run([".venv-tools/bin/grpcurl", "-plaintext", "-d", '{"images":[{"raw":"%s"}]}' % pixels,
                          f"{host}:{port}", "fashion_mnist.v1.Classifier/Classify"], capture_output=True, text=True)
    served += out.returncode == 0 and '"prediction"' in out.stdout
print(f"polite client during the stall: {served} of 20 calls served")
[t.join() for t in threads]
print(f"30 stalled uploads: MiB sent {sorted(r[0] for r in results)}; closed by the server after {min(r[1] for r in results):.1f}-{max(r[1] for r in results):.1f} s")
PY
echo "after: RSS $(server_rss_mib) MiB, peak $(server_peak_mib) MiB"
