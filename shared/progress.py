"""Progress of slow model preparation as log lines: hub downloads, assembling and converting packaged models.

A server's output is a log, not a terminal: tqdm's redrawn bar would be one unreadable line per refresh in
journald or `kubectl logs`. `LoggedProgress` is a tqdm class (what `huggingface_hub.hf_hub_download` takes as
`tqdm_class`) that draws nothing and logs the percentage, size and rate at most every few seconds, and once
at the end. `timed` logs the start and the end of a step that has no byte count (assembling, converting).
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from collections.abc import Iterator
from typing import Any

from tqdm import tqdm

log = logging.getLogger("llamafleet.models")

LOG_EVERY_SECONDS = 5.0


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


class LoggedProgress(tqdm):
    """A tqdm bar that logs instead of drawing (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["file"] = io.StringIO()  # nothing drawn anywhere
        kwargs["disable"] = False  # the hub disables bars when not on a terminal; we log instead
        kwargs["mininterval"] = 0.0
        self._last_log = float("-inf")
        self._finished = False
        super().__init__(*args, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if self._finished:  # the 100% line is logged once (close() displays again)
            return True
        now = time.monotonic()
        done = bool(self.total) and self.n >= self.total
        if (done and not self._finished) or now - self._last_log >= LOG_EVERY_SECONDS:
            self._last_log = now
            self._finished = done
            self._log()
        return True

    def _log(self) -> None:
        what = self.desc.rstrip(": ") or "download"
        elapsed = self.format_dict.get("elapsed") or 0.0
        rate = f", {_size(self.n / elapsed)}/s" if elapsed > 0 else ""
        if self.total:
            percent = 100.0 * self.n / self.total
            log.info("%s: %.0f%% of %s%s", what, percent, _size(self.total), rate)
        else:
            log.info("%s: %s%s", what, _size(self.n), rate)


@contextlib.contextmanager
def timed(what: str) -> Iterator[None]:
    """Logs `what` when it starts and how long it took when it ends."""
    log.info("%s ...", what)
    started = time.monotonic()
    yield
    log.info("%s: done in %.1fs", what, time.monotonic() - started)
