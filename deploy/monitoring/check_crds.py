"""Validates the custom resources in rendered manifests against their CRD schemas in deploy/monitoring/schemas/.

kubernetes-validate only knows the built-in kinds: for a custom resource (a PrometheusRule) it prints
"Couldn't find schema for kind K with api version G/V", passes, and checks nothing. deploy/validate.sh hands
those warnings to this script on stdin, which
  - validates every object whose kind has a schema here (schemas/<group>_<version>_<Kind>.json, the CRD's
    openAPIV3Schema as JSON Schema, strict) with jsonschema, plus the CRD's list-map keys (rule group names
    unique);
  - fails for any kind kubernetes-validate warned about that has no schema here, so no kind goes unchecked.

Usage: python deploy/monitoring/check_crds.py RENDERED.yaml < kubernetes-validate-output
"""

import json
import pathlib
import re
import sys

import jsonschema
import yaml

SCHEMAS = pathlib.Path(__file__).resolve().parent / "schemas"
UNKNOWN = re.compile(r"Couldn't find schema for kind (\S+) with api version (\S+)")


def schema_path(api_version, kind):
    return SCHEMAS / f"{api_version.replace('/', '_')}_{kind}.json"


def main(rendered, warnings):
    problems = []
    with open(rendered) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    for kind, api_version in sorted(set(UNKNOWN.findall(warnings))):
        if not schema_path(api_version, kind).exists():
            problems.append(f"{kind} ({api_version}): kubernetes-validate has no schema and neither has {SCHEMAS}")
    checked = 0
    for doc in docs:
        path = schema_path(doc.get("apiVersion", ""), doc.get("kind", ""))
        if not path.exists():
            continue
        where = f"{doc['kind']}/{doc.get('metadata', {}).get('name')}"
        schema = json.loads(path.read_text())
        validator = jsonschema.Draft202012Validator(schema)
        for error in validator.iter_errors(doc):
            problems.append(f"{where}: {'.'.join(map(str, error.absolute_path)) or '(root)'}: {error.message}")
        names = [g.get("name") for g in doc.get("spec", {}).get("groups", [])]
        if len(names) != len(set(names)):
            problems.append(f"{where}: rule group names must be unique (x-kubernetes-list-map-keys): {names}")
        checked += 1
        if not any(p.startswith(where) for p in problems):
            print(f"ok - {where} is valid against the {doc['apiVersion']} {doc['kind']} CRD schema (strict)")
    for p in problems:
        print(f"CRD {rendered}: {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.stdin.read()))
