"""One `celery worker -Q gpu -c 1` per GPU (or per group of SCAN_GPUS_PER_WORKER GPUs), each pinned
by CUDA_VISIBLE_DEVICES, in one container: compose scales GPU workers by a variable instead of by editing the file.

    python -m workers.per_gpu                    # one worker per GPU that nvidia-smi lists (or 1)
    SCAN_GPU_WORKERS=4 python -m workers.per_gpu # exactly 4, on GPUs 0..3
    SCAN_GPU_WORKERS=4 SCAN_GPUS_PER_WORKER=2 python -m workers.per_gpu  # 2 workers, GPUs 0,1 and 2,3
    python -m workers.per_gpu --ping             # healthcheck: every worker on this host answers

A worker that sees k GPUs trains a run asking for `devices: k` (or more) data-parallel on all k
(ml/distributed.py); with one GPU each, such a run trains on one, with the same result, slower.

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


def gpu_groups(gpus: int, per_worker: int) -> list[str]:
    """CUDA_VISIBLE_DEVICES of each worker: consecutive groups of ``per_worker`` GPUs."""
    if per_worker < 1 or gpus % per_worker:
        raise SystemExit(f"SCAN_GPUS_PER_WORKER={per_worker} must be >= 1 and divide the {gpus} GPUs")
    return [",".join(str(g) for g in range(w, w + per_worker)) for w in range(0, gpus, per_worker)]


def worker_groups() -> list[str]:
    return gpu_groups(gpu_count(), int(os.environ.get("SCAN_GPUS_PER_WORKER") or 1))


def names(n: int) -> list[str]:
    host = socket.gethostname()
    return [f"gpu-{i}@{host}" for i in range(n)]


def ping() -> int:
    """Exit 0 when every worker of this host answers a Celery ping (the compose healthcheck)."""
    want = names(len(worker_groups()))
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
    groups = worker_groups()
    procs = []
    for visible, name in zip(groups, names(len(groups))):
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": visible}
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
