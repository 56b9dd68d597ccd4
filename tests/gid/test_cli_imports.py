"""The client commands start light: running ``gid --version``, ``gid status`` or ``gid jobs list``
imports neither torch nor the server's libraries (FastAPI, SQLAlchemy, Celery, uvicorn)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gid_core.processes import free_port

HEAVY = ("torch", "torchvision", "fastapi", "starlette", "sqlalchemy", "alembic", "celery", "uvicorn", "worker")

# Runs `python -m gid ARGS` in this interpreter, then reports the exit code and what was imported.
PROBE = """
import json, runpy, sys
sys.argv = ["gid", *json.loads(sys.argv[1])]
try:
    runpy.run_module("gid", run_name="__main__", alter_sys=True)
    code = 0
except SystemExit as e:
    code = e.code
print("PROBE " + json.dumps({"code": code, "modules": sorted(sys.modules)}), file=sys.stderr)
"""


def imported_by(*args: str) -> tuple[int, list[str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GID_")}
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(args)], env=env, capture_output=True, text=True,
                         timeout=60)
    report = json.loads(out.stderr.rsplit("PROBE ", 1)[-1])
    return report["code"], report["modules"]


@pytest.mark.parametrize("args", [("--version",), ("status", "abc"), ("jobs", "list")])
def test_client_commands_import_no_server_library(args):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens: the command fails after its request
    code, modules = imported_by(*args, "--url", url, "--token", "t")
    assert code == (0 if args == ("--version",) else 1)
    heavy = [m for m in modules if m.split(".")[0] in HEAVY]
    assert heavy == [], heavy
    assert {m for m in modules if m.split(".")[0] == "service"} <= {"service", "service.status"}
