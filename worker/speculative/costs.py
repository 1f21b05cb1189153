"""What a decode step costs by its number of output rows, and the draft length that pays best.

Speculation trades rows for steps: a sequence verifying k drafts adds k output rows to the step and, if
its drafts are accepted with probability p each, gains on average (1 - p^(k+1)) / (1 - p) tokens instead
of one. Whether that pays depends on the hardware: on a GPU a 33-row decode costs about what a 1-row
decode costs; on this project's 2-core CPU with Gemma 3 270M (a 262k-token vocabulary, so the output
matmul dominates) 2 output rows cost 2.1x one row, 8 rows 3.9x, 16 rows 5.1x, and sizes that are not a
multiple of 8 cost more than the next multiple (llama.cpp's CPU matmul tiles). No fixed rule fits both, so
the worker measures the curve once, on the first sequence about to draft (worker/speculative/calibrate.py),
and `StepCosts.best_k` picks, per sequence and step, the draft length with the most expected tokens per
second, counting the step's time outside llama_decode too (planning, sampling, frames), which the scheduler
keeps measuring.
No llama.cpp here: the scheduler's unit tests give it made-up curves.
"""

from __future__ import annotations

from collections.abc import Sequence

P_MAX = 0.99  # an acceptance estimate is never trusted beyond this (one wrong token ends a draft)
# A draft must promise this much more throughput than none: estimates and timings are noisy, and a
# marginal gain is not worth a risk (copying and editing gain 2x and more).
MARGIN = 1.1
_OVERHEAD_WEIGHT = 0.05  # EMA weight of each new measurement of the time outside llama_decode
_ROW_WEIGHT = 0.2  # EMA weight of a real step's decode time in its row count's entry
_SCALE_WEIGHT = 0.05  # EMA weight of a real step's time / measured time in the scale of unused entries


class StepCosts:
    """Seconds of a decode step by its output rows (`row(n)`) plus the per-step overhead.

    The measured curve is a starting point. A row count that real steps use follows their decode times (a
    running average); one they have not used yet follows the measurement times how far real steps have
    been from the measurement overall (`scale`). So a curve measured during a load spike does not keep
    sizes that real steps never try looking expensive forever."""

    def __init__(self, rows: Sequence[float], overhead: float = 0.0) -> None:
        if not rows or min(rows) <= 0:
            raise ValueError("step costs need at least one positive measurement")
        self.measured = [float(seconds) for seconds in rows]
        self.learned: list[float | None] = [None] * len(rows)
        self.scale = 1.0  # real decode time / measured, a running average over every row count
        self.overhead = overhead

    def row(self, n_rows: int) -> float:
        """Seconds of llama_decode with `n_rows` (1 .. the measured count) output rows."""
        learned = self.learned[n_rows - 1]
        return learned if learned is not None else self.measured[n_rows - 1] * self.scale

    @property
    def rows(self) -> list[float]:
        """The whole curve as it stands (index: rows - 1)."""
        return [self.row(n) for n in range(1, len(self.measured) + 1)]

    def cost(self, n_rows: int) -> float:
        """Seconds of a step with `n_rows` output rows, extrapolated linearly beyond the measured ones."""
        last = len(self.measured)
        if n_rows <= last:
            return self.row(max(n_rows, 1)) + self.overhead
        first, end = self.row(1), self.row(last)
        slope = (end - first) / (last - 1) if last > 1 else first
        return end + slope * (n_rows - last) + self.overhead

    def observe_decode(self, n_rows: int, seconds: float) -> None:
        """A real decode with `n_rows` output rows took `seconds`: moves that row count's entry and the scale
        of the ones not used yet."""
        if not 0 < n_rows <= len(self.measured) or seconds <= 0:
            return
        self.scale += _SCALE_WEIGHT * (seconds / self.measured[n_rows - 1] - self.scale)
        current = self.row(n_rows)
        self.learned[n_rows - 1] = current + _ROW_WEIGHT * (seconds - current)

    def observe_overhead(self, seconds: float) -> None:
        """One step's time outside llama_decode (a running average: machines are noisy)."""
        if seconds >= 0:
            self.overhead += _OVERHEAD_WEIGHT * (seconds - self.overhead)

    def best_k(self, p: float, longest: int, rows: int, tokens: float) -> tuple[int, float]:
        """The draft length (0 .. `longest`) for one sequence that maximizes the step's expected tokens per
        second, given the `rows` output rows and `tokens` expected tokens already in the step (this
        sequence's own pending row included); returns it with its expected extra tokens."""
        p = min(max(p, 0.0), P_MAX)
        best_k, best_gain = 0, 0.0
        best_rate = MARGIN * tokens / self.cost(rows)
        gain, term = 0.0, 1.0
        for k in range(1, longest + 1):
            term *= p
            gain += term  # expected accepted drafts: p + p^2 + ... + p^k
            rate = (tokens + gain) / self.cost(rows + k)
            if rate > best_rate:
                best_k, best_gain, best_rate = k, gain, rate
        return best_k, best_gain
