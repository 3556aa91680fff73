"""Run a function on W gloo CPU processes (torch.multiprocessing spawn, file:// rendezvous) for the parallel tests."""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank, world, init_file, fn, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
        # no rank tears gloo down while a peer may still be talking to it (seen: an abort at exit, "terminate
        # called without an active exception"); only on success, since a failed peer would never arrive
        dist.barrier()
    finally:
        dist.destroy_process_group()
    exit_without_shutdown()  # success only: a failure raised above still reaches spawn, which reports it


def exit_without_shutdown() -> None:
    """End a gloo rank that succeeded and left its process group, skipping the interpreter's shutdown: its static
    destructors can still meet a gloo thread and abort (SIGABRT, "terminate called without an active exception",
    once in a full CPU test run after the barrier above; 0 of 25 runs of the test alone)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(fn, world: int, tmp_path, *args, timeout: float = 300.0) -> None:
    """Run fn(rank, world, *args) on `world` processes; an exception in any rank fails the caller (with its traceback)
    and the other ranks are terminated; so is every rank after `timeout` seconds (a hung collective)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    init_file = str(tmp_path / "rendezvous")
    ctx = mp.spawn(_entry, args=(world, init_file, fn, args), nprocs=world, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            raise TimeoutError(f"{world} ranks did not finish in {timeout:.0f} s")
