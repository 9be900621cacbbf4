"""The secrets scan of tests/test_secrets.py and tests/test_auth.py: every secret looked for
in every text (console, MLflow params and tags) and every file (artifacts, Ray logs,
checkpoints) a run leaves."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping


def files_under(root: Path) -> list[Path]:
    return [p for p in Path(root).rglob("*") if p.is_file()]


def read_all(label: str, root: Path, base: Path | None = None) -> dict[str, bytes]:
    """``{"<label> <path>": bytes}`` for every file under ``root``."""
    return {f"{label} {p.relative_to(base) if base else p.name}": p.read_bytes()
            for p in files_under(root)}


def leaks(secrets: Iterable[str], texts: Mapping[str, str],
          blobs: Mapping[str, bytes]) -> list[str]:
    """``"<where>: <secret>"`` for each secret found in a text or a file."""
    secrets = list(secrets)
    found = [f"{where}: {s}" for s in secrets for where, text in texts.items() if s in text]
    found += [f"{where}: {s}" for s in secrets for where, data in blobs.items()
              if s.encode() in data]
    return found
