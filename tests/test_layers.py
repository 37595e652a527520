"""The layers as a test: app (cli, pipeline, dry_run, serve, config) > sibling stages > core (pyproject's
[tool.importlinter]). import-linter reads a package from one folder, so the tree is laid out the way the wheel
installs it (pyproject's package-dir mapping) before it is linted."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _installed_layout(target: Path) -> Path:
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    for package in setuptools["packages"]:
        source = REPO / setuptools.get("package-dir", {}).get(package, package.replace(".", "/"))
        dest = target / package.replace(".", "/")
        dest.mkdir(parents=True, exist_ok=True)
        for module in source.glob("*.py"):
            shutil.copy2(module, dest / module.name)
    return target


def _lint(tree: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run([str(Path(sys.executable).parent / "lint-imports"), str(REPO / "pyproject.toml")],
                          cwd=tree, env=env, capture_output=True, text=True, timeout=120)


def test_import_contracts_hold(tmp_path: Path) -> None:
    done = _lint(_installed_layout(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 kept, 0 broken" in done.stdout


def test_a_stage_importing_another_stage_breaks_the_contract(tmp_path: Path) -> None:
    tree = _installed_layout(tmp_path)
    report = tree / "ragtune" / "eval" / "report.py"
    report.write_text(report.read_text() + "\nfrom ragtune.train import sft  # noqa\n")
    done = _lint(tree)
    assert done.returncode != 0
    assert "ragtune.eval.report -> ragtune.train.sft" in done.stdout
