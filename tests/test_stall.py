"""A PSI that stops moving is stopped on both sides, naming the SPU stage it stalled in.

Two real stalls: a message really lost between the brokers (a test-only HTTP proxy on the
route from alice's broker to bob's answers one SPU message "OK" and drops it), and a peer
job (its job process and SPU's) frozen with SIGSTOP. Without stall detection both would wait
for SPU's 20-minute receive timeout.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from conftest import make_ids, read_result, wait_for, write_csv, write_spec

from broker import codes
from broker.proto.http_ptp_pb2 import TransportOutbound
from harness.localnet import psi_run_command, route_to, start_pair


class DroppingProxy:
    """Relays broker-to-broker HTTP invokes, and swallows the first large SPU message."""

    def __init__(self, target: str, drop_over_bytes: int = 20_000) -> None:
        self.target = target
        self.drop_over_bytes = drop_over_bytes
        self.dropped: list[str] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()
        assert self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._ready.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        self._session = aiohttp.ClientSession()
        app = web.Application(client_max_size=1 << 30)
        app.router.add_post("/v1/interconn/chan/invoke", self._invoke)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _invoke(self, request: web.Request) -> web.Response:
        body = await request.read()
        session = request.headers.get("x-ptp-session-id", "")
        spu_link = not session.endswith(".hs") and not session.endswith("-fed")
        if spu_link and not self.dropped and len(body) > self.drop_over_bytes:
            self.dropped.append(session)  # answered OK, never delivered
            return web.Response(body=TransportOutbound(code=codes.OK).SerializeToString())
        headers = {k: v for k, v in request.headers.items() if k.lower().startswith("x-ptp")}
        async with self._session.post(
            f"http://{self.target}/v1/interconn/chan/invoke", data=body, headers=headers
        ) as resp:
            return web.Response(status=resp.status, body=await resp.read())


def _start(spec: Path, party: str) -> subprocess.Popen:
    return subprocess.Popen(
        psi_run_command(spec, party), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _inputs(folder: Path, rows: int) -> None:
    rng = random.Random(5)
    shared = make_ids(rows // 2, "s", rng)
    write_csv(folder / "data/alice.csv", {"uid": shared + make_ids(rows // 2, "a", rng)})
    write_csv(folder / "data/bob.csv", {"uid": shared + make_ids(rows // 2, "b", rng)})


def _run_with_one_lost_message(tmp_path: Path, job_id: str, **spec_keys) -> tuple:
    """Both parties' (process, stdout, stderr), with alice's route to bob through a proxy
    that drops the first large SPU message."""
    brokers = start_pair(tmp_path / "brokers", protocol="http")
    alice, bob = brokers
    try:
        proxy = DroppingProxy(bob.http)
        url = f"http://127.0.0.1:{proxy.port}/v1/interconn/chan/invoke"
        alice.write_routes({"bob": {"default": [{"protocol": "http", "url": url}]}})
        bob.write_routes({"alice": {"default": route_to(alice, "http")}})
        time.sleep(0.5)  # the route tables are reloaded every 200 ms
        _inputs(tmp_path, 20_000)
        spec = write_spec(tmp_path, brokers, job_id=job_id, stall_timeout_s=6, **spec_keys)
        procs = [_start(spec, p) for p in ("alice", "bob")]
        results = [(p, *p.communicate(timeout=180)) for p in procs]
    finally:
        for b in brokers:
            b.stop()
    assert proxy.dropped, "the proxy saw no large SPU message to drop"
    return results


def test_a_message_lost_between_the_brokers_stops_both_sides_as_a_stall(tmp_path):
    results = _run_with_one_lost_message(tmp_path, "stall-lost")
    errs = [err for _, _, err in results]
    for proc, out, err in results:
        assert proc.returncode == 5, err
        assert out == ""
        assert "made no progress on either side" in err, err
    # The side that saw it first names the SPU stage; the other may have been told by it.
    assert any("for 6 s (stalled in SPU stage" in err for err in errs), errs
    for party in ("alice", "bob"):
        assert not (tmp_path / f"out/{party}_psi.csv").exists()


def test_with_retries_both_sides_start_again_after_a_stall_and_finish(tmp_path):
    results = _run_with_one_lost_message(tmp_path, "stall-retry", retries=1)
    for proc, out, err in results:
        assert proc.returncode == 0, err
        assert "starting the job again after the stall (attempt 2)" in err, err
        assert json.loads(out)["intersection_count"] == 10_000
    alice = read_result(tmp_path / "out/alice_psi.csv")
    assert len(alice) == 10_000 and alice["uid"].str.startswith("s").all()


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_a_frozen_peer_is_caught_as_a_stall(tmp_path):
    brokers = start_pair(tmp_path / "brokers")
    try:
        _inputs(tmp_path, 400_000)
        spec = write_spec(tmp_path, brokers, job_id="stall-frozen", stall_timeout_s=6)
        alice = _start(spec, "alice")
        bob = _start(spec, "bob")
        logs = tmp_path / "logs"
        assert wait_for(
            lambda: any(
                "PreProcess] start" in f.read_text(errors="replace")
                for f in logs.glob("*-bob-*.log")
            ),
            60,
        ), "bob's PSI did not start"
        # bob's job process and SPU's own process, its child: the whole of bob's job freezes
        # (a job process alone frozen leaves SPU running to its end, and alice then waits for
        # bob's result check until its silence limit instead)
        frozen = _children(bob.pid)[:1]
        frozen += _children(frozen[0])
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        try:
            _, err = alice.communicate(timeout=90)
        finally:
            for pid in frozen:
                os.kill(pid, signal.SIGKILL)
            bob.communicate(timeout=60)
    finally:
        for b in brokers:
            b.stop()
    if alice.returncode == 0:
        pytest.skip("the PSI finished before bob was frozen")
    assert alice.returncode == 5, err
    assert "made no progress on either side for 6 s (stalled in SPU stage" in err, err


def test_a_flood_of_link_warnings_is_not_progress_but_a_stage_line_is(tmp_path):
    """A client retrying a link that does not move writes a line every second; a stall must
    still be seen through them, while SPU's own stage and bucket lines keep the job alive."""
    from psi_runner.stall import StallMeter

    log = tmp_path / "job.log"
    log.write_bytes(b"")
    # No broker on this port: traffic is unknown and never counts as movement.
    meter = StallMeter(log, "127.0.0.1:9", "s1")
    meter.own_active -= 100
    flood = [
        b"W1203 05:46:36.901234 4321 socket.cpp:2466] Fail to connect Socket{id=0 addr=...}",
        b"E1203 05:46:37.001234 4321 channel.cpp:612] Not connected to 127.0.0.1:9380 yet",
        b"[2026-12-03 05:46:37.100] [warning] [channel.cc:417] send failed, retry 7 of 60",
        b"[2026-12-03 05:46:37.200] [error] [brpc_blackbox_link.cc:190] push failed: [112]",
        b"2026-12-03 05:46:38,000 WARNING psi_runner.peer_reach: job j party alice: ...",
        b"[psi-run] the line above repeated 40 more times (digits aside)",
        b"",
    ]
    with open(log, "ab") as fh:
        fh.write(b"\n".join(flood) + b"\n")
    meter.sample()
    assert meter.own_idle_s() >= 100
    with open(log, "ab") as fh:
        fh.write(b"[2026-12-03 05:46:39.000] [info] [rr22.cc:12] [Rr22PsiReceiver::Online] start\n")
    meter.sample()
    assert meter.own_idle_s() < 5
    assert meter.stage() == "Online"
