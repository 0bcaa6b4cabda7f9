#!/usr/bin/env bash
# Alternates server layouts under the same loads, round after round, with examples/loadgen; prints one line per
# (round, layout, model, load): images/s, server cores, CPU per image, p50, the formed batch and peak RSS.
# Run on a quiet machine, after `make bench` has written the request bodies (bench/results/tmp/bodies/).
#
#   bash bench/layouts.sh [ROUNDS] [MODEL...]       (default: 2 rounds of cnn-int8 and cnn)
#   LAYOUTS="1x2=--instances 1;adaptive=--instances 2 --ort-threads 1 --solo-threads 2" bash bench/layouts.sh
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-2}; shift || true
models=("${@:-cnn-int8}"); [ $# -gt 0 ] || models=(cnn-int8 cnn)
IFS=';' read -r -a layouts <<< "${LAYOUTS:-1x2=--instances 1;2x1=--instances 2 --ort-threads 1;adaptive=--instances 2 --ort-threads 1 --solo-threads 2}"
IFS=';' read -r -a loads <<< "${LOADS:-raw 64 1;raw 1 1;raw 4 1;multi16 64 16;multi16 1 16;multi16 4 16}"
seconds=${SECONDS_PER_LOAD:-4}
bin=target/release/fmnist loadgen=target/release/examples/loadgen
[ -x "$bin" ] && [ -x "$loadgen" ] || cargo build --release --bin fmnist --example loadgen
for round in $(seq "$rounds"); do
  for model in "${models[@]}"; do
    for layout in "${layouts[@]}"; do
      label=${layout%%=*}; read -r -a flags <<< "${layout#*=}"
      "$bin" serve --listen 127.0.0.1:50561 --metrics-listen 127.0.0.1:9561 --default-model "$model" "${flags[@]}" \
        > /tmp/layouts-serve.log 2>&1 &
      pid=$!
      for _ in $(seq 150); do curl -sf localhost:50561/v2/health/ready > /dev/null && break; sleep 0.2; done
      for load in "${loads[@]}"; do
        read -r mode concurrency images <<< "$load"
        json=$("$loadgen" --addr 127.0.0.1:50561 --path /fashion_mnist.v1.Classifier/Classify \
          --bodies "bench/results/tmp/bodies/fmnist-$model-$mode.bin" --images-per-request "$images" \
          --concurrency "$concurrency" --seconds "$seconds" --warmup 1 --server-pid "$pid" \
          --metrics 127.0.0.1:9561 2> /dev/null)
        python3 - "$round" "$label" "$model" "$mode" "$concurrency" "$json" <<'PY'
import json, sys
r, label, model, mode, c, raw = sys.argv[1:]
d = json.loads(raw)
print(f"r{r} {label:9s} {model:9s} {mode:8s} C={c:<4s} img/s {d['images_per_s']:7.0f} cores {d['server_cpu_cores']:.2f} "
      f"us/img {d['server_cpu_cores'] / d['images_per_s'] * 1e6:6.1f} p50 {d['latency_p50_ms']:.3f} "
      f"batch {d['batch_avg'] or 0:.1f} busy {d['machine_busy_cores']:.2f} rss_mb {d['server_peak_rss_kb'] // 1024}")
PY
      done
      kill "$pid"; wait "$pid" 2> /dev/null || true
    done
  done
done
