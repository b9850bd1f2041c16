"""Brokers on one machine, for the demo, the tests and the benchmark.

``LocalBroker`` runs a real ``psi-broker`` process. Brokers listen on port 0 (no race for a
free port) and their route tables are written once every broker's bound gRPC and HTTP ports
are known; the brokers pick them up by hot reload.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .broker_client import urlopen

BIN = Path(sys.executable).parent


@dataclass
class LocalBroker:
    party: str
    conf_dir: Path
    properties: dict[str, str] = field(default_factory=dict)
    log_dir: Path | None = None
    proc: subprocess.Popen | None = None
    addresses: dict[str, str] = field(default_factory=dict)

    @property
    def http(self) -> str:
        return self.addresses["http"]

    @property
    def grpc_port(self) -> int:
        return int(self.addresses["grpc"].rsplit(":", 1)[1])

    @property
    def http_port(self) -> int:
        return int(self.addresses["http"].rsplit(":", 1)[1])

    def write_config(self, routes: dict, self_parties: list[str] | None = None) -> None:
        self.conf_dir.mkdir(parents=True, exist_ok=True)
        props = {
            "grpc.port": "0",
            "bind.host": "127.0.0.1",
            "open.http.server": "true",
            "http.port": "0",
            "route.table.reload.interval": "200",
            **self.properties,
        }
        (self.conf_dir / "broker.properties").write_text(
            "".join(f"{k}={v}\n" for k, v in props.items()), encoding="utf-8"
        )
        self.write_routes(routes, self_parties)

    def write_routes(self, routes: dict, self_parties: list[str] | None = None) -> None:
        doc = {"route_table": routes, "self_party": self_parties or [self.party]}
        tmp = self.conf_dir / "route_table.json.tmp"
        tmp.write_text(json.dumps(doc, indent=2), encoding="utf-8")
        tmp.replace(self.conf_dir / "route_table.json")

    def start(self, timeout_s: float = 30.0) -> None:
        log_dir = self.log_dir or self.conf_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        ready = log_dir / "ready.json"
        ready.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [str(BIN / "psi-broker"), "--conf-dir", str(self.conf_dir), "--log-dir", str(log_dir),
             "--ready-file", str(ready), "--quiet"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout_s
        while not ready.exists():
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"broker {self.party} could not start: {err.strip()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"broker {self.party} did not start in {timeout_s} s")
            time.sleep(0.05)
        self.addresses = json.loads(ready.read_text(encoding="utf-8"))

    def health(self) -> dict:
        with urlopen(f"http://{self.http}/health", timeout=5) as resp:
            return json.loads(resp.read())

    def wait_routes(self, parties: list[str], timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if set(parties) <= set(self.health().get("routes", [])):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"broker {self.party} did not load routes for {parties}")
            time.sleep(0.05)

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def flow_log(self) -> str:
        path = (self.log_dir or self.conf_dir / "logs") / "flow.log"
        return path.read_text(encoding="utf-8") if path.exists() else ""


def route_to(broker: LocalBroker, protocol: str = "grpc") -> list[dict]:
    """A route entry pointing at ``broker``."""
    if protocol == "http":
        return [{"protocol": "http",
                 "url": f"http://127.0.0.1:{broker.http_port}/v1/interconn/chan/invoke"}]
    return [{"ip": "127.0.0.1", "port": broker.grpc_port}]


def start_pair(root: Path, parties: tuple[str, str] = ("alice", "bob"), protocol: str = "grpc",
               properties: dict[str, str] | None = None) -> list[LocalBroker]:
    """Two brokers routed to each other, ready for a PSI."""
    brokers = [LocalBroker(p, root / f"broker-{p}", dict(properties or {})) for p in parties]
    try:
        for b in brokers:
            if b.conf_dir.exists():
                shutil.rmtree(b.conf_dir)
            b.write_config({})
            b.start()
        a, b = brokers
        a.write_routes({b.party: {"default": route_to(b, protocol)}})
        b.write_routes({a.party: {"default": route_to(a, protocol)}})
        a.wait_routes([b.party])
        b.wait_routes([a.party])
    except BaseException:
        for b in brokers:
            b.stop()
        raise
    return brokers


def run_parties(spec: Path, parties: list[str], timeout_s: float = 600.0, cwd: Path | None = None,
                extra_env: dict[str, str] | None = None, log_dir: Path | None = None,
                extra_args: list[str] | None = None) -> list[subprocess.CompletedProcess]:
    """Run ``psi-run SPEC --party P`` for every party at once; wait for all."""
    env = {**os.environ, **(extra_env or {})}
    procs = [
        subprocess.Popen(
            [str(BIN / "psi-run"), str(spec), "--party", p,
             "--log-dir", str(log_dir or spec.parent / "logs"), *(extra_args or [])],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd, env=env,
        )
        for p in parties
    ]
    results = []
    deadline = time.monotonic() + timeout_s
    for p, proc in zip(parties, procs):
        try:
            out, err = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            out, err = proc.communicate()
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode,
                                                   out.decode(), err.decode()))
    return results
