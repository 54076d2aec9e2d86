"""docker-compose.yml is valid (`docker compose config` needs no engine)."""
from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from tests.service.conftest import ROOT


def _compose() -> list[str]:
    """The Compose command line here, or a skip naming how to get one (a bare docker CLI is not enough)."""
    if shutil.which("docker"):
        plugin = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
        if plugin.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.skip("Docker Compose is not installed (`make compose` installs Debian's docker-compose)")


def test_compose_config_is_valid():
    out = subprocess.run([*_compose(), "config"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    services = yaml.safe_load(out.stdout)["services"]
    assert {"postgres", "redis", "api", "worker-gpu", "worker-cpu"} <= set(services)
    gpu = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert "alembic upgrade head" in " ".join(services["api"]["command"])
    assert services["worker-gpu"]["command"][services["worker-gpu"]["command"].index("-Q") + 1] == "gpu"
    assert services["worker-cpu"]["command"][services["worker-cpu"]["command"].index("-Q") + 1] == "cpu"
    for name in ("api", "worker-gpu", "worker-cpu"):
        assert services[name]["environment"]["DATABASE_URL"].startswith("postgresql://")
        assert any("/data" in str(v) for v in services[name]["volumes"])
