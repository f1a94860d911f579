"""Run a command's `main()` inside the test process, as its command line would run it.

Starting `python embed_images.py` costs seconds of imports before any work; most tests only need
what the command does, so they call its `main()` here, with the environment set, and stdout, stderr
and log lines captured. The result is what `subprocess.run(..., capture_output=True, text=True)`
returns. Tests of the process itself (signals, kill -9, the README's commands) still start one.
"""

from __future__ import annotations

import importlib
import io
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


def run_main(
    main: Callable[[list[str]], int], argv: list[str], env: dict[str, str]
) -> subprocess.CompletedProcess:
    stdout, stderr = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.setLevel(env.get("LOG_LEVEL", os.environ.get("LOG_LEVEL", "INFO")))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        with mock.patch.dict(os.environ, env), redirect_stdout(stdout), redirect_stderr(stderr):
            try:
                code = main(argv)
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 2
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    return subprocess.CompletedProcess(argv, code, stdout.getvalue(), stderr.getvalue())


def run_script(
    script: str, argv: list[str], env: dict[str, str], own_process: bool = False, timeout: float = 300
) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGV` with `env` added to the environment: in this process, unless the script is
    api.py (it would serve) or `own_process` is asked (a fresh Chroma client: one in this process may
    hold state from earlier opens of the same folder)."""
    if script == "api.py" or own_process:
        return subprocess.run(
            [sys.executable, str(ROOT / script), *argv],
            env={**os.environ, **env},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    module = importlib.import_module(script.removesuffix(".py"))
    return run_main(module.main, argv, env)
