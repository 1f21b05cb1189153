"""Bounded stderr for llama.cpp calls that print to it directly.

llama.cpp's grammar parser reports an error by printing the whole grammar to stderr with fprintf, past the
log callback: one bad megabyte-sized grammar from a client wrote megabytes into the service log. Around such
a call, file descriptor 2 is pointed at a temporary file; afterwards at most `limit` bytes of what was
written go on to the real stderr, with a note of how much was cut. The swap is process-wide, so calls are
serialised by a lock and kept short (a parse, not a generation).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
from collections.abc import Iterator

_lock = threading.Lock()


@contextlib.contextmanager
def bounded_stderr(limit: int = 2000) -> Iterator[None]:
    with _lock, tempfile.TemporaryFile() as capture:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            size = os.fstat(capture.fileno()).st_size
            if size:
                capture.seek(0)
                text = capture.read(limit)
                if size > limit:
                    text += f"... ({size - limit} more bytes not shown)\n".encode()
                os.write(2, text)
