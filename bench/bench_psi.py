"""Benchmark: psi-run + two psi-broker processes versus a bare SPU PSI call.

For the same job (N x N rows, 50 % overlap, one key column ``uid``) it runs, alternating in
one process so that machine noise hits both alike:

  (a) the product: two ``psi-broker`` processes routed to each other (gRPC or HTTP route)
      and ``psi-run SPEC --party alice`` / ``--party bob``;
  (b) the baseline: two processes of ``bench/bare_psi.py``, each one SPU PSI v2 call on a
      direct brpc link between 127.0.0.1 ports (no broker, no psi-run);
  (c) with ``--bare-brokers``: the same ``bare_psi.py`` call on SPU's blackbox link through two
      brokers started as (a)'s are (same route, same link settings as psi-run), so that (a)/(c)
      is psi-run's own cost and (c)/(b) the transport's.

``--shards 1,2,4`` runs (a) once per shard count (``shards: K`` in the spec, ``K=`` in the
label); peak RSS then also gives the sum over each party's processes (its K SPU processes peak
at about the same time).

``--backends embedded,secretflow,ray`` runs (a) once per backend (the ``ray`` backend against
two Ray heads started at the beginning on disjoint ports), so the backends' fixed costs are
measured side by side in one run.

Per run it measures the wall time from starting both party processes to both having exited
(so the slower party counts) and the PSI call time (the larger of the two parties'); it checks
that both parties' results hold exactly the expected intersection. It also records the peak
RSS of the largest process of each party (``peak_rss``: the kernel's VmHWM of every process in
the party's tree). ``--keys plain|quoted|awkward`` chooses the input's shape (see
``make_dataset``). See bench/README.md.

    .venv/bin/python bench/bench_psi.py --rows 1000000 --rounds 3 --keys quoted
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo's harness/
from bench.peak_rss import PeakRss, party_label
from harness.localnet import BIN, LocalRayHead, run_parties, start_pair
from psi_runner.progress import spu_stage_seconds

HERE = Path(__file__).resolve().parent
BARE = HERE / "bare_psi.py"
PARTIES = ("alice", "bob")
KEY = "uid"
KEY_KINDS = ("plain", "quoted", "awkward")
TARGET_RATIO = 1.25


class BenchError(RuntimeError):
    """A run failed or produced a wrong result: the benchmark stops."""


# --------------------------------------------------------------------------------------------
# data


@dataclass
class Dataset:
    rows: int
    overlap: int
    paths: dict[str, Path]
    expected: pa.Array | np.ndarray  # sorted keys of the intersection (ids: sorted int64)


def _write_ids(path: Path, ids: np.ndarray, xs: np.ndarray) -> None:
    """``uid,x`` with bare ids, written by Arrow's vectorised CSV writer (100M rows in
    seconds, not minutes); the same bytes as formatting each line in Python."""
    tmp = path.with_suffix(".tmp")
    step = 10_000_000
    with open(tmp, "wb") as fh:
        fh.write(f"{KEY},x\n".encode())
        for i in range(0, len(ids), step):
            table = pa.table({KEY: id_texts(ids[i : i + step]), "x": pa.array(xs[i : i + step])})
            pcsv.write_csv(table, fh, pcsv.WriteOptions(include_header=False, quoting_style="none"))
    tmp.replace(path)


def id_texts(ids: np.ndarray) -> pa.Array:
    """``id000123456`` for each id, vectorised."""
    digits = pc.utf8_lpad(pc.cast(pa.array(ids, pa.int64()), pa.string()), width=9, padding="0")
    return pc.binary_join_element_wise("id", digits, "")


def key_texts(ids: list[int], keys: str) -> list[str]:
    """The key of each id: ``id000123456`` (plain, quoted), or for ``awkward`` one id in four
    each as it is, with a comma, with a double quote, with a non-ASCII character."""
    if keys != "awkward":
        return [f"id{v:09d}" for v in ids]
    tails = ("", ",x", '"q', "\u4e2d")
    return [f"id{v:09d}{tails[v % 4]}" for v in ids]


def _write_arrow(path: Path, keys: list[str], xs: np.ndarray) -> None:
    """pyarrow's CSV writer, as a pyarrow or pandas user's export: the header is quoted
    (``"uid","x"``) and so is every text value, plain or not."""
    tmp = path.with_suffix(".tmp")
    table = pa.table({KEY: pa.array(keys, pa.string()), "x": pa.array(xs)})
    pcsv.write_csv(table, tmp, pcsv.WriteOptions(quoting_style="needed"))
    tmp.replace(path)


def make_dataset(folder: Path, rows: int, seed: int, keys: str = "plain") -> Dataset:
    """alice.csv and bob.csv with ``rows`` unique ids each, ``rows // 2`` of them shared.

    ``keys``: ``plain`` (``uid,x`` and bare ``id000123456`` values), ``quoted`` (the same
    values written by pyarrow: header and values in quotes) or ``awkward`` (pyarrow-written,
    a quarter of the keys each with a comma, a quote or a non-ASCII character). Reused when
    ``folder`` already holds files made with the same rows, seed and keys.
    """
    folder.mkdir(parents=True, exist_ok=True)
    overlap = rows // 2
    paths = {p: folder / f"{p}.csv" for p in PARTIES}
    meta_path = folder / "dataset.json"
    meta = {"rows": rows, "overlap": overlap, "seed": seed, "format": 1}
    if keys != "plain":
        meta["keys"] = keys
    rng = np.random.default_rng(seed)
    pool = rng.choice(10**9, size=2 * rows - overlap, replace=False)
    shared = pool[rows - overlap : rows]
    if keys == "awkward":
        expected = pa.array(key_texts(shared.tolist(), keys), type=pa.string())
        expected = pc.take(expected, pc.sort_indices(expected))
    else:  # ``id000123456``: compared as numbers, sorted in seconds even at 100M
        expected = np.sort(shared.astype(np.int64))
    reuse = (
        meta_path.exists()
        and json.loads(meta_path.read_text()) == meta
        and all(p.exists() for p in paths.values())
    )
    if reuse:
        print(f"data: reusing {folder} ({rows} rows per party, {overlap} shared)")
        return Dataset(rows, overlap, paths, expected)
    t = time.monotonic()
    meta_path.unlink(missing_ok=True)
    halves = {"alice": pool[:rows], "bob": pool[rows - overlap :]}
    for party, ids in halves.items():
        ids = rng.permutation(ids)  # shared ids scattered through both files
        xs = rng.integers(0, 1_000_000, size=rows)
        if keys == "plain":
            _write_ids(paths[party], ids, xs)
        else:
            _write_arrow(paths[party], key_texts(ids.tolist(), keys), xs)
    meta_path.write_text(json.dumps(meta))
    print(
        f"data: wrote {folder} ({rows} rows per party, {overlap} shared) "
        f"in {time.monotonic() - t:.1f} s"
    )
    return Dataset(rows, overlap, paths, expected)


def check_output(path: Path, data: Dataset, who: str) -> int:
    """Fail unless ``path`` holds exactly the expected intersection; return its row count."""
    if not path.exists():
        raise BenchError(f"{who}: no output file {path}")
    raw = path.read_bytes()
    lines = raw.count(b"\n") + (1 if raw and not raw.endswith(b"\n") else 0)
    count = max(lines - 1, 0)
    if count != data.overlap:
        raise BenchError(f"{who}: {path} has {count} rows, expected {data.overlap}")
    table = pcsv.read_csv(
        path,
        convert_options=pcsv.ConvertOptions(column_types={KEY: pa.string()}, include_columns=[KEY]),
    )
    got = table[KEY].combine_chunks()
    if isinstance(data.expected, np.ndarray):
        same = _same_ids(got, data.expected)
    else:
        same = pc.take(got, pc.sort_indices(got)).equals(data.expected)
    if not same:
        raise BenchError(f"{who}: {path} has {count} rows but not the expected ids")
    return count


def _same_ids(got: pa.Array, expected: np.ndarray) -> bool:
    """Whether ``got`` holds exactly the ids ``id%09d`` of ``expected`` (sorted int64)."""
    if len(got) != len(expected):
        return False
    if len(got) == 0:
        return True
    well_formed = pc.all(pc.match_substring_regex(got, r"^id[0-9]{9}$")).as_py()
    if not well_formed:
        return False
    numbers = pc.cast(pc.utf8_slice_codeunits(got, 2), pa.int64())
    return bool(np.array_equal(np.sort(numbers.to_numpy(zero_copy_only=False)), expected))


# --------------------------------------------------------------------------------------------
# runs


@dataclass
class Run:
    round: int
    variant: str  # "a:grpc", "a:http", "c:grpc", "c:http" or "b" (see variant_label)
    wall_s: float
    psi_s: float
    link_s: float
    rows: tuple[int, int]
    stages: dict[str, float] = field(default_factory=dict)  # max over parties, (a) only
    proc_s: float = 0.0  # in-process total_s reported by the parties (max of the two)
    setup_s: float = 0.0  # brokers' start (a, c) / nothing (b); not part of wall_s
    rss: tuple[int, int] = (0, 0)  # peak RSS (bytes) of each party's largest process
    rss_sum: tuple[int, int] = (0, 0)  # the sum of the peaks of each party's processes
    # Each party's own stage seconds (alice, bob): the report's ``seconds`` (a) or bare_psi's
    # (b, c), SPU's stages from its log as ``spu:<stage>``, and ``rest_s`` (wall - total_s).
    parts: tuple[dict[str, float], ...] = ()

    @property
    def label(self) -> str:
        return variant_label(self.variant)


def variant_label(variant: str) -> str:
    """ "b" is bare SPU; "c:<route>" bare SPU through the brokers; "a:<route>" psi-run
    (embedded); "a-<backend>:<route>" other backends; "/K" after the route: ``shards: K``."""
    if variant == "b":
        return "bare SPU"
    if variant.startswith("c:"):
        return f"bare SPU+brokers({variant_route(variant)})"
    kind, route = variant.split(":")
    backend = kind[2:] if kind.startswith("a-") else ""
    shards = f" K={variant_shards(variant)}" if "/" in route else ""
    return f"psi-run{f'[{backend}]' if backend else ''}+brokers({variant_route(variant)}){shards}"


def variant_name(backend: str, route: str, shards: int = 1) -> str:
    """The variant of (a) with ``backend`` over ``route``: "a:<route>" or "a-<backend>:<route>",
    with "/K" for ``shards: K`` > 1."""
    name = f"a:{route}" if backend == "embedded" else f"a-{backend}:{route}"
    return name + (f"/{shards}" if shards > 1 else "")


def is_bare(variant: str) -> bool:
    """Whether ``variant`` is bare SPU: (b) on a direct link or (c) through the brokers."""
    return variant == "b" or variant.startswith("c:")


def variant_route(variant: str) -> str:
    return variant.split(":")[1].split("/")[0]


def variant_shards(variant: str) -> int:
    route = variant.split(":")[1]
    return int(route.split("/")[1]) if "/" in route else 1


def variant_backend(variant: str) -> str:
    kind = variant.split(":")[0]
    return kind[2:] if kind.startswith("a-") else "embedded"


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (bound together, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def run_product(
    rnd: int,
    route: str,
    data: Dataset,
    run_dir: Path,
    protocol: str,
    timeout_s: float,
    backend: str = "embedded",
    ray_heads: dict[str, str] | None = None,
    shards: int = 1,
) -> Run:
    """(a): two routed brokers, then both psi-run processes; wall time of the psi-runs."""
    who = f"round {rnd} (a) {backend} route {route} shards {shards}"
    t = time.monotonic()
    brokers = start_pair(run_dir / "brokers", protocol=route)
    setup_s = time.monotonic() - t
    try:
        spec = run_dir / "job.yaml"
        doc = {
            "job_id": f"bench-{rnd}-{route}-{backend}-{shards}",
            "shards": shards,
            "backend": backend,
            "protocol": protocol,
            "keys": [KEY],
            "receiver": "alice",
            "parties": {
                b.party: {
                    "broker": b.http,
                    "input": str(data.paths[b.party]),
                    "output": str(run_dir / "out" / f"{b.party}_psi.csv"),
                }
                for b in brokers
            },
        }
        if backend == "ray":
            for party, address in (ray_heads or {}).items():
                doc["parties"][party]["ray_address"] = address
        spec.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
        cpu0 = [_cpu_s(b.proc) for b in brokers]
        t0 = time.monotonic()
        with PeakRss(party_label(PARTIES)) as mem:
            results = run_parties(
                spec, list(PARTIES), timeout_s=timeout_s, log_dir=run_dir / "logs"
            )
        wall = time.monotonic() - t0
        broker_cpu = [_cpu_s(b.proc) - c for b, c in zip(brokers, cpu0)]
    finally:
        for b in brokers:
            b.stop()
    reports = []
    for party, r in zip(PARTIES, results):
        if r.returncode != 0:
            raise BenchError(
                f"{who}: psi-run --party {party} exited {r.returncode}:\n{r.stderr.strip()}"
            )
        try:
            reports.append(json.loads(r.stdout))
        except ValueError:
            raise BenchError(
                f"{who}: psi-run --party {party} printed no JSON report:\n"
                f"{r.stdout!r}\n{r.stderr.strip()}"
            ) from None
    rows = []
    for party, rep in zip(PARTIES, reports):
        if rep.get("intersection_count") != data.overlap:
            raise BenchError(
                f"{who}: {party} reports intersection_count "
                f"{rep.get('intersection_count')}, expected {data.overlap}"
            )
        rows.append(check_output(Path(rep["output"]), data, f"{who} {party}"))
    stages = {k: max(rep["seconds"][k] for rep in reports) for k in reports[0]["seconds"]}
    parts = tuple(
        {**_parts(rep["seconds"], rep.get("spu_stages_s") or {}, wall), "broker_cpu_s": cpu}
        for rep, cpu in zip(reports, broker_cpu)
    )
    return Run(
        rnd,
        variant_name(backend, route, shards),
        wall,
        stages["psi_s"],
        stages["link_s"],
        tuple(rows),
        stages,
        stages["total_s"],
        setup_s,
        _rss(mem),
        _rss_sum(mem),
        parts,
    )


def _cpu_s(proc: subprocess.Popen | None) -> float:
    """CPU seconds (user + system, all threads) a process has used so far; 0 if unknown."""
    if proc is None:
        return 0.0
    try:
        fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _parts(seconds: dict[str, float], spu: dict[str, float], wall: float) -> dict[str, float]:
    """One party's stage seconds for the breakdown (see ``Run.parts``)."""
    out = {k: float(v) for k, v in seconds.items()}
    out.update({f"spu:{k}": float(v) for k, v in spu.items()})
    out["rest_s"] = wall - out.get("total_s", 0.0)
    return out


