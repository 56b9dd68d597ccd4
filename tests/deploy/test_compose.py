"""``docker-compose.yml`` and ``deploy/`` agree with the settings the code reads.

No Docker engine here: the compose file is parsed and checked against ``Settings`` (API and
worker): every ``GID_*`` variable is a real setting and its value validates,
the artifact volume sits at ``GID_DATA_DIR`` in both api and worker, the dataset roots are mounted,
Redis persists, PostgreSQL keeps its data, the worker reserves NVIDIA GPUs, and the commands are
valid ``gid`` command lines.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from gid.cli import build_parser
from service.core.config import Settings

ROOT = Path(__file__).resolve().parents[2]
APP_SERVICES = ("api", "worker", "gpu-worker-a", "gpu-worker-b")
TEST_VALUES = {"GID_SECRET_KEY": "s" * 40, "POSTGRES_PASSWORD": "pw", "DATASETS_DIR": "/srv/datasets", "API_PORT": "8000"}
_VAR = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)(?::?[-?][^}]*)?\}")


def interpolate(text: str) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}`` with the test values."""
    def sub(m: re.Match) -> str:
        if m.group(1) not in TEST_VALUES:
            raise AssertionError(f"compose uses ${{{m.group(1)}}}, which deploy/env.example does not document")
        return TEST_VALUES[m.group(1)]

    return _VAR.sub(sub, text)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(interpolate((ROOT / "docker-compose.yml").read_text()))


def env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path}: not KEY=VALUE: {line!r}"
            env[key.strip()] = value.strip()
    return env


def service_env(compose: dict, name: str) -> dict[str, str]:
    svc = compose["services"][name]
    env: dict[str, str] = {}
    for f in svc.get("env_file", []):
        env.update(env_file(ROOT / f))
    environment = svc.get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    env.update({k: str(v) for k, v in environment.items()})
    return env


def mounts(compose: dict, name: str) -> dict[str, str]:
    """Container path -> source (named volume or host path)."""
    out = {}
    for spec in compose["services"][name].get("volumes", []):
        source, target = spec.split(":")[:2]
        out[target] = source
    return out


def test_services_and_volumes(compose):
    default = {name for name, svc in compose["services"].items() if not svc.get("profiles")}
    assert default == {"api", "worker", "redis", "postgres"}
    # the GPU node example: workers that own disjoint device ids, only with --profile gpu-node
    gpu = {name: compose["services"][name] for name in set(compose["services"]) - default}
    assert set(gpu) == {"gpu-worker-a", "gpu-worker-b"}
    assert all(svc["profiles"] == ["gpu-node"] for svc in gpu.values())
    host_ids = [{i for d in svc["deploy"]["resources"]["reservations"]["devices"] for i in d["device_ids"]}
                for svc in gpu.values()]
    assert host_ids[0] and host_ids[1] and not host_ids[0] & host_ids[1]  # each host GPU has one owner
    for name, given in zip(gpu, host_ids):  # the worker uses the GPUs its container is given (0..n-1)
        own = service_env(compose, name)["GID_WORKER_DEVICES"].split(",")
        assert sorted(own) == [str(i) for i in range(len(given))]
    assert all(mounts(compose, name)["/var/lib/gid"] == "artifacts" for name in gpu)
    declared = set(compose["volumes"])
    for name in compose["services"]:
        for target, source in mounts(compose, name).items():
            if not source.startswith(("/", ".")):
                assert source in declared, f"{name}: volume {source} is not declared"


