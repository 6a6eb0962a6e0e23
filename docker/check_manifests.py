"""Offline checks of the Kubernetes and KServe manifests (``make lint``; no cluster needed).

* Built-in kinds (Deployment, Service, HorizontalPodAutoscaler) and every container spec, including
  those inside KServe's resources, are validated strictly against Kubernetes' own OpenAPI schemas
  (the ``kubernetes-validate`` package ships them): a misspelt or misplaced field is an error.
* KServe's ServingRuntime and InferenceService are validated against the parts of their CRDs these
  manifests use (:data:`KSERVE_SCHEMAS`, written from KServe's Go types: ``ServingRuntimeSpec``,
  ``PredictorSpec``, ``ModelSpec``), unknown fields refused at every level written out.
* And against this service: probe paths are routes the app serves, probe ports are the container's
  ports (HTTP probes on ``CAMSERVE_PORT``, gRPC probes on ``CAMSERVE_GRPC_PORT``, which answers
  ``grpc.health.v1.Health``), a port named ``grpc`` or ``h2c`` is ``CAMSERVE_GRPC_PORT``, a gRPC
  ServingRuntime (``grpc-v2``) exposes an ``h2c`` port, every ``CAMSERVE_*`` variable is a setting, the
  InferenceService is named as the bundle (the protocol's paths carry that name) and uses the runtime,
  model format and protocol the ServingRuntime declares.

    python docker/check_manifests.py [docker/k8s.yaml docker/kserve.yaml]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = [ROOT / "docker" / "k8s.yaml", ROOT / "docker" / "kserve.yaml"]
KUBERNETES_VERSION = "1.33"
SHIPPED_BUNDLE = ROOT / "models" / "cifar10-resnet" / "model.json"
DEFAULT_GRPC_PORT = 8001  # service/settings.py's grpc_port

_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"}},
}
_PROTOCOLS = {"enum": ["v1", "v2", "grpc-v1", "grpc-v2"]}  # constants.InferenceServiceProtocol
_CONTAINER_LIST = {"type": "array", "minItems": 1, "items": {"type": "object"}}  # each checked as a k8s Container
# ModelSpec = modelFormat + runtime + PredictorExtensionSpec (storageUri, protocolVersion, ...) + an inline Container
_MODEL_KEYS = {"modelFormat", "runtime", "storageUri", "storage", "runtimeVersion", "protocolVersion"}

KSERVE_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "serving.kserve.io/v1alpha1"},
            "kind": {"const": "ServingRuntime"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["containers"],
                "additionalProperties": False,
                "properties": {
                    "supportedModelFormats": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["name"],
                            "additionalProperties": False,
                            "properties": {
                                "name": {"type": "string"},
                                "version": {"type": "string"},
                                "autoSelect": {"type": "boolean"},
                                "priority": {"type": "integer", "minimum": 1},
                            },
                        },
                    },
                    "multiModel": {"type": "boolean"},
                    "disabled": {"type": "boolean"},
                    "protocolVersions": {"type": "array", "items": _PROTOCOLS},
                    "containers": _CONTAINER_LIST,
                    "volumes": {"type": "array"},
                    "nodeSelector": _STRING_MAP,
                    "tolerations": {"type": "array"},
                    "labels": _STRING_MAP,
                    "annotations": _STRING_MAP,
                },
            },
        },
    },
    ("serving.kserve.io/v1beta1", "InferenceService"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "serving.kserve.io/v1beta1"},
            "kind": {"const": "InferenceService"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["predictor"],
                "additionalProperties": False,
                "properties": {
                    "predictor": {
                        "type": "object",
                        "required": ["model"],
                        "additionalProperties": False,
                        "properties": {
                            "minReplicas": {"type": "integer", "minimum": 0},
                            "maxReplicas": {"type": "integer", "minimum": 0},
                            "scaleMetric": {"enum": ["cpu", "memory", "concurrency", "rps"]},
                            "scaleTarget": {"type": "integer", "minimum": 1},
                            "containerConcurrency": {"type": "integer", "minimum": 0},
                            "timeout": {"type": "integer", "minimum": 1},
                            "canaryTrafficPercent": {"type": "integer", "minimum": 0, "maximum": 100},
                            "serviceAccountName": {"type": "string"},
                            "labels": _STRING_MAP,
                            "annotations": _STRING_MAP,
                            "model": {
                                "type": "object",
                                "required": ["modelFormat"],
                                "properties": {
                                    "modelFormat": {
                                        "type": "object",
                                        "required": ["name"],
                                        "additionalProperties": False,
                                        "properties": {"name": {"type": "string"}, "version": {"type": "string"}},
                                    },
                                    "runtime": {"type": "string"},
                                    "protocolVersion": _PROTOCOLS,
                                    "storageUri": {"type": "string"},
                                    "runtimeVersion": {"type": "string"},
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


def _served_paths() -> set[str]:
    sys.path.insert(0, str(ROOT))
    from service.app import create_app
    from service.settings import Settings

    # GET paths from the OpenAPI document: probes are GETs, and FastAPI nests included routers.
    return {path for path, operations in create_app(Settings()).openapi()["paths"].items() if "get" in operations}


def _setting_names() -> set[str]:
    from service.settings import Settings

    return {f"CAMSERVE_{name.upper()}" for name in Settings.model_fields}


def _check_container(container: dict[str, Any], where: str, served: set[str], settings: set[str]) -> list[str]:
    """A k8s Container, strictly, plus what it must agree with in this service."""
    errors = []
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"}, "spec": {"containers": [container]}}
    try:
        kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        errors.append(f"{where}: {'.'.join(map(str, exc.path))}: {exc.message}")
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    errors += [f"{where}: {name} is not a camserve setting" for name in env if name not in settings]
    ports = {p["containerPort"]: p.get("name") for p in container.get("ports", [])}
    named = {name: port for port, name in ports.items() if name}
    http_port = env.get("CAMSERVE_PORT")
    grpc_port = env.get("CAMSERVE_GRPC_PORT", str(DEFAULT_GRPC_PORT))
    if ports and not {http_port, grpc_port} & {str(p) for p in ports}:
        errors.append(
            f"{where}: neither CAMSERVE_PORT {http_port} nor CAMSERVE_GRPC_PORT {grpc_port} is a container port"
        )
    for port, name in ports.items():
        if name in ("grpc", "h2c") and str(port) != grpc_port:
            errors.append(f"{where}: port {name} {port} is not CAMSERVE_GRPC_PORT {grpc_port}")
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container.get(kind, {})
        if "httpGet" in probe:
            if probe["httpGet"]["path"] not in served:
                errors.append(f"{where}: {kind} path {probe['httpGet']['path']} is not served by the app")
            port = named.get(probe["httpGet"]["port"], probe["httpGet"]["port"])
            if port not in ports:
                errors.append(f"{where}: {kind} port {probe['httpGet']['port']} is not a container port")
        for action in ("grpc", "tcpSocket"):
            if action in probe:
                port = named.get(probe[action]["port"], probe[action]["port"])
                if port not in ports:
                    errors.append(f"{where}: {kind} port {probe[action]['port']} is not a container port")
                elif action == "grpc" and str(port) != grpc_port:
                    errors.append(f"{where}: {kind} is a gRPC probe on {port}, not CAMSERVE_GRPC_PORT {grpc_port}")
    return errors


def _check_kserve(doc: dict[str, Any], where: str) -> list[str]:
    schema = KSERVE_SCHEMAS.get((doc.get("apiVersion"), doc.get("kind")))
    if schema is None:
        return [f"{where}: no schema for {doc.get('apiVersion')} {doc.get('kind')}"]
    validator = jsonschema.Draft202012Validator(schema)
    return [f"{where}: {'.'.join(map(str, e.path)) or '(root)'}: {e.message}" for e in validator.iter_errors(doc)]


def check(paths: list[Path]) -> list[str]:
    """Every problem found, as one line each; empty when all is well."""
    served, settings = _served_paths(), _setting_names()
    errors: list[str] = []
    runtimes: dict[str, dict[str, Any]] = {}
    services: list[tuple[str, dict[str, Any]]] = []
    for path in paths:
        for i, doc in enumerate(d for d in yaml.safe_load_all(path.read_text()) if d):
            where = f"{path.name}[{i}] {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
            if str(doc.get("apiVersion", "")).startswith("serving.kserve.io/"):
                errors += _check_kserve(doc, where)
                spec = doc.get("spec", {})
                if doc.get("kind") == "ServingRuntime":
                    runtimes[doc["metadata"]["name"]] = spec
                    for c, container in enumerate(spec.get("containers", [])):
                        errors += _check_container(container, f"{where} container {c}", served, settings)
                        names = {p.get("name") for p in container.get("ports", [])}
                        if "grpc-v2" in spec.get("protocolVersions", []) and "h2c" not in names:
                            errors.append(f"{where} container {c}: speaks grpc-v2 but has no port named h2c")
                else:
                    services.append((where, doc))
                    model = spec.get("predictor", {}).get("model", {})
                    container = {k: v for k, v in model.items() if k not in _MODEL_KEYS}
                    errors += _check_container({"name": "model", **container}, f"{where} model", served, settings)
                continue
            try:
                kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                errors.append(f"{where}: {'.'.join(map(str, exc.path))}: {exc.message}")
            pod_spec = doc.get("spec", {}).get("template", {}).get("spec", {})
            for c, container in enumerate(pod_spec.get("containers", [])):
                errors += _check_container(container, f"{where} container {c}", served, settings)
    bundle_name = json.loads(SHIPPED_BUNDLE.read_text()).get("name") if SHIPPED_BUNDLE.is_file() else None
    for where, doc in services:
        model = doc["spec"]["predictor"]["model"]
        runtime = runtimes.get(model.get("runtime", ""))
        if runtime is None:
            errors.append(f"{where}: runtime {model.get('runtime')!r} is not a ServingRuntime in these manifests")
            continue
        if model["modelFormat"]["name"] not in {f["name"] for f in runtime.get("supportedModelFormats", [])}:
            errors.append(f"{where}: model format {model['modelFormat']['name']!r} is not one the runtime supports")
        if model.get("protocolVersion") not in runtime.get("protocolVersions", []):
            errors.append(f"{where}: protocol {model.get('protocolVersion')!r} is not one the runtime speaks")
        if bundle_name and doc["metadata"]["name"] != bundle_name:
            errors.append(f"{where}: named {doc['metadata']['name']!r}, the bundle is {bundle_name!r}")
    return errors


def main(argv: list[str]) -> int:
    paths = [Path(a) for a in argv] or MANIFESTS
    errors = check(paths)
    for line in errors:
        print(line, file=sys.stderr)
    names = ", ".join(p.name for p in paths)
    print(f"{names}: {'FAILED, ' + str(len(errors)) + ' problem(s)' if errors else 'valid'}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
