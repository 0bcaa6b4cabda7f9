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
PLAYED="" CLAIMS=""
cleanup() {
  [ -z "$PLAYED" ] || "${PODMAN[@]}" kube play --down "$PLAYED" >/dev/null 2>&1 || true
  [ -z "$CLAIMS" ] || { "${PODMAN[@]}" kube play --down "$CLAIMS" >/dev/null 2>&1; remove_volumes; } || true
  rm -rf "$WORK"
}
trap cleanup EXIT
[ -x "$KUBECTL" ] && [ -x "$GRPCURL" ] || fail "$KUBECTL or $GRPCURL missing: run \`make tools\`"
podman image exists "$IMAGE" || fail "$IMAGE missing: \`make image\` builds it"

check() {
  local name=$1 dir=$2 rendered=$WORK/$1.yaml
  echo "== $name: podman kube play $(basename "$rendered") (kubectl kustomize $dir, one replica)"
  # One replica: podman runs every replica as a pod publishing the container ports on the host, so a second one
  # cannot bind them. The count is set the way an overlay would, by kustomize, on top of the directory.
  local one=$ROOT/build/kube-play/$name
  mkdir -p "$one"
  printf 'apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [../../../%s]\nreplicas: [{name: fmnist, count: 1}]\n' "$dir" >"$one/kustomization.yaml"
  "$KUBECTL" kustomize "$one" >"$rendered"
  # The image name the manifest uses, pointed at the image built here.
  local ref
  ref=$(sed -n 's/^ *image: *//p' "$rendered" | head -1)
  [ -n "$ref" ] || fail "$rendered names no image"
  podman tag "$IMAGE" "$ref"
  echo "   image $ref = $IMAGE"
  # Claims first, alone: podman makes each a named volume, which the caller's `fill_volumes` fills before the
  # pod starts (as the one-off job of deploy/README.md would).
  python3 - "$rendered" <<'PY'
import sys
docs = open(sys.argv[1]).read().split("\n---\n")
claims = [d for d in docs if "\nkind: PersistentVolumeClaim\n" in "\n" + d + "\n"]
open(sys.argv[1] + ".claims", "w").write("\n---\n".join(claims))
open(sys.argv[1], "w").write("\n---\n".join(d for d in docs if d not in claims))
PY
  if [ -s "$rendered.claims" ]; then
    CLAIMS=$rendered.claims
    remove_volumes
    "${PODMAN[@]}" kube play "$rendered.claims" | sed 's/^/   | /'
    fill_volumes
  fi
  PLAYED=$rendered
  "${PODMAN[@]}" kube play "$rendered" | sed 's/^/   | /'
  local pod container
  pod=$(podman pod ps --format '{{.Name}}' --filter label=app.kubernetes.io/name=fmnist | head -1)
  [ -n "$pod" ] || pod=$(podman pod ps --format '{{.Name}}' | grep '^fmnist' | head -1)
  container=$(podman ps --format '{{.Names}}' --filter "pod=$pod" | grep -v infra | head -1)
  [ -n "$container" ] || fail "no container in pod $pod"
  # podman publishes the container ports the manifest declares on the host (as a node port would be): 50051
  # (gRPC, REST, the page) and 9090 (metrics).
  local ip=127.0.0.1
  echo "   pod $pod, container $container; published: $(podman port "$container" | tr '\n' ' ')"
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

  local pid uid caps readonly_root memory
  pid=$(podman inspect --format '{{.State.Pid}}' "$container")
  uid=$(ps -o uid= -p "$pid" | tr -d ' ')
  caps=$(sed -n 's/^CapEff:[[:space:]]*//p' "/proc/$pid/status")
  readonly_root=$(podman inspect --format '{{.HostConfig.ReadonlyRootfs}}' "$container")
  memory=$(podman inspect --format '{{.HostConfig.Memory}}' "$container")
  echo "   process $pid: uid $uid, effective capabilities $caps, read-only root $readonly_root, memory limit $memory bytes"
  [ "$uid" = 65532 ] && [ "$readonly_root" = true ] && [ "$caps" = 0000000000000000 ] \
    || fail "expected uid 65532 on a read-only root with no capabilities"
  [ "$memory" = $((768 << 20)) ] || fail "memory limit $memory, the manifest says 768Mi"
  pass "$name: uid 65532, no capabilities, read-only root, the manifest's 768Mi memory limit"
  local mounts
  mounts=$(podman inspect --format '{{range .Mounts}}{{.Destination}}:{{if .RW}}rw{{else}}ro{{end}} {{end}}' "$container")
  echo "   mounts: ${mounts:-none}"
  if [ -s "$rendered.claims" ]; then
    grep -q '/models:ro' <<<"$mounts" && podman logs "$container" 2>&1 | grep -q 'version loaded' \
      || fail "$name: the models volume is not mounted at /models, or no version loaded from it"
    pass "$name: the claim's volume is mounted read-only at /models and the server loaded its versions from it"
  fi

  # SIGTERM with 16 calls of 64 images under way: every call the server accepted is answered (at least 4 must
  # have been accepted for the check to mean anything), and the server exits 0.
  # (podman stop prints the container's name; the restart policy does not restart a stopped container.)
  python3 - "$ip:50051" "$container" <<'PY' || fail "$name: SIGTERM drain"
import base64, json, subprocess, sys, threading, time
addr, container = sys.argv[1:3]
img = base64.b64encode(open("tests/fixtures/png/ankle-boot-0.png", "rb").read()).decode()
body = json.dumps({"images": [{"encoded": img}] * 64})
results = []
def call():
    # The proto from the repository, not reflection: one RPC per call, so a call is sent or not as a whole.
    p = subprocess.run([".venv-tools/bin/grpcurl", "-plaintext", "-import-path", "proto", "-proto",
                        "fashion_mnist/v1/classifier.proto", "-d", "@", addr, "fashion_mnist.v1.Classifier/Classify"],
                       input=body, capture_output=True, text=True)
    if p.returncode == 0 and '"Ankle boot"' in p.stdout:
        results.append("answered")
    elif "Failed to dial target host" in p.stderr or "error while dialing" in p.stderr:
        # grpcurl connects before it sends: a connection refused, or closed before its HTTP/2 preface, after the
        # draining server stopped accepting. The call was never sent (safe to retry elsewhere).
        results.append("never sent")
    else:
        results.append("failed: " + p.stderr.strip()[-200:])
threads = [threading.Thread(target=call) for _ in range(16)]
for t in threads:
    t.start()
time.sleep(0.3)
# `podman stop` sends the image's stop signal, SIGTERM, and waits (up to the grace) as the kubelet does; a plain
# kill would be followed by a restart (the Deployment's restartPolicy is Always).
subprocess.run(["podman", "stop", "-t", "30", container], check=True, capture_output=True)
for t in threads:
    t.join()
code = subprocess.run(["podman", "inspect", "--format", "{{.State.ExitCode}}", container],
                      capture_output=True, text=True).stdout.strip()
logs = subprocess.run(["podman", "logs", container], capture_output=True, text=True)
clean = "stopped cleanly" in logs.stdout + logs.stderr
answered = results.count("answered")
failed = [r for r in results if r.startswith("failed")]
print(f"   {answered} of {len(results)} calls answered, {results.count('never sent')} never sent "
      f"(their connection refused or closed before the call, the listener being closed), {len(failed)} failed {failed}; exit code {code}; "
      f"'stopped cleanly' logged: {clean}")
sys.exit(0 if answered >= 4 and not failed and code == "0" and clean else 1)
PY
  pass "$name: SIGTERM with calls in flight: every accepted call answered, exit 0"
  "${PODMAN[@]}" kube play --down "$rendered" >/dev/null
  PLAYED=""
  if [ -n "$CLAIMS" ]; then
    "${PODMAN[@]}" kube play --down "$CLAIMS" >/dev/null
    remove_volumes
    CLAIMS=""
  fi
  pass "$name: podman kube play --down"
}

# `kube play --down` leaves a claim's volume behind, and a second play refuses to make it again.
remove_volumes() {
  local volume
  for volume in $(sed -n 's/^  name: *//p' "$CLAIMS"); do
    podman volume rm -f "$volume" >/dev/null 2>&1 || true
  done
}

# The claims' volumes get the repository's models/ (the model-volume overlay's fmnist-models).
fill_volumes() {
  local volume
  for volume in $(sed -n 's/^  name: *//p' "$CLAIMS"); do
    tar -C models -c . | podman volume import "$volume" -
    echo "   volume $volume: filled with models/ ($(du -sh models | cut -f1))"
  done
}

check base deploy/base
check model-volume deploy/overlays/model-volume
echo "kube play check: all checks passed"
