"""What one streaming pass over a CSV file's bytes learns about its text.

``data.scan_text`` reads the input once, in fixed-size chunks, to refuse what is not UTF-8
text; ``TextFacts`` rides along on the same chunks and records what the later checks and the
plain-file decision need, so that the file is never held whole: the header line, the first
blank line, whether there is a BOM, a CR, a quote, a byte outside the plain key alphabet, and
how many data lines start with a quote. Each fact is found with bytes methods or numpy over
the chunk (no Python loop over lines or bytes).
"""

from __future__ import annotations

import numpy as np

BOM = b"\xef\xbb\xbf"
# Bytes a plain file may hold anywhere: printable ASCII except '"' and '~', and '\n'.
PLAIN = bytes(b for b in range(0x20, 0x7F) if b not in b'"~') + b"\n"


class TextFacts:
    """Facts about a file's text (without its BOM: the "body"), fed chunk by chunk in order.

    After ``finish``: ``bom``, ``header`` (the first line, without its newline; at most the
    scan's line cap), ``header_ends`` (a newline follows it), ``empty`` (only whitespace),
    ``blank_line`` (1-based number of the first empty line, not counting a final newline;
    0 if none), ``has_cr``, ``has_quote``, ``plain_bytes`` (every byte in the plain alphabet
    or a separator), ``plain_or_quote`` (the same, quotes allowed), ``data_lines`` (lines
    after a newline; a final newline starts none) and ``quoted_starts`` (of those, how many
    start with a quote)."""

    def __init__(self) -> None:
        self.bom = False
        self.header = b""
        self.header_ends = False
        self.empty = True
        self.blank_line = 0
        self.has_cr = False
        self.has_quote = False
        self.plain_bytes = True
        self.plain_or_quote = True
        self.data_lines = 0
        self.quoted_starts = 0
        self._pending = b""  # the first bytes, until the BOM question is settled
        self._started = False
        self._header = bytearray()
        self._length = 0  # body bytes seen
        self._newlines = 0  # newlines in them
        self._tail = b""  # the body's last two bytes seen
        # first "\n\n" and "\n\r\n": (body offset, newlines before it), or None
        self._blank: dict[bytes, tuple[int, int] | None] = {b"\n\n": None, b"\n\r\n": None}
        self._first = b""  # the body's first two bytes

    def feed(self, chunk: bytes, rest: bytes | None = None, newlines: int = -1) -> None:
        """The next bytes of the file; ``rest`` and ``newlines``, when the caller has them:
        the chunk's bytes outside ``PLAIN`` (``chunk.translate(None, PLAIN)``) and its count
        of newlines."""
        if not self._started:
            self._pending += chunk
            if len(self._pending) < len(BOM):
                return
            self._start()
            chunk, self._pending, rest, newlines = self._pending, b"", None, -1
        if chunk:
            rest = chunk.translate(None, PLAIN) if rest is None else rest
            self._body(chunk, rest, chunk.count(b"\n") if newlines < 0 else newlines)

    def _start(self) -> None:
        self._started = True
        if self._pending.startswith(BOM):
            self.bom = True
            self._pending = self._pending[len(BOM) :]

    def _body(self, c: bytes, rest: bytes, newlines: int) -> None:
        """One chunk of the body; ``rest`` its bytes outside ``PLAIN`` (most files: none, so
        most questions are answered on ``rest``, not on the chunk)."""
        if len(self._first) < 2:
            self._first += c[: 2 - len(self._first)]
        if not self.header_ends:
            nl = c.find(b"\n")
            self._header += c if nl < 0 else c[:nl]
            self.header_ends = nl >= 0
        cr, quote = b"\r" in rest, b'"' in rest
        self.has_cr = self.has_cr or cr
        self.has_quote = self.has_quote or quote
        if rest:
            self.plain_bytes = False
            self.plain_or_quote = self.plain_or_quote and not rest.replace(b'"', b"")
        if self.empty:
            self.empty = not c.strip()
        buf = self._tail + c
        searching = [n for n, found in self._blank.items() if found is None]
        if searching or quote:  # with numpy: bytes.find/count of two bytes is 5x slower
            arr = np.frombuffer(buf, dtype=np.uint8)
            nl = arr == 0x0A
            for needle in searching:
                if needle == b"\n\n":
                    hits = np.flatnonzero(nl[:-1] & nl[1:])
                elif cr or b"\r" in self._tail:
                    hits = np.flatnonzero(nl[:-2] & (arr[1:-1] == 0x0D) & nl[2:])
                else:
                    continue
                if len(hits):
                    i = int(hits[0])
                    before = self._newlines - buf.count(b"\n", i, len(self._tail))
                    before += c.count(b"\n", 0, max(i - len(self._tail), 0))
                    self._blank[needle] = (self._length - len(self._tail) + i, before)
            if quote:
                at = max(len(self._tail) - 1, 0)
                self.quoted_starts += int(np.count_nonzero(nl[at:-1] & (arr[at + 1 :] == 0x22)))
        self._newlines += newlines
        self._length += len(c)
        self._tail = buf[-2:]

    def finish(self) -> TextFacts:
        """The end of the file: settle the facts that depend on it."""
        if not self._started:
            self._start()
            if self._pending:
                pending = self._pending
                self._body(pending, pending.translate(None, PLAIN), pending.count(b"\n"))
            self._pending = b""
        self.header = bytes(self._header)
        if self._first.startswith((b"\n", b"\r\n")):
            self.blank_line = 1
        else:
            for needle, found in self._blank.items():
                if found is not None and found[0] + len(needle) < self._length:
                    self.blank_line = found[1] + 2  # the line after the newline's
                    break
        ends_with_newline = self._tail.endswith(b"\n")
        self.data_lines = self._newlines - (1 if ends_with_newline else 0)
        return self
