"""How many threads TVM's CPU kernels use: every CPU this process may run on."""

from __future__ import annotations

import os


def use_every_cpu() -> None:
    """Size TVM's CPU thread pool to every CPU this process may run on, unless told otherwise.

    TVM takes its thread count from TVM_NUM_THREADS or OMP_NUM_THREADS (Ray sets the
    latter to an actor's CPU share) and otherwise from half the logical CPUs on x86, on
    the assumption of two hyper-threads per core: one thread on a 2-vCPU machine, which
    halves every parallel kernel, and with one thread TVM also pins the main thread to
    one CPU, so that torch threads started later share it. The pool is sized once, when
    the first kernel runs, and only from the environment, so call this before that
    (compiling and building a runner do). An explicit setting wins.
    """
    if os.environ.get("TVM_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS"):
        return
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    os.environ["TVM_NUM_THREADS"] = str(len(cpus) if cpus else os.cpu_count() or 1)
