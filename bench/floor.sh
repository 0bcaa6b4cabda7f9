#!/usr/bin/env bash
# The floor under the serving work (issue #34): server CPU per unary gRPC call, under the same h2load load, for
#   floor        examples/grpc_floor: bare tonic with grpc.health.v1 only (tonic + hyper + h2 + tokio + TCP)
#   health       `fmnist serve`'s own grpc.health.v1 Check (the floor plus the service's layers: admission of
#                the connection, metrics, the request-id and tracing layers, the router)
#   noop-raw     `fmnist serve` with the no-op model (bench/noop-models): Classify of one raw 28x28 image, the
#                whole single-image path with ONNX Runtime costing microseconds
# alternated round after round, so the host's drift falls on each alike. CPU per call is the server's
# utime + stime (/proc/PID/stat) over the whole h2load run (its connections' set-up included, after a separate
# warm-up run), divided by the calls answered: for the service, the calls its own counter saw end with gRPC
# status OK (h2load counts any HTTP 200, and a failed gRPC call is an HTTP 200 too); for the bare server, whose
# one call cannot fail, h2load's count. Both service targets serve the no-op model and never poll the repository.
#
#   bash bench/floor.sh [ROUNDS] [SECONDS]    (after `make bench` or bench/encode_requests.py wrote the bodies)
set -uo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3} seconds=${2:-4}
bin=target/release/fmnist floor=target/release/examples/grpc_floor
[ -x "$bin" ] && [ -x "$floor" ] || cargo build --release --bin fmnist --example grpc_floor || exit 1
command -v h2load > /dev/null || { echo "h2load is needed (Debian: nghttp2-client)" >&2; exit 1; }
body=bench/results/tmp/bodies/fmnist-cnn-raw.bin
[ -f "$body" ] || { echo "$body is missing: run make bench (or bench/encode_requests.py) first" >&2; exit 1; }
frames=$(mktemp -d); trap 'rm -rf "$frames"; kill $(jobs -p) 2> /dev/null' EXIT
printf '\0\0\0\0\0' > "$frames/health.grpc"  # an empty HealthCheckRequest: service "" (the server as a whole)
python3 - "$body" "$frames/raw.grpc" <<'PY'
import struct, sys
data = open(sys.argv[1], "rb").read()
(n,) = struct.unpack("<I", data[:4])
open(sys.argv[2], "wb").write(data[4:4 + n])
PY
ticks=$(getconf CLK_TCK)
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
ok_calls() { # the service's calls answered with gRPC status OK, from its /metrics (empty for the bare server)
  [ "$target" = floor ] && return
  curl -s "http://127.0.0.1:9571/metrics" | awk '/^fmnist_requests_total\{/ && /code="Ok"/ {n += $NF} END {print n + 0}'
}
start() { # TARGET -> sets pid, port, path, frame
  port=50571
  case $1 in
    floor) "$floor" --listen 127.0.0.1:$port 2> /dev/null & path=/grpc.health.v1.Health/Check frame=health ;;
    health) "$bin" serve --listen 127.0.0.1:$port --metrics-listen 127.0.0.1:9571 --models-dir bench/noop-models \
      --models cnn --model-poll-s 0 > /dev/null 2>&1 & path=/grpc.health.v1.Health/Check frame=health ;;
    noop-raw) "$bin" serve --listen 127.0.0.1:$port --metrics-listen 127.0.0.1:9571 --models-dir bench/noop-models \
      --models cnn --model-poll-s 0 > /dev/null 2>&1 & path=/fashion_mnist.v1.Classifier/Classify frame=raw ;;
  esac
  pid=$!
  for _ in $(seq 100); do
    h2load -n 1 -c 1 -d "$frames/$frame.grpc" -H 'content-type: application/grpc' -H 'te: trailers' \
      "http://127.0.0.1:$port$path" 2> /dev/null | grep -q '1 succeeded' && return
    sleep 0.2
  done
  echo "$1 did not start" >&2; exit 1
}
row() { # TARGET C
  local clients=$(($2 >= 4 ? 4 : 1)) before after ok_before ok_after out calls sent
  h2load -D 1 -c "$clients" -m $(($2 / clients)) -d "$frames/$frame.grpc" -H 'content-type: application/grpc' \
    -H 'te: trailers' "http://127.0.0.1:$port$path" > /dev/null  # warm-up
  before=$(cpu "$pid") ok_before=$(ok_calls)
  out=$(h2load -D "$seconds" -c "$clients" -m $(($2 / clients)) -d "$frames/$frame.grpc" \
    -H 'content-type: application/grpc' -H 'te: trailers' "http://127.0.0.1:$port$path")
  after=$(cpu "$pid") ok_after=$(ok_calls)
  sent=$(sed -n 's/^requests: .* \([0-9]*\) succeeded.*/\1/p' <<< "$out")
  calls=${sent:-0}
  if [ -n "$ok_after" ]; then
    calls=$((ok_after - ok_before))
    # The two counts differ by the few calls in flight at the window's ends; more is failures.
    [ $(((calls - ${sent:-0}) * 100 / (calls + 1))) -eq 0 ] ||
      echo "  ($1 C=$2: h2load counted ${sent:-0} calls, the server $calls with status OK)" >&2
  fi
  [ "$calls" -gt 0 ] || { echo "$1 C=$2: no call answered" >&2; return; }
  python3 -c "
calls, cpu = $calls, ($after - $before) / $ticks
print('%-9s C=%-3s %8.0f calls/s  server CPU %6.1f us per call  (%.2f cores)' % ('$1', $2, calls / $seconds, cpu / calls * 1e6, cpu / $seconds))"
}
echo "# $(date -u '+%Y-%m-%d %H:%M UTC'), lscpu \"$(lscpu | sed -n 's/^Model name: *//p')\", $(nproc) CPUs, h2load ${seconds} s windows"
for round in $(seq "$rounds"); do
  for target in floor health noop-raw; do
    start "$target"
    for c in 1 64; do echo "r$round $(row "$target" "$c")"; done
    kill "$pid"; wait "$pid" 2> /dev/null
  done
done