def _rss_sum(mem: PeakRss) -> tuple[int, int]:
    summed = mem.summed()
    return (summed.get(PARTIES[0], 0), summed.get(PARTIES[1], 0))


def _rss(mem: PeakRss) -> tuple[int, int]:
    largest = mem.largest()
    return (largest.get(PARTIES[0], 0), largest.get(PARTIES[1], 0))


def _bare_report(stdout: str) -> dict | None:
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if isinstance(doc, dict) and "intersection_count" in doc:
                return doc
    return None


def run_bare(
    rnd: int, data: Dataset, run_dir: Path, protocol: str, timeout_s: float, dup_check: bool
) -> Run:
    """(b): two bare SPU processes on a direct brpc link; wall time of both."""
    ports = ",".join(map(str, free_ports(2)))
    link = ["--ports", ports, "--link-id", f"bench-{rnd}"]
    return _bare_pair(
        "b", rnd, data, run_dir, protocol, timeout_s, dup_check, (link, link), f"round {rnd} (b)"
    )


def run_bare_brokers(
    rnd: int,
    session: str,
    route: str,
    data: Dataset,
    run_dir: Path,
    protocol: str,
    timeout_s: float,
    dup_check: bool,
) -> Run:
    """(c): two routed brokers started as (a)'s are, then two bare SPU processes whose blackbox
    link goes through them (session ``session``); wall time of both, brokers' start not in it."""
    t = time.monotonic()
    brokers = start_pair(run_dir / "brokers", protocol=route)
    setup_s = time.monotonic() - t
    try:
        links = tuple(["--broker", b.http, "--session", session] for b in brokers)
        cpu0 = [_cpu_s(b.proc) for b in brokers]
        run = _bare_pair(
            f"c:{route}", rnd, data, run_dir, protocol, timeout_s, dup_check, links,
            f"round {rnd} (c)",
        )  # fmt: skip
        broker_cpu = [_cpu_s(b.proc) - c for b, c in zip(brokers, cpu0)]
    finally:
        for b in brokers:
            b.stop()
    for part, cpu in zip(run.parts, broker_cpu):
        part["broker_cpu_s"] = cpu
    run.setup_s = setup_s
    return run


