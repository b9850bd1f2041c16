"""Key normalisation and the result agreement check, end to end: two real parties, two real
brokers, the real SPU PSI, and every expectation computed independently with pandas and the
standard library (no psi-run or phonenumbers code in the expectations).

The inputs hold the same people written differently at the two parties (phone numbers in five
formats and three countries, e-mail addresses with case, spaces, gmail dots and +tags,
full-width characters that need NFKC); the result files must keep each party's own values.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import re
import subprocess
import unicodedata
from pathlib import Path

import pandas as pd
import yaml
from conftest import read_result, run_ok, write_csv, write_spec

from harness.localnet import psi_run_command, run_parties

# --- independent normalisers (the rules the README states, written again here) -----------


def phone_e164(text: str, region_code: str = "86") -> str:
    """NFKC; a '+' before the first digit means an international number; '00' is the
    international prefix and '0' the trunk prefix in China (the default region here)."""
    text = unicodedata.normalize("NFKC", text)
    digits = re.sub(r"[^0-9]", "", text)
    first_digit = re.search(r"[0-9]", text)
    plus = first_digit is not None and "+" in text[: first_digit.start()]
    if plus:
        return "+" + digits
    if digits.startswith("00"):
        return "+" + digits[2:]
    if digits.startswith("0"):
        return "+" + region_code + digits[1:]
    return "+" + region_code + digits


def email_key(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).strip().lower()
    local, _, domain = text.rpartition("@")
    if domain in ("gmail.com", "googlemail.com"):
        local = local.split("+", 1)[0].replace(".", "")
        domain = "gmail.com"
    return f"{local}@{domain}"


def full_width(text: str) -> str:
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else "\u3000" for c in text)


# --- inputs ----------------------------------------------------------------------------------


def _phone_formats(country: str, n: str) -> list[str]:
    """Five ways to write one number (``n``: the national significant number)."""
    if country == "CN":  # mobile, 11 digits
        a, b, c = n[:3], n[3:7], n[7:]
        return [f"+86 {a}-{b}-{c}", n, f"0086 {a} {b} {c}", f"(+86) {a} {b} {c}",
                full_width(f"+86 {a} {b} {c}")]  # fmt: skip
    if country == "US":
        a, b, c = n[:3], n[3:6], n[6:]
        return [f"+1 ({a}) {b}-{c}", f"+1-{a}-{b}-{c}", f"001 {a} {b} {c}", f"+1.{a}.{b}.{c}",
                full_width(f"+1 {a} {b} {c}")]  # fmt: skip
    a, b, c = n[:2], n[2:6], n[6:]  # GB, London
    return [f"+44 {a} {b} {c}", f"0044 {a} {b} {c}", f"+44-{a}-{b}-{c}", f"(+44) {a} {b} {c}",
            full_width(f"+44 {a} {b} {c}")]  # fmt: skip


def _numbers(rng: random.Random, count: int) -> list[tuple[str, str]]:
    out = []
    for i in range(count):
        country = ("CN", "US", "GB")[i % 3]
        if country == "CN":
            n = f"13{rng.randrange(10**9):09d}"
        elif country == "US":
            n = f"415555{rng.randrange(10**4):04d}"
        else:
            n = f"2079{rng.randrange(10**6):06d}"
        out.append((country, n))
    return list(dict.fromkeys(out))


BOB_INVALID = ["n/a", "12", ""]  # not a phone number, too short, empty


def phone_data(folder: Path, seed: int = 7) -> None:
    rng = random.Random(seed)
    numbers = _numbers(rng, 200)
    shared, alice_only, bob_only = numbers[:90], numbers[90:150], numbers[150:]
    alice, bob = [], []
    for i, (country, n) in enumerate(shared):
        formats = _phone_formats(country, n)
        alice.append(formats[i % 5])
        bob.append(formats[(i + 2) % 5])  # the same number, written another way
    alice += [_phone_formats(c, n)[0] for c, n in alice_only]
    bob += [_phone_formats(c, n)[3] for c, n in bob_only] + BOB_INVALID
    rng.shuffle(alice)
    rng.shuffle(bob)
    write_csv(
        folder / "data/alice.csv", {"phone": alice, "a": [f"a{i}" for i in range(len(alice))]}
    )
    write_csv(folder / "data/bob.csv", {"b": [f"b{i}" for i in range(len(bob))], "phone": bob})


def email_data(folder: Path) -> tuple[list[str], list[str]]:
    alice = [" Li.Wei@Example.com", "john.smith+news@gmail.com", full_width("mary@example.org"),
             "A.B@example.com", "Zhang.San@Example.CN ", "only.alice@example.com",
             "x.y.z+1@googlemail.com", "Case@Example.com"]  # fmt: skip
    bob = ["li.wei@example.com", "JohnSmith@googlemail.com", "MARY@EXAMPLE.ORG",
           "ab@example.com", "\tzhang.san@example.cn", "only.bob@example.com", "xyz@gmail.com",
           "case@example.com "]  # fmt: skip
    write_csv(folder / "data/alice.csv", {"email": alice, "n": [str(i) for i in range(len(alice))]})
    write_csv(folder / "data/bob.csv", {"email": bob, "m": [str(i) for i in range(len(bob))]})
    return alice, bob


def _frame(folder: Path, party: str) -> pd.DataFrame:
    return pd.read_csv(folder / f"data/{party}.csv", dtype=str, keep_default_na=False)


def _expected(mine: pd.DataFrame, theirs: pd.DataFrame, column: str, norm) -> pd.DataFrame:
    """This party's own rows (original values) whose normalised key the other party has."""
    their_keys = set(theirs[column].map(norm))
    return mine[mine[column].map(norm).isin(their_keys)]


