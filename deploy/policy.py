"""Checks on rendered manifests that a schema cannot express: the rules this service's pods must keep.

Usage: python deploy/policy.py RENDERED.yaml...   (deploy/validate.sh runs it on each kustomize output)
Prints one line per violation and exits 1 if there is any.
"""

import sys

import yaml

GRPC_PORT = 50051
METRICS_PORT = 9090


def env_value(container, name, default=None):
    for entry in container.get("env", []):
        if entry.get("name") == name:
            return entry.get("value")
    return default


def matches(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check_deployment(doc, problems):
    where = f"Deployment/{doc['metadata']['name']}"
    pod = doc["spec"]["template"]
    spec = pod["spec"]
    pod_sc = spec.get("securityContext", {})
    if pod_sc.get("runAsNonRoot") is not True:
        problems.append(f"{where}: pod securityContext.runAsNonRoot must be true")
    if pod_sc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        problems.append(f"{where}: pod seccompProfile must be RuntimeDefault")
    if spec.get("automountServiceAccountToken") is not False:
        problems.append(f"{where}: the server needs no API token: automountServiceAccountToken: false")

    annotations = pod.get("metadata", {}).get("annotations", {})
    if annotations.get("prometheus.io/scrape") != "true" or annotations.get("prometheus.io/path") != "/metrics":
        problems.append(f"{where}: prometheus.io/scrape \"true\" and prometheus.io/path /metrics annotations missing")

    for c in spec["containers"]:
        cw = f"{where} container {c['name']}"
        sc = c.get("securityContext", {})
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{cw}: readOnlyRootFilesystem must be true")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{cw}: allowPrivilegeEscalation must be false")
        if "ALL" not in sc.get("capabilities", {}).get("drop", []):
            problems.append(f"{cw}: capabilities must drop ALL")
        if sc.get("capabilities", {}).get("add"):
            problems.append(f"{cw}: no capability may be added")

        image = c.get("image", "")
        tag = image.rsplit("/", 1)[-1]
        if "@sha256:" not in image and (":" not in tag or tag.endswith(":latest")):
            problems.append(f"{cw}: image {image!r} must be pinned to a tag other than latest, or a digest")

        resources = c.get("resources", {})
        for kind in ("requests", "limits"):
            for res in ("cpu", "memory"):
                if res not in resources.get(kind, {}):
                    problems.append(f"{cw}: resources.{kind}.{res} missing")

        ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
        if ports.get("grpc") != GRPC_PORT or ports.get("metrics") != METRICS_PORT:
            problems.append(f"{cw}: ports must be grpc {GRPC_PORT} and metrics {METRICS_PORT}, got {ports}")
        if annotations.get("prometheus.io/port") != str(ports.get("metrics")):
            problems.append(f"{cw}: prometheus.io/port {annotations.get('prometheus.io/port')!r} is not the metrics port")

        # With TLS on, the kubelet's gRPC probe cannot connect (it speaks plaintext only): the probes must be
        # HTTPS GETs of the REST health routes instead, readiness and startup on /v2/health/ready.
        tls = env_value(c, "FMNIST_TLS_CERT") is not None
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if tls:
                get = c.get(probe, {}).get("httpGet", {})
                want = "/v2/health/live" if probe == "livenessProbe" else "/v2/health/ready"
                if get.get("port") != GRPC_PORT or get.get("scheme") != "HTTPS" or get.get("path") != want:
                    problems.append(f"{cw}: with TLS, {probe} must be an HTTPS GET of {want} on port {GRPC_PORT}")
                continue
            grpc = c.get(probe, {}).get("grpc")
            if not grpc or grpc.get("port") != GRPC_PORT:
                problems.append(f"{cw}: {probe} must be a gRPC health probe on port {GRPC_PORT}")

        # Termination: preStop sleep, then SIGTERM and a drain bounded by FMNIST_DRAIN_TIMEOUT_S, must end
        # before the grace period does, or Kubernetes SIGKILLs calls still in flight.
        drain = int(env_value(c, "FMNIST_DRAIN_TIMEOUT_S", "20"))
        pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        grace = spec.get("terminationGracePeriodSeconds", 30)
        if grace <= pre_stop + drain:
            problems.append(
                f"{cw}: terminationGracePeriodSeconds {grace} must exceed preStop sleep {pre_stop} + drain {drain}"
            )
        # kube-proxy balances connections: without a connection age, pods added by the HPA never get the calls
        # of clients already connected.
        if int(env_value(c, "FMNIST_MAX_CONNECTION_AGE_S", "300")) <= 0:
            problems.append(f"{cw}: FMNIST_MAX_CONNECTION_AGE_S must be positive (clients must re-balance)")
        # Health is NOT_SERVING while draining: liveness must not restart a pod before its drain can end.
        live = c.get("livenessProbe", {})
        if live.get("periodSeconds", 10) * live.get("failureThreshold", 3) <= drain:
            problems.append(f"{cw}: livenessProbe would fail within the {drain} s drain")


def check(docs):
    problems = []
    by_kind = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    deployments = by_kind.get("Deployment", [])
    if not deployments:
        problems.append("no Deployment rendered")
    for d in deployments:
        check_deployment(d, problems)
    pod_labels = {d["metadata"]["name"]: d["spec"]["template"]["metadata"].get("labels", {}) for d in deployments}

    for svc in by_kind.get("Service", []):
        selector = svc["spec"].get("selector", {})
        if not any(matches(selector, labels) for labels in pod_labels.values()):
            problems.append(f"Service/{svc['metadata']['name']}: selector {selector} matches no pod template")
        for port in svc["spec"]["ports"]:
            if not port.get("appProtocol"):
                problems.append(f"Service/{svc['metadata']['name']} port {port.get('name')}: appProtocol missing")
    for pdb in by_kind.get("PodDisruptionBudget", []):
        selector = pdb["spec"]["selector"].get("matchLabels", {})
        if not any(matches(selector, labels) for labels in pod_labels.values()):
            problems.append(f"PodDisruptionBudget/{pdb['metadata']['name']}: selector matches no pod template")
    for hpa in by_kind.get("HorizontalPodAutoscaler", []):
        ref = hpa["spec"]["scaleTargetRef"]
        if ref.get("kind") != "Deployment" or ref.get("name") not in pod_labels:
            problems.append(f"HorizontalPodAutoscaler/{hpa['metadata']['name']}: target {ref} is not a rendered Deployment")
    services = by_kind.get("Service", [])
    if services and not any(svc["spec"].get("clusterIP") == "None" for svc in services):
        problems.append("no headless Service (clusterIP: None) for clients that balance per call")
    for kind in ("Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"):
        if kind not in by_kind:
            problems.append(f"no {kind} rendered")
    return problems


def main(paths):
    failed = False
    for path in paths:
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        problems = check(docs)
        for p in problems:
            print(f"POLICY {path}: {p}")
        if not problems:
            print(f"ok - {path}: {len(docs)} objects keep the pod rules (hardening, probes, resources, drain)")
        failed |= bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
