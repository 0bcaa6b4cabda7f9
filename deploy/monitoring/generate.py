"""Writes deploy/monitoring/prometheusrule.yaml from deploy/monitoring/alerts.rules.yml, the one source of the
alert rules: the same groups, text and comments included, as the spec of a monitoring.coreos.com/v1
PrometheusRule for the Prometheus Operator.

Usage: python3 deploy/monitoring/generate.py [--check]
  --check: write nothing; exit 1 if prometheusrule.yaml is not what this script would write (tests/prometheus.sh).
Standard library only.
"""

import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
SOURCE = HERE / "alerts.rules.yml"
TARGET = HERE / "prometheusrule.yaml"

HEADER = """\
# GENERATED from alerts.rules.yml by generate.py: edit that file, then run python3 deploy/monitoring/generate.py.
# The fmnist-serve alerts for the Prometheus Operator. Your Prometheus selects PrometheusRules by label
# (spec.ruleSelector): add its label here with kustomize (`labels:`), e.g. release: kube-prometheus-stack.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: fmnist-alerts
  labels:
    app.kubernetes.io/name: fmnist
    app.kubernetes.io/component: monitoring
spec:
"""


def render(source_text):
    lines = source_text.splitlines()
    # The rules file's own header comment (everything before `groups:`) describes the file, not the spec.
    start = next(i for i, line in enumerate(lines) if line.startswith("groups:"))
    body = "\n".join(("  " + line) if line.strip() else "" for line in lines[start:])
    return HEADER + body + "\n"


def main(args):
    want = render(SOURCE.read_text())
    if args == ["--check"]:
        if not TARGET.exists() or TARGET.read_text() != want:
            print(f"FAIL: {TARGET.name} is stale: run python3 deploy/monitoring/generate.py")
            return 1
        return 0
    if args:
        print(__doc__)
        return 2
    TARGET.write_text(want)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
