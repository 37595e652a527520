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
    package_dir = setuptools.get("package-dir", {})
    for package in setuptools["packages"]:
        # a subpackage of a mapped package (ragtune.eval.report) lives in its parent's folder (eval/report)
        parent = max((p for p in package_dir if package == p or package.startswith(p + ".")), key=len, default=None)
        relative = package_dir[parent] + package[len(parent):] if parent else package
        source = REPO / relative.replace(".", "/")
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
    report = tree / "ragtune" / "eval" / "report" / "verdicts.py"
    report.write_text(report.read_text() + "\nfrom ragtune.train import sft  # noqa\n")
    done = _lint(tree)
    assert done.returncode != 0
    assert "ragtune.eval.report.verdicts -> ragtune.train.sft" in done.stdout


def _python_files() -> list[Path]:
    """The package (app, core, the three stages) and scripts/, gpu_check included (a Python script without .py)."""
    folders = [REPO / name for name in ("ragtune", "data_prep", "train", "eval", "scripts")]
    return sorted(p for folder in folders for p in folder.rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts and (p.suffix == ".py" or p.name == "gpu_check"))


def test_rooms_stay_small_enough_to_read_in_one_sitting() -> None:
    """No module of the package over 500 lines and no function over 60 (scripts included): the split along each
    room's seams (#26) stays split."""
    import ast

    too_long = []
    for path in _python_files():
        source = path.read_text(encoding="utf-8")
        if path.parent.name != "scripts" and source.count("\n") > 500:
            too_long.append(f"{path.relative_to(REPO)}: {source.count(chr(10))} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                too_long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: "
                                f"{node.end_lineno - node.lineno + 1} lines")
    assert not too_long, "\n".join(too_long)
