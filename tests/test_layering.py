"""The layering the README's module map promises: Ray and MLflow only at the edge."""

import re
import subprocess
import sys
from pathlib import Path

import cvaa

PACKAGE = Path(cvaa.__file__).parent
EDGE = ("distributed", "tracking")


def _core_modules() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        if rel.parts[0] in EDGE:
            continue
        parts = [p for p in rel.parts if p != "__init__"]
        names.append(".".join(["cvaa", *parts]))
    return names


def test_the_core_imports_neither_ray_nor_mlflow():
    modules = _core_modules()
    assert {"cvaa.gan", "cvaa.scoring", "cvaa.models", "cvaa.metrics", "cvaa.data.drr"} <= set(modules)
    code = ("import importlib, sys\n"
            f"for m in {modules!r}:\n"
            "    importlib.import_module(m)\n"
            "print(sorted(m for m in ('ray', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout.strip()
    assert out == "[]"


def test_private_ray_names_only_in_the_compat_module():
    pattern = re.compile(r"_private|gcs_pb2|\._internal")
    offenders = [f"{p.relative_to(PACKAGE)}:{i}" for p in sorted(PACKAGE.rglob("*.py"))
                 if p.name != "compat.py"
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []
