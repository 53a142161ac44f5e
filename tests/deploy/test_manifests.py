"""The container image's Dockerfile and the Kubernetes manifests of deploy/.

* Every Kubernetes object is validated offline against the Kubernetes API's schemas that the
  ``kubernetes-validate`` package ships (strict: an unknown field fails), for the oldest
  release with gRPC probes (1.27) and the newest the package knows.
* KServe's ServingRuntime and InferenceService: no package ships KServe's CRD schemas without
  KServe's whole server, so their KServe fields are checked here by name and value, and every
  container in them against the Kubernetes Container schema.
* Every ``mip serve`` command line (the image's default, the Deployment's, the
  ServingRuntime's) is parsed by the real command-line parser, so a renamed option fails;
  ports, probes and Services are checked against those arguments, and the Deployment's
  command line is run to answer its own probes and the image's HEALTHCHECK.
"""

from __future__ import annotations

import copy
import re
import socket
import subprocess
import sys

import pytest
from _deploy import documents, exec_form, instructions, one, parse_serve, port
from _serve_process import start, stop

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is not installed (pip install -e '.[test]')")
from kubernetes_validate import utils as kv  # noqa: E402

KUBERNETES = ["1.27", kv.major_minor(kv.latest_version())]
KSERVE = ("serving.kserve.io/v1alpha1", "serving.kserve.io/v1beta1")


def _core() -> list[tuple[str, dict]]:
    return [(name, doc) for name, doc in documents() if doc["apiVersion"] not in KSERVE]


def _validate_container(container: dict, version: str) -> None:
    """`container` against the Kubernetes Container schema (strict) of `version`."""
    import jsonschema
    from referencing import Registry, Resource

    folder = f"kubernetes-json-schema/v{version}.0-local-strict"
    schema = kv.schema_contents(f"{folder}/container-v1.json", version)
    definitions = kv.schema_contents(f"{folder}/_definitions.json", version)
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())
    jsonschema.Draft202012Validator(schema, registry=registry).validate(container)


@pytest.mark.parametrize("version", KUBERNETES)
def test_every_kubernetes_object_matches_the_api_schema(version):
    checked = set()
    for _name, doc in _core():
        kv.validate(doc, version, strict=True)
        checked.add((doc["kind"], doc["metadata"]["name"]))
    assert checked == {("Deployment", "mip"), ("Service", "mip"), ("Service", "mip-headless"),
                       ("HorizontalPodAutoscaler", "mip")}


