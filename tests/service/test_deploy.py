"""docker-compose.yml is valid (`docker compose config` needs no engine)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

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
    out = subprocess.run(
        [*_compose(), "config"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SCAN_GPU_WORKERS": "3"},
    )
    assert out.returncode == 0, out.stderr
    services = yaml.safe_load(out.stdout)["services"]
    assert {"postgres", "redis", "minio", "api", "worker-gpu", "worker-cpu"} <= set(services)
    for name, service in services.items():
        assert service.get("restart") == ("on-failure" if name == "minio-bucket" else "unless-stopped"), name
    # GPU workers: one per GPU by a variable, each pinned (workers/per_gpu.py), with a healthcheck.
    gpu_worker = services["worker-gpu"]
    gpu = gpu_worker["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"] and int(gpu["count"]) == 3
    assert gpu_worker["environment"]["SCAN_GPU_WORKERS"] == "3"
    assert gpu_worker["environment"]["SCAN_GPUS_PER_WORKER"] == "1"
    assert gpu_worker["command"] == ["python", "-m", "workers.per_gpu"]
    assert "--ping" in gpu_worker["healthcheck"]["test"]
    cpu_worker = services["worker-cpu"]
    assert cpu_worker["command"][cpu_worker["command"].index("-Q") + 1] == "cpu"
    assert "inspect ping" in " ".join(cpu_worker["healthcheck"]["test"])
    # One image per variant, each built here (the CPU worker does not lean on the API's tag).
    for name in ("api", "worker-cpu"):
        assert services[name]["build"]["args"]["VARIANT"] == "cpu", name
    assert services["worker-gpu"]["build"]["args"]["VARIANT"] == "gpu"
    assert services["api"]["image"] != services["worker-gpu"]["image"]
    assert "scan db upgrade" in " ".join(services["api"]["command"])
    for name in ("api", "worker-gpu", "worker-cpu"):
        assert services[name]["environment"]["DATABASE_URL"].startswith("postgresql://")
        assert services[name]["environment"]["SCAN_ARTIFACT_STORE"].startswith("s3://scan-artifacts/")
        assert services[name]["environment"]["SCAN_S3_ENDPOINT"] == "http://minio:9000"
        assert any("/data" in str(v) for v in services[name]["volumes"])


def test_each_image_variant_gets_exactly_one_faiss():
    """faiss-cpu and faiss-gpu-cu12 install the same module: the GPU image must not get both."""

    def requirements(variant: str) -> list[str]:
        out = subprocess.run(
            [sys.executable, str(ROOT / "docker" / "requirements.py"), variant],
            capture_output=True,
            text=True,
            check=True,
        )
        return [line.split(">")[0].split("=")[0] for line in out.stdout.split()]

    cpu, gpu = requirements("cpu"), requirements("gpu")
    assert [r for r in cpu if r.startswith("faiss")] == ["faiss-cpu"]
    assert [r for r in gpu if r.startswith("faiss")] == ["faiss-gpu-cu12"]
    assert {r for r in cpu if not r.startswith("faiss")} == {r for r in gpu if not r.startswith("faiss")}
    assert "torch" in cpu


def test_gpus_per_worker_groups_consecutive_gpus():
    from workers.per_gpu import gpu_groups

    assert gpu_groups(4, 1) == ["0", "1", "2", "3"]
    assert gpu_groups(4, 2) == ["0,1", "2,3"]  # two workers that each train `devices: 2` runs on both
    assert gpu_groups(8, 8) == ["0,1,2,3,4,5,6,7"]
    with pytest.raises(SystemExit, match="divide the 4 GPUs"):
        gpu_groups(4, 3)


def test_per_gpu_launcher_runs_one_pinned_worker_per_gpu_and_stops_cleanly(stack):
    """`python -m workers.per_gpu` with SCAN_GPU_WORKERS=2: two gpu-queue workers (CUDA_VISIBLE_DEVICES
    0 and 1), healthy by its own --ping (on Redis; the filesystem broker has no broadcast), and one
    SIGTERM ends them all with exit status 0."""
    import signal
    import time

    env = {**stack.env, "SCAN_GPU_WORKERS": "2"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "workers.per_gpu"],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        log = ""
        while log.count(" ready.") < 2:
            line = proc.stdout.readline()
            assert line, f"launcher exited early: {log[-3000:]}"
            log += line
        assert "gpu-0@" in log and "gpu-1@" in log
        if stack.mode == "services":
            # Like compose's healthcheck (retries: 3), a few tries: a loaded machine may answer late.
            for _ in range(5):
                healthy = subprocess.run(
                    [sys.executable, "-m", "workers.per_gpu", "--ping"],
                    cwd=ROOT,
                    env=env,
                    capture_output=True,
                    text=True,
                )
                if healthy.returncode == 0:
                    break
            assert healthy.returncode == 0, healthy.stderr
        children = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True).stdout.split()
        devices = set()
        for pid in children:
            try:
                environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            except OSError:
                continue
            devices |= {e.decode() for e in environ if e.startswith(b"CUDA_VISIBLE_DEVICES=")}
        assert devices == {"CUDA_VISIBLE_DEVICES=0", "CUDA_VISIBLE_DEVICES=1"}
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=120)[0]
        assert proc.returncode == 0, rest[-3000:]
        assert "Traceback" not in rest
        time.sleep(0.5)
        left = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert left == [], "workers outlived the launcher"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
