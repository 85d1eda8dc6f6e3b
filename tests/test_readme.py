"""The README's commands work as written: the quick ones run here, in a scratch folder, exactly as shown."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def readme_commands(section: str) -> list[list[str]]:
    """The commands of the first bash block under the README heading `section` (continuations joined)."""
    text = (ROOT / "README.md").read_text()
    body = text.split(f"## {section}\n", 1)[1]
    block = re.search(r"```bash\n(.*?)```", body, re.S).group(1)
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        line = line.split("  #", 1)[0].strip()
        if line:
            commands.append(shlex.split(line))
    return commands


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    exe = argv[0].removeprefix(".venv/bin/")
    return subprocess.run([str(BIN / exe), *argv[1:]], cwd=cwd, capture_output=True, text=True, timeout=900)


def test_single_run_commands(tmp_path):
    commands = readme_commands("Single runs with `tpp`")
    assert [c[:2] for c in commands] == [[".venv/bin/tpp", "list"], [".venv/bin/tpp", "pretrain"],
                                         [".venv/bin/tpp", "run"]]
    for argv in commands:
        proc = run(argv, tmp_path)
        assert proc.returncode == 0, (argv, proc.stderr[-2000:])
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    assert metrics["speedup"] > 1 and 0 <= metrics["best_acc"] <= 100


@pytest.mark.parametrize("exe", ["tpp", "tpp-study", "tpp-analyze"])
def test_every_command_has_help(exe):
    proc = subprocess.run([str(BIN / exe), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage:" in proc.stdout


def test_make_targets_are_the_readme_commands():
    readme = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert "make demo" in readme and "make test" in readme
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci and "set -euo pipefail" in ci


def test_the_readme_is_short_and_every_link_and_cited_test_exists():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200  # the rest is one click away, in docs/
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
            if not target.startswith(("http://", "https://")):
                assert (page.parent / target).exists(), (page.name, target)
    linked = set(re.findall(r"\]\(docs/([^)]+\.md)\)", readme))
    assert linked == {p.name for p in pages[1:]}, linked  # every guide is reachable from the README
    # every test the reliability table cites exists (a renamed test would leave a row unproven)
    table = (ROOT / "docs" / "reliability.md").read_text()
    for path, name in re.findall(r"`(tests/[\w/]+\.py)(?:::(\w+))?", table):
        source = (ROOT / path).read_text()
        assert name == "" or f"def {name}(" in source, (path, name)
    for name in re.findall(r"`(test_\w+)`", table):  # a bare name continues the previous row's file
        assert any(f"def {name}(" in p.read_text() for p in (ROOT / "tests").glob("test_*.py")), name
