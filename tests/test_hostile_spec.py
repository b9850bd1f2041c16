"""Hostile job specs (issue 16): every malformed spec is one short refusal with exit code 2.

First one regular test per class of spec that used to crash ("internal error"), hang or echo
itself whole; then generated specs (hypothesis): mutations of a valid spec, at the YAML value
level and at the text level, through ``parse_spec`` and ``load_spec``. No example may raise
anything but SpecError, take more than its deadline, or print a line longer than ``LINE_MAX``.
A few refusals also go through the real CLI (``psi-run SPEC --party alice --check``).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import finishes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.localnet import psi_run_command
from psi_runner.errors import LINE_MAX, SpecError
from psi_runner.link import LinkSettings
from psi_runner.spec import TIMEOUT_MAX_S, JobSpec, load_spec, parse_spec
from psi_runner.specfile import SPEC_MAX_BYTES, SPEC_MAX_VALUES

PREFIX = "psi-run: "
VALID_DOC = {
    "job_id": "demo-001",
    "keys": ["uid"],
    "receiver": "alice",
    "parties": {
        "alice": {"broker": "127.0.0.1:9380", "input": "a.csv", "output": "out/a.csv"},
        "bob": {"broker": "127.0.0.1:9381", "input": "b.csv", "output": "out/b.csv"},
    },
}
VALID = yaml.safe_dump(VALID_DOC, sort_keys=False)
NEXT_LINE = VALID.count("\n") + 1  # the number of a line added at the end of VALID
# An alias "bomb": each level holds nine of the one before; the last one expands to 9**6
# strings, which used to become a 12 MB error line.
BOMB = 'a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 7)
)


def spec_error(text: str, path: Path = Path("/tmp/hostile/job.yaml")) -> SpecError:
    with pytest.raises(SpecError) as info:
        parse_spec(text, path)
    assert_short(info.value)
    return info.value


def assert_short(exc: SpecError) -> None:
    """Every line the CLI would print for ``exc`` fits in LINE_MAX and holds no raw control
    character (those come out escaped)."""
    for line in str(exc).splitlines():
        assert len(PREFIX + line) <= LINE_MAX, f"{len(PREFIX + line)} characters: {line[:300]!r}"
        assert line.isprintable(), repr(line)


def with_value(key_path: tuple, value_text: str) -> str:
    """VALID with the value at ``key_path`` replaced by raw YAML text."""
    doc = yaml.safe_load(VALID)
    marker = "__VALUE__"
    node = doc
    for key in key_path[:-1]:
        node = node.setdefault(key, {})
    node[key_path[-1]] = marker
    return yaml.safe_dump(doc, sort_keys=False).replace(marker, value_text)


# --- numbers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key_path",
    [("job_id",), ("timeout_s",), ("link", "recv_timeout_ms"), ("keys",), ("receiver",)],
)
def test_integer_of_thousands_of_digits_is_refused_by_its_size(key_path) -> None:
    exc = spec_error(with_value(key_path, "9" * 5000))
    assert exc.problems[0].startswith(".".join(key_path) + ": ")
    assert "<a number of 5000 digits>" in str(exc)
    assert "integer string conversion" not in str(exc)


def test_integer_of_thousands_of_digits_as_party_name_is_refused() -> None:
    # "? key" is YAML's explicit key: a plain key is at most 1024 characters.
    exc = spec_error(VALID.replace("  bob:", "  ? " + "7" * 6000 + "\n  :"))
    assert "party names use" in str(exc)
    assert "7" * 50 not in str(exc) and "digits>" in str(exc)


@pytest.mark.parametrize("value", [".nan", ".NaN", ".inf", "-.inf", "1.0e+400", "0", "-1", "86401"])
def test_timeout_that_is_not_a_finite_number_of_seconds_up_to_a_day_is_refused(value) -> None:
    exc = spec_error(VALID + f"timeout_s: {value}\n")
    assert exc.problems == [
        f"timeout_s: must be a number of seconds > 0 and at most {TIMEOUT_MAX_S} (a day), "
        f"got {yaml.safe_load(value)!r}"
    ]


def test_timeout_of_a_day_is_accepted() -> None:
    assert parse_spec(VALID + "timeout_s: 86400\n", Path("/tmp/j.yaml")).timeout_s == 86_400.0


@pytest.mark.parametrize(
    "setting, bad",
    [
        ("connect_retry_times", 10_001),
        ("connect_retry_interval_ms", 600_001),
        ("recv_timeout_ms", 604_800_001),
        ("http_timeout_ms", 604_800_001),
        ("http_max_payload_size", 256 * 1024 * 1024 + 1),
        ("throttle_window_size", 10_001),
    ],
)
def test_link_settings_have_upper_bounds(setting, bad) -> None:
    exc = spec_error(VALID + f"link: {{{setting}: {bad}}}\n")
    assert exc.problems[0].startswith(f"link.{setting}: must be between ")
    assert exc.problems[0].endswith(f"and {bad - 1}, got {bad}")
    ok = parse_spec(VALID + f"link: {{{setting}: {bad - 1}}}\n", Path("/tmp/j.yaml"))
    assert getattr(ok.link, setting) == bad - 1


@pytest.mark.parametrize("value", [".nan", ".inf", "1.5"])
def test_link_settings_refuse_non_whole_numbers(value) -> None:
    exc = spec_error(VALID + f"link: {{recv_timeout_ms: {value}}}\n")
    assert exc.problems[0].startswith("link.recv_timeout_ms: must be a whole number, got ")


# --- structure -------------------------------------------------------------------------------


def test_deep_nesting_is_refused_at_its_line_not_by_a_recursion_error() -> None:
    exc = spec_error(VALID + "link: " + "[" * 5000 + "]" * 5000 + "\n")
    assert f"not valid YAML at line {NEXT_LINE}" in str(exc)
    assert "nested more than 10 deep" in str(exc)


def test_alias_bomb_is_refused_in_one_short_line() -> None:
    exc = spec_error(VALID + BOMB + "protocol: *a6\n")
    assert len(str(exc)) < LINE_MAX
    assert "aliases (*name) are not allowed" in str(exc)
    assert f"line {NEXT_LINE + 1}" in str(exc)  # the first alias, in a1


def test_more_values_than_the_cap_are_refused_before_they_are_built() -> None:
    exc = spec_error(VALID + "keys2: [" + ", ".join(["k"] * (SPEC_MAX_VALUES + 10)) + "]\n")
    assert f"more than {SPEC_MAX_VALUES} values" in str(exc)


@pytest.mark.parametrize(
    "value",
    [
        "!!int abc",
        "!!int",
        "!!bool maybe",
        "!!float x",
        "!!float " + "9:" * 400 + "9",  # sexagesimal: OverflowError in PyYAML
        "!!timestamp 2024-13-99",
    ],
)
def test_explicit_tag_that_does_not_fit_its_value_is_a_yaml_problem(value) -> None:
    exc = spec_error(VALID + f"timeout_s: {value}\n")
    assert str(exc).count("\n") == 0
    assert f"not valid YAML at line {NEXT_LINE}, column 12" in str(exc)


@pytest.mark.parametrize("value", ["!!binary aGk=", "!!set {a, b}", "!foo x", "!!python/none x"])
def test_tags_a_spec_never_needs_are_refused(value) -> None:
    exc = spec_error(VALID + f"protocol: {value}\n")
    assert "has no use in a job spec" in str(exc)


def test_many_problems_are_listed_twenty_and_counted() -> None:
    text = VALID + "".join(f"unknown_{i}: 1\n" for i in range(50))
    exc = spec_error(text)
    lines = str(exc).splitlines()
    assert lines[0].endswith(": 50 problems:")
    assert len(lines) == 22 and lines[-1] == "  ... and 30 more"


# --- text ------------------------------------------------------------------------------------


@pytest.mark.parametrize("char", ["\x00", "\x1b", "\x7f", "\x9f"])
def test_control_character_in_the_yaml_names_line_and_column(char) -> None:
    text = VALID.replace("job_id: demo-001", f"job_id: demo{char}001")
    exc = spec_error(text)
    code = f"U+{ord(char):04X}"
    assert exc.problems[0].startswith("not valid YAML at line 1, column 13: ")
    assert code in exc.problems[0] and "not allowed in a YAML file" in exc.problems[0]


@pytest.mark.parametrize(
    "key_path", [("parties", "bob", "input"), ("parties", "alice", "output"), ("keys", 0)]
)
@pytest.mark.parametrize("escape, what", [("\\0", "a NUL byte"), ("\\e", "a control character")])
def test_nul_or_control_character_in_a_path_or_column_name_is_refused(
    key_path, escape, what
) -> None:
    doc = yaml.safe_load(VALID)
    node = doc
    for key in key_path[:-1]:
        node = node[key]
    node[key_path[-1]] = "__X__"
    text = yaml.safe_dump(doc, sort_keys=False).replace("__X__", f'"data/{escape}x.csv"')
    exc = spec_error(text)
    where = ".".join(map(str, key_path)) if key_path[0] != "keys" else "keys[0]"
    assert exc.problems[0].startswith(f"{where}: holds {what}")


@pytest.mark.parametrize("escape", ["\\uD800", "\\uDFFF"])
def test_lone_surrogate_in_a_path_is_refused(escape) -> None:
    exc = spec_error(VALID.replace("input: b.csv", f'input: "b{escape}.csv"'))
    assert "not valid YAML at line" in str(exc) or "lone surrogate" in str(exc)
    # Given as text directly (as a caller of parse_spec could), it is the YAML reader's problem.
    exc = spec_error(VALID.replace("b.csv", "b\ud800.csv"))
    assert "a lone surrogate (U+D800) is not allowed" in str(exc)


def test_nul_byte_and_surrogate_in_the_spec_path_are_spec_errors() -> None:
    for path in ("/tmp/a\x00b.yaml", "/tmp/a\ud800.yaml"):
        with pytest.raises(SpecError) as info:
            load_spec(path)
        assert_short(info.value)


@pytest.mark.parametrize("value", ['"demo-001\\n"', '"demo 001"', "demo\u00e9"])
def test_job_id_with_a_final_newline_or_other_character_is_refused(value) -> None:
    exc = spec_error(VALID.replace("demo-001", value))
    assert exc.problems[0].startswith("job_id: use 1-64 letters")


@pytest.mark.parametrize(
    "broker", ["127.0.0.1:\u0669\u0663\u0668\u0660", "127.0.0.1:09380x", "a b:80", "x/y:80"]
)
def test_broker_address_with_non_ascii_port_or_url_characters_is_refused(broker) -> None:
    exc = spec_error(VALID.replace("127.0.0.1:9381", broker))
    assert exc.problems[0].startswith("parties.bob.broker: must be host:port")


@pytest.mark.parametrize(
    "key_path",
    [
        ("protocol",),
        ("job_id",),
        ("keys", 0),
        ("parties", "bob", "broker"),
        ("parties", "bob", "input"),
        ("link", "brpc_channel_protocol"),
        ("left_side",),
    ],
)
def test_a_10000_character_value_is_quoted_short(key_path) -> None:
    doc = yaml.safe_load(VALID)
    node = doc
    for key in key_path[:-1]:
        node = node.setdefault(key, {})
    node[key_path[-1]] = "x" * 10_000
    if key_path == ("left_side",):
        doc["join"] = "left"
    exc = spec_error(yaml.safe_dump(doc, sort_keys=False))
    assert "x" * 100 not in str(exc)


def test_a_10000_character_key_or_party_name_is_quoted_short() -> None:
    exc = spec_error(VALID + "y" * 10_000 + ": 1\n")  # over 1024: not even a YAML key
    assert "y" * 100 not in str(exc)
    exc = spec_error(VALID + "? " + "y" * 10_000 + "\n: 1\n")
    assert exc.problems[0].startswith("'yyyyy")
    exc = spec_error(VALID.replace("  bob:", "  ? " + "z" * 10_000 + "\n  :"))
    assert "z" * 100 not in str(exc) and "party names use" in str(exc)


def test_unresolvable_paths_are_spec_problems(tmp_path) -> None:
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    exc = spec_error(VALID.replace("b.csv", "~no-such-user-xyz/b.csv"), tmp_path / "job.yaml")
    assert exc.problems[0].startswith("parties.bob.input: cannot resolve '~no-such-user-xyz")
    exc = spec_error(VALID.replace("b.csv", "loop1/b.csv"), tmp_path / "job.yaml")
    assert exc.problems[0].startswith("parties.bob.input: cannot resolve 'loop1/b.csv'")


# --- the spec file ---------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom", "/dev/null"])
def test_spec_path_that_is_a_device_is_refused_unread(device) -> None:
    with pytest.raises(SpecError) as info:
        finishes(lambda: load_spec(device), 5)
    assert info.value.problems == ["is a character device, not a regular file; give the YAML file"]


def test_spec_path_that_is_a_fifo_is_refused_without_blocking(tmp_path) -> None:
    fifo = tmp_path / "job.yaml"
    os.mkfifo(fifo)
    try:
        with pytest.raises(SpecError) as info:
            finishes(lambda: load_spec(fifo), 5)
        assert "is a named pipe (FIFO), not a regular file" in info.value.problems[0]
    finally:  # should open() have blocked, a writer lets it go
        fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
        os.close(fd)


def test_spec_larger_than_1_mib_is_refused_by_its_size(tmp_path) -> None:
    big = tmp_path / "job.yaml"
    with open(big, "wb") as fh:
        fh.truncate(SPEC_MAX_BYTES + 1)  # sparse: zeros, which would also not be YAML
    with pytest.raises(SpecError) as info:
        load_spec(big)
    assert info.value.problems == [f"is {SPEC_MAX_BYTES + 1} bytes; a job spec is at most "
                                   f"{SPEC_MAX_BYTES} bytes (1 MiB)"]  # fmt: skip


def test_spec_that_is_not_utf8_names_the_byte(tmp_path) -> None:
    path = tmp_path / "job.yaml"
    path.write_bytes(VALID.encode() + b"protocol: \xff\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert info.value.problems[0].startswith(
        f"not UTF-8 text (byte 0xff at line {NEXT_LINE}, byte offset {len(VALID) + 10})"
    )


# --- through the CLI -------------------------------------------------------------------------


def run_check(spec: Path, logs: Path) -> tuple[int, list[str]]:
    """``psi-run SPEC --party alice --check``: its exit code and its refusal's lines."""
    r = subprocess.run(
        psi_run_command(spec, "alice", logs, "--check"), capture_output=True, text=True, timeout=60
    )
    assert "Traceback" not in r.stderr, r.stderr
    assert r.stdout == "", r.stdout
    lines = [ln for ln in r.stderr.splitlines() if not ln.startswith(PREFIX + "log file ")]
    assert lines and lines[0].startswith(PREFIX), r.stderr
    for line in lines:
        assert len(line) <= LINE_MAX, f"{len(line)} characters: {line[:300]!r}"
    return r.returncode, lines


