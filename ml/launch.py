"""Starting the ranks of a data-parallel stage (ml/distributed.py says what they compute) and
joining them: the parent side runs in the process that runs the stage (a worker's task, `scan
train`); it spawns one process per rank, relays rank 0's progress to the stage's callback, passes a
cancel request on, and turns the failure of any rank into the stage's failure (the rank's own
exception when it can travel between processes, else a RuntimeError naming the rank).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import queue
import shutil
import signal
import tempfile
import threading
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ml.data import ImageSet
from ml.device import select_runtime
from ml.distributed import Group
from ml.rundir import RunDir
from ml.stages.common import StageContext


def launch(
    fn: Callable,
    stage: str,
    run_dir: Path,
    data,
    cfg,
    world: int,
    progress: Callable[[Any], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    poll_s: float = 0.2,
) -> dict[str, Any]:
    """Train ``stage`` (its function ``fn``) on ``world`` ranks and return rank 0's summary. Runs in
    the calling process: progress callbacks and cancel polls happen here, the ranks only exchange
    messages with it."""
    import numpy as np
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException

    spawn = mp.get_context("spawn")
    events, acks = spawn.Queue(), spawn.Queue()
    cancel = spawn.Event()
    rendezvous = Path(tempfile.mkdtemp(prefix="scan-ddp-"))
    # The images go to shared memory once; each rank maps them instead of receiving a copy.
    images = torch.from_numpy(np.ascontiguousarray(data.images)).share_memory_()
    parts = (images, data.labels, data.class_names, data.source)
    args = (world, fn, stage, str(run_dir), parts, cfg, str(rendezvous / "store"), events, acks, cancel)
    with _children_allowed():
        procs = mp.start_processes(_rank_main, args=args, nprocs=world, join=False, start_method="spawn")
    state: dict[str, Any] = {"summary": None, "error": None}

    def poll_cancel() -> None:
        if should_cancel is not None and not cancel.is_set() and should_cancel():
            cancel.set()

    def drain() -> None:
        while True:
            try:
                kind, *body = events.get_nowait()
            except queue.Empty:
                return
            if kind == "progress":
                if progress is not None:
                    progress(body[0])
                if body[0].epoch_end:
                    # Rank 0 waits here, as one process waits for its callback: the epoch is
                    # reported (and its checkpoint pushed) and a cancel seen before the ranks'
                    # end-of-epoch cancel check, so a cancel stops them after this epoch.
                    poll_cancel()
                    acks.put(True)
            elif kind == "done":
                state["summary"] = body[0]
            elif kind == "error" and state["error"] is None:
                state["error"] = body

    try:
        while True:
            drain()
            poll_cancel()
            try:
                if procs.join(timeout=poll_s):
                    break
            except ProcessException as exc:
                drain()
                raise _rank_error(stage, state["error"], exc, _killed(procs.processes)) from exc
        drain()
    finally:
        for p in procs.processes:
            if p.is_alive():
                p.terminate()
            p.join()
        shutil.rmtree(rendezvous, ignore_errors=True)
    if state["summary"] is None:
        raise RuntimeError(f"{stage}: rank 0 ended without a result")
    return state["summary"]


@contextlib.contextmanager
def _children_allowed():
    """Start the ranks as a plain process would. A Celery prefork child is daemonic, which
    multiprocessing refuses children to (a daemon may be killed without cleaning up after itself),
    and billiard's process object holds an authkey that spawn cannot pickle. For the moment of the
    start, the process is presented to multiprocessing as a plain one: not a daemon, the same
    authkey as plain bytes. The ranks clean up for it: each exits as soon as its launcher is
    gone (``_exit_with_launcher``), and ``launch`` joins them."""
    current = multiprocessing.process._current_process
    saved = dict(current._config)
    current._config["daemon"] = False
    current._config["authkey"] = multiprocessing.process.AuthenticationString(bytes(current.authkey))
    try:
        yield
    finally:
        current._config.clear()
        current._config.update(saved)


def _exit_with_launcher() -> None:
    """A thread that ends this rank when the process that launched it dies (SIGKILL, OOM killer):
    an orphaned rank would otherwise hang in a collective or train on with no one to report to."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        parent.join()  # returns when the launcher's sentinel closes, i.e. it is gone
        os._exit(1)

    threading.Thread(target=watch, name="scan-ddp-watchdog", daemon=True).start()


