"""llama.cpp's CPU threads (OpenMP) should stay awake between engine steps, and sleep when idle.

libgomp lets a thread that finished a parallel region spin only briefly before sleeping on a futex. A worker
runs a little Python between two llama_decode calls (sampling, frames), long enough for the threads to fall
asleep, and waking them costs time at every step (decode steps measured ~20% slower). A spin count of about
20 million keeps them spinning across that gap (tens of milliseconds) and still lets an idle worker sleep,
unlike OMP_WAIT_POLICY=active, which spins forever. Must run before llama_cpp is imported: libgomp reads its
environment when it is loaded. A value set by the user wins, and OMP_WAIT_POLICY=passive turns it off.
"""

from __future__ import annotations

import os

GOMP_SPINCOUNT = "20000000"


def tune_openmp() -> None:
    # OMP_WAIT_POLICY=passive asks for threads that never spin (e.g. several workers sharing few cores).
    if os.environ.get("OMP_WAIT_POLICY", "").lower() != "passive":
        os.environ.setdefault("GOMP_SPINCOUNT", GOMP_SPINCOUNT)
