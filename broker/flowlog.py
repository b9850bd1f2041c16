"""The flow log: one line per message handled, in OSX's ``flow.log`` layout.

    time|protocol|seq|ACTION|session:..|topic:..|des:..|code:..|cost:..|ip:port|size:..|msg

Actions: MSG_DOWNLOAD (stored for a local party), MSG_REDIRECT (sent on to another broker),
DEFAULT_CONSUME (popped), PEEK, RELEASE, QUEUE_EXPIRED, and REFUSED for messages turned away.
"""

from __future__ import annotations

import itertools
import logging
import time

_log = logging.getLogger("broker.flow")
_counter = itertools.count(1)


def _clean(value: object) -> str:
    # A field must not break the line layout; names are validated anyway.
    return str(value).replace("|", "/").replace("\n", " ")


def flow(
    protocol: str,
    action: str,
    *,
    session: str = "",
    topic: str = "",
    des: str = "",
    code: str = "",
    started: float | None = None,
    address: str = "",
    size: int = 0,
    msg: str = "",
) -> None:
    """Write one flow-log line (cheap when the flow logger is disabled)."""
    if not _log.isEnabledFor(logging.INFO):
        return
    cost = int((time.monotonic() - started) * 1000) if started is not None else 0
    seq = f"{int(time.time())}_{next(_counter)}"
    _log.info(
        "%s|%s|%s|session:%s|topic:%s|des:%s|code:%s|cost:%d|%s|size:%d|msg:%s",
        protocol,
        seq,
        action,
        _clean(session),
        _clean(topic),
        _clean(des),
        code,
        cost,
        _clean(address),
        size,
        _clean(msg),
    )


FLOW_FORMAT = "%(asctime)s,%(msecs)03d|%(message)s"
FLOW_DATEFMT = "%Y-%m-%d %H:%M:%S"