def _bare_pair(
    variant: str,
    rnd: int,
    data: Dataset,
    run_dir: Path,
    protocol: str,
    timeout_s: float,
    dup_check: bool,
    links: tuple[list[str], ...],
    where: str,
) -> Run:
    """Both parties' ``bare_psi.py`` with their link options ``links``; outputs checked."""
    who = f"{where} {variant_label(variant)}"
    out = run_dir / "out"
    out.mkdir(parents=True, exist_ok=True)
    cmds = [
        [
            sys.executable,
            str(BARE),
            "--rank",
            str(rank),
            *link,
            "--input",
            str(data.paths[party]),
            "--output",
            str(out / f"{party}_psi.csv"),
            "--protocol",
            protocol,
            "--key",
            KEY,
            *(["--dup-check"] if dup_check else []),
        ]
        for rank, (party, link) in enumerate(zip(PARTIES, links))
    ]
    # Files, not pipes: SPU logs to stdout and stderr, and a pipe that is not drained while
    # the other party's is read (communicate() one process after the other) fills up and
    # blocks that party's SPU, which then stalls both (seen here under load).
    logs = [(run_dir / f"{p}.stdout.txt", run_dir / f"{p}.stderr.txt") for p in PARTIES]
    t0 = time.monotonic()
    mem = PeakRss(party_label(PARTIES)).__enter__()
    procs = []
    for c, (out_path, err_path) in zip(cmds, logs):
        with open(out_path, "wb") as o_fh, open(err_path, "wb") as e_fh:
            procs.append(subprocess.Popen(c, stdout=o_fh, stderr=e_fh))
    results = []
    deadline = t0 + timeout_s
    try:
        for proc in procs:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 1))
            except subprocess.TimeoutExpired:
                for other in procs:
                    other.kill()
                proc.wait()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        mem.__exit__(None, None, None)
    for proc, (out_path, err_path) in zip(procs, logs):
        results.append(
            (
                proc.returncode,
                out_path.read_text(errors="replace"),
                err_path.read_text(errors="replace"),
            )
        )
    wall = time.monotonic() - t0
    reports = []
    for party, (code, o, e) in zip(PARTIES, results):
        if code != 0:
            (run_dir / f"{party}.stderr.txt").write_text(e)
            tail = "\n".join(e.strip().splitlines()[-15:])
            raise BenchError(f"{who}: bare_psi.py {party} exited {code}:\n{tail}")
        rep = _bare_report(o)  # SPU logs to stdout too; the report is the line of JSON
        if rep is None:
            (run_dir / f"{party}.stdout.txt").write_text(o)
            raise BenchError(
                f"{who}: bare_psi.py {party} printed no JSON report (stdout kept in {run_dir})"
            )
        reports.append(rep)
    rows = []
    for party, rep in zip(PARTIES, reports):
        if rep["intersection_count"] != data.overlap:
            raise BenchError(
                f"{who}: {party} reports intersection_count "
                f"{rep['intersection_count']}, expected {data.overlap}"
            )
        rows.append(check_output(out / f"{party}_psi.csv", data, f"{who} {party}"))
    psi_s = max(r["seconds"]["psi_s"] for r in reports)
    link_s = max(r["seconds"]["link_s"] for r in reports)
    proc_s = max(r["seconds"]["total_s"] for r in reports)
    parts = tuple(
        _parts(rep["seconds"], spu_stage_seconds(f"{o}\n{e}".encode()), wall)
        for rep, (_code, o, e) in zip(reports, results)
    )
    return Run(
        rnd, variant, wall, psi_s, link_s, tuple(rows), proc_s=proc_s, rss=_rss(mem),
        rss_sum=_rss_sum(mem), parts=parts,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# report


def machine_info() -> list[str]:
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 2**20:.1f} GiB"
                break
    except OSError:
        pass

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return [
        f"nproc: {affinity} (cpu_count {os.cpu_count()}){'; ' + cpu if cpu else ''}",
        f"memory: {mem or '?'}; load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"platform: {platform.platform()}",
        f"python: {platform.python_version()} ({sys.executable})",
        f"spu: {version('spu')}; psi-run: {version('psi-run')}",
    ]


