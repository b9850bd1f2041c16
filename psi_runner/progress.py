"""Progress on stderr, shown by the supervising parent from the job's events and SPU's log.

Modes (``--progress``):

* ``auto`` (default): a live line when stderr is a terminal, else ``plain``;
* ``plain``: one line per stage and per 10 % of the PSI (``psi-run: progress: ...``);
* ``json``: one JSON object per line (``{"progress": ...}``) for schedulers;
* ``none``: nothing but the failure line.

The PSI's percentage comes from SPU's own log lines (stage marks, buckets, batches): SPU
prints nothing else about its progress.
"""

from __future__ import annotations

import json
import math
import os
import re
import time

MODES = ("auto", "plain", "json", "none")
LIVE_EVERY_S = 0.5

# SPU's PSI stages and the share of the PSI each one ends at (percent).
_SPU_STAGES = {"Init": 5, "PreProcess": 25, "Online": 90, "PostProcess": 95, "Finalize": 100}
_STAGE_MARK = re.compile(
    rb"\[(?:(?:Rr22|Kkrt|Ecdh)Psi(?:Receiver|Sender)|AbstractPsiParty)::"
    rb"(Init|PreProcess|Online|PostProcess|Finalize)\] (start|end)"
)
_ITEMS = re.compile(rb"psi protocol=\d+, rank=\d+,? item_size=(\d+)")
_BUCKET_DONE = re.compile(rb"\] (?:mask size: \d+|run psi bucket_idx=\d+)")
_ECDH_BATCH = re.compile(rb"MaskSelf:[^,]*, batch_count=\d+, self_item_count=(\d+)")
# With checkpoints on, SPU says how many buckets are done for good (the best marker).
_BUCKETS_SAVED = re.compile(rb"UpdateParsedBucketCount, cnt = (\d+)")
SPU_BUCKET_ITEMS = 1 << 20  # PSI v2's default bucket size
_TIMED_MARK = re.compile(
    rb"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+)\][^\n]*?\[(?:(?:Rr22|Kkrt|Ecdh)Psi"
    rb"(?:Receiver|Sender)|AbstractPsiParty)::(Init|PreProcess|Online|PostProcess|Finalize)\] "
    rb"(start|end)",
    re.MULTILINE,
)


def spu_stage_seconds(log_text: bytes) -> dict[str, float]:
    """Seconds of each SPU stage, from the stage marks in its log (stages not ended: left out)."""
    from datetime import datetime

    starts: dict[str, datetime] = {}
    seconds: dict[str, float] = {}
    for match in _TIMED_MARK.finditer(log_text):
        when = datetime.strptime(match.group(1).decode(), "%Y-%m-%d %H:%M:%S.%f")
        stage = match.group(2).decode()
        if match.group(3) == b"start":
            starts.setdefault(stage, when)
        elif stage in starts:
            seconds[stage] = round((when - starts[stage]).total_seconds(), 3)
    return seconds


class SpuProgress:
    """What SPU's log says about its progress: its stage and a percentage of the PSI."""

    def __init__(self, rows: int = 0) -> None:
        self.rows = rows
        self.stage = ""
        self.percent = 0.0
        self._buckets = 0
        self._buckets_done = 0
        self._saved = False  # buckets counted by SPU's checkpoint lines

    def feed(self, line: bytes) -> bool:
        """Read one log line; True when the stage or the percentage moved."""
        before = (self.stage, int(self.percent))
        mark = _STAGE_MARK.search(line)
        if mark:
            stage, state = mark.group(1).decode(), mark.group(2)
            self.stage = stage
            ends = _SPU_STAGES[stage]
            starts = max([0] + [v for v in _SPU_STAGES.values() if v < ends])
            self.percent = max(self.percent, ends if state == b"end" else starts)
        elif (items := _ITEMS.search(line)) is not None:
            buckets = math.ceil(int(items.group(1)) / SPU_BUCKET_ITEMS)
            self._buckets = max(self._buckets, buckets)
        elif (saved := _BUCKETS_SAVED.search(line)) is not None and self._buckets:
            self._saved = True
            self._buckets_done = min(int(saved.group(1)), self._buckets)
            self._online(self._buckets_done / self._buckets)
        elif not self._saved and _BUCKET_DONE.search(line) and self._buckets:
            self._buckets_done = min(self._buckets_done + 1, self._buckets)
            self._online(self._buckets_done / self._buckets)
        elif (batch := _ECDH_BATCH.search(line)) is not None and self.rows:
            self._online(min(int(batch.group(1)) / self.rows, 1.0))
        return (self.stage, int(self.percent)) != before

    def _online(self, share: float) -> None:
        start, end = _SPU_STAGES["PreProcess"], _SPU_STAGES["Online"]
        self.percent = max(self.percent, start + (end - start) * share)


