"""Unit tests of broker.properties handling (broker/config.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.config import load_config, parse_properties
from broker.errors import ConfigError


def conf(tmp_path: Path, text: str) -> Path:
    (tmp_path / "broker.properties").write_text(text, encoding="utf-8")
    return tmp_path


def problems_of(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(conf(tmp_path, text))
    return info.value.problems


def test_defaults(tmp_path: Path) -> None:
    cfg = load_config(conf(tmp_path, "# nothing set\n"))
    assert cfg.grpc_port == 9370
    assert cfg.bind_host == "0.0.0.0"
    assert cfg.http_context_path == "/v1"
    assert cfg.queue_max_free_time_ms == 43_200_000
    assert cfg.queue_check_interval_ms == 60_000
    assert cfg.consume_msg_waiting_timeout_ms == 3_600_000
    assert cfg.open_http_server is False and cfg.http_port is None
    assert cfg.open_grpc_tls_server is False
    assert cfg.unknown_keys == () and cfg.ignored_keys == ()
    assert cfg.conf_dir == tmp_path.resolve()
    assert cfg.route_table_path == tmp_path.resolve() / "route_table.json"


def test_shipped_example_config_loads() -> None:
    cfg = load_config(Path(__file__).resolve().parents[1] / "conf" / "alice")
    assert cfg.open_http_server is True
    assert cfg.http_port is not None
    assert cfg.unknown_keys == ()


def test_properties_syntax() -> None:
    text = (
        "# hash comment = ignored\n"
        "! bang comment: ignored\n"
        "\n"
        "   \n"
        "a = 1\n"
        "b: two\n"
        "c=3\n"
        "d:4\n"
        "  e   =   spaced value  \n"
        "f 6\n"
        "g =\n"
        "h = x=y:z\n"
        "long = one, \\\n"
        "       two\n"
        "a = last wins\n"
    )
    assert parse_properties(text) == {
        "a": "last wins",
        "b": "two",
        "c": "3",
        "d": "4",
        "e": "spaced value",
        "f": "6",
        "g": "",
        "h": "x=y:z",
        "long": "one, two",
    }


def test_values_applied(tmp_path: Path) -> None:
    cfg = load_config(
        conf(
            tmp_path,
            (
                "grpc.port = 19370\n"
                "bind.host: 127.0.0.1\n"
                "open.http.server = TRUE\n"
                "http.port = 0\n"
                "http.context.path = api/\n"
                "queue.check.interval=5000\n"
                "forward.retry.timeout=0\n"
            ),
        )
    )
    assert cfg.grpc_port == 19370
    assert cfg.bind_host == "127.0.0.1"
    assert cfg.open_http_server is True
    assert cfg.http_port == 0  # port 0: pick a free port
    assert cfg.http_context_path == "/api"
    assert cfg.queue_check_interval_ms == 5000
    assert cfg.forward_retry_timeout_ms == 0


def test_empty_context_path_means_root(tmp_path: Path) -> None:
    assert load_config(conf(tmp_path, "http.context.path =\n")).http_context_path == ""


def test_bad_values_all_reported_with_key(tmp_path: Path) -> None:
    problems = problems_of(
        tmp_path,
        (
            "grpc.port=abc\n"
            "open.http.server=maybe\n"
            "http.port=70000\n"
            "queue.check.interval=0\n"
            "forward.retry.timeout=-1\n"
            "bind.host=\n"
        ),
    )
    assert [p.split(":", 1)[0] for p in problems] == [
        "grpc.port",
        "open.http.server",
        "http.port",
        "queue.check.interval",
        "forward.retry.timeout",
        "bind.host",
    ]
    assert "'abc'" in problems[0]
    assert problems[1] == "open.http.server: expected true or false, got 'maybe'"
    assert "70000" in problems[2]
    assert problems[5] == "bind.host: value is empty"
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert str(info.value).startswith(str(tmp_path.resolve() / "broker.properties") + ": ")


def test_http_server_needs_port(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, "open.http.server=true\n")
    assert problems == ["http.port: required when open.http.server = true"]


def test_https_and_grpc_tls_need_port_and_files(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, "open.https.server=true\nopen.grpc.tls.server=true\n")
    assert sorted(p.split(":", 1)[0] for p in problems) == sorted(
        [
            "https.port",
            "https.server.cert.chain.file",
            "https.server.private.key.file",
            "grpc.tls.port",
            "grpc.server.cert.chain.file",
            "grpc.server.private.key.file",
        ]
    )


def test_unknown_keys_collected(tmp_path: Path) -> None:
    cfg = load_config(conf(tmp_path, "grpc.prot = 1\nfoo.bar = x\ngrpc.port = 9371\n"))
    assert cfg.unknown_keys == ("grpc.prot", "foo.bar")
    assert cfg.grpc_port == 9371


def test_osx_only_keys_ignored(tmp_path: Path) -> None:
    cfg = load_config(
        conf(
            tmp_path,
            (
                "eggroll.cluster.manager.ip = localhost\n"
                "eggroll.cluster.manager.port = 4670\n"
                "grpc.server.keystore.file = x.jks\n"
            ),
        )
    )
    assert cfg.ignored_keys == (
        "eggroll.cluster.manager.ip",
        "eggroll.cluster.manager.port",
        "grpc.server.keystore.file",
    )
    assert cfg.unknown_keys == ()


def test_missing_properties_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert info.value.path == str(tmp_path.resolve() / "broker.properties")
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith("file not found; create it")


def test_tls_files_must_exist(tmp_path: Path) -> None:
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "server.crt").write_text("x")
    problems = problems_of(
        tmp_path,
        (
            "open.grpc.tls.server = true\n"
            "grpc.tls.port = 9371\n"
            "grpc.server.cert.chain.file = certs/server.crt\n"
            "grpc.server.private.key.file = certs/server.key\n"
            "https.server.ca.file = /nonexistent/ca.pem\n"
        ),
    )
    assert problems == [
        f"grpc.server.private.key.file: file not found: {tmp_path.resolve() / 'certs/server.key'}",
        "https.server.ca.file: file not found: /nonexistent/ca.pem",
    ]


def test_tls_files_resolved_against_conf_dir(tmp_path: Path, monkeypatch) -> None:
    for name in ("server.crt", "server.key", "ca.crt"):
        (tmp_path / name).write_text("x")
    monkeypatch.chdir("/")
    cfg = load_config(
        conf(
            tmp_path,
            (
                "open.grpc.tls.server = true\n"
                "grpc.tls.port = 9371\n"
                "grpc.server.cert.chain.file = server.crt\n"
                "grpc.server.private.key.file = server.key\n"
                "grpc.server.ca.file = ca.crt\n"
            ),
        )
    )
    assert cfg.resolve(cfg.grpc_server_ca_file) == tmp_path.resolve() / "ca.crt"
