"""Normalisation steps, pre-hashed columns, the spec's rules and the agreement digest, in
process. Each step is checked against the standard library's own idea of it."""

from __future__ import annotations

import base64
import hashlib
import itertools
import re
import unicodedata
from pathlib import Path

import pyarrow as pa
import pytest
import yaml
from conftest import write_csv
from hypothesis import given, settings
from hypothesis import strategies as st

from psi_runner import agreement, normalize, phones
from psi_runner.data import inspect_input
from psi_runner.digest import shared_fields, spec_digest
from psi_runner.errors import PreflightError, SpecError
from psi_runner.handshake import _differences
from psi_runner.keyspec import Step
from psi_runner.spec import load_spec, parse_spec

SPACES = "".join(chr(c) for c in range(0x3001) if chr(c).isspace())
VALUES = [
    "  Li.Wei@Example.com ",
    "ＡＢＣ　１２３",  # full-width letters, digits and space
    "a\u00a0\u2003b\t\tc",  # no-break and em spaces
    f"{SPACES}x{SPACES}",
    "",
    "ÄÖÜ straße",
    "+86 (138) 0013-8000",
    "①②③ ﬁ",  # NFKC: circled digits, a ligature
]


def _run(steps: list[Step], values: list[str]) -> list[str | None]:
    out, _empty = normalize.apply_steps(pa.array(values), tuple(steps))
    return out.to_pylist()


@pytest.mark.parametrize(
    "step,reference",
    [
        ("trim", str.strip),
        ("nfkc", lambda v: unicodedata.normalize("NFKC", v)),
        ("collapse_spaces", lambda v: re.sub(r"\s+", " ", v)),
        ("digits_only", lambda v: re.sub(r"[^0-9]", "", v)),
    ],
)
def test_each_text_step_does_what_the_standard_library_does(step, reference):
    assert _run([Step(step)], VALUES) == [reference(v) for v in VALUES]


def test_digits_only_works_slice_by_slice(monkeypatch):
    monkeypatch.setattr(normalize, "_DIGITS_SLICE", 3)
    values = VALUES * 3 + ["１２3", "0", "a1b2c3"]
    assert _run([Step("digits_only")], values) == [re.sub(r"[^0-9]", "", v) for v in values]


def test_lower_and_upper_follow_unicode_case_mapping_one_to_one():
    values = ["Li.Wei@Example.COM", "ÄÖÜ é", "ΣΑΒ", "abc"]  # (not a final sigma: see README)
    assert _run([Step("lower")], values) == [v.lower() for v in values]
    assert _run([Step("upper")], values) == [v.upper() for v in values]


def test_email_lower_cases_trims_and_applies_gmail_rules_only_when_asked():
    values = [" Li.Wei@Example.com", "john.smith+news@Gmail.com", "j.s@googlemail.com",
              "a.b+c@example.com", "not an address", "two@at@signs", "+x@gmail.com"]  # fmt: skip
    assert _run([Step("email")], values) == [
        "li.wei@example.com", "john.smith+news@gmail.com", "j.s@googlemail.com",
        "a.b+c@example.com", None, None, "+x@gmail.com",
    ]  # fmt: skip
    assert _run([Step("email", gmail=True)], values) == [
        "li.wei@example.com", "johnsmith@gmail.com", "js@gmail.com",
        "a.b+c@example.com", None, None, None,
    ]  # fmt: skip


def test_e164_uses_the_region_only_for_numbers_without_a_country_code():
    values = ["138 0013 8000", "+1 (415) 555-2671", "0044 20 7946 0958", "010 6552 9988",
              "n/a", "12"]  # fmt: skip
    assert _run([Step("e164", region="CN")], values) == [
        "+8613800138000", "+14155552671", "+442079460958", "+861065529988", None, None,
    ]  # fmt: skip
    assert _run([Step("e164")], values)[:2] == [None, "+14155552671"]