class ProgressView:
    """Turns events and log lines into stderr output in one of ``MODES``."""

    def __init__(self, mode: str, err_fd: int) -> None:
        if mode == "auto":
            mode = "live" if os.isatty(err_fd) else "plain"
        self.mode = mode
        self.err_fd = err_fd
        self.started = time.monotonic()
        self.stage = ""
        self.stage_started = self.started
        self.rows = 0
        self.spu = SpuProgress()
        self._last_tenth = -1
        self._next_live = 0.0
        self._live_shown = False
        self.stalled_retries = -1  # after a stall: the spec's retries (the CLI counts them)
        self.relinked = False  # SPU's link was lost: the CLI starts the job again (relink)
        # Kept for the supervisor: what a notice needs if the job process dies.
        self.nonce = ""
        self.peer_nonce = ""

    # -- input ------------------------------------------------------------------------

    def on_event(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "tick":
            self._live()
            return
        if kind == "input":
            self.rows = int(event.get("rows") or 0)
            self.spu.rows = self.rows
        elif kind == "met":
            self.nonce = str(event.get("nonce", ""))
            self.peer_nonce = str(event.get("peer_nonce", ""))
        elif kind == "stage":
            self._on_stage(event)
        elif kind == "stalled":
            self.stalled_retries = int(event.get("retries") or 0)
        elif kind == "relink":
            self.relinked = True

    def on_line(self, line: bytes) -> None:
        if self.stage == "psi" and self.spu.feed(line):
            tenth = int(self.spu.percent // 10)
            if tenth > self._last_tenth:
                self._last_tenth = tenth
                self._show("psi", f"{self.spu.percent:.0f} % (SPU {self.spu.stage})")

    def close(self) -> None:
        if self._live_shown:
            self._live_shown = False
            self._write("\n")

    # -- output -----------------------------------------------------------------------

    def _on_stage(self, event: dict) -> None:
        stage, state = str(event.get("stage")), event.get("state")
        if state == "start":
            self.stage = stage
            self.stage_started = time.monotonic()
            if stage == "psi":
                self._show(stage, "started")
        elif state == "done":
            extra = f" ({self.rows:,} rows)" if stage == "preflight" else ""
            self._show(stage, f"done in {float(event.get('seconds') or 0):.1f} s{extra}")
        elif state == "failed":
            self._show(stage, "failed")

    def _show(self, stage: str, text: str) -> None:
        elapsed = time.monotonic() - self.started
        if self.mode == "plain":
            self._write(f"psi-run: progress: {stage} {text} [{elapsed:.0f} s]\n")
        elif self.mode == "json":
            record = {"progress": stage, "status": text, "percent": self._percent(),
                      "rows": self.rows, "elapsed_s": round(elapsed, 1)}  # fmt: skip
            self._write(json.dumps(record) + "\n")

    def _percent(self) -> float:
        if self.stage == "psi":
            return round(self.spu.percent, 1)
        return 100.0 if self.stage in ("agree", "output", "report") else 0.0

    def _live(self) -> None:
        now = time.monotonic()
        if self.mode != "live" or not self.stage or now < self._next_live:
            return
        self._next_live = now + LIVE_EVERY_S
        elapsed = now - self.started
        line = f"psi-run: {self.stage}"
        if self.stage == "psi":
            pct = self.spu.percent
            eta = ""
            if pct >= 5:
                psi_elapsed = now - self.stage_started
                eta = f", ETA {psi_elapsed * (100 - pct) / pct:.0f} s"
            line += f" {pct:.0f} % (SPU {self.spu.stage or 'starting'}){eta}"
        line += f", {self.rows:,} rows, {elapsed:.0f} s"
        self._write("\r\x1b[K" + line[:120])
        self._live_shown = True

    def _write(self, text: str) -> None:
        try:
            os.write(self.err_fd, text.encode("utf-8", "replace"))
        except OSError:
            pass
