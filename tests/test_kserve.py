"""deploy/kserve/: the ServingRuntime and InferenceServices validate against KServe's own
schemas, agree with each other, and their container arguments start a real ipcserve.

The schemas: KServe's CRDs are not on PyPI, but its Python SDK (the ``kserve`` package,
installed by .ci/run with ``--no-deps``: only its files are read, never imported) carries
the generated model of every KServe type: each field's JSON name, its type and whether it
is required. From those models this test builds a JSON Schema (unknown fields refused, as
KServe's typed fields are), and the Kubernetes types they use (``V1Container``,
``V1ObjectMeta``, ...) are kubernetes-validate's strict schemas of the Kubernetes API.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import re
import socket
from pathlib import Path
from typing import Any

import pytest
import requests

from server import Server

pytestmark = pytest.mark.timeout(120)

KSERVE = Path(__file__).resolve().parent.parent / "deploy" / "kserve"
KUBERNETES = "1.30.0"
_K8S_ID = "https://kubernetes.io/api/_definitions.json"
_SCALARS = {"str": {"type": "string"}, "int": {"type": "integer"},
            "float": {"type": "number"}, "bool": {"type": "boolean"}, "object": {},
            "datetime": {"type": "string"},
            "ResourceQuantity": {"type": ["string", "integer", "number"]}}


def _documents() -> dict[str, dict[str, Any]]:
    yaml = pytest.importorskip("yaml", reason="PyYAML comes with kubernetes-validate (.[deploy])")
    return {path.name: yaml.safe_load(path.read_text()) for path in sorted(KSERVE.glob("*.yaml"))}


@functools.lru_cache(maxsize=1)
def _sdk_models() -> dict[str, tuple[dict[str, str], dict[str, str], list[str]]]:
    """Every model of KServe's SDK by class name: (field -> type, field -> JSON name,
    required fields), read from the generated source without importing it."""
    spec = importlib.util.find_spec("kserve")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the kserve SDK is not installed (.ci/run: pip install --no-deps kserve)")
    models = Path(list(spec.submodule_search_locations)[0]) / "models"
    found = {}
    for path in models.glob("*.py"):
        source = path.read_text()
        tree = ast.parse(source)
        for node in tree.body:
            if not isinstance(node, ast.ClassDef):
                continue
            values: dict[str, Any] = {}
            for item in node.body:
                if isinstance(item, ast.Assign) and isinstance(item.targets[0], ast.Name) \
                        and item.targets[0].id in ("openapi_types", "attribute_map"):
                    values[item.targets[0].id] = ast.literal_eval(item.value)
            if len(values) == 2:
                required = re.findall(r"client_side_validation and (\w+) is None",
                                      ast.get_source_segment(source, node) or "")
                found[node.name] = (values["openapi_types"], values["attribute_map"],
                                    sorted(set(required)))
    assert {"V1alpha1ServingRuntime", "V1beta1InferenceService"} <= set(found), models
    return found


@functools.lru_cache(maxsize=1)
def _k8s_definitions() -> dict[str, Any]:
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install '.[deploy]'")
    from kubernetes_validate import utils

    version = [v for v in utils.all_versions()
               if utils.major_minor(v) <= utils.major_minor(KUBERNETES)][-1]
    assert kubernetes_validate
    return utils.schema_contents(f"kubernetes-json-schema/v{version}-local-strict/"
                                 "_definitions.json", KUBERNETES)


def _k8s_name(sdk_name: str, definitions: dict[str, Any]) -> str | None:
    """The Kubernetes definition an SDK type stands for: ``V1Container`` is
    ``io.k8s.api.core.v1.Container``, ``K8sIoApiAppsV1DeploymentStrategy`` is
    ``io.k8s.api.apps.v1.DeploymentStrategy``."""
    names = list(definitions["$defs"])
    flat = sdk_name.lower()
    for name in names:  # the SDK's long form: k8s.io.<group>.<version>.<Kind> run together
        if ("k8s.io." + name.removeprefix("io.k8s.")).replace(".", "").lower() == flat:
            return name
    match = re.fullmatch(r"(V\d+(?:alpha\d+|beta\d+)?)([A-Z]\w*)", sdk_name)
    if match is None:
        return None
    suffix = f".{match.group(1).lower()}.{match.group(2)}"
    candidates = [n for n in names if n.endswith(suffix)]
    for preferred in ("io.k8s.api.core.", "io.k8s.apimachinery.pkg.apis.meta."):
        for name in candidates:
            if name.startswith(preferred):
                return name
    return candidates[0] if len(candidates) == 1 else None


def _schema(root: str) -> tuple[dict[str, Any], set[str]]:
    """A JSON Schema of the SDK model ``root``, and the SDK types it could not check."""
    models, definitions = _sdk_models(), _k8s_definitions()
    defs: dict[str, Any] = {}
    loose: set[str] = set()

    def of(kind: str) -> dict[str, Any]:
        kind = kind.strip()
        if kind in _SCALARS:
            return dict(_SCALARS[kind])
        if kind.startswith("list[") and kind.endswith("]"):
            return {"type": "array", "items": of(kind[5:-1])}
        if kind.startswith("dict(") and kind.endswith(")"):
            return {"type": "object", "additionalProperties": of(kind[5:-1].split(",", 1)[1])}
        if kind in models:
            if kind not in defs:
                defs[kind] = {}  # before the fields: a type may contain itself
                types, names, required = models[kind]
                defs[kind] = {"type": "object", "additionalProperties": False,
                              "required": [names[f] for f in required],
                              "properties": {names[f]: of(t) for f, t in types.items()}}
            return {"$ref": f"#/$defs/{kind}"}
        k8s = _k8s_name(kind, definitions)
        if k8s is None:
            loose.add(kind)
            return {}
        return {"$ref": f"{_K8S_ID}#/$defs/{k8s}"}

    schema = of(root)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema,
            "$defs": defs}, loose


def _validate(document: dict[str, Any], root: str) -> None:
    import jsonschema
    from referencing import Registry, Resource

    schema, loose = _schema(root)
    registry = Resource.from_contents(_k8s_definitions()) @ Registry()
    jsonschema.Draft202012Validator(schema, registry=registry).validate(document)
    # Every type this document uses was checked (none fell back to "anything").
    assert not loose & _types_used(document, root), loose


def _types_used(document: Any, kind: str) -> set[str]:
    """The SDK types ``document`` (of SDK type ``kind``) actually reaches."""
    models = _sdk_models()
    kind = kind.strip()
    if kind.startswith("list[") and isinstance(document, list):
        return set().union(*[_types_used(d, kind[5:-1]) for d in document]) if document else set()
    if kind.startswith("dict(") and isinstance(document, dict):
        inner = kind[5:-1].split(",", 1)[1]
        return set().union(*[_types_used(d, inner) for d in document.values()]) \
            if document else set()
    if kind in models and isinstance(document, dict):
        types, names, _ = models[kind]
        by_json = {names[f]: t for f, t in types.items()}
        return {kind}.union(*[_types_used(v, by_json[k]) for k, v in document.items()
                              if k in by_json])
    return {kind} if kind not in _SCALARS else set()


def test_the_examples_validate_against_kserves_schemas() -> None:
    documents = _documents()
    assert set(documents) == {"servingruntime.yaml", "inferenceservice.yaml",
                              "inferenceservice-grpc.yaml"}
    for name, document in documents.items():
        root = {"ServingRuntime": "V1alpha1ServingRuntime",
                "InferenceService": "V1beta1InferenceService"}[document["kind"]]
        expected = {"ServingRuntime": "serving.kserve.io/v1alpha1",
                    "InferenceService": "serving.kserve.io/v1beta1"}[document["kind"]]
        assert document["apiVersion"] == expected, name
        _validate(document, root)


def test_the_schema_refuses_what_kserve_would() -> None:
    # The check can fail: an unknown field, a wrong type, a container without its name.
    import jsonschema

    runtime = _documents()["servingruntime.yaml"]
    for broken in (
        {**runtime, "spec": {**runtime["spec"], "protocolVersion": ["v2"]}},
        {**runtime, "spec": {**runtime["spec"], "multiModel": "no"}},
        {**runtime, "spec": {**runtime["spec"], "containers": [
            {k: v for k, v in runtime["spec"]["containers"][0].items() if k != "name"}]}},
        {**runtime, "spec": {k: v for k, v in runtime["spec"].items() if k != "containers"}},
    ):
        with pytest.raises(jsonschema.ValidationError):
            _validate(broken, "V1alpha1ServingRuntime")


def _container() -> dict[str, Any]:
    (container,) = _documents()["servingruntime.yaml"]["spec"]["containers"]
    return container


def test_the_runtime_and_the_services_agree() -> None:
    documents = _documents()
    runtime = documents["servingruntime.yaml"]
    container = _container()
    assert container["name"] == "kserve-container"  # the name KServe merges the model into
    args = dict(arg.split("=", 1) for arg in container["args"])
    assert args["--model_dir"] == "/mnt/models" and args["--model_name"] == "{{.Name}}"
    assert [p["containerPort"] for p in container["ports"]] == [int(args["--http_port"])]
    formats = {(f["name"], f.get("version")) for f in runtime["spec"]["supportedModelFormats"]}
    for name in ("inferenceservice.yaml", "inferenceservice-grpc.yaml"):
        model = documents[name]["spec"]["predictor"]["model"]
        assert model["runtime"] == runtime["metadata"]["name"]
        assert (model["modelFormat"]["name"], model["modelFormat"].get("version")) in formats
        assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    grpc_ports = documents["inferenceservice-grpc.yaml"]["spec"]["predictor"]["model"]["ports"]
    assert grpc_ports == [{"name": "h2c", "containerPort": int(args["--grpc_port"]),
                           "protocol": "TCP"}]
    probe = documents["inferenceservice.yaml"]["spec"]["predictor"]["model"]["readinessProbe"]
    assert probe["httpGet"] == {"path": "/v2/health/ready", "port": int(args["--http_port"])}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_the_runtimes_arguments_start_ipcserve_as_kserve_would(tmp_path: Path) -> None:
    # KServe's storage initializer leaves the model's files in /mnt/models and fills in
    # {{.Name}}; here a temporary directory, free ports and the loopback address stand in.
    from ipcserve.adapters import digits

    (tmp_path / "model.onnx").write_bytes(Path(digits.__file__).with_name("digits.onnx")
                                          .read_bytes())
    ports = {"8080": str(_free_port()), "8081": "0"}
    args = []
    for arg in _container()["args"]:
        flag, value = arg.split("=", 1)
        value = {"{{.Name}}": "digits-isvc", "/mnt/models": str(tmp_path),
                 "0.0.0.0": "127.0.0.1"}.get(value, ports.get(value, value))
        args.append(f"{flag}={value}")
    env = {e["name"]: e.get("value", "k3y") for e in _container()["env"]}
    server = Server(*args, env=env)
    try:
        assert server.url.endswith(":" + ports["8080"])
        assert "V2 gRPC on 127.0.0.1:" in server.output
        ready = requests.get(f"{server.url}/v2/models/digits-isvc/ready", timeout=10,
                             headers={"Authorization": "Bearer k3y"})
        assert ready.status_code == 200 and ready.json()["ready"] is True
        assert requests.get(f"{server.url}/v2/health/ready", timeout=10).status_code == 200
    finally:
        assert server.stop() == 0, server.output
