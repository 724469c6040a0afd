"""A sweep's Ray Tune state is sealed as the driver writes it and checked before Ray reads
it back (raybm.tune.sealed_state): a file planted or changed in the results store is refused,
never unpickled. No Ray needed: the filesystem is the one the driver hands Tune."""

from __future__ import annotations

import json
import os
import pickle

import pyarrow.fs as pafs
import pytest

from raybm.errors import RaybmError
from raybm.tune.sealed_state import STATE_KEY_ENV, check_sealed, is_guarded, sealed_filesystem, state_key


@pytest.fixture
def experiment(tmp_path, monkeypatch):
    monkeypatch.setenv(STATE_KEY_ENV, "a-test-key-of-this-driver")
    root = tmp_path / "sweeps" / "s" / "tune"
    root.mkdir(parents=True)
    return root


def write(fs: pafs.FileSystem, path, data: bytes) -> None:
    fs.create_dir(str(path.parent), recursive=True)
    with fs.open_output_stream(str(path)) as f:
        f.write(data)


def test_what_ray_could_unpickle_is_guarded(experiment):
    root = str(experiment)
    assert is_guarded(root, f"{root}/tuner.pkl") and is_guarded(root, f"{root}/experiment_state-2026.json")
    assert is_guarded(root, f"{root}/trial1/error.pkl")  # a trial's pickled error
    assert not is_guarded(root, f"{root}/trial1/result.json")  # plain JSON Tune never unpickles
    assert not is_guarded(root, f"{root}/trial1/checkpoint_000000/model.safetensors")
    assert not is_guarded(root, f"{root}/.raybm-seal-tuner.pkl") and not is_guarded(root, "/elsewhere/x.pkl")


def test_sealed_files_read_back_and_changed_or_planted_ones_are_refused(experiment):
    fs = sealed_filesystem(pafs.LocalFileSystem(), str(experiment))
    write(fs, experiment / "tuner.pkl", pickle.dumps({"state": 1}))
    write(fs, experiment / "trial1" / "params.json", b"{}")  # not guarded: no seal
    assert (experiment / ".raybm-seal-tuner.pkl").exists()
    assert not (experiment / "trial1" / ".raybm-seal-params.json").exists()
    with fs.open_input_file(str(experiment / "tuner.pkl")) as f:
        assert pickle.loads(f.readall()) == {"state": 1}
    check_sealed(pafs.LocalFileSystem(), str(experiment), "sweep 's'")

    # Rewritten by the driver: the newest and the previous content both verify (a driver
    # killed between writing the seal and the file leaves a state that still loads).
    write(fs, experiment / "tuner.pkl", pickle.dumps({"state": 2}))
    (experiment / "tuner.pkl").write_bytes(pickle.dumps({"state": 1}))
    check_sealed(pafs.LocalFileSystem(), str(experiment), "sweep 's'")

    (experiment / "tuner.pkl").write_bytes(pickle.dumps({"state": "planted"}))  # a bucket writer's file
    with pytest.raises(OSError, match="does not match the seal"):
        fs.open_input_file(str(experiment / "tuner.pkl"))
    with pytest.raises(
        RaybmError,
        match=r"sweep 's': refused to resume: tuner.pkl .* does not carry a valid raybm "
        r"seal.*Nothing was loaded",
    ):
        check_sealed(pafs.LocalFileSystem(), str(experiment), "sweep 's'")


def test_a_planted_file_without_a_seal_and_a_forged_seal_are_refused(experiment, monkeypatch):
    fs = sealed_filesystem(pafs.LocalFileSystem(), str(experiment))
    write(fs, experiment / "tuner.pkl", b"ours")
    (experiment / "experiment_state-1.json").write_text(json.dumps({"_type": "CLOUDPICKLE_FALLBACK"}))
    with pytest.raises(RaybmError, match="experiment_state-1.json"):
        check_sealed(pafs.LocalFileSystem(), str(experiment), "sweep 's'")
    os.remove(experiment / "experiment_state-1.json")
    # A seal made with another key (the attacker's) does not verify under the driver's.
    monkeypatch.setenv(STATE_KEY_ENV, "the-attackers-key")
    write(sealed_filesystem(pafs.LocalFileSystem(), str(experiment)), experiment / "trial1" / "error.pkl", b"x")
    monkeypatch.setenv(STATE_KEY_ENV, "a-test-key-of-this-driver")
    with pytest.raises(RaybmError, match="trial1/error.pkl"):
        check_sealed(pafs.LocalFileSystem(), str(experiment), "sweep 's'")


def test_trials_get_the_filesystem_without_the_key(experiment):
    import ray.cloudpickle as cloudpickle

    fs = sealed_filesystem(pafs.LocalFileSystem(), str(experiment))
    blob = cloudpickle.dumps(fs)
    assert b"a-test-key-of-this-driver" not in blob
    copy = cloudpickle.loads(blob)
    write(copy, experiment / "trial1" / "checkpoint_000000" / "x.bin", b"1")  # trials still write through it
    assert (experiment / "trial1" / "checkpoint_000000" / "x.bin").read_bytes() == b"1"


def test_the_key_file_is_private_and_made_once(tmp_path, monkeypatch):
    monkeypatch.delenv(STATE_KEY_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    key = state_key()
    path = tmp_path / ".config" / "raybm" / "state.key"
    assert oct(path.stat().st_mode & 0o777) == "0o600" and len(key) >= 32
    assert state_key() == key
