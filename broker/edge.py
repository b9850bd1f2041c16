"""The rules every untrusted value meets at the broker's edge, the same on both front ends.

HTTP headers and gRPC call metadata carry the same PTP headers, and a pop's timeout comes as a
query parameter (HTTP, in seconds as SPU's link sends it) or a message field (gRPC, in
milliseconds as OSX reads it). Each value is parsed once, here, before any use; the rest of the
broker sees only values that passed:

    names    session, topic, source and target node: 1 to 256 characters of letters, digits
             and ``_.:@#=+-`` (they key queues, never a file path; FATE's session ids and
             topics are full of underscores)
    text     trace id, instance ids, token: valid UTF-8 of at most 1024 bytes, printable ASCII
             only (they are passed on as gRPC metadata or HTTP headers, which carry no more)
    numbers  ASCII digits only, a bounded count of them, within a range; a timeout may have a
             decimal fraction (``0.25``), never an exponent, a sign, NaN or infinity
    once     a PTP header given twice in one request is ambiguous, so it is refused too

A value that breaks a rule raises :class:`Refusal`, which carries the PTP code the front end
answers with (``E0000000400``; ``E0000000403`` for the token, as a wrong token gets) and a
reason that names the header and the rule, never the value.
"""

from __future__ import annotations

import re

from . import codes

NAME_MAX = 256
TEXT_MAX_BYTES = 1024
POP_TIMEOUT_MAX_S = 86_400  # one day, for HTTP's ?timeout= (SPU's link asks for seconds)
POP_TIMEOUT_MAX_MS = 2**31 - 1  # all an int32 holds: gRPC's PopInbound.timeout, as OSX reads it
HOPS_MAX_DIGITS = 9

_NAME = re.compile(rf"[A-Za-z0-9_.:@#=+\-]{{1,{NAME_MAX}}}")
_PRINTABLE = re.compile(r"[\x20-\x7e]*")
_SECONDS = re.compile(r"([0-9]{1,9})(?:\.([0-9]{1,9}))?")
_DIGITS = re.compile(r"[0-9]+")


class Refusal(Exception):
    """A request the broker turns away: the PTP ``code`` to answer and the ``reason`` why."""

    def __init__(self, reason: str, code: str = codes.BAD_REQUEST) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


def decode(what: str, raw: str | bytes, max_bytes: int, code: str = codes.BAD_REQUEST) -> str:
    """``raw`` as text: bounded (checked before any decoding), valid UTF-8, surrounding
    blanks removed. A ``str`` may come with lone surrogates (aiohttp keeps undecodable bytes
    that way); they are not valid UTF-8 either."""
    if len(raw) > max_bytes:
        raise Refusal(f"{what} is longer than {max_bytes} bytes", code)
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        if len(text.encode("utf-8")) > max_bytes:
            raise Refusal(f"{what} is longer than {max_bytes} bytes", code)
    except UnicodeError:
        raise Refusal(f"{what} is not valid UTF-8", code) from None
    return text.strip(" \t")


def name(what: str, raw: str | bytes) -> str:
    """A session, topic or node name (empty when absent)."""
    text = decode(what, raw, NAME_MAX)
    if text and not _NAME.fullmatch(text):
        raise Refusal(f"{what} must be 1-{NAME_MAX} characters of letters, digits and _.:@#=+-")
    return text


def text(what: str, raw: str | bytes, code: str = codes.BAD_REQUEST) -> str:
    """A value passed on as it is (trace id, instance id, token): printable ASCII, bounded."""
    value = decode(what, raw, TEXT_MAX_BYTES, code)
    if not _PRINTABLE.fullmatch(value):
        raise Refusal(f"{what} must be printable ASCII (space to '~')", code)
    return value


def whole_number(what: str, raw: str | bytes, max_digits: int) -> int:
    """A count: ASCII digits only, at most ``max_digits`` of them (empty means 0)."""
    problem = f"{what} must be a whole number of at most {max_digits} ASCII digits"
    if len(raw) > max_digits + 2:  # room for surrounding blanks; checked before decoding
        raise Refusal(problem)
    value = decode(what, raw, max_digits + 2)
    if value == "":
        return 0
    if len(value) > max_digits or not _DIGITS.fullmatch(value):
        raise Refusal(problem)
    return int(value)


def seconds(what: str, raw: str | bytes, max_s: float) -> float | None:
    """A duration such as ``5`` or ``0.25``, from 0 to ``max_s``; None when empty."""
    value = decode(what, raw, 32)
    if value == "":
        return None
    match = _SECONDS.fullmatch(value)
    if match is None:
        raise Refusal(
            f"{what} must be a number of seconds in ASCII digits (such as 5 or 0.25), "
            f"from 0 to {max_s:g}"
        )
    whole, fraction = match.groups()
    result = int(whole) + (int(fraction) / 10 ** len(fraction) if fraction else 0.0)
    if result > max_s:
        raise Refusal(f"{what} is over the limit of {max_s:g} s")
    return result


def pop_timeout(raw: str | bytes, default_s: float) -> float:
    """A pop's wait in seconds from HTTP's ``timeout`` parameter (SPU's link sends seconds).

    Absent (empty) means ``default_s`` (``consume.msg.waiting.timeout``); 0 answers at once."""
    value = seconds("pop timeout", raw, POP_TIMEOUT_MAX_S)
    return default_s if value is None else value


def pop_timeout_ms(raw: int, default_s: float) -> float:
    """A pop's wait in seconds from gRPC's ``PopInbound.timeout``, which is milliseconds (OSX
    reads it so and FATE's client sends 36,000,000 by default).

    0 is also what proto3 sends for an absent field, so it means ``default_s``; a negative
    value is refused. Every positive int32 (up to about 24.8 days) is accepted, as OSX does."""
    if raw < 0 or raw > POP_TIMEOUT_MAX_MS:
        raise Refusal(f"pop timeout must be from 0 to {POP_TIMEOUT_MAX_MS} ms")
    return raw / 1000 if raw else default_s
