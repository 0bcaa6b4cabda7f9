#!/usr/bin/env bash
# A real Prometheus (Debian's prometheus 2.42, `make test-deps`) against a real server: it scrapes the metrics
# port every second and loads deploy/monitoring/alerts.rules.yml. After real traffic (grpcurl, test-set images),
# the PromQL expressions of docs/operations.md (request rate, latency quantiles, queue depth, batch size, images by reason)
# must return sensible values, the alert rules must evaluate without error and stay quiet, and every expression
# of deploy/monitoring/dashboard.json must parse and return data. Offline; on loopback only.
# Also: promtool check rules, promtool test rules (deploy/monitoring/alerts.test.yml), and the PrometheusRule
# (deploy/monitoring/prometheusrule.yaml) generated from the rules file and identical in content.
set -euo pipefail
cd "$(dirname "$0")/.."
GRPCURL=${GRPCURL:-.venv-tools/bin/grpcurl}
PYTHON=${PYTHON:-.venv-tools/bin/python}
PROMETHEUS=${PROMETHEUS:-prometheus}
PROMTOOL=${PROMTOOL:-promtool}
MON=deploy/monitoring
fail() { echo "FAIL: $*"; exit 1; }
pass() { echo "ok - $*"; }
started=$(date +%s.%N)

for tool in "$PROMETHEUS" "$PROMTOOL"; do
  command -v "$tool" >/dev/null || fail "$tool missing: run \`make test-deps\` (Debian package prometheus)"
done
[ -x "$GRPCURL" ] && [ -x "$PYTHON" ] || fail "$GRPCURL or $PYTHON missing: run \`make tools\`"

# The documented expressions (docs/operations.md, "Prometheus: queries, alerts, dashboard"), exactly as written there.
EXPR_RATE='sum by (rpc, code) (rate(fmnist_requests_total[5m]))'
EXPR_P50='histogram_quantile(0.5, sum by (rpc, le) (rate(fmnist_request_duration_seconds_bucket{rpc=~"Classify|ModelInfer|v2/infer",code="Ok"}[5m])))'
EXPR_P99='histogram_quantile(0.99, sum by (rpc, le) (rate(fmnist_request_duration_seconds_bucket{rpc=~"Classify|ModelInfer|v2/infer",code="Ok"}[5m])))'
EXPR_QUEUE='sum by (model, version) (fmnist_queue_depth_images)'
EXPR_BATCH='sum by (model) (rate(fmnist_batch_size_images_sum[5m])) / sum by (model) (rate(fmnist_batch_size_images_count[5m]))'
EXPR_REASONS='sum by (outcome, reason) (rate(fmnist_images_total[5m]))'
missing=1
for doc in docs/operations.md; do
  [ -f "$doc" ] || continue
  missing=0
  for e in "$EXPR_RATE" "$EXPR_P50" "$EXPR_P99" "$EXPR_QUEUE" "$EXPR_BATCH" "$EXPR_REASONS"; do
    grep -qF -- "$e" "$doc" || missing=1
  done
  [ $missing -eq 0 ] && break
done
[ $missing -eq 0 ] || fail "docs/operations.md does not show the expressions this test checks"
pass "the expressions checked are the documented ones ($doc)"

