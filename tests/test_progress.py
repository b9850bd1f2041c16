"""Progress: a line per stage and per 10 % of the PSI (plain), JSON events (json), and the
report's SPU stage timings and bytes exchanged."""

from __future__ import annotations

import json
import random

from conftest import make_ids, write_csv, write_spec

from harness.localnet import run_parties
from psi_runner.progress import SpuProgress, spu_stage_seconds


def _job(tmp_path, brokers, rows: int = 30_000):
    rng = random.Random(8)
    shared = make_ids(rows // 3, "s", rng)
    write_csv(tmp_path / "data/alice.csv", {"uid": shared + make_ids(rows, "a", rng)})
    write_csv(tmp_path / "data/bob.csv", {"uid": shared + make_ids(rows, "b", rng)})
    return write_spec(tmp_path, brokers, job_id="progress-1")


def test_json_progress_reports_every_stage_and_the_psi_up_to_100_percent(tmp_path, brokers):
    spec = _job(tmp_path, brokers)
    results = run_parties(spec, ["alice", "bob"], timeout_s=120, extra_args=["--progress", "json"])
    for r in results:
        assert r.returncode == 0, r.stderr
        events = [json.loads(ln) for ln in r.stderr.splitlines() if ln.startswith("{")]
        done = [e["progress"] for e in events if e["status"].startswith("done")]
        assert done == ["preflight", "handshake", "prepare", "psi", "agree", "output"], events
        psi = [e["percent"] for e in events if e["progress"] == "psi"]
        assert psi == sorted(psi) and psi[-1] == 100.0, psi
        assert all(e["rows"] == 40_000 for e in events if e["progress"] != "preflight")
        report = json.loads(r.stdout)
        assert set(report["spu_stages_s"]) >= {"Init", "PreProcess", "Online", "Finalize"}
        assert report["bytes"]["sent"] > 0 and report["bytes"]["received"] > 0
    sent = [json.loads(r.stdout)["bytes"]["sent"] for r in results]
    received = [json.loads(r.stdout)["bytes"]["received"] for r in results]
    # What one broker sent the other received (the control channel aside: a few KB).
    assert abs(sent[0] - received[1]) < 20_000 and abs(sent[1] - received[0]) < 20_000


def test_plain_progress_is_one_line_per_stage_and_per_tenth(tmp_path, brokers):
    spec = _job(tmp_path, brokers)
    results = run_parties(spec, ["alice", "bob"], timeout_s=120, extra_args=["--progress", "plain"])
    for r in results:
        assert r.returncode == 0, r.stderr
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith("psi-run: progress:")]
        assert any(ln.startswith("psi-run: progress: preflight done in") for ln in lines)
        assert any("psi 100 % (SPU Finalize)" in ln for ln in lines), lines
        assert len(lines) <= 20, lines


def test_progress_none_prints_nothing_but_the_log_line(tmp_path, brokers):
    spec = _job(tmp_path, brokers, rows=3000)
    results = run_parties(spec, ["alice", "bob"], timeout_s=120, extra_args=["--progress", "none"])
    for r in results:
        assert r.returncode == 0, r.stderr
        assert [ln for ln in r.stderr.splitlines() if "log file" not in ln] == []


def test_spu_log_lines_give_stage_and_percent():
    spu = SpuProgress(rows=3_000_000)
    lines = [
        b"[2026-12-02 16:47:48.735] [info] [sender.cc:39] [Rr22PsiSender::Init] start",
        b"[2026-12-02 16:47:48.788] [info] [sender.cc:43] [Rr22PsiSender::Init] end",
        b"[2026-12-02 16:47:48.793] [info] [bucket_psi.cc:492] psi protocol=3, rank=0 "
        b"item_size=3000000",
        b"[2026-12-02 16:47:48.802] [info] [sender.cc:86] [Rr22PsiSender::Online] start",
        b"[2026-12-02 16:47:50.000] [info] [recovery.cc:1] RecoveryManager::"
        b"UpdateParsedBucketCount, cnt = 2",
    ]
    for line in lines:
        spu.feed(line)
    assert spu.stage == "Online"
    assert 25 < spu.percent < 90  # two of three buckets done
    assert spu_stage_seconds(b"\n".join(lines)) == {"Init": 0.053}
