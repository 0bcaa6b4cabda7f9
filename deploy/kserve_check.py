"""Loads deploy/kserve/*.yaml into the kserve SDK's model classes (V1alpha1ServingRuntime, V1beta1InferenceService,
and the Kubernetes classes inside them), strictly: a field the classes do not know fails, as a required field
missing or a wrong type does. Then checks what ties the two files to the server: the runtime the service names,
its model format, the v2 protocol and the port the server listens on.

usage: kserve_check.py deploy/kserve/servingruntime.yaml deploy/kserve/inferenceservice.yaml
(runs in .venv-oip, where the kserve SDK lives; tests/oip_clients.sh calls it)
"""

import re
import sys

import kubernetes.client.models as k8s
import kserve.models
import yaml

PRIMITIVES = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object,
              "ResourceQuantity": (str, int, float)}


def model_class(name):
    for module in (kserve.models, k8s):
        if hasattr(module, name):
            return getattr(module, name)
    raise SystemExit(f"FAIL: no model class {name}")


def load(value, type_name, path):
    """value (parsed YAML) as an instance of the SDK type named type_name; fails on unknown fields."""
    if value is None:
        return None
    # The SDKs spell containers two ways: list[X] / dict(str, X) (kserve), List[X] / Dict[str, X] (kubernetes).
    if m := re.fullmatch(r"[lL]ist\[(.+)\]", type_name):
        assert isinstance(value, list), f"{path}: expected a list"
        return [load(v, m[1], f"{path}[{i}]") for i, v in enumerate(value)]
    if m := re.fullmatch(r"dict\([^,]+, (.+)\)|Dict\[[^,]+, (.+)\]", type_name):
        assert isinstance(value, dict), f"{path}: expected a map"
        return {k: load(v, m[1] or m[2], f"{path}.{k}") for k, v in value.items()}
    if type_name in PRIMITIVES:
        assert isinstance(value, PRIMITIVES[type_name]), f"{path}: expected {type_name}, got {value!r}"
        return value
    cls = model_class(type_name)
    assert isinstance(value, dict), f"{path}: expected a {type_name} object"
    by_key = {key: attr for attr, key in cls.attribute_map.items()}
    unknown = sorted(set(value) - set(by_key))
    assert not unknown, f"{path}: {type_name} has no field {', '.join(unknown)}"
    kwargs = {by_key[k]: load(v, cls.openapi_types[by_key[k]], f"{path}.{k}") for k, v in value.items()}
    return cls(**kwargs)  # the SDK's own checks: required fields, allowed values


def main(runtime_file, service_file):
    runtime = load(yaml.safe_load(open(runtime_file)), "V1alpha1ServingRuntime", "ServingRuntime")
    service = load(yaml.safe_load(open(service_file)), "V1beta1InferenceService", "InferenceService")
    print(f"ok - {runtime_file} and {service_file} load into the kserve SDK's classes, no unknown field")

    model = service.spec.predictor.model
    assert model.runtime == runtime.metadata.name, f"the service names runtime {model.runtime}"
    formats = [f.name for f in runtime.spec.supported_model_formats]
    assert model.model_format.name in formats, f"model format {model.model_format.name} not in {formats}"
    assert model.protocol_version == "v2" and "v2" in runtime.spec.protocol_versions
    assert "grpc-v2" in runtime.spec.protocol_versions
    container = runtime.spec.containers[0]
    assert container.name == "kserve-container", "KServe looks for kserve-container"
    ports = {(p.name, p.container_port) for p in container.ports}
    assert ports == {("h2c", 50051)} and {(p.name, p.container_port) for p in model.ports} == ports, ports
    assert container.security_context.read_only_root_filesystem and container.security_context.run_as_non_root
    print("ok - the InferenceService runs the fmnist-serve runtime, v2 protocol, gRPC (h2c) on the server's port 50051")


if __name__ == "__main__":
    main(*sys.argv[1:3])
