"""The driver dies mid-run (SIGKILL, whole process group); the same command resumes.

Runs `raybm train` as a user would, in a subprocess with its own local Ray.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import make_frame

pytestmark = pytest.mark.integration


def test_rerun_after_the_driver_was_killed_resumes(tmp_path):
    data = tmp_path / "d.csv"
    make_frame(60).to_csv(data, index=False)
    cmd = [
        sys.executable,
        "-m",
        "raybm.cli",
        "train",
        f"storage.root={tmp_path / 'r'}",
        f"data.source={data}",
        "data.text_column=body",
        "data.label_column=sentiment",
        "data.max_length=16",
        "model.name=tiny-bert",
        "train.batch_size=16",
        "train.lr=0.003",
        "train.epochs=8",
        "name=killed",
        "ray.num_cpus=2",
    ]
    # 8 epochs of about a second each: with 3, the run sometimes finished all of them
    # between its first checkpoint and the kill, and the rerun had nothing to resume.
    run_dir = tmp_path / "r" / "runs" / "killed"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (run_dir / "checkpoint_manager_snapshot.json").exists():
            time.sleep(0.5)
        assert (run_dir / "checkpoint_manager_snapshot.json").exists(), "no checkpoint within 4 minutes"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
        proc.wait()
    assert not (run_dir / "_SUCCESS").exists()

    done = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-2000:]
    history = json.loads((run_dir / "history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(1, 9))
    assert history[-1]["resumed_from_epoch"] >= 1  # the rerun started after a saved epoch
    assert (run_dir / "_SUCCESS").exists()
