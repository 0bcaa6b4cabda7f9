#!/usr/bin/env bash
# Runs the rendered Kubernetes manifests on a real engine, `podman kube play`, with the image `make image` built,
# and checks the pod only from outside it: the probes' endpoint (gRPC health), Classify, ModelInfer, /metrics,
# the uid and the read-only root, then a SIGTERM with calls in flight, which must all succeed, and
# `podman kube play --down`. Two renderings: deploy/base (models baked into the image) and
# deploy/overlays/model-volume (models on a PersistentVolumeClaim, which podman makes a named volume; the
# script fills it first, as the one-off job of deploy/README.md would).
#
# What the manifests set is what runs: arguments, environment, security context, memory and CPU limits, volumes
# and mounts all come from the rendered YAML. What podman does not do (deploy/README.md "A real engine"):
# Services, the HPA and the PDB are not run, a Deployment runs one pod whatever its replicas, probes are not
# acted on (the script calls their endpoint), preStop hooks do not run, and the Namespace is ignored.
#
# `make image` runs it after building the image (scripts/container-check.sh); IMAGE names the image to run.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
IMAGE=${IMAGE:-localhost/fmnist-serve:dev}
KUBECTL=${KUBECTL:-$ROOT/.venv-tools/bin/kubectl}
GRPCURL=${GRPCURL:-$ROOT/.venv-tools/bin/grpcurl}
PODMAN=(podman --runtime runc)
WORK=$(mktemp -d)
fail() { echo "FAIL: $*" >&2; exit 1; }
pass() { echo "ok - $*"; }
PLAYED=""
cleanup() {
  [ -z "$PLAYED" ] || "${PODMAN[@]}" kube play --down "$PLAYED" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT
[ -x "$KUBECTL" ] && [ -x "$GRPCURL" ] || fail "$KUBECTL or $GRPCURL missing: run \`make tools\`"
podman image exists "$IMAGE" || fail "$IMAGE missing: \`make image\` builds it"

# The pod's address on podman's network: the pod is reached there, on the container ports the manifest
# declares (no hostPort: the manifests publish nothing on a node).
pod_ip() {
  local infra
  infra=$(podman pod inspect --format '{{.InfraContainerID}}' "$1")
  podman inspect --format '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$infra"
}

check() {
  local name=$1 dir=$2 rendered=$WORK/$1.yaml
  echo "== $name: podman kube play $(basename "$rendered") (kubectl kustomize $dir)"
  "$KUBECTL" kustomize "$dir" >"$rendered"
  # The image name the manifest uses, pointed at the image built here.
  local ref
  ref=$(sed -n 's/^ *image: *//p' "$rendered" | head -1)
  [ -n "$ref" ] || fail "$rendered names no image"
  podman tag "$IMAGE" "$ref"
  echo "   image $ref = $IMAGE"
  PLAYED=$rendered
  "${PODMAN[@]}" kube play "$rendered" | sed 's/^/   | /'
  local pod container
  pod=$(podman pod ps --format '{{.Name}}' --filter label=app.kubernetes.io/name=fmnist | head -1)
  [ -n "$pod" ] || pod=$(podman pod ps --format '{{.Name}}' | grep '^fmnist' | head -1)
  container=$(podman ps --format '{{.Names}}' --filter "pod=$pod" | grep -v infra | head -1)
  [ -n "$container" ] || fail "no container in pod $pod"
  local ip
  ip=$(pod_ip "$pod")
  echo "   pod $pod, container $container, address $ip"
  local out=""
  for _ in $(seq 1 120); do
    out=$("$GRPCURL" -plaintext -max-time 2 "$ip:50051" grpc.health.v1.Health/Check 2>&1) || true
    grep -q '"SERVING"' <<<"$out" && break
    [ "$(podman inspect --format '{{.State.Running}}' "$container")" = true ] || { podman logs "$container" | tail -20; fail "container exited"; }
    sleep 0.5
  done
  grep -q '"SERVING"' <<<"$out" || { podman logs "$container" | tail -20; fail "not SERVING after 60 s: $out"; }
  pass "$name: the probes' endpoint (grpc.health.v1 on 50051, as startup/readiness/liveness call it) is SERVING"

  local png=tests/fixtures/png/ankle-boot-0.png
  out=$("$GRPCURL" -plaintext -d "{\"images\":[{\"encoded\":\"$(base64 -w0 "$png")\"}]}" "$ip:50051" fashion_mnist.v1.Classifier/Classify)
  grep -q '"className": "Ankle boot"' <<<"$out" || fail "Classify $png: $out"
  pass "$name: Classify of $png answers Ankle boot"
  local raw
  raw=$(python3 -c 'import json,sys; d=open(sys.argv[1],"rb").read()[:784]; print(json.dumps({"model_name":"cnn","inputs":[{"name":"raw","datatype":"UINT8","shape":[1,28,28],"contents":{"uint_contents":list(d)}}]}))' tests/fixtures/test-images.u8)
  out=$("$GRPCURL" -plaintext -d @ "$ip:50051" inference.GRPCInferenceService/ModelInfer <<<"$raw")
  grep -q '"name": "class_id"' <<<"$out" || fail "ModelInfer: $out"
  pass "$name: ModelInfer (Open Inference Protocol, gRPC) answers with class_id"
  curl -sf "http://$ip:9090/metrics" | grep -q '^fmnist_requests_total{' || fail "/metrics lacks fmnist_requests_total"
  pass "$name: /metrics on the metrics port counts the calls"

  local pid uid readonly_root memory
  pid=$(podman inspect --format '{{.State.Pid}}' "$container")
  uid=$(ps -o uid= -p "$pid" | tr -d ' ')
  readonly_root=$(podman inspect --format '{{.HostConfig.ReadonlyRootfs}}' "$container")
  memory=$(podman inspect --format '{{.HostConfig.Memory}}' "$container")
  echo "   process $pid: uid $uid, read-only root $readonly_root, memory limit $memory bytes"
  [ "$uid" = 65532 ] && [ "$readonly_root" = true ] || fail "expected uid 65532 on a read-only root"
  [ "$memory" = $((768 << 20)) ] || fail "memory limit $memory, the manifest says 768Mi"
  pass "$name: uid 65532, read-only root, the manifest's 768Mi memory limit"

  # SIGTERM with 16 calls of 64 images in flight: every one is answered, and the server exits 0.
  python3 - "$ip:50051" "$container" <<'PY' || fail "$name: SIGTERM drain"
import base64, json, subprocess, sys, threading, time
addr, container = sys.argv[1:3]
img = base64.b64encode(open("tests/fixtures/png/ankle-boot-0.png", "rb").read()).decode()
body = json.dumps({"images": [{"encoded": img}] * 64})
results = []
def call():
    p = subprocess.run([".venv-tools/bin/grpcurl", "-plaintext", "-d", "@", addr, "fashion_mnist.v1.Classifier/Classify"],
                       input=body, capture_output=True, text=True)
    results.append(p.returncode == 0 and '"Ankle boot"' in p.stdout)
threads = [threading.Thread(target=call) for _ in range(16)]
for t in threads:
    t.start()
time.sleep(0.3)
subprocess.run(["podman", "kill", "--signal", "TERM", container], check=True, capture_output=True)
for t in threads:
    t.join()
code = subprocess.run(["podman", "wait", container], capture_output=True, text=True).stdout.strip()
print(f"   {sum(results)} of {len(results)} calls in flight answered; exit code {code}")
sys.exit(0 if all(results) and code == "0" else 1)
PY
  pass "$name: SIGTERM with 16 calls in flight: all answered, exit 0"
  "${PODMAN[@]}" kube play --down "$rendered" >/dev/null
  PLAYED=""
  pass "$name: podman kube play --down"
}

check base deploy/base

# The model-volume overlay: its claim becomes the podman volume fmnist-models, filled with the repository first.
podman volume rm -f fmnist-models >/dev/null 2>&1 || true
podman volume create fmnist-models >/dev/null
tar -C models -c . | podman volume import fmnist-models -
check model-volume deploy/overlays/model-volume
podman volume rm -f fmnist-models >/dev/null
echo "kube play check: all checks passed"