HEADER = (
    f"{'round':>5}  {'#':>1}  {'variant':<33} {'wall_s':>8} {'psi_s':>8} {'link_s':>7} "
    f"{'wall-psi':>8} {'proc_s':>7} {'prep_s':>7} {'out_s':>6} {'brokers':>7}  rows alice/bob"
    "  peak RSS MB alice/bob (largest process, sum of processes)"
)


def _mb(n: float) -> str:
    return f"{n / 1e6:.0f}"


def row_line(r: Run, pos: int) -> str:
    if r.variant == "b":
        prep = out = brk = "-"
    elif is_bare(r.variant):
        prep = out = "-"
        brk = f"{r.setup_s:.2f}"
    else:
        prep = f"{r.stages['preflight_s'] + r.stages['prepare_s']:.2f}"
        out = f"{r.stages['output_s']:.2f}"
        brk = f"{r.setup_s:.2f}"
    return (
        f"{r.round:>5}  {pos:>1}  {r.label:<33} {r.wall_s:>8.2f} {r.psi_s:>8.2f} "
        f"{r.link_s:>7.2f} {r.wall_s - r.psi_s:>8.2f} {r.proc_s:>7.2f} {prep:>7} {out:>6} "
        f"{brk:>7}  {r.rows[0]}/{r.rows[1]}  {_mb(r.rss[0])}/{_mb(r.rss[1])}"
        f"  {_mb(r.rss_sum[0])}/{_mb(r.rss_sum[1])}"
    )


