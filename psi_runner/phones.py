"""Phone numbers to E.164 (``+8613800138000``) with libphonenumber's rules (``phonenumbers``).

``phonenumbers`` is the Python port of Google's libphonenumber, the library Android and most
phone-number handling build on; its metadata (country codes, national prefixes, number lengths)
is refreshed with every libphonenumber release. Both parties must run the same release (the
handshake compares it). A number is accepted when it parses and has a possible length for its
country (``is_possible_number``); stricter validity (``is_valid_number``) depends on number
ranges that change from release to release, so two sides a release apart could disagree.

Parsing is per-value Python (about 12 us a number here): distinct values are parsed once, and
a large column is split over a pool of worker processes, one per available core.
"""

from __future__ import annotations

import logging

import phonenumbers
import pyarrow as pa
import pyarrow.compute as pc

from .workers import cores, map_chunks

log = logging.getLogger("psi_runner.phones")

# Below this many distinct values one process is faster than starting a pool (about 0.3 s).
PARALLEL_FROM = 100_000
_CHUNK = 50_000


def to_e164(values: list[str], region: str | None) -> list[str | None]:
    """Each value in E.164, or None where it does not parse or has no possible length."""
    out: list[str | None] = []
    e164 = phonenumbers.PhoneNumberFormat.E164
    for value in values:
        try:
            number = phonenumbers.parse(value, region)
        except phonenumbers.NumberParseException:
            out.append(None)
            continue
        if phonenumbers.is_possible_number(number):
            out.append(phonenumbers.format_number(number, e164))
        else:
            out.append(None)
    return out


def _chunk(args: tuple[list[str], str | None]) -> list[str | None]:
    return to_e164(*args)


def e164_column(column: pa.Array, region: str | None, workers: int | None = None) -> pa.Array:
    """``column`` (strings) in E.164; null where a value is not a phone number.

    Distinct values are parsed once; with many of them the work is spread over ``workers``
    processes (default: the cores this process may use)."""
    encoded = pc.dictionary_encode(column)
    distinct = encoded.dictionary.to_pylist()
    workers = cores() if workers is None else workers
    if workers > 1 and len(distinct) >= PARALLEL_FROM:
        parsed = _parallel(distinct, region, workers)
    else:
        parsed = to_e164(distinct, region)
    return pa.array(parsed, pa.large_string()).take(encoded.indices)


def _parallel(values: list[str], region: str | None, workers: int) -> list[str | None]:
    chunks = [(values[i : i + _CHUNK], region) for i in range(0, len(values), _CHUNK)]
    log.info("parsing %d phone numbers in %d processes", len(values), workers)
    return [e164 for part in map_chunks(_chunk, chunks, workers) for e164 in part]
