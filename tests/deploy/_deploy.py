"""What the deploy tests read: the Dockerfile's instructions, the Kubernetes manifests, and
``mip serve`` command lines parsed by the real command-line parser."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
MANIFESTS = ROOT / "deploy" / "kubernetes"


def documents() -> list[tuple[str, dict]]:
    """Every manifest: (file name, document), in file and document order."""
    found = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        found += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return found


def one(kind: str, name: str | None = None) -> dict:
    """The manifest of `kind` (and `name`); there must be exactly one."""
    matches = [doc for _, doc in documents() if doc["kind"] == kind
               and (name is None or doc["metadata"]["name"] == name)]
    assert len(matches) == 1, (kind, name, len(matches))
    return matches[0]


def instructions() -> list[tuple[str, str]]:
    """The Dockerfile's instructions: (INSTRUCTION, rest of it), continuation lines joined,
    comments and blank lines left out."""
    joined, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        joined.append(pending + line)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    result = []
    for text in joined:
        word, _, rest = text.strip().partition(" ")
        result.append((word.upper(), rest.strip()))
    return result


def exec_form(text: str) -> list[str]:
    """A JSON (exec form) argument list of an instruction such as CMD."""
    value = json.loads(text)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), text
    return value


def parse_serve(args: list[str]) -> argparse.Namespace:
    """``mip serve ARGS`` as the real parser reads it; an option it does not know (renamed,
    removed, misspelt) fails with the parser's own message."""
    from mip.cli import _parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return _parser().parse_args(["serve", *args])
    except SystemExit:
        raise AssertionError(f"mip serve {' '.join(args)}: {err.getvalue().strip()}") from None


def port(address: str) -> int:
    """The port of ``HOST:PORT`` or ``tcp://HOST:PORT``."""
    found = re.fullmatch(r"(?:tcp://)?[^/]*:(\d+)", address)
    assert found, address
    return int(found.group(1))
