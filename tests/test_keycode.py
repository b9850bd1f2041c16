"""Unit tests of the ``escape`` key code (psi_runner/keycode.py), how both parties pick it, and
the result check's digest of ``escape``-coded texts."""

from __future__ import annotations

import random

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from psi_runner import keycode
from psi_runner.agreement import digest_key, keys_digest
from psi_runner.data import canonical_keys

ESCAPED = set(range(0x20)) | {0x7F} | set(b'",~')


def escaped(value: str) -> str:
    """The ``escape`` canonical key of one value, by its definition (keycode's docstring)."""
    raw = value.encode()
    if raw and all(0x20 <= b < 0x7F and b not in b'",~' for b in raw):
        return value  # plain: as it is
    body = b"".join(b"~%02x" % b if b in ESCAPED else bytes([b]) for b in raw)
    return "~" + body.decode()


def test_escape_keys_match_their_definition_value_by_value() -> None:
    rng = random.Random(12)
    pieces = ["a", "1", " ", ",", '"', "~", "é", "\n", "\r", "\t", "\x7f", "}", "张", "🙂"]
    for round_ in range(300):
        values = ["".join(rng.choices(pieces, k=rng.randrange(0, 6))) for _ in range(30)]
        arr = pa.array(values, pa.string()).slice(round_ % 3)  # offset slices too
        table = pa.table({"k": pa.chunked_array([arr.slice(0, 5), arr.slice(5)])})
        got = canonical_keys(table, ("k",), keycode.ESCAPE).to_pylist()
        assert got == [escaped(v) for v in values[round_ % 3 :]]


def test_escape_keys_are_distinct_for_distinct_values_and_hold_no_csv_syntax() -> None:
    values = [
        "",
        "~",
        "~7e",
        "~~7e",
        "7e",
        "a,b",
        "a~2cb",
        '"',
        "~22",
        "张",
        "~张",
        "x\ny",
        "x~0ay",
    ]
    got = canonical_keys(pa.table({"k": values}), ("k",), keycode.ESCAPE).to_pylist()
    assert len(set(got)) == len(values)
    for key in got:
        assert not any(c in key for c in '",\r\n\x7f') and key.isprintable()
    assert got[:3] == ["~", "~~7e", "~~7e7e"]
    assert got[values.index("a,b")] == "~a~2cb"


def test_escape_only_when_both_sides_know_it_and_for_one_key_column() -> None:
    assert keycode.agreed_code(("uid",), list(keycode.CODES)) == keycode.ESCAPE
    assert keycode.agreed_code(("uid",), None) == keycode.HEX  # a peer of an earlier version
    assert keycode.agreed_code(("uid",), ["hex"]) == keycode.HEX
    assert keycode.agreed_code(("a", "b"), list(keycode.CODES)) == keycode.HEX


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(max_size=8), max_size=40), st.integers(0, 3))
def test_escape_keys_decode_back_to_their_values(values, cut) -> None:
    """The result check reads the keys back from SPU's output: decoding any column of escape
    keys (sliced, as a CSV reader's chunks are) gives the values they were made from."""
    keys = canonical_keys(pa.table({"k": pa.array(values, pa.string())}), ("k",), keycode.ESCAPE)
    sliced = keys.slice(min(cut, len(values)))
    got = keycode.tilde_unescape(sliced.cast(pa.string())).to_pylist()
    assert got == values[min(cut, len(values)) :]


def test_a_truncated_escape_is_refused() -> None:
    with pytest.raises(ValueError, match="inside an escape"):
        keycode.tilde_unescape(pa.array(["~ab~2"]))


plain_values = st.text(st.sampled_from("ab1 -}!#"), min_size=1, max_size=6)
any_values = st.text(st.sampled_from('ab1 ,"~\n\x7fé张🙂'), min_size=0, max_size=6)


@settings(max_examples=200, deadline=None)
@given(common=st.lists(plain_values, unique=True, max_size=12))
def test_a_plain_sides_values_and_a_canonical_sides_texts_digest_alike(common) -> None:
    """The result check's two forms meet: a side whose file went to SPU as it is digests its
    values; a side with ``escape``-coded keys digests SPU's texts. Keys both sides hold are
    plain (the plain side has no other), and a plain value is its own canonical key."""
    key = digest_key("n1", "n2")
    texts = canonical_keys(pa.table({"k": common}), ("k",), keycode.ESCAPE)
    assert keys_digest([texts], key) == keys_digest([pa.array(common, pa.string())], key)


@settings(max_examples=200, deadline=None)
@given(a=st.lists(any_values, unique=True, max_size=8), b=st.lists(any_values, max_size=8))
def test_escape_texts_digest_alike_exactly_when_the_values_are_alike(a, b) -> None:
    key = digest_key("n1", "n2")

    def digest(values):
        return keys_digest([canonical_keys(pa.table({"k": values}), ("k",), keycode.ESCAPE)], key)

    b = list(dict.fromkeys(b))
    assert (digest(a) == digest(b)) == (a == b)
