"""The source passes the linter (as configured in pyproject.toml)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed (it comes with the 'test' extra)")
    result = subprocess.run([ruff, "check", "--output-format", "concise", "mip", "tests", "bench"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def _imported_modules(path: Path) -> set[str]:
    import ast
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_frontends_use_other_packages_public_modules_only():
    """A frontend reaches the engine through mip.serving.engine (never the repository) and
    every other package through its public modules (no ``_name`` module of another package)."""
    frontends = ROOT / "mip" / "frontends"
    wrong = []
    for path in sorted(frontends.rglob("*.py")):
        for name in sorted(_imported_modules(path)):
            parts = name.split(".")
            if parts[0] != "mip" or name.startswith("mip.frontends"):
                continue
            if name.startswith("mip.serving.repository") or any(p.startswith("_") for p in parts):
                wrong.append(f"{path.relative_to(ROOT)}: {name}")
    assert not wrong, "\n".join(wrong)
