"""Unit tests of the broker's route table (broker/routes.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from broker.errors import RouteError
from broker.routes import RouteTableFile, load_route_table, parse_route_table

OSX_SEED = {
    "route_table": {
        "9999": {"fateflow": [{"port": 9360, "ip": "localhost"}]},
        "10000": {"default": [{"port": 9370, "ip": "192.168.0.2"}]},
    },
    "self_party": ["9999"],
}


def problems_of(doc: object, source: str = "route_table.json") -> list[str]:
    text = doc if isinstance(doc, str) else json.dumps(doc)
    with pytest.raises(RouteError) as info:
        parse_route_table(text, source)
    return info.value.problems


def one_route(entry: dict) -> dict:
    return {"route_table": {"bob": {"default": [entry]}}, "self_party": ["alice"]}


def test_osx_seed_loads() -> None:
    table = parse_route_table(json.dumps(OSX_SEED))
    assert table.self_parties == frozenset({"9999"})
    assert table.is_self("9999") and not table.is_self("10000")
    assert "9999" not in table.routes  # the self "fateflow" entry is not a route
    assert table.lookup("9999") == ()
    (hop,) = table.lookup("10000")
    assert hop.protocol == "grpc"
    assert (hop.ip, hop.port) == ("192.168.0.2", 9370)
    assert hop.party == "10000"
    assert hop.use_ssl is False
    assert hop.target == "192.168.0.2:9370"
    assert table.knows("9999") and table.knows("10000") and not table.knows("8888")
    assert table.lookup("8888") == ()  # no catch-all in the seed


def test_http_route() -> None:
    url = "https://10.0.0.3:9443/v1/interconn/chan/invoke"
    table = parse_route_table(json.dumps(one_route({"protocol": "HTTP", "url": url})))
    (hop,) = table.lookup("bob")
    assert hop.protocol == "http"
    assert hop.url == url
    assert hop.target == url
    assert hop.use_ssl is True  # https implies TLS
    assert hop.ip is None and hop.port is None


def test_several_hops_keep_order_and_port_as_text() -> None:
    doc = {
        "route_table": {"bob": {"default": [{"ip": "a", "port": 1}, {"ip": "b", "port": "2"}]}},
        "self_party": ["alice"],
    }
    hops = parse_route_table(json.dumps(doc)).lookup("bob")
    assert [(h.ip, h.port) for h in hops] == [("a", 1), ("b", 2)]


def test_default_party_is_the_catch_all() -> None:
    doc = {
        "route_table": {
            "bob": {"default": [{"ip": "10.0.0.2", "port": 9370}]},
            "default": {"default": [{"ip": "hub", "port": 9371}]},
        },
        "self_party": ["alice"],
    }
    table = parse_route_table(json.dumps(doc))
    assert [h.target for h in table.lookup("bob")] == ["10.0.0.2:9370"]
    assert [h.target for h in table.lookup("carol")] == ["hub:9371"]
    assert not table.knows("carol")


def test_non_default_role_of_a_peer_is_warned_and_ignored() -> None:
    doc = {
        "route_table": {
            "bob": {"default": [{"ip": "h", "port": 1}], "fateflow": [{"ip": "h", "port": 2}]}
        },
        "self_party": ["alice"],
    }
    table = parse_route_table(json.dumps(doc))
    assert [h.port for h in table.lookup("bob")] == [1]
    assert table.warnings == ("route_table.bob.fateflow: only 'default' routes are used; ignored",)


def test_invalid_json_mentions_line_and_column() -> None:
    text = '{\n  "route_table": {\n    "bob": {"default": [}\n  }\n}'
    problems = problems_of(text)
    assert len(problems) == 1
    assert problems[0].startswith("not valid JSON at line 3, column ")


def test_top_level_must_be_object() -> None:
    assert problems_of("[]") == ["the top level must be a JSON object"]


def test_missing_self_party() -> None:
    doc = {"route_table": OSX_SEED["route_table"]}
    problems = problems_of(doc)
    assert len(problems) == 1
    assert problems[0].startswith("self_party: required")


def test_missing_route_table_and_unknown_key() -> None:
    problems = problems_of({"self_party": ["a"], "routes": {}})
    assert sorted(p.split(":", 1)[0] for p in problems) == ["route_table", "routes"]


@pytest.mark.parametrize(
    "entry, culprit",
    [
        ({"port": 9370}, "route_table.bob.default[0].ip: required"),
        ({"ip": "10.0.0.2"}, "route_table.bob.default[0].port: required"),
        ({"ip": "10.0.0.2", "port": 70000}, "route_table.bob.default[0].port: required"),
        ({"ip": "10.0.0.2", "port": True}, "route_table.bob.default[0].port: required"),
        ({"ip": "", "port": 1}, "route_table.bob.default[0].ip: required"),
    ],
)
def test_route_needs_ip_and_port(entry: dict, culprit: str) -> None:
    problems = problems_of(one_route(entry))
    assert len(problems) == 1
    assert problems[0].startswith(culprit)


def test_route_missing_both_reports_both() -> None:
    problems = problems_of(one_route({}))
    assert [p.split(":", 1)[0] for p in problems] == [
        "route_table.bob.default[0].ip",
        "route_table.bob.default[0].port",
    ]


def test_bad_protocol() -> None:
    problems = problems_of(one_route({"ip": "h", "port": 1, "protocol": "udp"}))
    assert problems == ["route_table.bob.default[0].protocol: must be grpc or http, got 'udp'"]


@pytest.mark.parametrize("url", [None, "", "10.0.0.2:9380/v1", "ftp://h/x", "http://"])
def test_http_route_needs_url(url) -> None:
    entry = {"protocol": "http"} if url is None else {"protocol": "http", "url": url}
    problems = problems_of(one_route(entry))
    assert len(problems) == 1
    assert problems[0].startswith("route_table.bob.default[0].url: an http route needs a url")


@pytest.mark.parametrize(
    "entry, culprit",
    [
        ({"ip": "h", "port": "²"}, "route_table.bob.default[0].port: required"),
        ({"ip": "h", "port": "0" * 5000 + "1"}, "route_table.bob.default[0].port: required"),
        ({"protocol": "http", "url": "http://[::1/x"}, "route_table.bob.default[0].url: an http"),
    ],
)
def test_port_or_url_that_python_cannot_read_is_reported_not_raised(entry, culprit) -> None:
    # int() refuses some digits ("²") and very long numbers, urlsplit() an unclosed "[":
    # each is a problem of the table, not a ValueError out of the parser.
    problems = problems_of(one_route(entry))
    assert len(problems) == 1
    assert problems[0].startswith(culprit)


def test_unknown_route_key() -> None:
    problems = problems_of(one_route({"ip": "h", "port": 1, "hostname": "x"}))
    assert problems == ["route_table.bob.default[0].hostname: unknown key"]


def test_keystore_keys_accepted_but_use_keystore_refused() -> None:
    # An OSX table that names a keystore without using it still loads.
    parse_route_table(
        json.dumps(one_route({"ip": "h", "port": 1, "useKeyStore": False, "keyStoreFile": "x.jks"}))
    )
    problems = problems_of(one_route({"ip": "h", "port": 1, "useKeyStore": True}))
    assert len(problems) == 1
    assert problems[0].startswith("route_table.bob.default[0].useKeyStore: Java keystores")
    assert "caFile" in problems[0]


def test_use_ssl_must_be_bool() -> None:
    problems = problems_of(one_route({"ip": "h", "port": 1, "useSSL": "true"}))
    assert problems == ["route_table.bob.default[0].useSSL: must be true or false"]


def test_empty_route_list() -> None:
    doc = {"route_table": {"bob": {"default": []}}, "self_party": ["alice"]}
    assert problems_of(doc) == ["route_table.bob.default: must be a non-empty list of routes"]


def test_all_problems_at_once() -> None:
    doc = {
        "route_table": {
            "bob": {"default": [{"ip": "h"}, {"protocol": "http"}]},
            "carol": "nowhere",
        },
        "extra": 1,
    }
    problems = problems_of(doc)
    assert sorted(p.split(":", 1)[0] for p in problems) == sorted(
        [
            "extra",
            "self_party",
            "route_table.bob.default[0].port",
            "route_table.bob.default[1].url",
            "route_table.carol",
        ]
    )


def test_relative_ca_file_resolves_against_table_folder(tmp_path: Path, monkeypatch) -> None:
    conf = tmp_path / "conf"
    (conf / "certs").mkdir(parents=True)
    (conf / "certs" / "ca.crt").write_text("x")
    monkeypatch.chdir(tmp_path)  # not the table's folder
    path = conf / "route_table.json"
    path.write_text(
        json.dumps(one_route({"ip": "h", "port": 1, "useSSL": True, "caFile": "certs/ca.crt"}))
    )
    (hop,) = load_route_table(path).lookup("bob")
    assert hop.ca_file == str(conf / "certs" / "ca.crt")
    assert Path(hop.ca_file).is_absolute()
    assert hop.use_ssl is True


def test_missing_ca_file_reported(tmp_path: Path) -> None:
    path = tmp_path / "route_table.json"
    path.write_text(
        json.dumps(one_route({"protocol": "http", "url": "https://h:1/x", "caFile": "missing.crt"}))
    )
    with pytest.raises(RouteError) as info:
        load_route_table(path)
    assert info.value.problems == [
        f"route_table.bob.default[0].caFile: file not found: {tmp_path / 'missing.crt'}"
    ]


def test_missing_table_file(tmp_path: Path) -> None:
    with pytest.raises(RouteError) as info:
        load_route_table(tmp_path / "route_table.json")
    assert info.value.problems == ["file not found"]


# --- hot reload ----------------------------------------------------------------------------


def bump_mtime(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_reload_after_edit(tmp_path: Path) -> None:
    path = tmp_path / "route_table.json"
    path.write_text(json.dumps(OSX_SEED))
    rt = RouteTableFile(path)
    assert rt.reload_if_changed() == ("unchanged", None)
    assert rt.table.lookup("10000")[0].ip == "192.168.0.2"

    doc = json.loads(json.dumps(OSX_SEED))
    doc["route_table"]["10000"]["default"][0]["ip"] = "192.168.0.3"  # same length
    path.write_text(json.dumps(doc))
    bump_mtime(path)
    assert rt.reload_if_changed() == ("reloaded", None)
    assert rt.table.lookup("10000")[0].ip == "192.168.0.3"
    assert rt.reload_if_changed() == ("unchanged", None)


def test_broken_edit_is_rejected_and_old_table_kept(tmp_path: Path) -> None:
    path = tmp_path / "route_table.json"
    path.write_text(json.dumps(OSX_SEED))
    rt = RouteTableFile(path)
    old = rt.table

    path.write_text(json.dumps(OSX_SEED)[:-5])  # truncated JSON
    bump_mtime(path)
    status, detail = rt.reload_if_changed()
    assert status == "rejected"
    assert "not valid JSON" in detail and str(path) in detail
    assert rt.table is old
    assert rt.reload_if_changed() == ("unchanged", None)  # not re-reported every poll

    bad = json.loads(json.dumps(OSX_SEED))
    bad["route_table"]["10000"]["default"][0]["port"] = 0
    path.write_text(json.dumps(bad))
    bump_mtime(path)
    status, detail = rt.reload_if_changed()
    assert status == "rejected"
    assert "route_table.10000.default[0].port" in detail
    assert rt.table is old

    path.write_text(json.dumps(OSX_SEED))
    bump_mtime(path)
    assert rt.reload_if_changed() == ("reloaded", None)
    assert rt.table.lookup("10000")[0].port == 9370
