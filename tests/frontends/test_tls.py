"""TLS on the binary listeners: MIP (with mutual TLS) and KServe v2 gRPC, with certificates made
at test time."""

from __future__ import annotations

import asyncio
import ssl

import numpy as np
import pytest

from mip.frontends.mip_handler import MipHandler
from mip.net import tls
from mip.net.mip_client import AsyncClient, Client
from mip.net.mip_server import MipServer
from mip.serving.demo import build_demo_repository
from mip.serving.engine import Engine
from mip.serving.repository import ModelRepository

trustme = pytest.importorskip("trustme")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("client@example.test")
    folder = tmp_path_factory.mktemp("pki")
    paths = {"ca": folder / "ca.pem", "cert": folder / "server.pem", "key": folder / "server.key",
             "client": folder / "client.pem"}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    server.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    server.private_key_pem.write_to_path(str(paths["key"]))
    client.private_key_and_cert_chain_pem.write_to_path(str(paths["client"]))
    return ca, server, client, paths


@pytest.fixture
async def engine(tmp_path):
    engine = Engine(ModelRepository(build_demo_repository(tmp_path / "demo")))
    await engine.start()
    yield engine
    await engine.stop()


async def test_mip_over_mutual_tls(engine, pki):
    """The contexts of mip.net.tls (as mip serve and mip worker make them from --tls-*)."""
    _, _, _, paths = pki
    server_ctx = tls.server_context(str(paths["cert"]), str(paths["key"]),
                                    client_ca=str(paths["ca"]))
    assert server_ctx.verify_mode == ssl.CERT_REQUIRED
    server = MipServer(MipHandler(engine), ssl=server_ctx)
    url = str(await server.start("tcp://127.0.0.1:0"))
    try:
        client_ctx = tls.client_context(ca=str(paths["ca"]), cert=str(paths["client"]))
        x = np.arange(16, dtype=np.float32).reshape(1, 16)
        async with AsyncClient(url, ssl=client_ctx, server_hostname="127.0.0.1") as client:
            out = await client.infer([[x]], model="identity")
        np.testing.assert_array_equal(out[0][0], x)

        def blocking():
            with Client(url, ssl=client_ctx, server_hostname="127.0.0.1") as c:
                return c.infer([[x]], model="identity")
        np.testing.assert_array_equal((await asyncio.to_thread(blocking))[0][0], x)

        # without a client certificate the handshake is refused
        no_cert = tls.client_context(ca=str(paths["ca"]))
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            await asyncio.to_thread(lambda: Client(url, ssl=no_cert, timeout=5,
                                                   server_hostname="127.0.0.1").ping())
    finally:
        await server.stop()


async def _grpc_tls_server(engine, paths, implementation: str, **tls):
    """A started gRPC listener with the test certificate, on ``implementation``."""
    from mip.frontends.oip.grpc import GrpcServer, native_available

    if implementation == "native" and not native_available():
        pytest.skip("mip.protocol._h2 not built (no libnghttp2 headers)")
    server = GrpcServer(engine, tls_cert=str(paths["cert"]), tls_key=str(paths["key"]),
                        implementation=implementation, **tls)
    return server, await server.start("127.0.0.1:0")


@pytest.mark.parametrize("implementation", ["native", "grpcio"])
async def test_grpc_over_tls_with_tritonclient(engine, pki, implementation):
    grpcclient = pytest.importorskip("tritonclient.grpc")
    _, _, _, paths = pki
    server, address = await _grpc_tls_server(engine, paths, implementation)
    try:
        def call():
            client = grpcclient.InferenceServerClient(address, ssl=True,
                                                      root_certificates=str(paths["ca"]))
            x = grpcclient.InferInput("input", [1, 16], "FP32")
            x.set_data_from_numpy(np.ones((1, 16), np.float32))
            return client.infer("identity", [x]).as_numpy("output")
        out = await asyncio.to_thread(call)
        np.testing.assert_array_equal(out, np.ones((1, 16), np.float32))
    finally:
        await server.stop()


@pytest.mark.parametrize("implementation", ["native", "grpcio"])
async def test_grpc_mutual_tls_requires_a_client_certificate(engine, pki, implementation):
    grpcclient = pytest.importorskip("tritonclient.grpc")
    from tritonclient.utils import InferenceServerException

    _, _, _, paths = pki
    server, address = await _grpc_tls_server(engine, paths, implementation,
                                             tls_ca=str(paths["ca"]))
    try:
        def live(**certs):
            client = grpcclient.InferenceServerClient(address, ssl=True,
                                                      root_certificates=str(paths["ca"]), **certs)
            try:
                return client.is_server_live(client_timeout=5)
            finally:
                client.close()
        assert await asyncio.to_thread(live, private_key=str(paths["client"]),
                                       certificate_chain=str(paths["client"]))
        with pytest.raises(InferenceServerException):
            await asyncio.to_thread(live)
    finally:
        await server.stop()
