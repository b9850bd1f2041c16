"""SPU link settings and the blackbox link through the party's own broker.

The defaults are tuned for real networks (the seed's post-mortem: retries and timeouts that
are too small kill jobs). A spec may override any of SPU's link keys under ``link:``; values
are checked here so a typo fails before any network activity.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, fields
from typing import Any

from .errors import key_text, shown

# The broker speaks HTTP/1.1; yacl's blackbox link refuses anything but http/h2.
_PROTOCOLS = ("http",)
_CONNECTION_TYPES = ("pooled", "short", "single")
_ZERO_ALLOWED = ("connect_retry_times", "throttle_window_size", "send_retry_times")
# The largest value of each whole-number setting (README, Link settings). SPU takes up to
# 2**31-1, but beyond these a job waits for days, or sends messages the broker refuses
# (its message.max.size is 256 MiB by default).
_MAXIMA = {
    "connect_retry_times": 10_000,
    "connect_retry_interval_ms": 600_000,  # 10 minutes between attempts
    "recv_timeout_ms": 604_800_000,  # 7 days
    "http_timeout_ms": 604_800_000,
    "http_max_payload_size": 256 * 1024 * 1024,
    "throttle_window_size": 10_000,
    "send_retry_times": 10_000,
    "send_retry_interval_ms": 600_000,
}
_MIN_RETRY_WINDOW_MS = 60_000
_MIN_RECV_TIMEOUT_MS = 600_000


@dataclass(frozen=True)
class LinkSettings:
    """SPU link options (the keys SPU's ``link_desc`` accepts).

    The field defaults are the one place the defaults are written; LINK_DEFAULTS derives from them.
    """

    connect_retry_times: int = 60
    connect_retry_interval_ms: int = 1000
    recv_timeout_ms: int = 1_200_000
    http_timeout_ms: int = 1_200_000
    http_max_payload_size: int = 1024 * 1024
    # 0 turns off yacl's send window. With it on, a sender waits for acks that the peer sends only
    # when its protocol code reads a message; protocols that read in another order than they
    # send (ECDH runs three flows at once) can then wait on each other for ever. Seen through
    # the brokers under load: both sides stuck until the receive timeout.
    throttle_window_size: int = 0
    brpc_channel_protocol: str = "http"
    # A new connection per request: after its broker restarts, SPU's HTTP client (brpc) with
    # pooled connections sometimes never reconnects (every call fails "Not connected yet"
    # until the receive timeout, 3 runs in 3 here); with short connections it always did, at
    # no measurable cost (1M-row RR22: 8.1-8.6 s either way).
    brpc_channel_connection_type: str = "short"
    # A message SPU fails to hand to the broker is retried this often, at this interval (yacl's
    # retry_opts.max_retry and retry_interval_ms): yacl's own 3 retries in 9 s are over before
    # a restarted broker is reachable again, and a message whose retries run out is dropped
    # and the job hangs until recv_timeout_ms. A repeated message is harmless (SPU's link drops
    # a repeated sequence number).
    send_retry_times: int = 60
    send_retry_interval_ms: int = 1000

    def as_dict(self) -> dict[str, Any]:
        """Every setting by its SPU name, in declaration order."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def warnings(self) -> list[str]:
        """Settings that are valid but likely to hurt on a real network."""
        out = []
        for kind, times, interval in (
            ("connect", self.connect_retry_times, self.connect_retry_interval_ms),
            ("send", self.send_retry_times, self.send_retry_interval_ms),
        ):
            window = times * interval
            if window < _MIN_RETRY_WINDOW_MS:
                out.append(
                    f"link: the {kind} retry window is {window / 1000:.0f} s ({kind}_retry_times "
                    f"x {kind}_retry_interval_ms); under 60 s a slow peer, network or broker "
                    "restart can fail the link"
                )
        if self.recv_timeout_ms < _MIN_RECV_TIMEOUT_MS:
            out.append(
                f"link.recv_timeout_ms: {self.recv_timeout_ms} ms is under 10 minutes; "
                "a large PSI can exceed it"
            )
        return out


# Derived from the dataclass, so a default is never written twice. Its order is the order the
# "allowed" list in an unknown-key problem shows.
LINK_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(LinkSettings)}


