"""flow.log written directly looks exactly as the flow logger's formatter would write it."""

from __future__ import annotations

import logging

from broker import flowlog


def test_flow_file_lines_match_the_logging_format(tmp_path, monkeypatch):
    path = tmp_path / "flow.log"
    flowlog.write_to(path)
    try:
        for now in (1_764_700_000.0004, 1_764_700_000.9996, 1_764_700_001.5):
            monkeypatch.setattr(flowlog.time, "time", lambda now=now: now)
            flowlog._write("http", "PEEK", "s", "t", "bob", "E0000000000", 3, "", 1024, "é|x")
    finally:
        flowlog._file.close()
        flowlog._file = None
    formatter = logging.Formatter(flowlog.FLOW_FORMAT, flowlog.FLOW_DATEFMT)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3
    for line, now in zip(lines, (1_764_700_000.0004, 1_764_700_000.9996, 1_764_700_001.5)):
        message = line.split("|", 1)[1]
        record = logging.LogRecord("broker.flow", logging.INFO, "", 0, message, None, None)
        record.created, record.msecs = now, int((now - int(now)) * 1000)
        assert line == formatter.format(record)
        assert message.endswith("|size:1024|msg:é/x")