def test_the_validation_catches_a_misspelt_field_and_a_wrong_type():
    import jsonschema

    deployment = copy.deepcopy(one("Deployment"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kv.ValidationError):
        kv.validate(deployment, KUBERNETES[-1], strict=True)
    hpa = copy.deepcopy(one("HorizontalPodAutoscaler"))
    hpa["spec"]["minReplicas"] = "two"
    with pytest.raises(kv.ValidationError):
        kv.validate(hpa, KUBERNETES[-1], strict=True)
    with pytest.raises(jsonschema.ValidationError):
        _validate_container({**container, "args": "--http"}, KUBERNETES[-1])


# -- command lines --------------------------------------------------------------------------

def _dockerfile() -> dict:
    """Instruction -> its arguments: a list for FROM, EXPOSE and COPY, else the last one."""
    found: dict = {"FROM": [], "EXPOSE": [], "COPY": []}
    for word, rest in instructions():
        if word in ("FROM", "EXPOSE", "COPY"):
            found[word].append(rest)
        else:
            found[word] = rest
    return found


def _container(doc: dict) -> dict:
    (container,) = doc["spec"]["template"]["spec"]["containers"]
    return container


def _runtime_container() -> dict:
    (container,) = one("ServingRuntime")["spec"]["containers"]
    return container


def test_the_image_builds_a_wheel_and_serves_it_as_a_user():
    docker = _dockerfile()
    stages = [re.fullmatch(r"(\S+)(?: AS (\S+))?", f, re.IGNORECASE).groups()
              for f in docker["FROM"]]
    assert [alias for _, alias in stages] == ["builder", "runtime"]
    assert any(c.startswith("--from=builder ") for c in docker["COPY"])
    assert docker["USER"].split(":")[0] not in ("0", "root")
    assert exec_form(docker["ENTRYPOINT"]) == ["mip", "serve"]
    args = parse_serve(exec_form(docker["CMD"]))
    assert args.model_repository is None  # the demo repository, built into the image
    listeners = {port(args.http), port(args.grpc), port(args.mip)}
    assert {int(p) for e in docker["EXPOSE"] for p in e.split()} == listeners
    check = docker["HEALTHCHECK"]
    url = re.search(r"http://127\.0\.0\.1:(\d+)(/[\w/]+)", check)
    assert url and int(url.group(1)) == port(args.http) and url.group(2) == "/v2/health/ready"


def test_the_deployment_command_line_ports_and_probes_agree():
    deployment = one("Deployment")
    container = _container(deployment)
    args = parse_serve(container["args"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"mip": port(args.mip), "grpc": port(args.grpc), "http": port(args.http)}
    for listener in (args.http, args.grpc, args.mip.removeprefix("tcp://")):
        assert listener.startswith("0.0.0.0:"), listener  # reachable from the pod's network
    http = container["readinessProbe"]["httpGet"]
    assert (http["path"], ports[http["port"]]) == ("/v2/health/ready", port(args.http))
    live = container["livenessProbe"]["httpGet"]
    assert (live["path"], ports[live["port"]]) == ("/v2/health/live", port(args.http))
    assert container["startupProbe"]["grpc"]["port"] == port(args.grpc)
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == port(args.http)
    assert annotations["prometheus.io/path"] == "/metrics"
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/var/lib/mip" in mounts  # MIP_STATE_DIR of the image: writable under a read-only root
    for service in ("mip", "mip-headless"):
        spec = one("Service", service)["spec"]
        assert spec["selector"].items() <= labels.items()
        assert {(p["name"], p["targetPort"]) for p in spec["ports"]} == {
            (name, name) for name in ports}
    assert one("Service", "mip-headless")["spec"]["clusterIP"] == "None"


def test_the_autoscaler_scales_the_deployment_on_the_pending_requests():
    spec = one("HorizontalPodAutoscaler")["spec"]
    target = spec["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", "mip")
    (metric,) = spec["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "nv_inference_pending_request_count"
    # the series the adapter reads: the metrics module names it
    from mip.frontends.oip import metrics

    assert "nv_inference_pending_request_count" in metrics.__doc__


# -- KServe ---------------------------------------------------------------------------------

#: fields of KServe's ServingRuntimeSpec, SupportedModelFormat and the InferenceService's
#: predictor model (besides the Container fields it embeds)
RUNTIME_FIELDS = {"supportedModelFormats", "multiModel", "disabled", "protocolVersions",
                  "containers", "volumes", "nodeSelector", "affinity", "tolerations",
                  "imagePullSecrets", "annotations", "labels", "replicas", "builtInAdapter",
                  "grpcEndpoint", "grpcDataEndpoint", "httpDataEndpoint", "storageHelper",
                  "hostIPC", "workerSpec"}
FORMAT_FIELDS = {"name", "version", "autoSelect", "priority"}
PROTOCOLS = {"v1", "v2", "grpc-v1", "grpc-v2"}
MODEL_FIELDS = {"modelFormat", "runtime", "protocolVersion", "storageUri", "storage"}


@pytest.mark.parametrize("version", KUBERNETES)
def test_the_serving_runtime_runs_mip_serve_as_a_kserve_v2_runtime(version):
    runtime = one("ServingRuntime")
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1"
    spec = runtime["spec"]
    assert set(spec) <= RUNTIME_FIELDS, set(spec) - RUNTIME_FIELDS
    assert {f["name"] for f in spec["supportedModelFormats"]} == {"onnx"}
    for model_format in spec["supportedModelFormats"]:
        assert set(model_format) <= FORMAT_FIELDS and isinstance(model_format["version"], str)
    assert spec["protocolVersions"] == ["v2", "grpc-v2"]
    container = _runtime_container()
    _validate_container(container, version)
    assert container["name"] == "kserve-container"  # the name KServe merges the predictor into
    args = parse_serve(container["args"])
    # KServe's conventions: the storage initializer's folder, REST on 8080, gRPC on 8081
    assert args.model_repository == "/mnt/models"
    assert (port(args.http), port(args.grpc)) == (8080, 8081)
    assert args.http.startswith("0.0.0.0:") and args.grpc.startswith("0.0.0.0:")
    assert int(spec["annotations"]["prometheus.kserve.io/port"]) == port(args.http)


@pytest.mark.parametrize("version", KUBERNETES)
def test_the_inference_services_name_the_runtime_and_its_ports(version):
    runtime = one("ServingRuntime")
    args = parse_serve(_runtime_container()["args"])
    services = [doc for _, doc in documents() if doc["kind"] == "InferenceService"]
    assert {s["spec"]["predictor"]["model"]["protocolVersion"] for s in services} == {
        "v2", "grpc-v2"}
    for service in services:
        assert service["apiVersion"] == "serving.kserve.io/v1beta1"
        assert set(service["spec"]) == {"predictor"}
        model = service["spec"]["predictor"]["model"]
        assert model["runtime"] == runtime["metadata"]["name"]
        assert model["modelFormat"]["name"] in {
            f["name"] for f in runtime["spec"]["supportedModelFormats"]}
        assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
        assert re.match(r"(pvc|s3|gs|https?)://", model["storageUri"])
        # the rest is a Container (without its name, which KServe sets)
        container = {k: v for k, v in model.items() if k not in MODEL_FIELDS}
        _validate_container({"name": "kserve-container", **container}, version)
        if model["protocolVersion"] == "grpc-v2":
            (serving_port,) = container["ports"]
            assert serving_port["name"] == "h2c" and serving_port["containerPort"] == port(args.grpc)
        else:
            assert "ports" not in container  # KServe's default: 8080, the runtime's --http


# -- the Deployment's command line, run --------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_deployment_command_line_answers_its_probes_and_the_image_healthcheck(tmp_path):
    """``mip serve`` with the Deployment's arguments, its listeners moved to free ports of
    127.0.0.1: the HTTP probes' paths answer 200, the gRPC probe's health check SERVING,
    and the image's HEALTHCHECK command exits 0."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    import grpc

    container = _container(one("Deployment"))
    moved, ports = [], {}
    for arg in container["args"]:
        found = re.fullmatch(r"((?:tcp://)?)0\.0\.0\.0:(\d+)", arg)
        if found:
            ports[int(found.group(2))] = _free_port()
            arg = f"{found.group(1)}127.0.0.1:{ports[int(found.group(2))]}"
        moved.append(arg)
    named = {p["name"]: ports[p["containerPort"]] for p in container["ports"]}
    process, _ = start([*moved, "--model", "identity"], 3, timeout=60,
                       env={"XDG_CACHE_HOME": str(tmp_path / "cache"),
                            "MIP_STATE_DIR": str(tmp_path / "state")})
    try:
        import urllib.request

        for probe in ("readinessProbe", "livenessProbe"):
            get = container[probe]["httpGet"]
            url = f"http://127.0.0.1:{named[get['port']]}{get['path']}"
            with urllib.request.urlopen(url, timeout=10) as response:
                assert response.status == 200, url
        grpc_port = ports[container["startupProbe"]["grpc"]["port"]]
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        check = exec_form(_dockerfile()["HEALTHCHECK"].split("CMD", 1)[1].strip())
        assert check[:2] == ["python3", "-c"]
        code = check[2].replace("127.0.0.1:8000", f"127.0.0.1:{ports[8000]}")
        assert subprocess.run([sys.executable, "-c", code], timeout=30).returncode == 0
    finally:
        stop(process)
