"""Sharded checkpoints (raybm.train.sharded) on real FSDP2 process groups (gloo, CPU):
written by 2 ranks, read back by 3 (DCP reshards), published into one model.safetensors."""

import json
import os

import pytest
import torch

from raybm.errors import RaybmError
from raybm.storage.layout import SHARDS_DIR, SHARDS_INDEX_FILE, WEIGHTS_FILE
from tests.process_groups import spawn_ranks

LABELS = ["negative", "positive"]


def _sharded_model(rank: int):
    """tiny-bert sharded over the process group the way training does it (rank 0's weights)."""
    from raybm.config import build_config
    from raybm.train.fsdp import wrap_fsdp
    from raybm.train.worker import build_training_model

    cfg = build_config(overrides=["model.name=tiny-bert", "train.parallelism=fsdp"])
    torch.manual_seed(0)
    model = build_training_model(cfg.train, cfg.model, LABELS, on_meta=rank != 0)
    return wrap_fsdp(model, torch.device("cpu"))


def _full_state(model, optimizer):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _rank(rank: int, world: int, mode: str, folder: str) -> None:
    from raybm.train.sharded import load_sharded, save_sharded, write_shards_index

    model = _sharded_model(rank)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    if mode == "save":
        for _ in range(2):  # moments and step counts worth restoring
            ids = torch.randint(5, 100, (4, 12), generator=torch.Generator().manual_seed(rank))
            model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.sum().backward()
            optimizer.step()
            optimizer.zero_grad()
        saved = save_sharded(folder, model, optimizer, with_model=True, file_bytes=256 * 1024)
        full = _full_state(model, optimizer)
        if rank == 0:
            write_shards_index(folder, saved.pop("files"), with_model=True)
            torch.save({"saved": saved, "full": full}, os.path.join(folder, "reference.pt"))
    else:
        reference = torch.load(os.path.join(folder, "reference.pt"), weights_only=True)
        load_sharded(folder, model, optimizer, reference["saved"], with_model=True)
        model_state, optim_state = _full_state(model, optimizer)
        if rank == 0:
            want_model, want_optim = reference["full"]
            assert model_state.keys() == want_model.keys()
            for k, v in want_model.items():
                assert torch.equal(model_state[k], v), k
            for name, entry in want_optim["state"].items():
                for key, value in entry.items():
                    assert torch.equal(optim_state["state"][name][key], value), (name, key)
            assert optim_state["param_groups"][0]["lr"] == 0.01
            with open(os.path.join(folder, "loaded.json"), "w") as f:
                json.dump({"world": world, "tensors": len(model_state)}, f)


@pytest.fixture(scope="module")
def sharded_checkpoint(tmp_path_factory):
    """A checkpoint folder with 2 ranks' shards of a trained tiny-bert and its optimizer."""
    folder = str(tmp_path_factory.mktemp("sharded"))
    spawn_ranks(_rank, 2, "save", folder)
    return folder


def test_each_rank_writes_its_files_in_bounded_runs_all_listed_and_none_pickled(sharded_checkpoint):
    from safetensors import safe_open

    files = sorted(os.listdir(os.path.join(sharded_checkpoint, SHARDS_DIR)))
    index = json.load(open(os.path.join(sharded_checkpoint, SHARDS_INDEX_FILE)))
    assert index["model"] is True and index["files"] == files
    assert all(f.endswith(".safetensors") for f in files)  # read back by safetensors, never unpickled
    by_rank = {f.split("-model-")[0] for f in files}
    assert by_rank == {"shard-00001", "shard-00002"} and len(files) > 4  # runs of 256 KiB: several files a rank
    for f in files:  # each file about 256 KiB / 2 ranks, or one tensor's shard when that is larger
        with safe_open(os.path.join(sharded_checkpoint, SHARDS_DIR, f), "pt") as st:
            sizes = [st.get_slice(k).get_shape() for k in st.keys()]
        assert len(sizes) == 1 or os.path.getsize(os.path.join(sharded_checkpoint, SHARDS_DIR, f)) < 200 * 1024


def test_three_ranks_resume_what_two_wrote(sharded_checkpoint, tmp_path):
    import shutil

    folder = str(tmp_path / "ckpt")
    shutil.copytree(sharded_checkpoint, folder)
    spawn_ranks(_rank, 3, "load", folder)
    assert json.load(open(os.path.join(folder, "loaded.json")))["world"] == 3


