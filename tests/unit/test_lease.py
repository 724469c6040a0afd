"""One writer per results folder: a live lease refuses a second writer, a dead or silent
one is taken over, renewals keep it, release frees it (local files; S3 in
tests/integration/test_data_s3.py)."""

import json
import subprocess
import sys
import time

import pytest

from raybm.config import StorageConfig
from raybm.errors import RaybmError
from raybm.lease import hold_lease
from raybm.results import Results

HOLDER = """
import sys, time
from raybm.config import StorageConfig
from raybm.lease import hold_lease
from raybm.results import Results
results = Results(sys.argv[1], StorageConfig(root=sys.argv[1], lease_ttl_s=float(sys.argv[2])))
with hold_lease(results, "runs", "r1", "training run 'r1'", log=lambda m: None):
    print("held", flush=True)
    time.sleep(600)
"""


def holder(root: str, ttl: float = 60) -> subprocess.Popen:
    """Another job holding the lease of runs/r1."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, root, str(ttl)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def results_at(root, ttl: float = 60) -> Results:
    return Results(str(root), StorageConfig(root=str(root), lease_ttl_s=ttl))


def test_a_live_writer_refuses_a_second_and_a_killed_one_is_taken_over(tmp_path):
    results = results_at(tmp_path)
    proc = holder(str(tmp_path))
    try:
        with pytest.raises(RaybmError, match=r"training run 'r1' is being written by another job \(host .*, pid "
                                             rf"{proc.pid}; lease renewed \d+ s ago\).*Wait for that job"):
            with hold_lease(results, "runs", "r1", "training run 'r1'"):
                pass
        with hold_lease(results, "runs", "r2", "training run 'r2'"):  # another name is free
            pass
    finally:
        proc.kill()
        proc.wait()
    said = []
    with hold_lease(results, "runs", "r1", "training run 'r1'", log=said.append):  # its owner is gone
        record = json.loads((tmp_path / ".leases" / "runs-r1").read_text())
        assert record["pid"] != proc.pid
    assert said and "Took over the stale lease of training run 'r1'" in said[0]
    assert not (tmp_path / ".leases" / "runs-r1").exists()  # released


def test_a_lease_nobody_renews_expires_and_a_renewed_one_does_not(tmp_path):
    results = results_at(tmp_path, ttl=5)
    lease = tmp_path / ".leases" / "sweeps-s1"
    lease.parent.mkdir(parents=True)
    # A holder on another host (its process cannot be checked) that stopped renewing.
    lease.write_text(json.dumps({"token": "t0", "host": "elsewhere", "pid": 1, "ttl_s": 5,
                                 "renewed_at": time.time() - 30}))
    with hold_lease(results, "sweeps", "s1", "sweep 's1'", log=lambda m: None):
        pass
    lease.write_text(json.dumps({"token": "t1", "host": "elsewhere", "pid": 1, "ttl_s": 5,
                                 "renewed_at": time.time()}))
    with pytest.raises(RaybmError, match="sweep 's1' is being written by another job"):
        with hold_lease(results, "sweeps", "s1", "sweep 's1'"):
            pass
    lease.unlink()
    # The holder renews every ttl/3: past its ttl, it still holds the lease.
    with hold_lease(results, "sweeps", "s1", "sweep 's1'"):
        first = json.loads(lease.read_text())["renewed_at"]
        time.sleep(6)
        assert json.loads(lease.read_text())["renewed_at"] > first + 1
        with pytest.raises(RaybmError, match="is being written by another job"):
            with hold_lease(results_at(tmp_path, ttl=5), "sweeps", "s1", "sweep 's1'"):
                pass