# The rules, without a server: syntax, unit tests, and the one source of truth.
out=$("$PROMTOOL" check rules "$MON/alerts.rules.yml" 2>&1) || fail "promtool check rules: $out"
grep -q 'SUCCESS: 16 rules found' <<<"$out" || fail "promtool check rules: $out"
pass "promtool check rules: 10 alerting rules, 6 recording rules (the drift group)"
out=$(cd "$MON" && "$PROMTOOL" test rules alerts.test.yml 2>&1) || fail "promtool test rules: $out"
pass "promtool test rules: each alert fires where it should and stays quiet where it should not"
python3 "$MON/generate.py" --check || fail "$MON/prometheusrule.yaml is stale"
"$PYTHON" - "$MON" <<'PY' || fail "the PrometheusRule and the rules file differ"
import sys, yaml
mon = sys.argv[1]
rules = yaml.safe_load(open(f"{mon}/alerts.rules.yml"))
cr = yaml.safe_load(open(f"{mon}/prometheusrule.yaml"))
assert (cr["apiVersion"], cr["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule"), cr
assert cr["spec"] == rules, "spec differs from alerts.rules.yml"
PY
pass "the PrometheusRule is generated from alerts.rules.yml and identical in content"

# The server, and one round of every kind of call before Prometheus starts: each series then exists at the first
# scrape, so the round after it shows as a rate above 0.
source tests/lib/server.sh
start_server
work=$(mktemp -d)
prom_pid=""
trap 'kill $prom_pid $ALL_SERVER_PIDS 2>/dev/null; wait $prom_pid $ALL_SERVER_PIDS 2>/dev/null; rm -rf "$work" $ALL_SERVER_LOGS' EXIT
# Requests: 16 test-set images as raw pixels in one call (a batch of 16), an all-black image (low contrast) and
# one of the wrong size.
python3 - "$work" <<'PY'
import base64, json, sys
images = open("tests/fixtures/test-images.u8", "rb").read()
raw = [{"raw": base64.b64encode(images[i * 784:(i + 1) * 784]).decode()} for i in range(16)]
json.dump({"images": raw}, open(f"{sys.argv[1]}/batch.json", "w"))
bad = [{"raw": base64.b64encode(bytes(784)).decode()}, {"raw": base64.b64encode(bytes(10)).decode()}]
json.dump({"images": bad}, open(f"{sys.argv[1]}/rejected.json", "w"))
PY
# One round: 3 calls answered Ok and 1 InvalidArgument; 18 images accepted and 2 rejected.
traffic() {
  local out
  out=$($GRPCURL -plaintext -d "{\"images\":[{\"encoded\":\"$(base64 -w0 tests/fixtures/png/ankle-boot-0.png)\"}]}" \
        "$GRPC_ADDR" fashion_mnist.v1.Classifier/Classify)
  grep -q '"accepted": true' <<<"$out" || fail "Classify of a PNG: $out"
  out=$($GRPCURL -plaintext -d @ "$GRPC_ADDR" fashion_mnist.v1.Classifier/Classify <"$work/batch.json")
  [ "$(grep -c '"prediction"' <<<"$out")" -eq 16 ] || fail "Classify of 16 raw images: $out"
  out=$($GRPCURL -plaintext -d @ "$GRPC_ADDR" fashion_mnist.v1.Classifier/Classify <"$work/rejected.json")
  grep -q 'REASON_LOW_CONTRAST' <<<"$out" && grep -q 'REASON_WRONG_SIZE' <<<"$out" || fail "Classify of rejected images: $out"
  out=$($GRPCURL -plaintext -d "{\"model_name\":\"cnn\",\"inputs\":[{\"name\":\"encoded\",\"datatype\":\"BYTES\",\"shape\":[1],
        \"contents\":{\"bytes_contents\":[\"$(base64 -w0 tests/fixtures/png/sneaker-9.png)\"]}}]}" \
        "$GRPC_ADDR" inference.GRPCInferenceService/ModelInfer)
  grep -q 'rawOutputContents' <<<"$out" || fail "ModelInfer: $out"
  out=$($GRPCURL -plaintext -d '{"images":[]}' "$GRPC_ADDR" fashion_mnist.v1.Classifier/Classify 2>&1) && fail "empty request succeeded"
  grep -q InvalidArgument <<<"$out" || fail "empty request: $out"
}
traffic

# The live checks, in one Python process: `prom.py ready`, `prom.py up`, `prom.py check` (below).
cat >"$work/prom.py" <<'PY'
import json, math, os, re, sys, time, urllib.error, urllib.parse, urllib.request

PROM, MODE = sys.argv[1], sys.argv[2]
E = {k[5:]: v for k, v in os.environ.items() if k.startswith("EXPR_")}


def get(path, timeout=5):
    try:
        with urllib.request.urlopen(PROM + path, timeout=timeout) as r:
            return json.load(r) if path.startswith("/api/") else r.read()
    except urllib.error.HTTPError as e:
        return json.load(e)


def query(expr):
    body = get("/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    assert body.get("status") == "success", f"{expr}: {body.get('errorType')}: {body.get('error')}"
    assert body["data"]["resultType"] == "vector", f"{expr}: a {body['data']['resultType']}"
    return [(s["metric"], float(s["value"][1])) for s in body["data"]["result"]]


def value(expr, **labels):
    """The value of the one series of EXPR whose labels include LABELS; None if there is none."""
    found = [v for m, v in query(expr) if all(m.get(k) == w for k, w in labels.items())]
    assert len(found) <= 1, f"{expr} {labels}: {found}"
    return found[0] if found else None


def wait(what, condition, seconds=15):
    deadline = time.monotonic() + seconds
    while True:
        try:
            if condition():
                return
        except (OSError, AssertionError):
            pass
        if time.monotonic() > deadline:
            sys.exit(f"FAIL: timed out waiting for {what}")
        time.sleep(0.1)


def ok(msg):
    print(f"ok - {msg}", flush=True)


def positive(x):
    return x is not None and x > 0  # NaN is not


if MODE == "ready":  # Prometheus answers /-/ready (or exits: then this fails at once)
    pid = int(sys.argv[3])
    def ready():
        os.kill(pid, 0)
        return get("/-/ready", timeout=1) is not None
    try:
        wait("prometheus to be ready", ready, 20)
    except ProcessLookupError:
        sys.exit(1)
    sys.exit(0)

if MODE == "up":
    wait("the target to be up", lambda: value('up{job="fmnist"}') == 1.0)
    ok("the target is up")
    sys.exit(0)

assert MODE == "check", MODE
metrics_url, rules_file, dashboard_file = sys.argv[3:6]
# The round of calls after the first scrape, scraped: every series has moved.
# (The empty request is the round's last call.)
wait("the second round of calls to be scraped", lambda: positive(value(E["RATE"], rpc="Classify", code="InvalidArgument")))

ok_rate, bad_rate = value(E["RATE"], rpc="Classify", code="Ok"), value(E["RATE"], rpc="Classify", code="InvalidArgument")
infer_rate = value(E["RATE"], rpc="ModelInfer", code="Ok")
assert positive(ok_rate) and positive(bad_rate) and positive(infer_rate), query(E["RATE"])
assert ok_rate > bad_rate, f"Classify: Ok {ok_rate}/s should exceed InvalidArgument {bad_rate}/s (3 calls to 1 a round)"
ok(f"request rate: Classify Ok {ok_rate:.4f}/s > InvalidArgument {bad_rate:.4f}/s > 0, ModelInfer Ok {infer_rate:.4f}/s")

p50, p99 = value(E["P50"], rpc="Classify"), value(E["P99"], rpc="Classify")
assert positive(p50) and p50 <= p99 < 10, f"latency: want 0 < p50 <= p99 < 10 s, got {p50}, {p99}"
assert positive(value(E["P99"], rpc="ModelInfer")), query(E["P99"])
ok(f"latency of Classify answered Ok: p50 {p50 * 1e3:.2f} ms <= p99 {p99 * 1e3:.2f} ms (and a p99 for ModelInfer)")

depths = {(m["model"], m["version"]): v for m, v in query(E["QUEUE"])}
# The served version of each shipped model: its newest (the shipped repository has no version policy).
models = os.path.join(os.environ["REPO_ROOT"], "models")
served = {(m, str(max(int(v) for v in os.listdir(os.path.join(models, m)) if v.isdigit())))
          for m in ("cnn", "cnn-int8", "dense")}
assert set(depths) == served, (depths, served)
assert all(0 <= v <= 1024 for v in depths.values()), depths
ok(f"queue depth: one series per model version, within 0..1024: {depths}")

batch = value(E["BATCH"], model="cnn")
assert batch is not None and 1 < batch <= 16, f"mean batch size of cnn {batch}: want 1 < x <= 16: {query(E['BATCH'])}"
ok(f"mean batch size of cnn: {batch:.2f} images (batches of 1 and 16 images)")

accepted = value(E["REASONS"], outcome="accepted", reason="accepted")
dark = value(E["REASONS"], outcome="rejected", reason="low_contrast")
wrong = value(E["REASONS"], outcome="rejected", reason="wrong_size")
assert positive(accepted) and positive(dark) and positive(wrong), query(E["REASONS"])
assert accepted > dark, (accepted, dark)
ok(f"images by reason: accepted {accepted:.4f}/s, rejected low_contrast {dark:.4f}/s and wrong_size {wrong:.4f}/s")

# Every metric name in the rules and the dashboard is one the server exports.
with urllib.request.urlopen(metrics_url, timeout=5) as r:
    exported = set(re.findall(r"^# TYPE (\S+) ", r.read().decode(), re.M))
used = set()
for path in (rules_file, dashboard_file):
    used |= {re.sub(r"_(bucket|sum|count)$", "", m) for m in re.findall(r"\bfmnist_[a-z_]+", open(path).read())}
assert used <= exported, f"not exported by the server: {sorted(used - exported)}"
ok(f"the {len(used)} metric names in the rules and the dashboard are all exported by the server")

# The alert rules, loaded from the file and evaluated on the live data: no error, nothing pending or firing.
def rules():
    return [r for g in get("/api/v1/rules")["data"]["groups"] for r in g["rules"]]
wait("the rules to be evaluated", lambda: len(rules()) == 16 and all(r.get("evaluationTime", 0) > 0 for r in rules()))
alerts = [r for r in rules() if r["type"] == "alerting"]
names = sorted(r["name"] for r in alerts)
assert names == sorted(["FmnistHighErrorRatio", "FmnistHighLatencyP99", "FmnistQueueSaturated",
                        "FmnistResourceExhaustedSustained", "FmnistModelLoadFailed",
                        "FmnistOutOfDistributionShareHigh", "FmnistLowConfidenceShareHigh", "FmnistClassMixShifted",
                        "FmnistConfidenceDropped", "FmnistInputBrightnessShifted"]), names
for r in rules():
    assert r["health"] == "ok" and not r.get("lastError"), (r["name"], r["health"], r.get("lastError"))
for r in alerts:
    assert r["state"] == "inactive" and not r["alerts"], (r["name"], r["state"], r["alerts"])
ok("the live Prometheus loaded the 10 alerts and 6 recording rules: each evaluates without error, and every alert is inactive under healthy traffic")

# Every expression of the dashboard, Grafana's interval variables filled in, parses and returns data.
dash = json.load(open(dashboard_file))
assert dash["templating"]["list"][0]["type"] == "datasource", "the dashboard picks its Prometheus with a variable"
def panels(ps):
    for p in ps:
        yield p
        yield from panels(p.get("panels", []))
exprs = []
for p in panels(dash["panels"]):
    assert p.get("datasource", {}).get("uid") in (None, "${datasource}"), (p["title"], p.get("datasource"))
    exprs += [(p["title"], t["expr"]) for t in p.get("targets", [])]
for title, expr in exprs:
    q = expr.replace("$__rate_interval", "1m").replace("$__range", "1h").replace("$__interval", "15s")
    assert "$" not in q, f"{title}: a variable this test does not fill in: {expr}"
    assert query(q), f"{title}: {expr}: no data"
ok(f"the dashboard's {len(exprs)} expressions ({sum(1 for _ in panels(dash['panels']))} panels) parse and return data")
PY

# Prometheus on a free loopback port, scraping every second, with the alert rules and a throwaway TSDB.
cat >"$work/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - $PWD/$MON/alerts.rules.yml
scrape_configs:
  - job_name: fmnist
    static_configs:
      - targets: ["$METRICS_ADDR"]
EOF
"$PROMTOOL" check config "$work/prometheus.yml" >/dev/null || fail "promtool check config"
for attempt in 1 2 3; do
  # A port bound by the kernel, then released; another process taking it in between costs a retry.
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  PROM="http://127.0.0.1:$port"
  "$PROMETHEUS" --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/data" \
    --web.listen-address="127.0.0.1:$port" --log.level=warn >"$work/prometheus.log" 2>&1 &
  prom_pid=$!
  python3 "$work/prom.py" "$PROM" ready "$prom_pid" && break
  kill "$prom_pid" 2>/dev/null; wait "$prom_pid" 2>/dev/null || true; prom_pid=""
done
[ -n "$prom_pid" ] || fail "prometheus did not start: $(cat "$work/prometheus.log")"
pass "$("$PROMETHEUS" --version 2>&1 | head -1 | cut -d' ' -f1-3) ready on $PROM, scraping $METRICS_ADDR every second"
python3 "$work/prom.py" "$PROM" up

traffic
EXPR_RATE=$EXPR_RATE EXPR_P50=$EXPR_P50 EXPR_P99=$EXPR_P99 EXPR_QUEUE=$EXPR_QUEUE EXPR_BATCH=$EXPR_BATCH \
  REPO_ROOT=$PWD EXPR_REASONS=$EXPR_REASONS python3 "$work/prom.py" "$PROM" check "http://$METRICS_ADDR/metrics" \
  "$MON/alerts.rules.yml" "$MON/dashboard.json" || fail "the live checks (prometheus log: $(tail -5 "$work/prometheus.log"))"

kill "$prom_pid"; wait "$prom_pid" 2>/dev/null || true; prom_pid=""
echo "prometheus: all checks passed in $(python3 -c "import time; print(f'{time.time() - $started:.1f}')") s"
