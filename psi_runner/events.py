"""Events from the job process to its supervising parent: one JSON object per line on a pipe.

The job process says which stage it is in, what it learned (input rows, the handshake's nonces)
and what it is waiting for; the parent shows progress from them and, should the job process
die, still knows enough to tell the peer (``notice``).
"""

from __future__ import annotations

import json
import os
import time


class Events:
    """The job process's end of the pipe (``fd`` None: events go nowhere)."""

    def __init__(self, fd: int | None = None) -> None:
        self.fd = fd

    def emit(self, event: str, **fields: object) -> None:
        if self.fd is None:
            return
        line = json.dumps({"event": event, "t": round(time.time(), 3), **fields}) + "\n"
        try:
            os.write(self.fd, line.encode("utf-8"))  # one write: lines never interleave
        except OSError:
            pass  # the parent is gone; the job goes on and its log has everything


def parse_events(buffer: bytes) -> tuple[list[dict], bytes]:
    """Complete JSON lines in ``buffer`` as dicts, and the unfinished rest."""
    *lines, rest = buffer.split(b"\n")
    events = []
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            events.append(event)
    return events, rest