@pytest.mark.parametrize(
    "name, text, needle",
    [
        ("bomb", VALID + BOMB + "protocol: *a6\n", "aliases (*name) are not allowed"),
        ("nan", VALID + "timeout_s: .nan\n", "timeout_s: must be a number of seconds > 0"),
        ("huge", VALID.replace("demo-001", "9" * 5000), "<a number of 5000 digits>"),
        ("long", VALID + "protocol: " + "x" * 10_000 + "\n", "(10000 characters)"),
        ("deep", VALID + "link: " + "[" * 5000 + "\n", "nested more than 10 deep"),
        ("ctrl", VALID.replace("demo-001", "demo\x1b001"), "control character U+001B"),
    ],
)
def test_cli_refuses_a_hostile_spec_with_exit_2_and_one_short_line(
    tmp_path, name, text, needle
) -> None:
    spec = tmp_path / f"{name}.yaml"
    spec.write_text(text, encoding="utf-8")
    code, lines = run_check(spec, tmp_path / "logs")
    assert code == 2, lines
    assert len(lines) == 1 and needle in lines[0], lines


def test_cli_refuses_dev_zero_as_spec_at_once(tmp_path) -> None:
    code, lines = run_check(Path("/dev/zero"), tmp_path / "logs")
    assert code == 2
    assert lines == [PREFIX + "/dev/zero: is a character device, not a regular file; give the "
                     "YAML file"]  # fmt: skip


