"""One `celery worker -Q gpu -c 1` per GPU, each pinned to its device by CUDA_VISIBLE_DEVICES, in one
container: compose scales GPU workers by a variable instead of by editing the file.

    python -m workers.per_gpu                    # one worker per GPU that nvidia-smi lists (or 1)
    SCAN_GPU_WORKERS=4 python -m workers.per_gpu # exactly 4, on GPUs 0..3
    python -m workers.per_gpu --ping             # healthcheck: every worker on this host answers

SIGTERM/SIGINT are passed to every worker (a warm shutdown: each finishes or requeues its stage). If
one worker dies the others are stopped and the launcher exits non-zero, so the container's restart
policy brings the whole set back rather than leaving a GPU idle.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

APP = "workers.celery_app"


def gpu_count() -> int:
    """SCAN_GPU_WORKERS when set, else the GPUs nvidia-smi lists, else 1 (a CPU machine)."""
    if os.environ.get("SCAN_GPU_WORKERS"):
        n = int(os.environ["SCAN_GPU_WORKERS"])
        if n < 1:
            raise SystemExit("SCAN_GPU_WORKERS must be >= 1")
        return n
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--list-gpus"], capture_output=True, text=True)
        listed = [line for line in out.stdout.splitlines() if line.startswith("GPU ")]
        if out.returncode == 0 and listed:
            return len(listed)
    return 1


def names(n: int) -> list[str]:
    host = socket.gethostname()
    return [f"gpu-{i}@{host}" for i in range(n)]


def ping() -> int:
    """Exit 0 when every worker of this host answers a Celery ping (the compose healthcheck)."""
    want = names(gpu_count())
    cmd = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        APP,
        "inspect",
        "ping",
        "--timeout",
        "10",
        "--destination",
        ",".join(want),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True)
    missing = [name for name in want if f"{name}: OK" not in out.stdout]
    if missing:
        print("not answering: " + ", ".join(missing), file=sys.stderr)
        return 1
    return 0


def main() -> int:
    n = gpu_count()
    procs = []
    for i, name in enumerate(names(n)):
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(i)}
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    APP,
                    "worker",
                    "-Q",
                    "gpu",
                    "-c",
                    "1",
                    "-P",
                    "prefork",
                    "-n",
                    name,
                    "--loglevel",
                    os.environ.get("SCAN_LOG_LEVEL", "INFO"),
                ],
                env=env,
            )
        )
    stopping = {"signal": None}

    def forward(signum: int, _frame: object) -> None:
        stopping["signal"] = signum
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while all(p.poll() is None for p in procs):
        time.sleep(0.5)
    if stopping["signal"] is None:  # one died on its own: take the set down, let the restart policy act
        forward(signal.SIGTERM, None)
    for p in procs:
        p.wait()
    if stopping["signal"] is not None:
        return 0
    return max((p.returncode or 0) for p in procs) or 1


if __name__ == "__main__":
    raise SystemExit(ping() if sys.argv[1:] == ["--ping"] else main())