def summary(runs: list[Run], variants: list[str]) -> list[str]:
    med: dict[str, dict[str, float]] = {}
    for v in variants:
        rs = [r for r in runs if r.variant == v]
        med[v] = {
            "wall": statistics.median(r.wall_s for r in rs),
            "psi": statistics.median(r.psi_s for r in rs),
            "link": statistics.median(r.link_s for r in rs),
            "other": statistics.median(r.wall_s - r.psi_s for r in rs),
            "nolink": statistics.median(r.wall_s - r.link_s for r in rs),
            "n": len(rs),
            "min_wall": min(r.wall_s for r in rs),
            "max_wall": max(r.wall_s for r in rs),
            "rss_a": statistics.median(r.rss[0] for r in rs),
            "rss_b": statistics.median(r.rss[1] for r in rs),
            "sum_a": statistics.median(r.rss_sum[0] for r in rs),
            "sum_b": statistics.median(r.rss_sum[1] for r in rs),
        }
    lines = [
        (
            f"{'variant':<33} {'runs':>4} {'median wall_s':>13} {'(min-max)':>15} "
            f"{'median psi_s':>12} {'median link_s':>13} {'median wall-psi':>15}"
        )
    ]
    for v in variants:
        m = med[v]
        lines.append(
            f"{variant_label(v):<33} {m['n']:>4} {m['wall']:>13.2f} "
            f"{m['min_wall']:>7.2f}-{m['max_wall']:<7.2f} {m['psi']:>12.2f} "
            f"{m['link']:>13.2f} {m['other']:>15.2f}"
        )
    lines.append("")
    base = med["b"]
    for v in variants:
        if v == "b":
            continue
        rw = med[v]["wall"] / base["wall"]
        rp = med[v]["psi"] / base["psi"]
        lines.append(f"ratio wall {variant_label(v)} / bare SPU: {rw:.2f}")
        lines.append(f"ratio psi call {variant_label(v)} / bare SPU: {rp:.2f}")
        rx = med[v]["nolink"] / base["nolink"]
        lines.append(
            f"  (for information: ratio of median (wall_s - link_s): {rx:.2f}; "
            "bare SPU's link_s includes waiting out brpc connect retries)"
        )
        if is_bare(v):
            lines.append(f"  (the transport's cost: SPU's link through the {variant_route(v)} "
                         "brokers against a direct one)")  # fmt: skip
            continue
        verdict = "met" if rw <= TARGET_RATIO else "NOT met"
        lines.append(f"target wall ratio <= {TARGET_RATIO} ({variant_label(v)}): {verdict}")
        same = f"c:{variant_route(v)}"
        if same in med:
            lines.append(
                f"ratio wall {variant_label(v)} / {variant_label(same)}: "
                f"{med[v]['wall'] / med[same]['wall']:.2f}  (psi-run's own cost, same transport)"
            )
            lines.append(
                f"ratio psi call {variant_label(v)} / {variant_label(same)}: "
                f"{med[v]['psi'] / med[same]['psi']:.2f}"
            )
    lines.append("")
    lines.append(
        "peak RSS of each party's largest process, median, MB (alice/bob); "
        "ratio of the larger party's"
    )
    for v in variants:
        m = med[v]
        line = (
            f"  {variant_label(v):<33} {_mb(m['rss_a'])}/{_mb(m['rss_b'])}"
            f"  (all processes: {_mb(m['sum_a'])}/{_mb(m['sum_b'])})"
        )
        big_base = max(base["rss_a"], base["rss_b"])
        if v != "b" and big_base:
            line += f"  ratio {max(m['rss_a'], m['rss_b']) / big_base:.2f}"
        lines.append(line)
    return lines


