"""Unit tests of the job spec (psi_runner/spec.py) and SPU link settings (psi_runner/link.py)."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest

from psi_runner.errors import SpecError
from psi_runner.link import LINK_DEFAULTS, LinkSettings, parse_link_settings
from psi_runner.spec import JobSpec, load_spec, parse_spec

VALID = """\
job_id: demo-001
keys: [uid]
receiver: alice
parties:
  alice:
    broker: 127.0.0.1:9380
    input: data/alice.csv
    output: out/alice_psi.csv
  bob:
    broker: 127.0.0.1:9381
    input: data/bob.csv
    output: out/bob_psi.csv
"""


def write(folder: Path, text: str, name: str = "job.yaml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def problems_of(folder: Path, text: str) -> list[str]:
    with pytest.raises(SpecError) as info:
        load_spec(write(folder, text))
    return info.value.problems


def with_link(link: str) -> str:
    return VALID + "link:\n" + textwrap.indent(textwrap.dedent(link), "  ")


# --- valid specs -------------------------------------------------------------------------


def test_valid_spec_has_defaults(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, VALID))
    assert spec.job_id == "demo-001"
    assert spec.protocol == "RR22"
    assert spec.keys == ("uid",)
    assert spec.receiver == "alice"
    assert spec.party_names == ["alice", "bob"]
    assert spec.peer_of("alice") == "bob"
    assert spec.broadcast_result is True
    assert spec.ecdh_curve == "CURVE_25519"
    link = spec.link
    assert link.connect_retry_times == 60
    assert link.connect_retry_interval_ms == 1000
    assert link.brpc_channel_protocol == "http"
    assert link.brpc_channel_connection_type == "short"
    assert link.recv_timeout_ms == 1_200_000
    assert link.http_timeout_ms == 1_200_000
    assert link.warnings() == []
    assert spec.parties["alice"].broker == "127.0.0.1:9380"


def test_omitted_keys_take_the_jobspec_field_defaults(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, VALID))
    defaults = {
        f.name: f.default
        for f in dataclasses.fields(JobSpec)
        if f.default is not dataclasses.MISSING
    }
    assert {name: getattr(spec, name) for name in defaults} == defaults
    assert spec.link == LinkSettings()
    assert type(spec.timeout_s) is float
    assert type(load_spec(write(tmp_path, VALID + "timeout_s: 30\n")).timeout_s) is float


def test_relative_paths_resolve_against_spec_folder(tmp_path: Path, monkeypatch) -> None:
    folder = tmp_path / "jobs" / "one"
    folder.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the current directory must not matter
    spec = load_spec(write(folder, VALID))
    alice = spec.parties["alice"]
    assert alice.input.is_absolute() and alice.output.is_absolute()
    assert alice.input == (folder / "data" / "alice.csv").resolve()
    assert alice.output == (folder / "out" / "alice_psi.csv").resolve()
    assert spec.path == (folder / "job.yaml").resolve()


def test_absolute_paths_kept(tmp_path: Path) -> None:
    target = tmp_path / "abs" / "in.csv"
    text = VALID.replace("data/bob.csv", str(target))
    spec = load_spec(write(tmp_path, text))
    assert spec.parties["bob"].input == target.resolve()


def test_numeric_party_names_become_strings(tmp_path: Path) -> None:
    spec = load_spec(
        write(
            tmp_path,
            """\
        job_id: 42
        keys: [uid]
        receiver: 9999
        parties:
          9999:
            broker: 127.0.0.1:9380
            input: a.csv
            output: a_out.csv
          10000:
            broker: 127.0.0.1:9381
            input: b.csv
            output: b_out.csv
        """,
        )
    )
    assert spec.party_names == ["9999", "10000"]
    assert all(isinstance(p, str) for p in spec.parties)
    assert spec.receiver == "9999"
    assert spec.parties["10000"].name == "10000"
    assert spec.peer_of("9999") == "10000"
    assert spec.job_id == "42"


def test_zero_padded_party_names_keep_their_text(tmp_path: Path) -> None:
    # YAML 1.1 would read 0001 as octal 1 and 0x10 as 16, silently renaming the parties.
    spec = load_spec(
        write(
            tmp_path,
            """\
        job_id: j
        keys: [uid]
        receiver: 0001
        parties:
          0001: {broker: "h:1", input: a.csv, output: a_out.csv}
          0x10: {broker: "h:2", input: b.csv, output: b_out.csv}
        link: {recv_timeout_ms: 1_200_000}
        """,
        )
    )
    assert spec.party_names == ["0001", "0x10"]
    assert spec.receiver == "0001"
    assert spec.link.recv_timeout_ms == 1_200_000  # decimal with '_' is still a number


def test_octal_link_value_is_not_a_number(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, with_link("recv_timeout_ms: 01200000\n"))
    assert problems == ["link.recv_timeout_ms: must be a whole number, got '01200000'"]


def test_list_as_key_is_a_spec_error(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, VALID + "[a, b]: 1\n")
    assert len(problems) == 1
    assert problems[0].startswith("not valid YAML at line 13, column 1: a key must be a plain")


def test_explicit_options(tmp_path: Path) -> None:
    text = VALID.replace(
        "job_id: demo-001",
        "job_id: demo-001\nprotocol: ecdh\necdh_curve: curve_sm2\nbroadcast_result: false",
    )
    spec = load_spec(
        write(
            tmp_path,
            text + "link:\n  connect_retry_times: 120\n  brpc_channel_connection_type: short\n",
        )
    )
    assert spec.protocol == "ECDH"
    assert spec.ecdh_curve == "CURVE_SM2"
    assert spec.broadcast_result is False
    assert spec.link.connect_retry_times == 120
    assert spec.link.brpc_channel_connection_type == "short"
    assert spec.link.connect_retry_interval_ms == 1000  # untouched keys keep their default


def test_broker_http_prefix_stripped(tmp_path: Path) -> None:
    text = VALID.replace("broker: 127.0.0.1:9380", "broker: http://localhost:9380/")
    spec = load_spec(write(tmp_path, text))
    assert spec.parties["alice"].broker == "localhost:9380"


# --- unreadable files --------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path / "nope.yaml")
    assert info.value.problems == ["file not found"]
    assert "nope.yaml" in str(info.value)


def test_folder_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path)
    assert "folder" in info.value.problems[0]


def test_invalid_yaml_reports_line(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, "job_id: x\nkeys: [uid\nreceiver: alice\n")
    assert len(problems) == 1
    assert problems[0].startswith("not valid YAML at line ")
    line = int(problems[0].split("at line ")[1].split(",")[0])
    assert line in (2, 3)  # the unclosed bracket is noticed on line 2 or 3


def test_duplicate_key_is_an_error(tmp_path: Path) -> None:
    text = VALID.replace(
        "    output: out/bob_psi.csv", "    output: out/bob_psi.csv\n    input: other.csv"
    )
    problems = problems_of(tmp_path, text)
    assert len(problems) == 1
    assert "'input' appears twice" in problems[0]
    assert "line 11 and line 13" in problems[0]


def test_duplicate_top_level_key(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, VALID + "receiver: bob\n")
    assert "'receiver' appears twice" in problems[0]


def test_not_a_mapping(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, "- a\n- b\n")
    assert problems == ["the file must be a YAML mapping of job settings"]


def test_empty_file(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, "")
    assert problems == ["the file must be a YAML mapping of job settings"]


# --- validation --------------------------------------------------------------------------


def test_unknown_keys_name_their_path(tmp_path: Path) -> None:
    text = (
        VALID.replace("    input: data/alice.csv", "    input: data/alice.csv\n    inptu: x")
        + "protocoll: RR22\nlink:\n  recv_timeout: 5\n"
    )
    problems = problems_of(tmp_path, text)
    assert len(problems) == 3
    assert any(p.startswith("protocoll: unknown key") for p in problems)
    assert any(p.startswith("parties.alice.inptu: unknown key") for p in problems)
    assert any(p.startswith("link.recv_timeout: unknown link setting") for p in problems)
    top = next(p for p in problems if p.startswith("protocoll"))
    assert top.endswith("(did you mean protocol?)")  # names the key it most likely meant


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    problems = problems_of(
        tmp_path,
        """\
        job_id: "bad id!"
        protocol: PSI
        keys: uid
        receiver: carol
        broadcast_result: "yes"
        parties:
          alice:
            broker: 127.0.0.1:9380
            input: a.csv
            output: a_out.csv
          bob:
            broker: nowhere
            output: b_out.csv
        link:
          recv_timeout_ms: "20"
        """,
    )
    prefixes = [p.split(":", 1)[0] for p in problems]
    assert sorted(prefixes) == sorted(
        [
            "job_id",
            "protocol",
            "keys",
            "receiver",
            "broadcast_result",
            "parties.bob.broker",
            "parties.bob.input",
            "link.recv_timeout_ms",
        ]
    )
    assert any("'carol' is not one of the parties" in p for p in problems)
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path / "job.yaml")
    assert f"{len(problems)} problems" in str(info.value)


def test_missing_required_keys(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, "protocol: RR22\n")
    prefixes = {p.split(":", 1)[0] for p in problems}
    assert prefixes == {"job_id", "keys", "receiver", "parties"}


def test_keys_must_be_a_list(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, VALID.replace("keys: [uid]", "keys: uid"))
    assert problems == ["keys: must be a list of key column names, e.g. keys: [uid], got 'uid'"]


def test_keys_listed_twice(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, VALID.replace("keys: [uid]", "keys: [uid, id, uid]"))
    assert problems == ["keys[2]: 'uid' is listed twice"]


def test_broadcast_result_must_be_bool(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, VALID + "broadcast_result: sometimes\n")
    assert problems == ["broadcast_result: must be true or false, got 'sometimes'"]


@pytest.mark.parametrize("value", ["'60'", "1.5", "true", "[1]"])
def test_link_value_must_be_int(tmp_path: Path, value: str) -> None:
    problems = problems_of(tmp_path, with_link(f"connect_retry_times: {value}\n"))
    assert len(problems) == 1
    assert problems[0].startswith("link.connect_retry_times: must be a whole number")


def test_link_value_range(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, with_link("recv_timeout_ms: 0\nhttp_timeout_ms: -5\n"))
    assert [p.split(":", 1)[0] for p in problems] == [
        "link.recv_timeout_ms",
        "link.http_timeout_ms",
    ]
    assert "between 1 and" in problems[0]


def test_link_must_be_mapping(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, VALID + "link: fast\n")
    assert problems == ["link: must be a mapping of SPU link settings"]


def test_receiver_not_among_parties(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, VALID.replace("receiver: alice", "receiver: carol"))
    assert problems == ["receiver: 'carol' is not one of the parties (alice, bob)"]


def test_receiver_number_must_match_party(tmp_path: Path) -> None:
    text = VALID.replace("receiver: alice", "receiver: 9999")
    problems = problems_of(tmp_path, text)
    assert problems[0].startswith("receiver: '9999' is not one of the parties")


def test_one_party_is_not_enough(tmp_path: Path) -> None:
    text = VALID.split("  bob:")[0]
    problems = problems_of(tmp_path, text)
    assert problems == ["parties: exactly two parties are needed, found 1"]


def test_three_parties_refused(tmp_path: Path) -> None:
    text = VALID + "  carol:\n    broker: h:1\n    input: c.csv\n    output: c_out.csv\n"
    # VALID ends inside parties.bob, so a two-space indent adds a third party.
    problems = problems_of(tmp_path, text)
    assert problems == ["parties: exactly two parties are needed, found 3"]


def test_party_settings_must_be_mapping(tmp_path: Path) -> None:
    text = VALID.split("  bob:")[0] + "  bob: 127.0.0.1:9381\n"
    problems = problems_of(tmp_path, text)
    assert problems == ["parties.bob: must be a mapping with broker, input and output"]


def test_bad_party_name(tmp_path: Path) -> None:
    text = VALID.replace("  bob:", "  'bob smith':")
    problems = problems_of(tmp_path, text)
    assert len(problems) == 1
    assert problems[0].startswith("parties.bob smith: party names use")


def test_ecdh_curve_needs_ecdh(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, VALID + "ecdh_curve: CURVE_25519\n")
    assert problems == ["ecdh_curve: only applies to protocol ECDH; remove it"]


def test_ecdh_curve_unknown(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, VALID + "protocol: ECDH\necdh_curve: P256\n")
    assert len(problems) == 1
    assert problems[0].startswith("ecdh_curve: must be one of CURVE_25519")


def test_brpc_protocol_other_than_http_refused(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, with_link("brpc_channel_protocol: h2\n"))
    assert len(problems) == 1
    assert problems[0].startswith("link.brpc_channel_protocol: must be http")
    assert "'h2'" in problems[0]


def test_single_connection_with_http_refused(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, with_link("brpc_channel_connection_type: single\n"))
    assert problems == ["link.brpc_channel_connection_type: http needs pooled or short, not single"]


def test_unknown_connection_type(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, with_link("brpc_channel_connection_type: many\n"))
    assert len(problems) == 1
    assert problems[0].startswith("link.brpc_channel_connection_type: must be one of")


def test_input_equal_output_refused(tmp_path: Path) -> None:
    # Different spellings of the same file still count as the same file.
    text = VALID.replace("output: out/bob_psi.csv", "output: ./data/../data/bob.csv")
    problems = problems_of(tmp_path, text)
    assert problems == ["parties.bob.output: must differ from the input file"]


@pytest.mark.parametrize(
    "broker", ["127.0.0.1", "localhost:http", ":9380", "host:0", "host:70000", "''"]
)
def test_broker_must_be_host_port(tmp_path: Path, broker: str) -> None:
    problems = problems_of(tmp_path, VALID.replace("127.0.0.1:9381", broker))
    assert len(problems) == 1
    assert problems[0].startswith("parties.bob.broker: ")
    if broker != "''":
        assert "must be host:port" in problems[0]
        assert repr(broker) in problems[0]


def test_paths_must_be_strings(tmp_path: Path) -> None:
    text = VALID.replace("input: data/bob.csv", "input: 12")
    problems = problems_of(tmp_path, text)
    assert len(problems) == 1
    assert problems[0].startswith("parties.bob.input: required, a file path")


def test_job_id_format(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, VALID.replace("demo-001", "-demo"))
    assert len(problems) == 1
    assert problems[0].startswith("job_id: use 1-64 letters")


def test_parse_spec_anchors_paths_on_given_path(tmp_path: Path) -> None:
    spec = parse_spec(VALID, tmp_path / "x" / "job.yaml")
    assert spec.parties["bob"].input == (tmp_path / "x" / "data" / "bob.csv").resolve()


# --- link settings directly --------------------------------------------------------------


def test_parse_link_settings_absent_gives_defaults() -> None:
    problems: list[str] = []
    settings = parse_link_settings(None, problems)
    assert problems == []
    assert settings == LinkSettings()
    assert settings.as_dict() == LINK_DEFAULTS


def test_parse_link_settings_collects_every_problem() -> None:
    problems: list[str] = []
    parse_link_settings(
        {"connect_retry_times": "x", "brpc_channel_protocol": "baidu_std", "bogus": 1},
        problems,
    )
    assert [p.split(":", 1)[0] for p in problems] == [
        "link.connect_retry_times",
        "link.brpc_channel_protocol",
        "link.bogus",
    ]


def test_zero_retries_allowed_but_warned() -> None:
    problems: list[str] = []
    settings = parse_link_settings({"connect_retry_times": 0}, problems)
    assert problems == []
    assert settings.connect_retry_times == 0
    assert any("retry window is 0 s" in w for w in settings.warnings())


def test_warning_short_retry_window() -> None:
    settings = LinkSettings(connect_retry_times=10, connect_retry_interval_ms=1000)
    warnings = settings.warnings()
    assert len(warnings) == 1
    assert warnings[0].startswith("link: the connect retry window is 10 s")
    assert "under 60 s" in warnings[0]


def test_no_warning_at_exactly_60_seconds() -> None:
    assert LinkSettings(connect_retry_times=30, connect_retry_interval_ms=2000).warnings() == []


def test_warning_short_recv_timeout() -> None:
    warnings = LinkSettings(recv_timeout_ms=599_999).warnings()
    assert len(warnings) == 1
    assert warnings[0].startswith("link.recv_timeout_ms: 599999 ms is under 10 minutes")
    assert LinkSettings(recv_timeout_ms=600_000).warnings() == []


def test_both_warnings_from_spec(tmp_path: Path) -> None:
    spec = load_spec(
        write(
            tmp_path,
            with_link(
                "connect_retry_times: 5\nconnect_retry_interval_ms: 100\nrecv_timeout_ms: 1000\n"
            ),
        )
    )
    warnings = spec.link.warnings()
    assert len(warnings) == 2
    assert "retry window is 0 s" in warnings[0]  # 0.5 s, rounded
    assert warnings[1].startswith("link.recv_timeout_ms: 1000 ms")


# --- backend, api, join (issue 4) -----------------------------------------------------------

RAY_PARTIES = VALID.replace(
    "    output: out/alice_psi.csv\n",
    "    output: out/alice_psi.csv\n    ray_address: 127.0.0.1:31000\n",
).replace(
    "    output: out/bob_psi.csv\n",
    "    output: out/bob_psi.csv\n    ray_address: 127.0.0.1:32000\n",
)


def test_backend_api_join_defaults(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, VALID))
    assert (spec.backend, spec.api, spec.join, spec.left_side) == ("embedded", "psi", "inner", None)


def test_ray_backend_reads_ray_addresses(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, "backend: ray\n" + RAY_PARTIES))
    assert spec.backend == "ray"
    assert spec.parties["alice"].ray_address == "127.0.0.1:31000"
    assert spec.parties["bob"].ray_address == "127.0.0.1:32000"


def test_ray_backend_needs_every_ray_address(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, "backend: ray\n" + VALID)
    assert len(problems) == 2
    assert problems[0].startswith("parties.alice.ray_address: required with backend: ray")


def test_ray_address_without_ray_backend_is_an_error(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, "backend: secretflow\n" + RAY_PARTIES)
    assert "only used with backend: ray" in problems[0]


def test_bad_ray_address(tmp_path: Path) -> None:
    text = "backend: ray\n" + RAY_PARTIES.replace("127.0.0.1:31000", "ray-head")
    assert problems_of(tmp_path, text) == [
        "parties.alice.ray_address: must be host:port, e.g. 127.0.0.1:31000, got 'ray-head'"
    ]


@pytest.mark.parametrize("key,value", [("backend", "spark"), ("api", "psi_v3"), ("join", "outer")])
def test_choices_are_checked(tmp_path: Path, key: str, value: str) -> None:
    problems = problems_of(tmp_path, f"{key}: {value}\n" + VALID)
    assert problems[0].startswith(f"{key}: must be one of ")
    assert repr(value) in problems[0]


def test_join_defaults_left_side_to_receiver(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, "join: LEFT\n" + VALID))
    assert (spec.join, spec.left_side) == ("left", "alice")
    spec = load_spec(write(tmp_path, "join: full\nleft_side: bob\n" + VALID))
    assert (spec.join, spec.left_side) == ("full", "bob")


def test_left_side_checks(tmp_path: Path) -> None:
    assert "only applies to join" in problems_of(tmp_path, "left_side: bob\n" + VALID)[0]
    assert (
        "must be one of the parties"
        in problems_of(tmp_path, "join: left\nleft_side: carol\n" + VALID)[0]
    )


def test_psi_csv_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    problems = problems_of(
        tmp_path, "api: psi_csv\njoin: left\nallow_duplicate_keys: true\n" + VALID
    )
    assert problems[0].startswith("join: left needs api: psi")
    assert problems[1].startswith("allow_duplicate_keys: the legacy psi_csv call cannot")


def test_backend_api_join_are_in_the_digest(tmp_path: Path) -> None:
    from psi_runner.digest import spec_digest

    base = spec_digest(load_spec(write(tmp_path, VALID)))
    for extra in (
        "backend: secretflow\n",
        "api: psi_csv\n",
        "join: left\n",
        "join: left\nleft_side: bob\n",
    ):
        assert spec_digest(load_spec(write(tmp_path, extra + VALID))) != base, extra
    # A party's own Ray head is local, like its paths: not part of the digest.
    ray1 = load_spec(write(tmp_path, "backend: ray\n" + RAY_PARTIES))
    ray2 = load_spec(write(tmp_path, "backend: ray\n" + RAY_PARTIES.replace("31000", "41000")))
    assert spec_digest(ray1) == spec_digest(ray2)
