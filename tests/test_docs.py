"""The README and docs/guide cannot rot: every `python jobs/X.py ...` and
`bash scripts/X.sh ...` command they show parses with that job's own argparse parser
(options spelled in full, choices, types, required arguments; nothing runs), every job is
documented, and every relative link (and its #anchor) resolves."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import shlex
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs" / "guide").glob("*.md"))]
# `python jobs/x.py args` / `bash scripts/x.sh args`, up to the end of the line, a closing
# backtick, a pipe, `;`, `&&`, a redirect or a shell comment.
COMMAND = re.compile(r"(?:python3?|bash)\s+((?:jobs|scripts)/[\w.-]+\.(?:py|sh))"
                     r"([^\n`|;&>#]*)")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _where(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def _text(path: Path) -> str:
    """The file with shell line continuations joined."""
    return re.sub(r"\\\n\s*", " ", path.read_text())


def commands(paths=DOCS) -> list[tuple[str, str, list[str]]]:
    """``(where, script, args)`` of every command the docs show."""
    found = []
    for path in paths:
        text = _text(path)
        for m in COMMAND.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            found.append((f"{_where(path)}:{line}", m.group(1), shlex.split(m.group(2))))
    return found


@lru_cache(maxsize=None)
def job_parser(script: str):
    """``jobs/<name>.py``'s ``build_parser()`` (the module is imported, main() not run)."""
    path = ROOT / script
    spec = importlib.util.spec_from_file_location(f"docs_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parser = module.build_parser()
    parser.prog = script
    parser.allow_abbrev = False       # a renamed option must not pass as a prefix of it
    return parser


def script_jobs(script: str) -> list[str] | None:
    """The jobs a shell script hands its arguments to (a command ending in ``"$@"``:
    ``python jobs/x.py ... "$@"``); ``None`` when it hands them to something else
    (pytest); ``[]`` when it takes none (a ``"$@"`` inside a function is the function's)."""
    text = (ROOT / script).read_text()
    lines = re.sub(r"\\\n\s*", " ", text).splitlines()
    forwarding = [line for line in lines if line.rstrip().endswith('"$@"')]
    if not forwarding:
        # positional parameters of its own (``"$1"``, ``${1:-...}``): not a job's options
        return None if re.search(r'\$\{?1\b', text) else []
    jobs = {m for line in forwarding for m in re.findall(r"python3?\s+(jobs/[\w.-]+\.py)", line)}
    return sorted(jobs) or None


def check(where: str, script: str, args: list[str]) -> str | None:
    """Why the command does not parse, or ``None``."""
    if not (ROOT / script).is_file():
        return f"{where}: {script} does not exist"
    if script.startswith("scripts/"):
        jobs = script_jobs(script)
        if jobs is None:
            return None
        if not jobs:
            return f"{where}: {script} takes no arguments, given {args}" if args else None
    else:
        jobs = [script]
    for job in jobs:
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                job_parser(job).parse_args(args)
        except SystemExit as exc:
            if exc.code == 0:         # --help
                continue
            message = err.getvalue().strip().splitlines()[-1]
            return f"{where}: {script} {shlex.join(args)}\n    {job}: {message}"
    return None


def test_every_documented_command_parses_with_its_jobs_parser():
    found = commands()
    failures = [f for f in (check(*c) for c in found) if f]
    assert not failures, "stale commands in the docs:\n" + "\n".join(failures)
    documented = {script for _, script, _ in found}
    jobs = {f"jobs/{p.name}" for p in (ROOT / "jobs").glob("*.py")}
    assert jobs <= documented, f"jobs the docs never show: {sorted(jobs - documented)}"
    assert "scripts/demo.sh" in documented


def test_a_renamed_or_unknown_option_is_caught(tmp_path):
    """The check is not vacuous: a stale option, a bad choice, a missing required
    argument, a script that takes no arguments and a job that is gone all fail."""
    page = tmp_path / "page.md"
    page.write_text("```\npython jobs/train.py --epochs 2 \\\n    --run-nam demo\n```\n"
                    "Then `python jobs/evaluate.py --data runs/prepared`, "
                    "`python jobs/train.py --preset nosuch`, `bash scripts/setup.sh --x`, "
                    "`python jobs/nosuch.py`, `bash scripts/demo.sh --epochs 2`.\n")
    results = [check(*c) for c in commands([page])]
    assert len(results) == 6
    assert "unrecognized arguments: --run-nam" in results[0]
    assert "--models" in results[1] and "required" in results[1]
    assert "invalid choice: 'nosuch'" in results[2]
    assert "takes no arguments" in results[3]
    assert "does not exist" in results[4]
    assert results[5] is None


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"`|\*|_(?=\W)|(?<=\W)_", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {slug(m) for m in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", text, flags=re.M)}


def broken_links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):      # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            broken.append(f"{_where(path)}: {target} (no {dest})")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{_where(path)}: {target} (no heading #{anchor})")
    return broken


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(path):
    assert broken_links(path) == []


def test_the_link_check_can_fail(tmp_path):
    page = ROOT / "docs" / "guide" / "index.md"
    text = page.read_text()
    assert LINK.search(text)                      # the index links its pages
    bad = tmp_path / "bad.md"
    bad.write_text("# Top\n[ok](#top) [gone](nosuch.md) [anchor](#nowhere)\n")
    problems = broken_links(bad)
    assert len(problems) == 2 and "nosuch.md" in problems[0] and "#nowhere" in problems[1]


def test_readme_is_a_five_minute_read():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines (at most 250)"