def _killed(processes) -> list[tuple[int, str]]:
    """Ranks a signal ended, with its name, apart from SIGTERM: torch's join sends that to the
    ranks still running once one has failed, so it is a consequence, never the cause."""
    out = []
    for rank, p in enumerate(processes):
        code = p.exitcode
        if code is not None and code < 0 and -code != signal.SIGTERM:
            out.append((rank, signal.Signals(-code).name))
    return out


def _rank_error(stage: str, error: list | None, exc: BaseException, killed=()) -> BaseException:
    """The first failed rank's own exception (Canceled stays Canceled, an OOM stays an OOM), or a
    RuntimeError naming the rank that died without one (killed by a signal, or unpicklable). A
    rank killed by a signal (the OOM killer's SIGKILL) comes first: the others then fail in a
    collective with a dead peer, and whichever reports first is a race, not the cause."""
    if killed:
        rank, name = killed[0]
        after = f"; rank {error[0]} then failed:\n{error[2]}" if error else ""
        return RuntimeError(f"{stage}: rank {rank} was killed by {name}{after}")
    if error:
        rank, blob, text = error
        if blob is not None:
            original = pickle.loads(blob)
            if hasattr(original, "add_note"):
                original.add_note(f"raised by rank {rank} of {stage}:\n{text}")
            return original
        return RuntimeError(f"{stage}: rank {rank} failed:\n{text}")
    return RuntimeError(f"{stage}: {exc}")


def _rank_main(
    rank: int, world: int, fn: Callable, stage: str, run_dir: str, parts, cfg, store: str, events, acks, cancel
) -> None:
    """One rank: join the group, run the stage function with a rank-aware context."""
    _exit_with_launcher()
    try:
        rt = select_runtime(cfg.device, cfg.precision, cfg.channels_last)
        if rt.device.type == "cuda":
            torch.cuda.set_device(rank)
            rt = replace(rt, device=torch.device("cuda", rank))
            backend = "nccl"
        else:
            # The ranks share the machine's cores instead of each claiming all of them.
            torch.set_num_threads(max(1, torch.get_num_threads() // world))
            backend = "gloo"
        dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world)
        group = Group(rank, world)
        images, labels, class_names, source = parts
        data = ImageSet(images.numpy(), labels, class_names, source)
        ctx = StageContext(
            stage,
            RunDir(run_dir),
            cfg,
            rt,
            progress=_reporter(events, acks) if rank == 0 else None,
            should_cancel=lambda: group.any(cancel.is_set()),
            group=group,
        )
        summary = fn(ctx, data)
        dist.barrier()
        dist.destroy_process_group()
        if rank == 0:
            events.put(("done", summary))
    except BaseException as exc:
        try:
            blob = pickle.dumps(exc)
            pickle.loads(blob)
        except Exception:  # noqa: BLE001 - an exception that cannot travel: its text does
            blob = None
        events.put(("error", rank, blob, traceback.format_exc()))
        events.close()
        events.join_thread()
        raise


def _reporter(events, acks) -> Callable[[Any], None]:
    """Rank 0's progress callback: a message to the launching process; at an epoch's end it waits
    for the answer (see ``launch``), or for the launcher to be gone."""

    def report(p) -> None:
        events.put(("progress", p))
        if not p.epoch_end:
            return
        parent = multiprocessing.parent_process()
        while True:
            try:
                acks.get(timeout=1.0)
                return
            except queue.Empty:
                if parent is not None and not parent.is_alive():
                    raise RuntimeError("the launching process is gone") from None

    return report
