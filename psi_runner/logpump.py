"""Copy the job process's output into its log file, without letting a log storm fill the disk.

SPU's blackbox link logs one error line per failed poll of an unreachable broker, in a tight
loop: about 30 MB per second. The runner's watchdog ends such a job within seconds, but a log
file must never be the thing that fills a disk. The runner's parent process therefore reads the
child's stdout/stderr through a pipe and writes it to the log file, with two limits:

* a line that repeats (ignoring the digits in it: timestamps, counters, thread ids) more than
  ``REPEATS_KEPT`` times in a row is counted, not written; one summary line follows it;
* the file stops growing at ``MAX_BYTES`` (a notice says so).

Reading in the parent also means nothing is lost when the child dies abruptly: the pipe is
drained after the child has gone, so a crash's last words reach the file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable

REPEATS_KEPT = 20
MAX_BYTES = 512 * 1024 * 1024
_DIGITS = re.compile(rb"\d+")


class LogPump:
    """Writes lines read from a pipe into ``log_fd`` with the limits above."""

    def __init__(
        self,
        log_fd: int,
        max_bytes: int = MAX_BYTES,
        repeats_kept: int = REPEATS_KEPT,
        on_line: Callable[[bytes], None] = lambda line: None,
    ) -> None:
        self.log_fd = log_fd
        self.on_line = on_line  # sees every line, written or not (progress reads SPU's)
        self.max_bytes = max_bytes
        self.repeats_kept = repeats_kept
        self.written = os.fstat(log_fd).st_size
        self.full = False
        self._partial = b""
        self._last_key: bytes | None = None
        self._run = 0  # lines in a row with the current key
        self._dropped = 0  # of those, not written

    def feed(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > 1 << 20:  # a "line" without end: write it as it is
            lines.append(self._partial)
            self._partial = b""
        for line in lines:
            self._line(line)

    def close(self) -> None:
        if self._partial:
            self._line(self._partial)
            self._partial = b""
        self._flush_repeats()

    def _line(self, line: bytes) -> None:
        self.on_line(line)
        key = _DIGITS.sub(b"#", line)
        if key == self._last_key:
            self._run += 1
            if self._run > self.repeats_kept:
                self._dropped += 1
                return
        else:
            self._flush_repeats()
            self._last_key = key
            self._run = 1
        self._write(line + b"\n")

    def _flush_repeats(self) -> None:
        if self._dropped:
            self._write(
                f"[psi-run] the line above repeated {self._dropped} more times "
                "(not written)\n".encode()
            )
        self._dropped = 0

    def _write(self, data: bytes) -> None:
        if self.full:
            return
        if self.written + len(data) > self.max_bytes:
            self.full = True
            data = (
                f"[psi-run] log file reached {self.max_bytes} bytes; nothing more is "
                "written to it\n"
            ).encode()
        try:
            os.write(self.log_fd, data)
            self.written += len(data)
        except OSError:  # a full disk: keep the job going, lose the log line
            pass
