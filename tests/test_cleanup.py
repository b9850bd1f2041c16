"""Nothing left behind: SPU's scratch copies of a party's data, its trace file and whatever a
library writes to the temp folder stay in private folders that are removed at the end."""

from __future__ import annotations

import os
import random
import re
import stat
from pathlib import Path

import pytest
from conftest import make_ids, read_result, write_csv, write_spec

from harness.localnet import run_parties

# SPU's own scratch folders (16 characters of its alphabet) and trace files, as seen in /tmp.
_SPU_LEFTOVER = re.compile(r"^(psi_\w+\.trace|[A-D][A-Za-z0-9_-]([A-D][A-Za-z0-9_-]){7})$")


def _spu_leftovers(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if _SPU_LEFTOVER.match(p.name)}


@pytest.mark.parametrize("backend", ["embedded", "secretflow"])
def test_a_job_leaves_nothing_in_the_temp_folder_or_the_working_directory(
    tmp_path, brokers, backend
):
    rng = random.Random(11)
    shared = make_ids(300, "s", rng)
    write_csv(tmp_path / "data/alice.csv", {"uid": shared + make_ids(700, "a", rng)})
    write_csv(tmp_path / "data/bob.csv", {"uid": [*shared, 'q"uote', *make_ids(699, "b", rng)]})
    spec = write_spec(tmp_path, brokers, job_id=f"clean-{backend}", backend=backend)
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    system_tmp = Path("/tmp")
    before = _spu_leftovers(system_tmp)

    results = run_parties(
        spec,
        ["alice", "bob"],
        timeout_s=300,
        cwd=cwd,
        extra_env={"TMPDIR": str(private_tmp)},
        log_dir=tmp_path / "logs",
    )

    for r in results:
        assert r.returncode == 0, r.stderr
    assert len(read_result(tmp_path / "out/alice_psi.csv")) == 300
    assert list(private_tmp.iterdir()) == [], list(private_tmp.iterdir())
    assert list(cwd.iterdir()) == [], list(cwd.iterdir())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "alice_psi.csv",
        "bob_psi.csv",
    ]
    assert _spu_leftovers(system_tmp) - before == set()


def test_work_folder_is_private_while_the_job_runs(tmp_path):
    """The work folder (SPU's scratch inside it) is created 0700."""
    from psi_runner.workdir import create_work_dir

    work = create_work_dir(tmp_path, "alice")
    try:
        assert stat.S_IMODE(os.stat(work).st_mode) == 0o700
    finally:
        work.rmdir()
