# Sourced by the shell tests: starts the release server on ephemeral ports and exports GRPC_ADDR and
# METRICS_ADDR (read back from its log, so no port is ever guessed). Stops it on exit. Called again, it starts
# another server (its own log and addresses) and stops them all on exit.
start_server() {
  SERVER_LOG=$(mktemp)
  # FMNIST_DEFAULT_MODEL: the FP32 model on every CPU (the shipped `auto` picks cnn-int8 where INT8 pays),
  # so expected answers do not depend on the machine; a --default-model argument still wins.
  RUST_LOG=info FMNIST_DEFAULT_MODEL=${FMNIST_DEFAULT_MODEL:-cnn} ./target/release/fmnist serve --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 "$@" >"$SERVER_LOG" 2>&1 &
  SERVER_PID=$!
  ALL_SERVER_PIDS="${ALL_SERVER_PIDS:-} $SERVER_PID"
  ALL_SERVER_LOGS="${ALL_SERVER_LOGS:-} $SERVER_LOG"
  trap 'kill $ALL_SERVER_PIDS 2>/dev/null; wait $ALL_SERVER_PIDS 2>/dev/null; rm -f $ALL_SERVER_LOGS' EXIT
  for _ in $(seq 1 600); do
    if grep -q 'serving' "$SERVER_LOG"; then break; fi
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then echo "server exited:"; cat "$SERVER_LOG"; return 1; fi
    sleep 0.1
  done
  GRPC_ADDR=$(grep -o 'grpc=[0-9.:]*' "$SERVER_LOG" | head -1 | cut -d= -f2)
  METRICS_ADDR=$(grep -o 'metrics=[0-9.:]*' "$SERVER_LOG" | head -1 | cut -d= -f2)
  [ -n "$GRPC_ADDR" ] || { echo "no address in server log:"; cat "$SERVER_LOG"; return 1; }
  export GRPC_ADDR METRICS_ADDR
}

# Resident and peak resident memory of the started server, in MiB (for the attack scripts).
server_rss_mib() { awk '/VmRSS/{print int($2/1024)}' "/proc/$SERVER_PID/status"; }
server_peak_mib() { awk '/VmHWM/{print int($2/1024)}' "/proc/$SERVER_PID/status"; }