def _same_rows(got: pd.DataFrame, want: pd.DataFrame) -> None:
    cols = list(want.columns)
    assert list(got.columns) == cols
    pd.testing.assert_frame_equal(
        got.sort_values(cols).reset_index(drop=True), want.sort_values(cols).reset_index(drop=True)
    )


# --- tests -----------------------------------------------------------------------------------


def test_phones_in_five_formats_and_three_countries_match_as_pandas_says(tmp_path, pair):
    phone_data(tmp_path)
    spec = write_spec(tmp_path, pair, job_id="nz-phone", keys=["phone"],
                      normalize={"phone": ["nfkc", {"e164": {"region": "CN"}}]},
                      on_invalid="drop")  # fmt: skip
    reports = {r["party"]: r for r in run_ok(spec, ["alice", "bob"])}
    a, b = _frame(tmp_path, "alice"), _frame(tmp_path, "bob")
    b_valid = b[~b["phone"].isin(BOB_INVALID)]
    want_a = _expected(a, b_valid, "phone", phone_e164)
    want_b = _expected(b_valid, a, "phone", phone_e164)
    assert len(want_a) == 90  # every shared person is found, whatever the format
    got_a = read_result(tmp_path / "out/alice_psi.csv")
    got_b = read_result(tmp_path / "out/bob_psi.csv")
    _same_rows(got_a, want_a)  # the files keep each party's own spelling
    _same_rows(got_b, want_b)
    # Row i of both files is the same person.
    assert list(got_a["phone"].map(phone_e164)) == list(got_b["phone"].map(phone_e164))
    assert reports["bob"]["normalize"] == {
        "phone": {"changed": len(b_valid), "empty": 1, "invalid": 2}
    }
    assert reports["bob"]["rows_used"] == len(b) - 3
    assert reports["alice"]["normalize"]["phone"]["invalid"] == 0
    for r in reports.values():
        assert r["intersection_count"] == 90
        assert r["agreement"] == {"checked": "count and keys in result order", "count": 90}


def test_emails_with_case_spaces_gmail_rules_and_full_width_match_as_pandas_says(tmp_path, pair):
    email_data(tmp_path)
    spec = write_spec(tmp_path, pair, job_id="nz-email", keys=["email"], protocol="KKRT",
                      normalize={"email": ["nfkc", {"email": {"gmail": True}}]})  # fmt: skip
    run_ok(spec, ["alice", "bob"])
    a, b = _frame(tmp_path, "alice"), _frame(tmp_path, "bob")
    want_a = _expected(a, b, "email", email_key)
    assert len(want_a) == 6  # not only.*, and a.b@ stays apart from ab@ outside gmail
    _same_rows(read_result(tmp_path / "out/alice_psi.csv"), want_a)
    _same_rows(read_result(tmp_path / "out/bob_psi.csv"), _expected(b, a, "email", email_key))


