#!/usr/bin/env bash
# Thread placement, and a held-out load generator (h2load) beside examples/loadgen, alternated round after round
# on a quiet machine (issue #34). Prints one line per (round, model, layout, placement, load).
#   unpinned  the kernel places every thread (what ships)
#   split     1 instance x 2 threads: the tokio workers and ONNX Runtime's pool thread on CPU 0, the inference
#             thread on CPU 1 (network and the calling thread of the session apart)
#   pinned    2 instances x 1 thread: each inference thread on its own CPU, the tokio workers unpinned
# h2load runs beside the unpinned default only: the same gRPC frame (the first body of the file) over 4
# connections x 16 streams (C=64) or 1 x 1 (C=1).
#
#   bash bench/placement.sh [ROUNDS]      (after `make bench` or bench/encode_requests.py wrote the bodies)
set -uo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-2}
bin=target/release/fmnist loadgen=target/release/examples/loadgen
[ -x "$bin" ] && [ -x "$loadgen" ] || cargo build --release --bin fmnist --example loadgen
command -v h2load > /dev/null || { echo "h2load is needed (Debian: nghttp2-client)" >&2; exit 1; }
frames=$(mktemp -d); trap 'rm -rf "$frames"' EXIT
for body in bench/results/tmp/bodies/fmnist-*.bin; do
  python3 - "$body" "$frames/$(basename "$body" .bin).grpc" <<'PY'
import struct, sys
data = open(sys.argv[1], "rb").read()
(n,) = struct.unpack("<I", data[:4])
open(sys.argv[2], "wb").write(data[4:4 + n])
PY
done
pin() { # PID PLACEMENT MODEL
  local pid=$1 placement=$2 prefix n=0
  prefix=$(printf 'infer-%s-' "$3" | cut -c1-15)  # a thread's name is cut at 15 bytes
  for task in /proc/"$pid"/task/*; do
    local tid=${task##*/} comm
    comm=$(cat "$task/comm")
    case "$placement:$comm" in
      split:tokio-rt-worker | split:model-loader) taskset -p -c 0 "$tid" > /dev/null ;;  # ORT's pools are named after their creator
      split:infer-*) taskset -p -c 1 "$tid" > /dev/null ;;
      pinned:"$prefix"*) taskset -p -c $((n % 2)) "$tid" > /dev/null; n=$((n + 1)) ;;
    esac
  done
}
loadgen_row() { # MODEL MODE C IMAGES PID
  "$loadgen" --addr 127.0.0.1:50561 --path /fashion_mnist.v1.Classifier/Classify \
    --bodies "bench/results/tmp/bodies/fmnist-$1-$2.bin" --images-per-request "$4" --concurrency "$3" \
    --seconds 4 --warmup 1 --server-pid "$5" --metrics 127.0.0.1:9561 2> /dev/null |
    python3 -c "import json,sys; d=json.load(sys.stdin); print('img/s %7.0f cores %.2f us/img %6.1f p50 %.3f batch %.1f busy %.2f' % (d['images_per_s'], d['server_cpu_cores'], d['server_cpu_cores']/d['images_per_s']*1e6, d['latency_p50_ms'], d['batch_avg'] or 0, d['machine_busy_cores']))"
}
h2load_row() { # MODEL MODE C IMAGES
  local clients=$(($3 >= 4 ? 4 : 1)) out rps latency
  out=$(h2load -D 4 --warm-up-time 1 -c "$clients" -m $(($3 / clients)) -d "$frames/fmnist-$1-$2.grpc" \
    -H 'content-type: application/grpc' -H 'te: trailers' http://127.0.0.1:50561/fashion_mnist.v1.Classifier/Classify)
  rps=$(sed -n 's/.*finished in .*, \([0-9.]*\) req\/s.*/\1/p' <<< "$out")
  latency=$(awk '/time for request/ {print $6}' <<< "$out")
  python3 -c "print('img/s %7.0f (h2load, req/s %s x %s; mean latency %s)' % (float('$rps') * $4, '$rps', $4, '$latency'))"
}
for round in $(seq "$rounds"); do
  for model in cnn-int8 cnn; do
    for layout in "1x2 unpinned" "1x2 split" "2x1 unpinned" "2x1 pinned"; do
      read -r shape placement <<< "$layout"
      flags=(--instances 1); [ "$shape" = 2x1 ] && flags=(--instances 2 --ort-threads 1)
      "$bin" serve --listen 127.0.0.1:50561 --metrics-listen 127.0.0.1:9561 --default-model "$model" "${flags[@]}" \
        > /tmp/placement-serve.log 2>&1 &
      pid=$!
      for _ in $(seq 150); do curl -sf localhost:50561/v2/health/ready > /dev/null && break; sleep 0.2; done
      kill -0 "$pid" 2> /dev/null || { echo "the server did not start: /tmp/placement-serve.log" >&2; exit 1; }
      pin "$pid" "$placement" "$model"
      for load in "raw 64 1" "raw 1 1" "multi16 64 16"; do
        read -r mode c n <<< "$load"
        echo "r$round $model $shape $placement $mode C=$c loadgen $(loadgen_row "$model" "$mode" "$c" "$n" "$pid")"
        if [ "$layout" = "1x2 unpinned" ]; then
          echo "r$round $model $shape $placement $mode C=$c h2load  $(h2load_row "$model" "$mode" "$c" "$n")"
        fi
      done
      kill "$pid"; wait "$pid" 2> /dev/null
    done
  done
done