def test_every_gid_variable_is_a_setting_and_validates(compose, monkeypatch):
    fields = {f"GID_{name.upper()}" for name in Settings.model_fields}
    for name in APP_SERVICES:
        env = service_env(compose, name)
        unknown = sorted(k for k in env if k.startswith("GID_") and k not in fields)
        assert not unknown, f"{name}: not settings of service.core.config: {unknown}"
        for key in [k for k in os.environ if k.startswith("GID_")]:
            monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        settings = Settings()  # production values must validate
        assert settings.env == "production"
        assert settings.database_url.startswith("postgresql")
        assert urlparse(settings.database_url).hostname == "postgres"
        assert urlparse(settings.redis_url).hostname == "redis"
        if name == "worker":
            assert settings.broker_visibility_timeout_seconds > settings.job_time_limit_seconds
    # The worker reads what the API reads, plus its own settings.
    api, worker = service_env(compose, "api"), service_env(compose, "worker")
    assert {k: v for k, v in worker.items() if k in api} == api
    assert set(worker) - set(api) <= fields


def test_shared_artifact_volume_and_dataset_roots(compose):
    volumes = {}
    for name in APP_SERVICES:
        env = service_env(compose, name)
        data_dir = env["GID_DATA_DIR"]
        m = mounts(compose, name)
        assert data_dir in m, f"{name}: nothing mounted at GID_DATA_DIR={data_dir}"
        volumes[name] = m[data_dir]
        for root in json.loads(env["GID_DATA_ROOTS"]):
            assert root in m, f"{name}: data root {root} is not mounted"
    assert volumes["api"] == volumes["worker"] and volumes["api"] in compose["volumes"]


def test_redis_persists_and_postgres_keeps_its_data(compose):
    redis = compose["services"]["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command
    assert mounts(compose, "redis").get("/data") in compose["volumes"]
    assert mounts(compose, "postgres").get("/var/lib/postgresql/data") in compose["volumes"]
    pg_env = compose["services"]["postgres"]["environment"]
    db_url = urlparse(service_env(compose, "api")["GID_DATABASE_URL"])
    assert (db_url.username, db_url.password, db_url.path.lstrip("/")) == (
        pg_env["POSTGRES_USER"], pg_env["POSTGRES_PASSWORD"], pg_env["POSTGRES_DB"])
    for name in ("redis", "postgres"):
        assert "healthcheck" in compose["services"][name]


def test_worker_reserves_nvidia_gpus_and_waits_for_the_schema(compose):
    worker = compose["services"]["worker"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert worker["depends_on"]["api"]["condition"] == "service_healthy"  # the API migrates on start-up
    assert compose["services"]["api"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_commands_and_images(compose):
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["gid"] == "gid.cli:main"
    assert "gid*" in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    parser = build_parser()
    for name, subcommand in (("api", "serve"), ("worker", "worker")):
        svc = compose["services"][name]
        command = svc["command"]
        assert command[:2] == ["gid", subcommand]
        parser.parse_args(command[1:])  # a valid command line (argparse exits otherwise)
        dockerfile = ROOT / svc["build"]["dockerfile"]
        text = dockerfile.read_text()
        dockerignore = (ROOT / f"{svc['build']['dockerfile']}.dockerignore").read_text()
        for package in ("gid_core", "service", "worker", "gid"):
            assert f"COPY {package} {package}" in text, f"{dockerfile.name} does not copy {package}"
            assert f"!{package}/**" in dockerignore, f"{dockerfile.name}.dockerignore leaves out {package}"
        assert "requirements.txt" in text and "pip install --no-deps ." in text
    api_port = compose["services"]["api"]["ports"][0].split(":")[-1]
    assert compose["services"]["api"]["command"][-1] == api_port
    worker_file = (ROOT / "deploy" / "Dockerfile.worker").read_text()
    assert re.search(r"ARG CUDA_IMAGE=nvidia/cuda:\S+", worker_file) and "FROM ${CUDA_IMAGE}" in worker_file
    assert "whl/cu" in worker_file and "whl/cpu" in (ROOT / "deploy" / "Dockerfile.api").read_text()


def test_env_example_documents_every_compose_variable():
    documented = set(env_file(ROOT / "deploy" / "env.example"))
    used = set(_VAR.findall((ROOT / "docker-compose.yml").read_text()))
    assert used == documented == set(TEST_VALUES)