# The breakdown's rows, in the order a run goes through them; SPU's own stages are inside psi_s.
STAGES = (
    "import_s", "preflight_s", "handshake_s", "prepare_s", "link_s", "psi_s", "spu:Init",
    "spu:PreProcess", "spu:Online", "spu:PostProcess", "spu:Finalize", "agree_s", "output_s",
    "total_s", "rest_s", "broker_cpu_s",
)  # fmt: skip


def stage_breakdown(runs: list[Run], variants: list[str]) -> list[str]:
    """Each party's stages, median over the rounds (and the range), per variant side by side:
    where the seconds go. ``rest_s`` is the run's wall time minus the party's ``total_s``
    (process start and imports before the party's clock starts, exit, the other party)."""
    lines = [
        "stage breakdown, seconds: median (min-max) over rounds, alice | bob; spu:* are SPU's "
        "own stages (inside psi_s), rest_s = wall_s - total_s, broker_cpu_s = the "
        "party's broker's CPU during the run"
    ]
    cols = [(v, i) for v in variants for i in range(len(PARTIES))]
    short = {v: _short_label(v) for v in variants}
    head = "".join(f"{(short[v] + ' ' + PARTIES[i])[-23:]:>24}" for v, i in cols)
    lines.append(f"  {'stage':<16}{head}")
    for stage in STAGES:
        cells, seen = [], False
        for v, i in cols:
            vals = [r.parts[i][stage] for r in runs if r.variant == v and len(r.parts) > i
                    and stage in r.parts[i]]  # fmt: skip
            if vals:
                seen = True
                cells.append(f"{statistics.median(vals):>8.2f} ({min(vals):.1f}-{max(vals):.1f})")
            else:
                cells.append("-")
        if seen:
            lines.append(f"  {stage:<16}" + "".join(f"{c:>24}" for c in cells))
    return lines


def _short_label(variant: str) -> str:
    """The breakdown's column title (23 characters with the party's name)."""
    if variant == "b":
        return "bare"
    if is_bare(variant):
        return f"bare+brk({variant_route(variant)})"
    return variant_label(variant).replace("+brokers", "")