# --- generated specs (hypothesis) ------------------------------------------------------------


class _Digits(str):
    """A whole number written out, however long (yaml.safe_dump would call str(int))."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_Digits, lambda d, v: d.represent_scalar("tag:yaml.org,2002:int", v))

HOSTILE = list("\x00\x01\x08\x0b\x1b\x7f\x85\x9f\u2028\ufeff\n\t\r \"'\\:#&*!%@`{}[],|>-~?é张")
texts = st.text(max_size=30) | st.text(st.sampled_from([*HOSTILE, "a", "0", "."]), max_size=30)
long_texts = st.integers(150, 12_000).map(lambda n: "x" * n)
huge_ints = st.integers(90, 6_000).map(lambda n: _Digits("9" * n))
numbers = (
    st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([0, -1, 1, 2**31, 86_400, 86_401])
)
scalars = st.none() | st.booleans() | numbers | huge_ints | texts | long_texts
keys_ = st.text(max_size=12) | st.integers(-5, 10**6) | st.sampled_from(["alice", "bob", "uid"])
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys_, inner, max_size=3),
    max_leaves=12,
)
deep = st.integers(3, 30).map(lambda n: "[" * n + "]" * n)
KEY_PATHS = [
    ("job_id",),
    ("keys",),
    ("keys", 0),
    ("receiver",),
    ("timeout_s",),
    ("protocol",),
    ("backend",),
    ("api",),
    ("join",),
    ("left_side",),
    ("ecdh_curve",),
    ("broadcast_result",),
    ("allow_duplicate_keys",),
    ("parties",),
    ("parties", "alice"),
    ("parties", "bob", "broker"),
    ("parties", "alice", "input"),
    ("parties", "alice", "output"),
    ("parties", "bob", "ray_address"),
    ("link",),
    ("link", "recv_timeout_ms"),
    ("link", "connect_retry_times"),
    ("link", "http_max_payload_size"),
    ("link", "brpc_channel_connection_type"),
]
SNIPPETS = [
    "\x00", "\x1b", "&a ", "*a", "!!int ", "!!float ", "!!binary ", "!!timestamp ", "!foo ",
    "[" * 40, "{", "? ", "<<: ", "- ", "\t", "'", '"', "\ud800", "\ufeff", "---\n", "%YAML 1.1\n",
    "\n  x: 1\n", ": ", "#", "|", ">\n", "9" * 5000, ".nan", "\\", "\r",
]  # fmt: skip


@st.composite
def mutated_docs(draw) -> dict:
    """VALID_DOC with one to three values replaced, removed or renamed."""
    doc = yaml.safe_load(VALID)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(KEY_PATHS) | st.tuples(keys_))
        node = doc
        for key in path[:-1]:
            if not isinstance(node, (dict, list)):
                break
            if isinstance(node, dict):
                node = node.setdefault(key, {})
            elif isinstance(key, int) and key < len(node):
                node = node[key]
            else:
                break
        else:
            action = draw(st.sampled_from(["set", "set", "set", "delete", "rename"]))
            last = path[-1]
            if not isinstance(node, (dict, list)):
                continue
            if isinstance(node, list):
                if isinstance(last, int) and last < len(node):
                    node[last] = draw(values)
            elif action == "delete":
                node.pop(last, None)
            elif action == "rename" and last in node:
                node[draw(keys_ | huge_ints)] = node.pop(last)
            else:
                node[last] = draw(values | deep.map(yaml.safe_load))
    return doc


@st.composite
def spec_texts(draw) -> str:
    """A mutated spec as YAML text, perhaps with a snippet of raw text put in somewhere."""
    text = yaml.dump(draw(mutated_docs()), Dumper=_Dumper, sort_keys=False, allow_unicode=True)
    for _ in range(draw(st.integers(0, 2))):
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from(SNIPPETS) | texts) + text[at:]
    return text


def check_outcome(text: str, path: Path, load=None) -> None:
    """``load`` (parse_spec by default) gives a sane JobSpec or a short SpecError."""
    try:
        spec = load() if load else parse_spec(text, path)
    except SpecError as exc:
        assert_short(exc)
        assert exc.problems
        return
    assert_sane(spec)


ADDRESS = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[\w.-]+):[0-9]{1,5}")
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def assert_sane(spec: JobSpec) -> None:
    """Whatever a generated spec gets accepted with is within the documented bounds."""
    assert isinstance(spec.timeout_s, float) and math.isfinite(spec.timeout_s)
    assert 0 < spec.timeout_s <= TIMEOUT_MAX_S
    for name, value in spec.link.as_dict().items():
        if isinstance(value, int):
            assert 0 <= value <= 2**31 - 1, name
    assert spec.link == LinkSettings(**spec.link.as_dict())
    texts_ = [spec.job_id, *spec.keys, *spec.parties]
    for party in spec.parties.values():
        texts_ += [party.broker, str(party.input), str(party.output)]
        assert ADDRESS.fullmatch(party.broker), party.broker
    for text in texts_:
        assert isinstance(text, str) and not CONTROL.search(text), repr(text)


GENERATED = settings(
    max_examples=300,
    deadline=2000,  # ms per example; each takes a few
    database=None,  # no .hypothesis folder in the tree
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@GENERATED
@given(spec_texts())
def test_generated_specs_give_a_sane_spec_or_a_short_spec_error(text) -> None:
    check_outcome(text, Path("/tmp/hostile/job.yaml"))


@GENERATED
@given(mutated_docs())
def test_generated_spec_values_give_a_sane_spec_or_a_short_spec_error(doc) -> None:
    check_outcome(yaml.dump(doc, Dumper=_Dumper, sort_keys=False), Path("/tmp/hostile/job.yaml"))


@pytest.fixture(scope="module")
def spec_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("specs")


@settings(GENERATED, max_examples=150)
@given(spec_texts().map(lambda t: t.encode("utf-8", "surrogatepass")) | st.binary(max_size=400))
def test_generated_spec_files_give_a_sane_spec_or_a_short_spec_error(spec_dir, raw) -> None:
    path = spec_dir / "job.yaml"
    path.write_bytes(raw)
    check_outcome("", path, load=lambda: load_spec(path))
