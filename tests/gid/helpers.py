"""Helpers of the ``gid`` tests (also imported by the worker tests that run ``gid`` against a stack)."""

from __future__ import annotations

import os
import subprocess
import sys


def run_gid(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m gid ARGS`` with no ``GID_*`` variable of this process, plus ``env``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("GID_")}
    return subprocess.run([sys.executable, "-m", "gid", *args], env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)