def result_rows(runs: list[Run], variants: list[str], rows: int, keys: str) -> list[str]:
    """bench/README.md's table: rows, keys, psi-run wall, bare wall, ratio, both peak RSS."""
    base = [r for r in runs if r.variant == "b"]
    bare_wall = statistics.median(r.wall_s for r in base)
    bare_rss = statistics.median(max(r.rss) for r in base)
    out = []
    for v in variants:
        if v == "b":
            continue
        rs = [r for r in runs if r.variant == v]
        wall = statistics.median(r.wall_s for r in rs)
        rss = statistics.median(max(r.rss) for r in rs)
        out.append(
            f"| {rows:,} | {keys} | {variant_label(v)} | {wall:.1f} | {bare_wall:.1f} | "
            f"{wall / bare_wall:.2f} | {_mb(rss)} | {_mb(bare_rss)} | "
            f"{rss / bare_rss if bare_rss else float('nan'):.2f} |"
        )
    return out


# --------------------------------------------------------------------------------------------
# command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The checked options; ``routes`` and ``backends`` come back as lists."""
    ap = argparse.ArgumentParser(description="psi-run + brokers versus bare SPU PSI, N x N rows")
    ap.add_argument("--rows", type=int, default=1_000_000, help="rows per party (default 1M)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    ap.add_argument("--protocol", default="RR22", choices=("RR22", "KKRT", "ECDH"))
    ap.add_argument(
        "--route",
        default="both",
        choices=("grpc", "http", "both"),
        help="broker-to-broker route of (a) (default both)",
    )
    ap.add_argument(
        "--workdir",
        type=Path,
        help="folder for data and runs (default: a temporary folder, removed "
        "afterwards); data there is reused when rows and seed match",
    )
    ap.add_argument("--seed", type=int, default=20240601)
    ap.add_argument(
        "--keys",
        default="plain",
        choices=KEY_KINDS,
        help="plain: uid,x with bare ids; quoted: the same written by pyarrow (header and "
        "values quoted); awkward: pyarrow-written, keys with commas, quotes, non-ASCII",
    )
    ap.add_argument("--timeout", type=float, default=1800.0, help="per run, seconds")
    ap.add_argument("--keep", action="store_true", help="keep every run's outputs and logs")
    ap.add_argument(
        "--backends",
        default="embedded",
        help="comma-separated psi-run backends for (a): embedded, secretflow, ray "
        "(default embedded)",
    )
    ap.add_argument(
        "--shards",
        default="1",
        help="comma-separated shard counts K for (a), e.g. 1,2,4 (default 1)",
    )
    ap.add_argument(
        "--bare-dup-check",
        action="store_true",
        help="(b) lets SPU check for duplicate keys (psi-run skips that check in "
        "SPU because its preflight does it); default: same PsiConfig as psi-run",
    )
    ap.add_argument(
        "--bare-brokers",
        action="store_true",
        help="add (c) to every round, per route: bare_psi.py's SPU call on SPU's blackbox "
        "link through two brokers (as psi-run's link), to tell psi-run's own cost from the "
        "transport's; rounds then rotate the order of the variants",
    )
    args = ap.parse_args(argv)
    if args.rows < 2 or args.rounds < 1:
        ap.error("--rows must be >= 2 and --rounds >= 1")
    for tool in ("psi-run", "psi-broker"):
        if not (BIN / tool).exists():
            ap.error(f"{BIN / tool} not found; run with the project's .venv/bin/python")
    args.routes = ["grpc", "http"] if args.route == "both" else [args.route]
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    try:
        args.shards = [int(k) for k in args.shards.split(",") if k.strip()]
    except ValueError:
        ap.error(f"--shards: whole numbers separated by commas, got {args.shards!r}")
    if not args.shards or any(not 1 <= k <= 64 for k in args.shards):
        ap.error("--shards: each K must be from 1 to 64")
    unknown = sorted(set(args.backends) - {"embedded", "secretflow", "ray"})
    if unknown or not args.backends:
        ap.error(f"--backends: unknown {', '.join(unknown) or '(none given)'}")
    return args


def print_job(args: argparse.Namespace) -> None:
    """The machine and the job, before any run."""
    print("== machine")
    for line in machine_info():
        print("  " + line)
    print(
        f"== job: {args.protocol}, {args.rows} x {args.rows} rows, {args.keys} keys, 50% overlap, "
        f"{args.rounds} round(s), routes {', '.join(args.routes)}; "
        f"(b{', c' if args.bare_brokers else ''}) dup check in SPU: "
        f"{'yes' if args.bare_dup_check else 'no (as psi-run)'}"
    )


def start_ray_heads(heads: list[LocalRayHead]) -> dict[str, str]:
    """A Ray head per party; returns party -> address.

    Each head joins ``heads`` before it starts, so that the caller stops it even if starting fails.
    """
    addresses: dict[str, str] = {}
    for party in PARTIES:
        head = LocalRayHead(party, Path(f"/tmp/psi-bench-ray-{party}-{os.getpid()}"))
        heads.append(head)
        head.start()
        addresses[party] = head.address
    print(f"  Ray heads: {addresses}")
    return addresses


def stop_ray_heads(heads: list[LocalRayHead]) -> None:
    for head in heads:
        head.stop()
        shutil.rmtree(head.temp_dir, ignore_errors=True)


def run_round(
    rnd: int,
    args: argparse.Namespace,
    variants: list[str],
    data: Dataset,
    runs_root: Path,
    ray_addresses: dict[str, str],
) -> list[Run]:
    """Every variant once, printing a row per run; a, b in odd rounds, b, a in even ones, or
    with ``--bare-brokers`` the order rotated by one each round (a, c, b; c, b, a; b, a, c)."""
    if args.bare_brokers:
        turn = (rnd - 1) % len(variants)
        order = variants[turn:] + variants[:turn]
    else:
        order = variants if rnd % 2 == 1 else list(reversed(variants))
    labels = " -> ".join(variant_label(v) for v in order)
    print(f"\n== round {rnd}/{args.rounds}: order {labels}", flush=True)
    print(HEADER)
    runs = []
    for pos, v in enumerate(order, 1):
        run_dir = runs_root / f"r{rnd}-{v.replace(':', '-')}"
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        r = run_variant(v, rnd, pos, args, data, run_dir, ray_addresses)
        runs.append(r)
        print(row_line(r, pos), flush=True)
        if not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)
    return runs