def test_prehashed_base64_column_matches_a_partner_that_hashes_with_the_salt(tmp_path, pair):
    alice, bob = email_data(tmp_path)
    salt = b"0123456789abcdef-shared-out-of-band"
    (tmp_path / "salt.txt").write_bytes(salt + b"\n")

    def hashed(text: str) -> str:
        digest = hashlib.sha256(salt + email_key(text).encode()).digest()
        return base64.b64encode(digest).decode()

    b_hashed = [hashed(v) for v in bob]
    write_csv(
        tmp_path / "data/bob.csv", {"email": b_hashed, "m": [str(i) for i in range(len(bob))]}
    )
    spec_path = write_spec(tmp_path, pair, job_id="nz-hash", keys=["email"], receiver="bob",
                           broadcast_result=False,
                           normalize={"email": ["nfkc", {"email": {"gmail": True}},
                                                {"sha256": {"salt": True}}]})  # fmt: skip
    doc = yaml.safe_load(spec_path.read_text())
    doc["parties"]["alice"]["salt_file"] = "salt.txt"
    doc["parties"]["bob"]["prehashed"] = {"email": "sha256_base64"}
    spec_path.write_text(yaml.safe_dump(doc, allow_unicode=True, sort_keys=False))
    reports = {r["party"]: r for r in run_ok(spec_path, ["alice", "bob"])}
    a_hashes = {hashed(v) for v in alice}
    b_frame = _frame(tmp_path, "bob")
    _same_rows(read_result(tmp_path / "out/bob_psi.csv"), b_frame[b_frame["email"].isin(a_hashes)])
    assert not (tmp_path / "out/alice_psi.csv").exists()
    # Receiver-only: SPU tells alice nothing, so there is nothing she could compare.
    assert reports["alice"]["agreement"]["checked"] == "nothing"
    assert reports["bob"]["agreement"]["checked"] == "nothing"


def _spec_copy(folder: Path, name: str, doc: dict) -> Path:
    sub = folder / name
    sub.mkdir()
    for p in doc["parties"].values():
        p["input"] = str(folder / p["input"])
        p["output"] = str(folder / p["output"])
    (sub / "job.yaml").write_text(yaml.safe_dump(doc, allow_unicode=True, sort_keys=False))
    return sub / "job.yaml"


def test_other_steps_in_the_peers_spec_copy_are_refused_naming_the_column(tmp_path, pair):
    phone_data(tmp_path)
    spec = write_spec(tmp_path, pair, job_id="nz-mismatch", keys=["phone"], on_invalid="drop",
                      normalize={"phone": ["nfkc", {"e164": {"region": "CN"}}]})  # fmt: skip
    base = yaml.safe_load(spec.read_text())
    other = json.loads(json.dumps(base))
    other["normalize"]["phone"] = [{"e164": {"region": "US"}}]
    procs = []
    for party, doc in (("alice", base), ("bob", other)):
        command = psi_run_command(_spec_copy(tmp_path, party, doc), party)
        procs.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))  # fmt: skip
    for proc in procs:
        _out, err = proc.communicate(timeout=120)
        assert proc.returncode == 4, err
        assert (
            "normalize.phone differs (alice: [nfkc, e164(region=CN)], bob: [e164(region=US)])"
            in err
        )
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.csv"))


def test_a_result_row_lost_on_one_side_fails_both_and_writes_nothing(tmp_path, pair):
    email_data(tmp_path)
    spec = write_spec(tmp_path, pair, job_id="nz-disagree", keys=["email"],
                      normalize={"email": ["nfkc", "email"]})  # fmt: skip
    results = run_parties(spec, ["alice", "bob"], timeout_s=240,
                          extra_env={"PSI_RUN_TEST_DROP_RESULT_ROW": "bob"})  # fmt: skip
    lines = []
    for r in results:
        assert r.returncode == 5, r.stderr
        assert "Traceback" not in r.stderr
        line = next(x for x in r.stderr.splitlines() if "disagree" in x)
        lines.append(line.split("psi-run: ", 1)[-1])
        assert "alice: 4, bob: 3 in the intersection" in line
    assert lines[0] == lines[1]  # one clear line, the same at both sides
    out = tmp_path / "out"
    assert list(out.iterdir()) == []  # no result, no work files, no checkpoint to resume from