def parse_link_settings(value: Any, problems: list[str]) -> LinkSettings:
    """Validate the spec's ``link:`` mapping (may be absent) into LinkSettings."""
    if value is None:
        return LinkSettings()
    if not isinstance(value, dict):
        problems.append("link: must be a mapping of SPU link settings")
        return LinkSettings()
    values: dict[str, Any] = {}
    for key, raw in value.items():
        if key not in LINK_DEFAULTS:
            problems.append(f"link.{key_text(key)}: {_unknown_setting(key)}")
            continue
        path = f"link.{key}"
        problem = _link_value_problem(key, raw)
        if problem is None:
            values[key] = raw
        else:
            problems.append(f"{path}: {problem}")
    settings = LinkSettings(**values)
    if (
        settings.brpc_channel_protocol == "http"
        and settings.brpc_channel_connection_type == "single"
    ):
        problems.append("link.brpc_channel_connection_type: http needs pooled or short, not single")
    return settings


def _unknown_setting(key: Any) -> str:
    # The ten names do not fit on one line with the key: name the likely one instead.
    close = difflib.get_close_matches(str(key)[:100], LINK_DEFAULTS, n=1)
    if close:
        return f"unknown link setting; did you mean {close[0]}?"
    return "unknown link setting; the README lists them (Link settings)"


def _link_value_problem(key: str, raw: Any) -> str | None:
    """What is wrong with one known ``link:`` value (without its key path), or None."""
    if isinstance(LINK_DEFAULTS[key], int):  # the default's type is the setting's type
        if isinstance(raw, bool) or not isinstance(raw, int):
            return f"must be a whole number, got {shown(raw)}"
        minimum = 0 if key in _ZERO_ALLOWED else 1
        if not minimum <= raw <= _MAXIMA[key]:  # a LongNumber is beyond every maximum
            return f"must be between {minimum} and {_MAXIMA[key]}, got {shown(raw)}"
    elif key == "brpc_channel_protocol" and raw not in _PROTOCOLS:
        return f"must be http (the broker speaks HTTP/1.1), got {shown(raw)}"
    elif key == "brpc_channel_connection_type" and raw not in _CONNECTION_TYPES:
        return f"must be one of {', '.join(_CONNECTION_TYPES)}, got {shown(raw)}"
    return None


def blackbox_environment(
    broker: str, parties: list[str], session_id: str, trace_id: str, token: str = "psi-run"
) -> dict[str, str]:
    """Environment variables through which yacl's blackbox link finds the broker."""
    env = {
        "system.transport": broker,
        "config.trace_id": trace_id,
        "config.token": token,
        "config.session_id": session_id,
    }
    for party in parties:
        env[f"config.inst_id.{party}"] = party
    return env


def blackbox_desc(settings: LinkSettings, parties: list[str], link_id: str):
    """SPU's link description for a blackbox link through the party's broker."""
    import spu.libspu.link as spu_link  # heavy import: only when a link is made

    desc = spu_link.Desc()
    desc.id = link_id
    for party in parties:
        desc.add_party(party, party)  # in blackbox mode the "host" is the party's node id
    for key, value in settings.as_dict().items():
        if not key.startswith("send_retry_"):
            setattr(desc, key, value)
    retry = desc.retry_opts
    retry.max_retry = settings.send_retry_times
    retry.retry_interval_ms = settings.send_retry_interval_ms
    retry.retry_interval_incr_ms = 0  # a steady interval: the window is times x interval
    retry.max_retry_interval_ms = settings.send_retry_interval_ms
    retry.aggressive_retry = True  # whatever the error: the broker may be restarting
    desc.retry_opts = retry
    desc.link_type = "blackbox"
    return desc


def create_blackbox_link(
    settings: LinkSettings, parties: list[str], self_party: str, link_id: str, env: dict[str, str]
):
    """Create SPU's link context through the broker. Blocks until the peer's link answers."""
    import spu.libspu.link as spu_link

    os.environ.update(env)
    return spu_link.create_brpc(
        blackbox_desc(settings, parties, link_id), parties.index(self_party)
    )