def test_phone_parsing_in_worker_processes_gives_what_one_process_gives(monkeypatch):
    monkeypatch.setattr(phones, "PARALLEL_FROM", 10)
    monkeypatch.setattr(phones, "_CHUNK", 7)
    values = pa.array([f"+1 415 555 {i:04d}" for i in range(40)] + ["bad"] * 3 + ["138 0013 8000"])
    one = phones.e164_column(values, "CN", workers=1)
    assert phones.e164_column(values, "CN", workers=2).equals(one)
    assert one[0].as_py() == "+14155550000" and one[40].as_py() is None


def test_sha256_is_hex_of_the_salt_and_the_value_in_one_process_or_many(monkeypatch):
    salt = b"s" * 16
    values = [v for v in VALUES if v] * 5
    want = [hashlib.sha256(salt + v.encode()).hexdigest() for v in values]
    assert normalize.sha256_hex(pa.array(values), salt, workers=1).to_pylist() == want
    monkeypatch.setattr(normalize, "HASH_PARALLEL_FROM", 5)
    monkeypatch.setattr(normalize, "_HASH_CHUNK", 4)
    assert normalize.sha256_hex(pa.array(values), salt, workers=4).to_pylist() == want
    plain = normalize.sha256_hex(pa.array(["x"]), None, workers=1).to_pylist()
    assert plain == [hashlib.sha256(b"x").hexdigest()]


def test_prehashed_hex_and_base64_are_validated_and_read_as_lower_case_hex():
    digests = [hashlib.sha256(str(i).encode()).digest() for i in range(4)]
    hexes = [d.hex() for d in digests]
    col = pa.array([hexes[0].upper(), f" {hexes[1]} ", hexes[2][:-1], hexes[3] + "0", "g" * 64])
    got, _ = normalize.prehashed_column(col, "sha256_hex")
    assert got.to_pylist() == [hexes[0], hexes[1], None, None, None]
    b64 = [base64.b64encode(digests[0]).decode(), base64.urlsafe_b64encode(digests[1]).decode(),
           base64.b64encode(digests[2]).decode().rstrip("="), "short=", hexes[3], ""]  # fmt: skip
    got, empty = normalize.prehashed_column(pa.array(b64), "sha256_base64")
    assert got.to_pylist()[:5] == [hexes[0], hexes[1], hexes[2], None, None]
    assert list(empty) == [False] * 5 + [True]


def _table_file(tmp_path: Path, values: list[str]) -> Path:
    path = tmp_path / "in.csv"
    write_csv(path, {"phone": values, "other": [f"o{i}" for i in range(len(values))]})
    return path


def _plan(steps: tuple[Step, ...], on_invalid: str = "refuse") -> normalize.KeyPlan:
    return normalize.KeyPlan(("phone",), {"phone": steps}, {}, on_invalid)


E164 = (Step("nfkc"), Step("e164", region="CN"))


def test_preflight_counts_per_column_and_refuses_with_numbers_only(tmp_path):
    values = ["138 0013 8000", "+8613800138001", "secret-not-a-phone", " ", "13800138002"]
    with pytest.raises(PreflightError) as err:
        inspect_input(_table_file(tmp_path, values), ("phone",), plan=_plan(E164))
    msg = str(err.value)
    assert "1 value(s) are not phone numbers (first: data row 3)" in msg
    assert "1 became empty (first: data row 4)" in msg
    assert "on_invalid: drop" in msg
    assert "secret" not in msg and "138" not in msg


def test_dropped_rows_are_left_out_and_the_input_keeps_its_original_values(tmp_path):
    values = ["138 0013 8000", "bad", "", "+86 138-0013-8001"]
    inp = inspect_input(_table_file(tmp_path, values), ("phone",), plan=_plan(E164, "drop"))
    done = inp.normalized
    assert done is not None and not inp.plain
    assert done.stats["phone"].as_dict() == {"changed": 2, "empty": 1, "invalid": 1}
    assert done.keys["phone"].to_pylist() == ["+8613800138000", "+8613800138001"]
    assert list(inp.input_rows(pa.array([1, 0]).to_numpy())) == [3, 0]
    assert inp.table["phone"].to_pylist() == values  # the file's own values, for the result


