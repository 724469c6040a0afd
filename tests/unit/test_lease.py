"""One writer per results folder: a live lease refuses a second writer, a dead or silent
one is taken over, renewals keep it, release frees it (local files; S3 in
tests/integration/test_data_s3.py)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from raybm.config import StorageConfig
from raybm.errors import RaybmError
from raybm.storage.lease import hold_lease
from raybm.storage.results import Results

HOLDER = """
import sys, time
from raybm.config import StorageConfig
from raybm.storage.lease import hold_lease
from raybm.storage.results import Results
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
        with pytest.raises(
            RaybmError,
            match=r"training run 'r1' is being written by another job \(host .*, pid "
            rf"{proc.pid}; lease renewed \d+ s ago\).*Wait for that job",
        ):
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
    lease.write_text(json.dumps({"token": "t0", "host": "elsewhere", "pid": 1, "ttl_s": 5, "renewed_at": time.time()}))
    os.utime(lease, (time.time() - 30, time.time() - 30))  # last written 30 s ago, on the store's clock
    with hold_lease(results, "sweeps", "s1", "sweep 's1'", log=lambda m: None):
        pass
    # Written just now by a holder whose clock runs 30 s behind (or a taker's 30 s ahead):
    # its own renewed_at does not make a live lease stale.
    lease.write_text(
        json.dumps({"token": "t1", "host": "elsewhere", "pid": 1, "ttl_s": 5, "renewed_at": time.time() - 30})
    )
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


def test_an_empty_lease_file_blocks_until_its_ttl_then_is_taken_over(tmp_path):
    results = results_at(tmp_path, ttl=5)
    lease = tmp_path / ".leases" / "runs-r1"
    lease.parent.mkdir(parents=True)
    lease.write_bytes(b"")  # a writer that died between creating the file and writing it
    started = time.time()
    with pytest.raises(
        RaybmError,
        match=r"being written by another job \(a job whose lease file is still being "
        r"written",
    ):
        with hold_lease(results, "runs", "r1", "training run 'r1'"):
            pass
    assert time.time() - started < 5  # refused at once: no retry loop
    os.utime(lease, (time.time() - 10, time.time() - 10))
    said = []
    with hold_lease(results, "runs", "r1", "training run 'r1'", log=said.append) as held:
        held.check()
        assert json.loads(lease.read_text())["generation"] == 2
    assert "Took over the stale lease" in said[0]


FENCED = """
import sys, time
from raybm.config import StorageConfig
from raybm.errors import RaybmError
from raybm.storage.lease import hold_lease
from raybm.storage.results import Results
results = Results(sys.argv[1], StorageConfig(root=sys.argv[1], lease_ttl_s=5))
with hold_lease(results, "runs", "r1", "training run 'r1'", log=lambda m: None) as lease:
    print("held", flush=True)
    sys.stdin.readline()
    try:
        lease.check()
        print("published", flush=True)
    except RaybmError as e:
        print("refused:", e, flush=True)
"""


def test_a_writer_that_lost_its_lease_publishes_nothing(tmp_path):
    """Fencing: a job stalled past its lease's time-to-live (stopped here with SIGSTOP) is
    taken over; when it wakes it checks its lease before publishing and stops."""
    first = subprocess.Popen(
        [sys.executable, "-c", FENCED, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert first.stdout.readline().strip() == "held"
        first.send_signal(signal.SIGSTOP)
        time.sleep(6.5)  # past the ttl of 5 s: nobody renewed it
        lease = tmp_path / ".leases" / "runs-r1"
        with hold_lease(results_at(tmp_path, ttl=5), "runs", "r1", "training run 'r1'", log=lambda m: None) as mine:
            assert json.loads(lease.read_text())["generation"] == 2
            first.send_signal(signal.SIGCONT)
            first.stdin.write("go\n")
            first.stdin.flush()
            said = first.stdout.readline()
            assert said.startswith("refused: training run 'r1': this job lost its lease"), said
            mine.check()  # the new holder's lease is intact
    finally:
        first.kill()
        first.wait()


SKEWED = """
import sys, time
real = time.time
time.time = lambda: real() + 30  # this job's clock runs 30 s ahead of the store's
from raybm.config import StorageConfig
from raybm.errors import RaybmError
from raybm.storage.lease import hold_lease
from raybm.storage.results import Results
results = Results(sys.argv[1], StorageConfig(root=sys.argv[1], lease_ttl_s=5))
try:
    with hold_lease(results, "runs", "r1", "training run 'r1'", log=print):
        print("took it")
except RaybmError as e:
    print("refused:", e)
"""


def test_a_job_whose_clock_runs_ahead_cannot_take_a_live_lease(tmp_path):
    """Ages are read on the store's clock: a second job on a machine whose clock runs 30 s
    ahead (over a TTL of 5 s) still finds the holder's lease live."""
    first = holder(str(tmp_path), ttl=5)
    try:
        time.sleep(2)
        got = subprocess.run([sys.executable, "-c", SKEWED, str(tmp_path)], capture_output=True, text=True, timeout=60)
        assert got.stdout.startswith("refused: training run 'r1' is being written by another job"), got
    finally:
        first.kill()
        first.wait()
