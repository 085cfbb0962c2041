"""Packaging: the license as an SPDX expression with its LICENSE file (no deprecation warning
when the metadata is built), and a `bench` extra that holds every third-party package the
bench imports beyond the core dependencies."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILD = "import setuptools.build_meta as b, sys; print(b.prepare_metadata_for_build_wheel(sys.argv[1]))"


@pytest.fixture(scope="module")
def metadata(tmp_path_factory) -> tuple[str, str]:
    """The METADATA setuptools writes for this checkout, and what it printed on stderr."""
    out = tmp_path_factory.mktemp("meta")
    done = subprocess.run(
        [sys.executable, "-W", "always", "-c", BUILD, str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return (out / done.stdout.strip().splitlines()[-1] / "METADATA").read_text(), done.stderr


def test_license_is_an_spdx_expression_with_its_file(metadata):
    meta, stderr = metadata
    assert "License-Expression: MIT" in meta.splitlines()
    assert "License-File: LICENSE" in meta.splitlines()
    assert "deprecated" not in stderr.lower(), stderr[-2000:]
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")


def _requires(meta: str, extra: str | None) -> set[str]:
    """Distribution names required, for an extra or (None) always."""
    names = set()
    for line in meta.splitlines():
        m = re.match(r"Requires-Dist: ([A-Za-z0-9_.-]+)[^;]*(?:; (.*))?$", line)
        marker = (m.group(2) or "") if m else ""
        if m and (f'extra == "{extra}"' in marker if extra else "extra ==" not in marker):
            names.add(m.group(1).lower().replace("_", "-"))
    return names


def _imported_modules(folder: Path) -> set[str]:
    mods = set()
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                mods |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods.add(node.module.split(".")[0])
    return mods


def test_the_bench_extra_holds_what_the_bench_imports(metadata):
    meta, _ = metadata
    declared = _requires(meta, None) | _requires(meta, "bench")
    assert {"matplotlib", "pyyaml"} <= _requires(meta, "bench")
    assert "gru-serve[bench]" in meta.replace(" ", "")  # dev brings it
    owners = importlib.metadata.packages_distributions()
    missing = {}
    for mod in _imported_modules(ROOT / "gru_serve" / "bench") - set(sys.stdlib_module_names) - {"gru_serve"}:
        dists = {d.lower().replace("_", "-") for d in owners.get(mod, [])}
        if dists and not dists & declared:
            missing[mod] = sorted(dists)
    assert not missing, f"gru_serve/bench imports these, undeclared for the bench: {missing}"