def run_variant(
    variant: str,
    rnd: int,
    pos: int,
    args: argparse.Namespace,
    data: Dataset,
    run_dir: Path,
    ray_addresses: dict[str, str],
) -> Run:
    """One run of ``variant`` (the ``pos``-th of round ``rnd``): (b) bare SPU, (c) bare SPU
    through the route's brokers, or (a) with the variant's backend and route."""
    if variant == "b":
        return run_bare(rnd, data, run_dir, args.protocol, args.timeout, args.bare_dup_check)
    if is_bare(variant):
        return run_bare_brokers(
            rnd, f"bench-bb-{rnd}-{pos}", variant_route(variant), data, run_dir, args.protocol,
            args.timeout, args.bare_dup_check,
        )  # fmt: skip
    return run_product(
        rnd,
        variant_route(variant),
        data,
        run_dir,
        args.protocol,
        args.timeout,
        variant_backend(variant),
        ray_addresses,
        variant_shards(variant),
    )


def print_summary(
    args: argparse.Namespace, runs: list[Run], variants: list[str], data: Dataset, started: float
) -> None:
    print(
        f"\n== summary ({args.protocol}, {args.rows} x {args.rows} rows, {args.rounds} "
        f"round(s), {time.monotonic() - started:.0f} s in all; "
        f"load average now {' '.join(f'{x:.2f}' for x in os.getloadavg())})"
    )
    for line in summary(runs, variants):
        print(line)
    print()
    for line in stage_breakdown(runs, variants):
        print(line)
    who = "variant" if args.bare_brokers else "psi-run"  # (c)'s rows are not psi-run's
    print(
        f"\n| rows | keys | variant | {who} wall s | bare wall s | wall ratio | "
        f"{who} RSS MB | bare RSS MB | RSS ratio |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for line in result_rows(runs, variants, args.rows, args.keys):
        print(line)
    print(
        "all outputs checked: both parties hold exactly the "
        f"{data.overlap} expected rows in every run"
    )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 when every run succeeded, 1 on a failed run, 130 on Ctrl+C."""
    args = parse_args(argv)
    variants = [
        variant_name(b, r, k) for b in args.backends for r in args.routes for k in args.shards
    ]
    if args.bare_brokers:
        variants += [f"c:{r}" for r in args.routes]
    variants.append("b")
    print_job(args)

    temp = args.workdir is None
    work = Path(tempfile.mkdtemp(prefix="psi-bench-")) if temp else args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"  workdir: {work}")
    data = make_dataset(work / "data" / args.keys, args.rows, args.seed, args.keys)
    runs_root = work / "runs"
    failed = False
    runs: list[Run] = []
    started = time.monotonic()
    heads: list[LocalRayHead] = []
    try:
        ray_addresses = start_ray_heads(heads) if "ray" in args.backends else {}
        for rnd in range(1, args.rounds + 1):
            runs += run_round(rnd, args, variants, data, runs_root, ray_addresses)
    except BenchError as exc:
        failed = True
        print(f"\nFAILED: {exc}", file=sys.stderr)
        print(f"(logs and outputs kept under {runs_root})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        failed = True
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        stop_ray_heads(heads)
        if temp and not args.keep and not failed:
            shutil.rmtree(work, ignore_errors=True)

    print_summary(args, runs, variants, data, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
