"""Build the image of deploy/Dockerfile with podman and smoke-test it (``make image``).

    python tests/deploy/image_smoke.py [--tag mip:smoke]

No registry of container images is needed: the base is Debian made with debootstrap (its
packages from the Debian mirror), imported into podman, and passed as the Dockerfile's BASE.
The machine's CA certificates go into that base, so the build reaches the package registries
the way this machine does (through a proxy that re-signs TLS, where there is one).

Then it runs the image with its default command, in a network namespace made for it (the
listeners bind 0.0.0.0 there, nothing of the machine's network), and checks from that
namespace: ``GET /v2/health/ready``, a MIP request to the demo ``mlp`` model, the gRPC health
check (SERVING), the image's own HEALTHCHECK (``podman healthcheck run``), and that the
server's process runs as uid 10001.

Where the machine cannot do it, it says what is missing and exits with status 2 (0 with
``--if-possible``, as CI runs it): podman and
debootstrap (Debian packages), root (podman's storage, network namespaces), a kernel that
lets root make mount namespaces. Three settings make it run in a sandbox such as the one it
was written on: podman runs in a private mount namespace without the cgroup v2 hierarchy of a
hybrid layout (crun refuses hybrid layouts), containers run with cgroups disabled, and their
resource limits stay within this process's (root there may not raise them).
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / "build" / "image"
BASE = "localhost/mip-base:bookworm"
DEBIAN = "http://deb.debian.org/debian"
UID = 10001

CHECKS = r"""
import json, sys, time, urllib.request
import numpy as np
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from mip.net.mip_client import Client

deadline = time.monotonic() + 120
while True:
    try:
        with urllib.request.urlopen("http://127.0.0.1:8000/v2/health/ready", timeout=2) as r:
            if r.status == 200:
                break
    except OSError:
        pass
    assert time.monotonic() < deadline, "the container was not ready within 120 s"
    time.sleep(0.5)
print("REST: /v2/health/ready 200")
rows = np.random.default_rng(0).random((2, 784), dtype=np.float32)
with Client("tcp://127.0.0.1:7070") as client:
    (out,), = client.infer([[rows]], model="mlp")
assert out.shape == (2, 10), out.shape
print("MIP: mlp answered", out.shape)
with grpc.insecure_channel("127.0.0.1:8001") as channel:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
assert reply.status == health_pb2.HealthCheckResponse.SERVING, reply
print("gRPC: grpc.health.v1 SERVING")
"""


def missing() -> list[str]:
    """What this machine lacks to build and run the image."""
    lacks = [f"{tool} (apt-get install {package})" for tool, package in
             (("podman", "podman"), ("debootstrap", "debootstrap"), ("unshare", "util-linux"),
              ("ip", "iproute2")) if shutil.which(tool) is None]
    if os.geteuid() != 0:
        lacks.append("root")
    elif subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode:
        lacks.append("mount namespaces (unshare -m fails)")
    return lacks


def podman(*args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """``podman ARGS`` in a private mount namespace without a hybrid layout's cgroup v2."""
    script = 'umount /sys/fs/cgroup/unified 2>/dev/null; exec podman "$@"'
    return subprocess.run(["unshare", "-m", "sh", "-c", script, "podman", *args],
                          check=check, **kwargs)


def limits() -> list[str]:
    """--ulimit options within this process's own limits: podman's defaults are higher, and
    root here may not raise a limit (nor, in a sandbox such as this one, set the process
    count near its own)."""
    import resource

    files = min(resource.getrlimit(resource.RLIMIT_NOFILE)[0], 65536)
    return ["--ulimit", f"nofile={files}:{files}", "--ulimit", "nproc=16384:16384"]


def base_image() -> None:
    """The Debian base in podman, made once (build/image/rootfs is kept too): the same base
    again keeps the build's cached layers."""
    if podman("image", "exists", BASE, check=False).returncode == 0:
        return
    rootfs = CACHE / "rootfs"
    if not (rootfs / "usr" / "bin" / "python3").exists():
        shutil.rmtree(rootfs, ignore_errors=True)
        rootfs.mkdir(parents=True)
        print("debootstrap: a minimal Debian bookworm with python3", flush=True)
        subprocess.run(["debootstrap", "--variant=minbase",
                        "--include=python3,python3-venv,python3-dev,ca-certificates",
                        "bookworm", str(rootfs), DEBIAN], check=True, stdout=subprocess.DEVNULL)
    local = Path("/usr/local/share/ca-certificates")
    for certificate in local.glob("*.crt") if local.is_dir() else ():
        shutil.copy(certificate, rootfs / "usr/local/share/ca-certificates" / certificate.name)
    bundle = Path("/etc/ssl/certs/ca-certificates.crt")
    if bundle.exists():
        shutil.copy(bundle, rootfs / "etc/ssl/certs/ca-certificates.crt")
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    podman("import", "--change", "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt", "-", BASE,
           stdin=tar.stdout, stdout=subprocess.DEVNULL)
    assert tar.wait() == 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tag", default="localhost/mip:smoke")
    parser.add_argument("--if-possible", action="store_true",
                        help="exit 0, not 2, where the machine cannot build or run the image "
                             "(after saying what it lacks); any failure of the image fails")
    args = parser.parse_args()
    lacks = missing()
    if lacks:
        print(f"image: cannot build and run the image on this machine: it lacks "
              f"{', '.join(lacks)}; not checked", file=sys.stderr)
        return 0 if args.if_possible else 2
    started = time.monotonic()
    base_image()
    print(f"build: {args.tag} from {BASE}", flush=True)
    podman("build", "--isolation", "chroot", "--network", "host", "--format", "docker",
           *limits(), "--build-arg", f"BASE={BASE}", "-f", str(ROOT / "deploy" / "Dockerfile"),
           "-t", args.tag, str(ROOT))
    print(f"build: done in {time.monotonic() - started:.0f} s", flush=True)

    netns = f"mip-image-{os.getpid()}-{secrets.token_hex(2)}"
    name = f"mip-smoke-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:
        subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
        podman("run", "-d", "--name", name, "--cgroups", "disabled", *limits(),
               "--network", f"ns:/run/netns/{netns}", "--read-only", "--tmpfs", "/tmp",
               "--tmpfs", "/var/lib/mip", args.tag, stdout=subprocess.DEVNULL)
        with tempfile.TemporaryDirectory() as tmp:
            script = Path(tmp) / "checks.py"
            script.write_text(CHECKS)
            env = dict(os.environ, PYTHONPATH=str(ROOT))
            subprocess.run(["ip", "netns", "exec", netns, sys.executable, str(script)],
                           check=True, env=env, timeout=300)
        health = podman("healthcheck", "run", name, check=False, capture_output=True, text=True)
        assert health.returncode == 0, f"HEALTHCHECK: {health.stdout}{health.stderr}"
        print("HEALTHCHECK: healthy")
        pid = podman("inspect", "--format", "{{.State.Pid}}", name, capture_output=True,
                     text=True).stdout.strip()
        status = Path(f"/proc/{pid}/status").read_text()
        uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert b"serve" in command and set(uids) == {str(UID)}, (command, uids)
        print(f"user: mip serve runs as uid {UID}")
    except BaseException:
        podman("logs", name, check=False)
        raise
    finally:
        podman("rm", "-f", "-t", "5", name, check=False, stdout=subprocess.DEVNULL,
               stderr=subprocess.DEVNULL)
        subprocess.run(["ip", "netns", "del", netns], check=False)
    print(f"image: all checks passed in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
