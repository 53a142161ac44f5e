"""Smoke-test a built wheel in a fresh venv, with the system's libnghttp2 out of reach.

    python tests/packaging/wheel_smoke.py dist/mip_toolkit-*.whl

1. creates a venv in a temporary folder and installs the wheel with its ``serve`` extra;
2. runs :data:`CHECKS` with that venv's Python, from an empty folder (so the source tree
   cannot be imported), inside a mount namespace where the system's ``libnghttp2.so.14`` is
   an empty file (``unshare -m`` and a bind mount; as root). Where the machine does not allow
   that, it says so and runs the checks without hiding the library;
3. the checks: a codec round trip; ``mip serve`` on its demo repository answering MIP, KServe
   v2 gRPC (grpcio) and REST; the native gRPC client (libnghttp2 again, on the client side);
   and, from ``/proc/PID/maps`` of the server and of the checking process, that the
   libnghttp2 mapped is the copy inside the wheel (``mip_toolkit.libs/``), never the system's.

Exit status 0 when every check passed. Used by ``make wheel``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

CHECKS = textwrap.dedent(r"""
    import asyncio, json, os, re, socket, subprocess, sys, time, urllib.request
    import numpy as np
    import mip
    from mip.net.mip_client import Client

    def free_port():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def nghttp2_maps(pid):
        with open(f"/proc/{pid}/maps") as f:
            return sorted({line.split()[-1] for line in f if "libnghttp2" in line})

    def check_vendored(pid, who):
        maps = nghttp2_maps(pid)
        assert maps, f"{who}: no libnghttp2 mapped"
        assert all("mip_toolkit.libs/" in path for path in maps), f"{who}: {maps}"
        print(f"{who}: libnghttp2 mapped from {maps[0]}")

    # 1. the codec
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    m = mip.decode(mip.encode_request([[x, mip.Text("hi")]], model="m"))
    assert m.model == "m" and (m.batch[0][0] == x).all() and m.batch[0][1] == mip.Text("hi")
    print("codec: round trip ok")

    # 2. mip serve on the demo models, over MIP, gRPC and REST
    ports = {k: free_port() for k in ("mip", "grpc", "http")}
    state = os.path.join(os.getcwd(), "state")
    server = subprocess.Popen(
        [sys.executable, "-m", "mip.cli", "--log-level", "WARNING", "serve",
         "--mip", f"tcp://127.0.0.1:{ports['mip']}", "--grpc", f"127.0.0.1:{ports['grpc']}",
         "--http", f"127.0.0.1:{ports['http']}", "--queue", os.path.join(state, "jobs.sqlite3")],
        env=dict(os.environ, MIP_STATE_DIR=state))
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, f"mip serve exited with {server.returncode}"
            try:
                with urllib.request.urlopen(
                        f"http://127.0.0.1:{ports['http']}/v2/models/mlp/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "mip serve not ready within 120 s"
            time.sleep(0.2)
        rows = np.random.default_rng(0).random((2, 784), dtype=np.float32)
        with Client(f"tcp://127.0.0.1:{ports['mip']}") as client:
            (out,), = client.infer([[rows]], model="mlp")
        assert out.shape == (2, 10), out.shape
        print("MIP: mlp answered", out.shape)

        body = json.dumps({"inputs": [{"name": "input", "shape": [2, 784], "datatype": "FP32",
                                       "data": rows.ravel().tolist()}]}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{ports['http']}/v2/models/mlp/infer",
                                     data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            reply = json.load(r)
        rest = np.asarray(reply["outputs"][0]["data"], np.float32).reshape(2, 10)
        assert np.allclose(rest, out, atol=1e-5)
        print("REST: mlp answered the same logits")

        import grpc
        from mip.frontends.oip import inference_pb2 as pb, inference_pb2_grpc as pbg
        request = pb.ModelInferRequest(model_name="mlp", inputs=[pb.ModelInferRequest.InferInputTensor(
            name="input", datatype="FP32", shape=[2, 784])], raw_input_contents=[rows.tobytes()])
        with grpc.insecure_channel(f"127.0.0.1:{ports['grpc']}") as channel:
            got = pbg.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
        grpc_out = np.frombuffer(got.raw_output_contents[0], np.float32).reshape(2, 10)
        assert np.allclose(grpc_out, out, atol=1e-5)
        print("gRPC (grpcio client, native server): mlp answered the same logits")

        from mip.net.grpc_client import GrpcChannel

        async def native_call():
            async with GrpcChannel(f"127.0.0.1:{ports['grpc']}") as channel:
                return await channel.unary("/inference.GRPCInferenceService/ServerLive",
                                           pb.ServerLiveRequest().SerializeToString())
        assert pb.ServerLiveResponse.FromString(asyncio.run(native_call())).live
        print("gRPC (native client): ServerLive answered")
        check_vendored(server.pid, "mip serve")
        check_vendored(os.getpid(), "native gRPC client")
    finally:
        server.terminate()
        server.wait(30)
    print("smoke: all checks passed")
""")


def system_nghttp2() -> str | None:
    """The real path of the system's libnghttp2.so.14 the loader would find, if any."""
    found = subprocess.run(["/sbin/ldconfig", "-p"], capture_output=True, text=True).stdout
    for line in found.splitlines():
        if "libnghttp2.so.14 " in line and "=>" in line:
            return os.path.realpath(line.split("=>", 1)[1].strip())
    return None


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    wheel = Path(sys.argv[1]).resolve()
    with tempfile.TemporaryDirectory(prefix="mip-wheel-smoke-") as tmp:
        venv = Path(tmp) / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        python = venv / "bin" / "python"
        print(f"installing {wheel.name}[serve] into a fresh venv", flush=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", f"{wheel}[serve]"], check=True)
        work = Path(tmp) / "run"
        work.mkdir()
        (work / "checks.py").write_text(CHECKS)
        argv = [str(python), "checks.py"]
        lib = system_nghttp2()
        hide = (lib is not None and os.geteuid() == 0 and shutil.which("unshare")
                and subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0)
        if hide:
            print(f"hiding {lib} (an empty file in a private mount namespace)", flush=True)
            argv = ["unshare", "-m", "sh", "-c",
                    f"mount --bind /dev/null '{lib}' && exec \"$@\"", "sh", *argv]
        elif lib is None:
            print("no system libnghttp2 found: nothing to hide", flush=True)
        else:
            print(f"cannot hide {lib} here (needs root and unshare -m); the checks of the "
                  "mapped copy still run", flush=True)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        return subprocess.run(argv, cwd=work, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
