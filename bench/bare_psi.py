"""One party of a bare SPU PSI v2 call on a direct brpc link: no broker, no psi-run.

The baseline of bench/bench_psi.py. Run one process per party, e.g.

    python bench/bare_psi.py --rank 0 --ports 61001,61002 --input /abs/alice.csv \
        --output /abs/alice_out.csv
    python bench/bare_psi.py --rank 1 --ports 61001,61002 --input /abs/bob.csv \
        --output /abs/bob_out.csv

Rank 0 is alice (the receiver), rank 1 is bob; the result is broadcast to both. The link uses
the same tuned settings as psi-run (retries, timeouts). The PsiConfig is the one psi-run builds
(skip_duplicates_check=True, since psi-run checks duplicates itself in its preflight) unless
--dup-check is given. The last stdout line is a JSON document with the timings.

With ``--broker HOST:PORT --session ID`` (instead of ``--ports``) the same PSI call goes through
SPU's blackbox link and the party's own psi-broker, built as psi-run builds it (the default link
settings of a job spec, the session id as link id and trace id, a barrier once the link is up),
but with no psi-run around it (bench_psi.py's variant (c)). Both parties give the same fresh
session id; at the end each drops the session's queues at its broker, as psi-run does.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import fields
from typing import Any

PARTIES = ("alice", "bob")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A blackbox link, once closed, is kept until the process ends with os._exit, as psi-run's
# embedded backend does: dropping it waits for its receive thread's pending pop at the broker.
_CLOSED_LINKS: list = []


def main(argv: list[str] | None = None) -> int:
    t_start = time.monotonic()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--rank",
        type=int,
        choices=(0, 1),
        required=True,
        help="0 = alice (receiver), 1 = bob (sender)",
    )
    ap.add_argument("--ports", help="alice's and bob's link ports, e.g. 61001,61002")
    ap.add_argument(
        "--broker",
        help="this party's broker (host:port of its HTTP PTP port, as in a psi-run spec): "
        "link through the brokers instead of a direct brpc link",
    )
    ap.add_argument("--session", help="the link's session id with --broker, the same at both")
    ap.add_argument("--input", required=True, help="absolute path of this party's CSV")
    ap.add_argument("--output", required=True, help="absolute path of this party's result CSV")
    ap.add_argument("--protocol", default="RR22", choices=("RR22", "KKRT", "ECDH"))
    ap.add_argument("--key", default="uid")
    ap.add_argument("--link-id", default="bench")
    ap.add_argument(
        "--dup-check",
        action="store_true",
        help="let SPU check the keys for duplicates (psi-run skips it in SPU)",
    )
    args = ap.parse_args(argv)
    if args.broker is None and args.session is None:
        if args.ports is None:
            ap.error("give --ports, or --broker and --session")
    elif args.broker is None or args.session is None or args.ports is not None:
        ap.error("--broker and --session go together, without --ports")
    # SPU's scratch (sorted input, buckets: copies of the party's data) goes to TMPDIR and its
    # trace file to /tmp unless told otherwise: both go to a private folder, removed at the end.
    scratch = tempfile.mkdtemp(
        prefix=".bare-psi-", dir=os.path.dirname(os.path.abspath(args.output))
    )
    os.environ["TMPDIR"] = scratch
    try:
        code = _run(args, ap, t_start, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if _CLOSED_LINKS:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _run(
    args: argparse.Namespace, ap: argparse.ArgumentParser, t_start: float, scratch: str
) -> int:
    import spu.libspu.link as link
    from spu import psi
    from spu import psi_v2_pb2 as v2

    if args.broker is not None:
        connect = _broker_link(args.broker, args.session, PARTIES[args.rank])
        t_import = time.monotonic()
        t0 = time.monotonic()
        lctx = connect()
    else:
        ports = [int(p) for p in args.ports.split(",")]
        if len(ports) != 2:
            ap.error("--ports needs two ports")
        t_import = time.monotonic()

        desc = link.Desc()
        desc.id = args.link_id
        for name, port in zip(PARTIES, ports):
            desc.add_party(name, f"127.0.0.1:{port}")
        desc.connect_retry_times = 60
        desc.connect_retry_interval_ms = 1000
        desc.recv_timeout_ms = 1_200_000
        desc.http_timeout_ms = 1_200_000
        # As psi-run: SPU's default send window (10) can deadlock a PSI (seen here on this very
        # direct link: both processes idle, connected, until the receive timeout).
        desc.throttle_window_size = 0

        t0 = time.monotonic()
        lctx = link.create_brpc(desc, args.rank)
    t1 = time.monotonic()
    receiver = args.rank == 0
    cfg = v2.PsiConfig(
        protocol_config=v2.ProtocolConfig(
            protocol=getattr(v2, f"PROTOCOL_{args.protocol}"),
            role=v2.ROLE_RECEIVER if receiver else v2.ROLE_SENDER,
            broadcast_result=True,
        ),
        input_config=v2.IoConfig(type=v2.IO_TYPE_FILE_CSV, path=os.path.abspath(args.input)),
        output_config=v2.IoConfig(type=v2.IO_TYPE_FILE_CSV, path=os.path.abspath(args.output)),
        keys=[args.key],
        skip_duplicates_check=not args.dup_check,
    )
    cfg.debug_options.trace_path = os.path.join(scratch, "spu.trace")
    if args.protocol == "ECDH":
        from spu import psi_pb2

        cfg.protocol_config.ecdh_config.curve = psi_pb2.CurveType.Value("CURVE_25519")
    report = psi.psi(cfg, lctx)
    t2 = time.monotonic()
    lctx.stop_link()
    if args.broker is not None:
        from psi_runner.broker_client import release_session

        _CLOSED_LINKS.append(lctx)
        release_session(args.broker, args.session, PARTIES[args.rank])
    print(
        json.dumps(
            {
                "party": PARTIES[args.rank],
                "original_count": int(report.original_count),
                "intersection_count": int(report.intersection_count),
                "seconds": {
                    "import_s": round(t_import - t_start, 3),
                    "link_s": round(t1 - t0, 3),
                    "psi_s": round(t2 - t1, 3),
                    "total_s": round(time.monotonic() - t_start, 3),
                },
            }
        ),
        flush=True,
    )
    return 0


def _broker_link(broker: str, session: str, party: str) -> Callable[[], Any]:
    """A function that makes SPU's blackbox link through ``broker`` as psi-run's embedded
    backend makes it (psi_runner is imported now, so that the link's time is the link's)."""
    sys.path.insert(0, REPO)  # this checkout's psi_runner, as bench_psi.py's
    from psi_runner.link import blackbox_environment, create_blackbox_link
    from psi_runner.spec import JobSpec

    # A spec without ``link:`` (bench_psi.py's) gets JobSpec's default settings.
    settings = next(f for f in fields(JobSpec) if f.name == "link").default_factory()
    parties = list(PARTIES)
    env = blackbox_environment(broker, parties, session, trace_id=session)

    def connect():
        lctx = create_blackbox_link(settings, parties, party, session, env)
        # As psi-run: SPU's PSI connects to the mesh again, and yacl drops a second connect
        # test message that arrives while the first is unread (both sides then wait for good).
        lctx.barrier()
        return lctx

    return connect


if __name__ == "__main__":
    sys.exit(main())