def test_keys_that_become_duplicates_are_refused_naming_rows_not_values(tmp_path):
    values = ["13800138000", "13800138009", "+86 138 0013 8000"]
    with pytest.raises(PreflightError) as err:
        inspect_input(_table_file(tmp_path, values), ("phone",), plan=_plan(E164))
    assert "1 row(s) repeat the key of an earlier row (e.g. data rows 1 and 3)" in str(err.value)
    assert "138" not in str(err.value)
    inp = inspect_input(_table_file(tmp_path, values), ("phone",), True, plan=_plan(E164))
    assert inp.normalized is not None and inp.normalized.keys.num_rows == 3


def test_normalisation_that_changes_nothing_keeps_the_plain_fast_path(tmp_path):
    path = tmp_path / "in.csv"
    write_csv(path, {"phone": ["+8613800138000", "+14155552671"]}, lineterminator="\n")
    inp = inspect_input(path, ("phone",), plan=_plan(E164))
    assert inp.plain and inp.normalized is not None


def _spec(**overrides) -> dict:
    doc = {
        "job_id": "n-1",
        "keys": ["phone", "email"],
        "receiver": "alice",
        "parties": {
            "alice": {"broker": "127.0.0.1:1", "input": "a.csv", "output": "oa.csv"},
            "bob": {"broker": "127.0.0.1:2", "input": "b.csv", "output": "ob.csv"},
        },
    }
    doc.update(overrides)
    return doc


def _parse(doc: dict):
    return parse_spec(yaml.safe_dump(doc), Path("/tmp/job.yaml"))


def test_spec_refuses_every_bad_normalisation_at_once():
    doc = _spec(
        normalize={
            "phone": ["trim", "soundex", {"e164": {"region": "XX"}}],
            "email": [{"sha256": {"salt": True}}, "lower"],
            "uid": ["trim"],
        },
        on_invalid="ignore",
    )
    doc["parties"]["bob"]["prehashed"] = {"phone": "sha256_hex", "email": "md5"}
    with pytest.raises(SpecError) as err:
        _parse(doc)
    problems = err.value.problems
    for needle in [
        "normalize.phone[1]: unknown step 'soundex'",
        "normalize.phone[2].region: must be a two-letter region code",
        "normalize.email[0]: sha256 must be the last step",
        "on_invalid: must be one of refuse, drop, got 'ignore'",
        "parties.bob.prehashed.email: must be sha256_hex or sha256_base64",
        "normalize.uid: not a key column",
    ]:
        assert any(needle in p for p in problems), (needle, problems)


def test_spec_needs_a_hashing_partner_for_prehashed_and_a_salt_file_for_a_salt():
    doc = _spec(normalize={"email": ["email", {"sha256": {"salt": True}}]})
    doc["parties"]["bob"]["prehashed"] = {"phone": "sha256_hex"}
    doc["parties"]["bob"]["salt_file"] = "salt.txt"
    with pytest.raises(SpecError) as err:
        _parse(doc)
    text = str(err.value)
    assert "parties.bob.prehashed.phone: the column's steps must end with sha256" in text
    assert "parties.alice.salt_file: required: normalize.email hashes with a salt" in text
    doc["parties"]["alice"]["salt_file"] = "salt.txt"
    doc["parties"]["bob"]["prehashed"] = {"email": "sha256_base64"}
    doc["parties"]["bob"].pop("salt_file")
    spec = _parse(doc)  # a prehashed side needs no salt
    assert spec.parties["bob"].prehashed == {"email": "sha256_base64"}


