"""A sweep whose driver dies (SIGKILL, whole process group) finishes with --resume,
without re-running the trials that had finished.

Runs `raybm tune` as a user would, in a subprocess with its own local Ray.
"""

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import make_frame

pytestmark = pytest.mark.integration


def _trial_states(tune_dir: Path) -> dict[str, str]:
    """Trial id -> status, from Tune's newest experiment state file (plain JSON)."""
    files = sorted(glob.glob(str(tune_dir / "experiment_state-*.json")), key=os.path.getmtime)
    if not files:
        return {}
    try:
        state = json.loads(Path(files[-1]).read_text())
    except (OSError, ValueError):  # caught mid-write
        return {}
    out = {}
    for entry in state.get("trial_data", []):
        trial = json.loads(entry[0])
        out[trial["trial_id"]] = trial["status"]
    return out


def _checkpoints(trial_dir: Path) -> set[str]:
    """A trial's checkpoint folders. Its trials train in their own processes (one worker
    each, tune.trial_runner=auto), so Tune keeps them in its trial folder."""
    return {p.name for p in trial_dir.glob("checkpoint_*")}


def test_killed_sweep_resumes_without_rerunning_finished_trials(tmp_path):
    data = tmp_path / "d.csv"
    make_frame(60).to_csv(data, index=False)
    cmd = [
        sys.executable,
        "-m",
        "raybm.cli",
        "tune",
        f"storage.root={tmp_path / 'r'}",
        f"data.source={data}",
        "data.text_column=body",
        "data.label_column=sentiment",
        "data.max_length=16",
        "model.name=tiny-bert",
        "train.batch_size=16",
        "train.lr=0.003",
        "train.epochs=20",
        "name=killed",
        "ray.num_cpus=2",
        "tune.scheduler=fifo",
        "tune.max_concurrent_trials=1",
        "tune.num_samples=1",
        "tune.search_space={train.weight_decay: 'grid([0.0, 0.01])'}",
    ]
    sweep = tmp_path / "r" / "sweeps" / "killed"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        # Kill once one trial has finished and the next has saved two checkpoints (the first
        # is then in Tune's experiment state). 20 short epochs: with fewer, the next trial
        # sometimes ran all of them before the kill.
        deadline, ready = time.time() + 300, None
        while time.time() < deadline and ready is None:
            states = _trial_states(sweep / "tune")
            done = [t for t, s in states.items() if s == "TERMINATED"]
            running = [t for t, s in states.items() if s == "RUNNING" and len(_checkpoints(sweep / "tune" / t)) >= 2]
            if done and running:
                ready = (done, running)
            time.sleep(0.5)
        assert ready, f"no finished trial plus a checkpointed running one within 5 minutes: {states}"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
        proc.wait()
    done, running = ready
    assert not (sweep / "_SUCCESS").exists()
    finished_checkpoints = {t: _checkpoints(sweep / "tune" / t) for t in done}
    assert all(finished_checkpoints.values())

    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=500)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming sweep" in resumed.stdout
    board = {row["trial"]: row for row in json.loads((sweep / "leaderboard.json").read_text())}
    assert len(board) == 2 and all(row["status"] == "completed" for row in board.values()), {
        t: (row["status"], row["epochs_run"], [h["epoch"] for h in row["history"]]) for t, row in board.items()
    }
    for t in done:  # finished trials did not run again
        assert _checkpoints(sweep / "tune" / t) == finished_checkpoints[t]
    for t in running:  # the interrupted trial went on from its checkpoint
        assert board[t]["history"][-1]["resumed_from_epoch"] >= 1
        assert [h["epoch"] for h in board[t]["history"]][-1] == 20
    assert (sweep / "_SUCCESS").exists() and (sweep / "model" / "_SUCCESS").exists()
    assert "Winner: trial" in resumed.stdout
    header = next(ln for ln in resumed.stdout.splitlines() if ln.startswith("rank") and "trial" in ln)
    assert resumed.stdout.count(header) == 1, "the leaderboard is printed once"
