"""grpc.health.v1 and server reflection on both gRPC transports, through grpcio's own health
and reflection clients."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest
from _oip_server import OipServer, add_model, grpc_implementations, identity
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from onnx import TensorProto

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
KSERVE = "inference.GRPCInferenceService"


def _repo(tmp_path: Path, broken: bool) -> Path:
    repo = tmp_path / "repo"
    add_model(repo, "good", identity(TensorProto.FLOAT))
    if broken:
        add_model(repo, "broken", b"not an onnx model")
    return repo


@pytest.mark.parametrize("impl", grpc_implementations())
def test_check_follows_strict_readiness(tmp_path, impl):
    for broken, expected in ((False, SERVING), (True, NOT_SERVING)):
        with OipServer(_repo(tmp_path / str(broken), broken), grpc_implementation=impl) as srv:
            with grpc.insecure_channel(srv.grpc_url) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                for service in ("", KSERVE):
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
                    assert reply.status == expected, (broken, service)
                with pytest.raises(grpc.RpcError) as info:
                    stub.Check(health_pb2.HealthCheckRequest(service="nosuch.Service"), timeout=10)
                assert info.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("impl", grpc_implementations())
def test_watch_sends_the_status_then_not_serving_at_shutdown(tmp_path, impl):
    srv = OipServer(_repo(tmp_path, broken=False), grpc_implementation=impl)
    srv.__enter__()
    stopped = False
    try:
        with grpc.insecure_channel(srv.grpc_url) as channel:
            stream = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=""), timeout=30)
            assert next(stream).status == SERVING
            unknown = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service="nosuch.Service"), timeout=30)
            assert next(unknown).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
            unknown.cancel()
            stopping = threading.Thread(target=srv.__exit__, args=(None, None, None))
            stopping.start()
            stopped = True
            assert next(stream).status == NOT_SERVING  # told before the server goes
            with pytest.raises((StopIteration, grpc.RpcError)):
                next(stream)
            stopping.join(30)
    finally:
        if not stopped:
            srv.__exit__(None, None, None)


@pytest.mark.parametrize("impl", grpc_implementations())
def test_reflection_lists_and_describes_every_service(tmp_path, impl):
    with OipServer(_repo(tmp_path, broken=False), grpc_implementation=impl) as srv:
        with grpc.insecure_channel(srv.grpc_url) as channel:
            database = ProtoReflectionDescriptorDatabase(channel)
            services = set(database.get_services())
            assert {KSERVE, "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
                    "grpc.reflection.v1alpha.ServerReflection"} <= services
            described = database.FindFileContainingSymbol(KSERVE)
            assert [s.name for s in described.service] == ["GRPCInferenceService"]
            assert "ModelInferRequest" in [m.name for m in described.message_type]
            health = database.FindFileContainingSymbol("grpc.health.v1.Health")
            assert health.package == "grpc.health.v1"
            # v1 (what grpcurl asks first): the same messages under the new package name
            call = channel.stream_stream(
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
            (reply,) = list(call(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                 timeout=10))
            assert KSERVE in {s.name for s in reply.list_services_response.service}


def test_mip_proto_prints_the_shipped_proto_files():
    result = subprocess.run([sys.executable, "-m", "mip.cli", "proto"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    paths = [Path(line) for line in result.stdout.splitlines()]
    assert [p.name for p in paths] == ["inference.proto", "model_config.proto"]
    assert all(p.is_file() for p in paths)
    assert "service GRPCInferenceService" in paths[0].read_text()