def test_steps_enter_the_digest_and_a_difference_names_the_column():
    a = _parse(_spec(normalize={"phone": ["nfkc", {"e164": {"region": "cn"}}]}))
    b = _parse(_spec(normalize={"phone": ["nfkc", {"e164": {"region": "US"}}]}))
    c = _parse(_spec(normalize={"phone": ["nfkc", {"e164": {"region": "CN"}}]}))
    assert spec_digest(a) == spec_digest(c) != spec_digest(b)
    diffs = _differences(
        a, "alice", {"fields": shared_fields(a)}, "bob", {"fields": shared_fields(b)}
    )
    assert diffs == [
        "normalize.phone differs (alice: [nfkc, e164(region=CN)], bob: [nfkc, e164(region=US)])"
    ]


def test_salt_file_is_read_checked_and_only_its_fingerprint_leaves(tmp_path):
    (tmp_path / "short.txt").write_text("tiny\n")
    with pytest.raises(PreflightError, match="at least 16 bytes"):
        normalize.read_salt(tmp_path / "short.txt", "parties.alice.salt_file")
    (tmp_path / "salt.txt").write_bytes(b"0123456789abcdef0123\r\n")
    salt = normalize.read_salt(tmp_path / "salt.txt", "x")
    assert salt == b"0123456789abcdef0123"
    fp = normalize.salt_fingerprint("job-1", salt)
    assert len(fp) == 16 and fp != normalize.salt_fingerprint("job-2", salt)
    assert salt.hex() not in fp


def test_result_digest_changes_with_a_lost_row_or_another_order_but_not_with_chunking():
    key = agreement.digest_key("n1", "n2")
    assert key == agreement.digest_key("n2", "n1")  # the same at both sides
    values = ["a", "bc", "", "d"]
    base = agreement.keys_digest([pa.array(values)], key)
    chunked = pa.chunked_array([pa.array(values[:1]), pa.array(values[1:])])
    assert agreement.keys_digest([chunked], key) == base
    assert agreement.keys_digest([pa.array(values[:-1])], key) != base
    assert agreement.keys_digest([pa.array(["bc", "a", "", "d"])], key) != base
    assert agreement.keys_digest([pa.array(["ab", "c", "", "d"])], key) != base  # boundaries
    assert agreement.keys_digest([pa.array(values)], agreement.digest_key("n1", "n3")) != base


def _reference_digest(columns: list[list[str]], key: bytes) -> str:
    """The result digest's definition, value by value in plain Python: per column the count,
    the 64-bit offsets from 0, then the UTF-8 bytes (what both versions of a peer compute)."""
    h = hashlib.blake2b(key=key, digest_size=32)
    for values in columns:
        encoded = [v.encode() for v in values]
        h.update(len(encoded).to_bytes(8, "little"))
        at = 0
        h.update(at.to_bytes(8, "little"))
        for raw in encoded:
            at += len(raw)
            h.update(at.to_bytes(8, "little"))
        h.update(b"".join(encoded))
    return h.hexdigest()


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.lists(st.text(max_size=6), max_size=30), min_size=1, max_size=3),
    st.data(),
)
def test_result_digest_is_its_definition_however_the_column_is_chunked_or_typed(columns, draw):
    """The digest streams over a column's chunks without combining them; it must still be the
    documented value for any split into chunks, sliced chunks and string or large_string."""
    key = agreement.digest_key("n1", "n2")
    arrays = []
    for values in columns:
        cuts = sorted(draw.draw(st.lists(st.integers(0, len(values)), max_size=4)))
        bounds = [0, *cuts, len(values)]
        kind = draw.draw(st.sampled_from([pa.string(), pa.large_string()]))
        padded = pa.array(["pad", *values, "pad"], kind)  # chunks are slices, offset != 0
        chunks = [padded.slice(1 + a, b - a) for a, b in itertools.pairwise(bounds)]
        arrays.append(pa.chunked_array(chunks, kind))
    assert agreement.keys_digest(arrays, key) == _reference_digest(columns, key)


def test_the_example_job_in_jobs_is_a_valid_spec():
    spec = load_spec(Path(__file__).parent.parent / "jobs" / "alice_bob_normalize.yaml")
    assert spec.normalize["phone"][-1] == Step("e164", region="CN")
    assert spec.parties["bob"].prehashed == {"email": "sha256_hex"}