def test_publishing_streams_the_shards_into_one_safetensors_file_with_the_same_logits(sharded_checkpoint, tmp_path):
    import shutil

    from safetensors.torch import load_file

    from raybm.config import build_config
    from raybm.models.build import build_classifier
    from raybm.train.sharded import publish_sharded

    folder = str(tmp_path / "ckpt")
    shutil.copytree(sharded_checkpoint, folder)
    want = torch.load(os.path.join(folder, "reference.pt"), weights_only=True)["full"][0]
    publish_sharded(folder, batch_bytes=64 * 1024)  # many batches, some tensors alone in theirs
    assert not os.path.exists(os.path.join(folder, SHARDS_DIR)) and not os.path.exists(
        os.path.join(folder, SHARDS_INDEX_FILE)
    )
    got = load_file(os.path.join(folder, WEIGHTS_FILE))
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    model = build_classifier(build_config(overrides=["model.name=tiny-bert"]).model, LABELS, pretrained=False)
    model.load_state_dict(got)
    trained = build_classifier(build_config(overrides=["model.name=tiny-bert"]).model, LABELS, pretrained=False)
    trained.load_state_dict(want)
    ids = torch.randint(5, 100, (3, 9))
    model.eval(), trained.eval()
    assert torch.equal(model(input_ids=ids).logits, trained(input_ids=ids).logits)


def test_a_model_past_the_file_size_is_published_in_several_files_that_transformers_loads(sharded_checkpoint, tmp_path):
    import shutil

    from transformers import AutoModelForSequenceClassification

    from raybm.config import build_config
    from raybm.models.build import build_classifier
    from raybm.storage.layout import WEIGHTS_INDEX_FILE, weight_files
    from raybm.train.sharded import publish_sharded
    from raybm.tune.cost import architecture

    folder = str(tmp_path / "ckpt")
    shutil.copytree(sharded_checkpoint, folder)
    want = torch.load(os.path.join(folder, "reference.pt"), weights_only=True)["full"][0]
    publish_sharded(folder, batch_bytes=64 * 1024, file_bytes=300 * 1024)
    files = weight_files(folder)
    assert len(files) > 2 and not os.path.exists(os.path.join(folder, WEIGHTS_FILE))
    index = json.load(open(os.path.join(folder, WEIGHTS_INDEX_FILE)))
    assert sorted(set(index["weight_map"].values())) == [os.path.basename(f) for f in files]
    assert index["weight_map"].keys() == want.keys()
    assert not [f for f in os.listdir(folder) if f.endswith(".partial")]
    build_classifier(
        build_config(overrides=["model.name=tiny-bert"]).model, LABELS, pretrained=False
    ).config.save_pretrained(folder)
    loaded = AutoModelForSequenceClassification.from_pretrained(folder).state_dict()
    assert all(torch.equal(loaded[k], want[k]) for k in want)
    assert architecture(folder)[1] == sum(v.numel() for v in want.values())  # a sweep's cost reads every file


def test_a_checkpoint_missing_a_ranks_shard_is_refused_by_name(sharded_checkpoint, tmp_path):
    import shutil

    from raybm.train.sharded import check_shards, publish_sharded

    folder = str(tmp_path / "ckpt")
    shutil.copytree(sharded_checkpoint, folder)
    shards = os.path.join(folder, SHARDS_DIR)
    os.remove(os.path.join(shards, sorted(os.listdir(shards))[-1]))
    with pytest.raises(
        RaybmError,
        match=r"incomplete checkpoint \(1 shard file\(s\) missing from shards/: shard-.*"
        r"upload was cut short",
    ):
        check_shards(folder)
    with pytest.raises(RaybmError, match="incomplete checkpoint"):
        publish_sharded(folder)
    assert not os.path.exists(os.path.join(folder, WEIGHTS_FILE))


def test_a_sweep_never_ranks_a_sharded_checkpoint_missing_a_ranks_file(tmp_path):
    from raybm.config import build_config
    from raybm.storage.layout import EPOCH_METRICS_FILE
    from raybm.storage.results import Results
    from raybm.train.checkpoints import CHECKPOINT_FILES
    from raybm.tune.leaderboard import best_checkpoint

    run = tmp_path / "run"
    for name, accuracy, shard_files in (("checkpoint_a", 0.9, 1), ("checkpoint_b", 0.7, 2)):
        folder = run / name
        (folder / SHARDS_DIR).mkdir(parents=True)
        for f in CHECKPOINT_FILES:
            (folder / f).write_text("{}")
        (folder / EPOCH_METRICS_FILE).write_text(json.dumps({"epoch": 1, "val_accuracy": accuracy}))
        (folder / SHARDS_INDEX_FILE).write_text(
            json.dumps({"files": ["shard-0.safetensors", "shard-1.safetensors"], "model": True})
        )
        for i in range(shard_files):
            (folder / SHARDS_DIR / f"shard-{i}.safetensors").write_bytes(b"x")
    results = Results.from_config(build_config(overrides=[f"storage.root={tmp_path}"]).storage)
    path, metrics = best_checkpoint(results, str(run), "val_accuracy", "max")
    assert path.endswith("checkpoint_b") and metrics["val_accuracy"] == 0.7  # the better one lost a rank's file
