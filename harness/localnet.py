"""Brokers, parties and Ray heads on one machine, for the demo, the tests and the benchmark.

Not part of the product (it is not installed with psi-run).

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

from psi_runner.broker_client import BrokerClient

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
        self.write_properties()
        self.write_routes(routes, self_parties)

    def write_properties(self) -> None:
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
            [
                str(BIN / "psi-broker"),
                "--conf-dir",
                str(self.conf_dir),
                "--log-dir",
                str(log_dir),
                "--ready-file",
                str(ready),
                "--quiet",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
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
        return BrokerClient(self.http).health()

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

    def kill(self) -> None:
        """SIGKILL the broker, as a crash or an OOM kill would end it: no graceful stop."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self, timeout_s: float = 30.0) -> None:
        """Start the broker again on the ports it had (after kill() or stop())."""
        self.properties["grpc.port"] = str(self.grpc_port)
        self.properties["http.port"] = str(self.http_port)
        self.write_properties()
        self.start(timeout_s)

    def flow_log(self) -> str:
        path = (self.log_dir or self.conf_dir / "logs") / "flow.log"
        return path.read_text(encoding="utf-8") if path.exists() else ""


def route_to(broker: LocalBroker, protocol: str = "grpc") -> list[dict]:
    """A route entry pointing at ``broker``."""
    if protocol == "http":
        return [
            {
                "protocol": "http",
                "url": f"http://127.0.0.1:{broker.http_port}/v1/interconn/chan/invoke",
            }
        ]
    return [{"ip": "127.0.0.1", "port": broker.grpc_port}]


def start_pair(
    root: Path,
    parties: tuple[str, str] = ("alice", "bob"),
    protocol: str = "grpc",
    properties: dict[str, str] | None = None,
) -> list[LocalBroker]:
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


def psi_run_command(spec: Path, party: str, log_dir: Path | None = None, *extra: str) -> list[str]:
    """``psi-run SPEC --party PARTY --log-dir DIR [extra...]`` (logs beside the spec by default)."""
    return [
        str(BIN / "psi-run"), str(spec), "--party", party,
        "--log-dir", str(log_dir or spec.parent / "logs"), *extra,
    ]  # fmt: skip


def run_parties(
    spec: Path,
    parties: list[str],
    timeout_s: float = 600.0,
    cwd: Path | None = None,
    extra_env: dict[str, str] | None = None,
    log_dir: Path | None = None,
    extra_args: list[str] | None = None,
) -> list[subprocess.CompletedProcess]:
    """Run ``psi-run SPEC --party P`` for every party at once; wait for all."""
    env = {**os.environ, **(extra_env or {})}
    procs = [
        subprocess.Popen(
            psi_run_command(spec, p, log_dir, *(extra_args or [])),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=env,
        )
        for p in parties
    ]
    results = []
    deadline = time.monotonic() + timeout_s
    for _p, proc in zip(parties, procs):
        try:
            out, err = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            out, err = proc.communicate()
        results.append(
            subprocess.CompletedProcess(proc.args, proc.returncode, out.decode(), err.decode())
        )
    return results


def free_port_block(
    size: int = 200, low: int = 20000, high: int = 60000, attempts: int = 200
) -> int:
    """A base port B with B..B+size-1 all free on 127.0.0.1 (for a Ray head's port range)."""
    import random
    import socket

    rng = random.Random()
    for _ in range(attempts):
        base = rng.randrange(low, high - size, 10)
        socks = []
        try:
            for port in range(base, base + size):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        return base
    raise RuntimeError(f"no block of {size} free ports found")


@dataclass
class LocalRayHead:
    """A party's Ray head (``ray start --head --block``) with ports derived from its address.

    Stopped by signalling its own process group, never with ``ray stop`` (which would end
    every Ray cluster on the machine)."""

    party: str
    temp_dir: Path
    address: str = ""
    num_cpus: int = 2
    object_store_bytes: int = 300_000_000  # PSI passes files, not objects: keep it small
    proc: subprocess.Popen | None = None
    script: Path | None = None  # e.g. deploy/ray/start-ray-head.sh instead of the command

    def start(self, timeout_s: float = 90.0) -> None:
        from psi_runner.rayhead import ray_start_command

        if not self.address:
            self.address = f"127.0.0.1:{free_port_block()}"
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        if self.script is not None:
            cmd = [
                str(self.script),
                self.party,
                self.address,
                f"--num-cpus={self.num_cpus}",
                f"--temp-dir={self.temp_dir}",
                f"--object-store-memory={self.object_store_bytes}",
                "--block",
            ]
        else:
            cmd = ray_start_command(
                self.party,
                self.address,
                num_cpus=self.num_cpus,
                temp_dir=str(self.temp_dir),
                block=True,
                object_store_bytes=self.object_store_bytes,
            )
        log_path = self.temp_dir / "ray-start.log"
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
            )
        deadline = time.monotonic() + timeout_s
        while b"Ray runtime started" not in log_path.read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                text = log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"Ray head of {self.party} did not start: {text}")
            time.sleep(0.2)

    def stop(self, timeout_s: float = 5.0) -> None:
        if self.proc is None:
            return
        # ray start --block ends its head's processes on SIGTERM; SIGKILL the group's rest.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
        self.proc = None
