"""The runner's small HTTP client for its own broker (health and queue release)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from .errors import PreflightError


# The broker is this party's own, usually on loopback: never send its traffic through an
# HTTP proxy that the environment (http_proxy, ...) may name.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def urlopen(request: urllib.request.Request | str, timeout: float):
    """urllib's urlopen without proxies."""
    return _OPENER.open(request, timeout=timeout)


def _url(broker: str, path: str) -> str:
    return f"http://{broker}{path}"


def check_broker(broker: str, party: str, timeout_s: float = 5.0) -> dict:
    """Make sure our broker answers and serves ``party``; return its health document."""
    try:
        with urlopen(_url(broker, "/health"), timeout=timeout_s) as resp:
            health = json.loads(resp.read().decode("utf-8"))
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise PreflightError(
            f"broker {broker} of party {party} does not answer ({reason}); start it with "
            f"psi-broker --conf-dir <its conf folder>, or fix parties.{party}.broker"
        ) from None
    served = health.get("self_party") or []
    if party not in served:
        raise PreflightError(
            f"broker {broker} serves {', '.join(served) or 'no party'}, not {party}: "
            f"point parties.{party}.broker at {party}'s own broker, or set self_party in its "
            "route_table.json"
        )
    return health


def release_session(broker: str, session: str, party: str, timeout_s: float = 5.0) -> None:
    """Ask our broker to drop the queues of a finished session (best effort)."""
    req = urllib.request.Request(
        _url(broker, "/v1/interconn/chan/release"),
        data=b"",
        method="POST",
        headers={"x-ptp-session-id": session, "x-ptp-source-node-id": party},
    )
    try:
        with urlopen(req, timeout=timeout_s):
            pass
    except (urllib.error.URLError, OSError):
        pass
