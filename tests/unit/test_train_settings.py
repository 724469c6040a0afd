"""Training settings decided on the driver: worker resources, the collective backend, and
the guard against resuming a run with another recipe."""

import os

import pytest

from raybm.config import build_config
from raybm.errors import ConfigError, RaybmError
from raybm.storage.layout import CONFIG_FILE
from raybm.storage.records import DataReport
from raybm.storage.results import Results
from raybm.train.driver import check_same_recipe, reads_whole_splits, recipe_differences, teacher_labels
from raybm.train.optim import amp_settings, precision_name
from raybm.train.publish import best_epoch
from raybm.train.resources import torch_backend, worker_resources


def train_cfg(*overrides):
    return build_config(overrides=list(overrides)).train


def test_workers_reserve_their_share_of_a_gpu():
    assert worker_resources(train_cfg("train.cpus_per_worker=2"), use_gpu=False) == {"CPU": 2.0}
    assert worker_resources(train_cfg("train.gpus_per_worker=0.5"), use_gpu=True) == {"CPU": 1.0, "GPU": 0.5}


def test_backend_is_nccl_on_gpus_and_gloo_when_workers_share_one():
    assert torch_backend(train_cfg(), use_gpu=False) == "gloo"
    assert torch_backend(train_cfg(), use_gpu=True) == "nccl"
    assert torch_backend(train_cfg("train.num_workers=2", "train.gpus_per_worker=0.5"), use_gpu=True) == "gloo"
    assert torch_backend(train_cfg("train.backend=nccl"), use_gpu=False) == "nccl"  # the user's word wins


def test_fsdp_runs_on_gloo_on_cpus_and_needs_nccl_and_whole_gpus_on_gpus():
    assert torch_backend(train_cfg("train.parallelism=fsdp", "train.num_workers=2"), use_gpu=False) == "gloo"
    assert torch_backend(train_cfg("train.parallelism=fsdp", "train.num_workers=2"), use_gpu=True) == "nccl"
    with pytest.raises(RaybmError, match="one GPU per worker"):
        torch_backend(
            train_cfg("train.parallelism=fsdp", "train.num_workers=2", "train.gpus_per_worker=0.5"), use_gpu=True
        )
    with pytest.raises(RaybmError, match="on GPUs needs NCCL"):
        torch_backend(train_cfg("train.parallelism=fsdp", "train.backend=gloo"), use_gpu=True)
    with pytest.raises(ConfigError, match="does not support train.l1"):
        build_config(overrides=["train.parallelism=fsdp", "train.l1=1e-5"])
    with pytest.raises(ConfigError, match="whole number"):
        build_config(overrides=["train.gpus_per_worker=1.5"])


def test_recipe_differences_ignore_where_a_run_runs():
    old = build_config(overrides=["train.lr=1e-4"]).to_dict()
    same = build_config(
        overrides=[
            "train.lr=1e-4",
            "train.num_workers=4",
            "train.use_gpu=no",
            "train.max_failures=3",
            "data.max_rows=50",
        ]
    ).to_dict()
    assert recipe_differences(old, same) == []
    other = build_config(overrides=["train.lr=3e-4", "train.precision=fp32", "model.keep_layers=3"]).to_dict()
    diff = recipe_differences(old, other)
    assert "train.lr: 0.0001 -> 0.0003" in diff
    assert any(d.startswith("train.precision") for d in diff)
    assert any(d.startswith("model.keep_layers") for d in diff)


def test_a_run_is_not_resumed_with_another_recipe(tmp_path):
    results = Results.from_config(build_config(overrides=[f"storage.root={tmp_path}"]).storage)
    run_dir = results.run_dir("r1")
    cfg = build_config(overrides=[f"storage.root={tmp_path}", "name=r1"])
    check_same_recipe(results, run_dir, "r1", cfg)  # a new run: nothing to compare
    results.write_text(results.join(run_dir, CONFIG_FILE), cfg.to_yaml())
    check_same_recipe(
        results, run_dir, "r1", build_config(overrides=[f"storage.root={tmp_path}", "name=r1", "train.num_workers=2"])
    )
    with pytest.raises(RaybmError, match=r"run 'r1' already exists .* another training recipe \(train\.lr"):
        check_same_recipe(
            results, run_dir, "r1", build_config(overrides=[f"storage.root={tmp_path}", "name=r1", "train.lr=1e-3"])
        )


def test_sweeps_run_as_many_trials_as_fit_the_nodes_one_by_one():
    from raybm.tune.trial import trials_that_fit

    def fit(nodes, *overrides, on_cluster=True, gpu=True):
        cfg = build_config(overrides=list(overrides))
        t = cfg.train
        bundle = {"CPU": t.cpus_per_worker, **({"GPU": t.gpus_per_worker} if gpu else {})}
        return trials_that_fit(cfg, [bundle] * t.num_workers, nodes, on_cluster)

    # 16 GPUs the autoscaler may start, none up yet: 2-GPU trials -> 8 at once.
    assert fit([{"CPU": 8}], "train.num_workers=2", "tune.cluster_gpus=16") == 8
    assert fit([{"CPU": 8}], "train.num_workers=1", "tune.cluster_gpus=16") == 16
    assert fit([{"CPU": 64, "GPU": 4}], "train.num_workers=2") == 2  # the GPUs up now
    assert fit([{"CPU": 64, "GPU": 4}], "train.num_workers=2", "train.gpus_per_worker=0.5") == 4
    assert fit([{"CPU": 8}], "train.num_workers=2", "tune.cluster_gpus=16", "tune.max_concurrent_trials=3") == 3
    # CPU sweeps, node by node: three 0.6-CPU trials fit 2 CPUs in all, but not two 1-CPU nodes.
    assert fit([{"CPU": 8}], "train.cpus_per_worker=2", gpu=False, on_cluster=False) == 4
    assert fit([{"CPU": 0}, {"CPU": 1}, {"CPU": 1}], "train.cpus_per_worker=0.6", gpu=False) == 2
    assert fit([{"CPU": 0}, {"CPU": 1}, {"CPU": 1}], "train.cpus_per_worker=1", gpu=False) == 2
    assert fit([{"CPU": 2}], "tune.max_concurrent_trials=4", gpu=False, on_cluster=False) == 2


def test_a_distillation_teacher_is_checked_before_any_work(tmp_path):
    assert teacher_labels(None) is None
    with pytest.raises(RaybmError, match=r"train.distill_from=.*no model.safetensors"):
        teacher_labels(str(tmp_path / "missing"))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(RaybmError, match="not a raybm model folder"):
        teacher_labels(str(tmp_path))
    (tmp_path / "label_map.json").write_text('{"labels": ["negative", "positive"]}')
    assert teacher_labels(str(tmp_path)) == ["negative", "positive"]


def test_work_that_no_node_can_hold_is_named():
    from raybm.placement import check_placeable, copies_that_fit, unplaceable

    nodes = [{"CPU": 0.0, "memory": 8e9}, {"CPU": 1.0, "memory": 8e9}, {"CPU": 1.0, "memory": 8e9}]
    assert unplaceable({"CPU": 1.0}, nodes) is None
    assert unplaceable({"CPU": 2.0}, nodes) == (
        "2 CPU per worker, but the largest node has 1 (nodes: 3 node(s) with 0, 1, 1 CPU)"
    )
    assert unplaceable({"CPU": 1.0, "GPU": 1.0}, nodes).startswith("1 GPU per worker, but no node has any")
    assert unplaceable({"CPU": 1.0, "GPU": 1.0}, nodes, frozenset({"GPU"})) is None  # an autoscaler adds them
    assert unplaceable({"CPU": 1.0, "nobody_has": 1.0}, nodes).startswith("1 nobody_has per worker, but no node")
    assert unplaceable({"CPU": 9.0}, nodes, frozenset({"*"})) is None
    # Two workers of 1 CPU fit two 1-CPU nodes; three do not, though each alone would.
    check_placeable([{"CPU": 1.0}] * 2, nodes, "training", "fix it")
    with pytest.raises(RaybmError, match=r"training needs 3 x \(1 CPU\) placed at once, more than the nodes hold"):
        check_placeable([{"CPU": 1.0}] * 3, nodes, "training", "fix it")
    assert copies_that_fit([{"CPU": 0.5}, {"CPU": 0.5}], nodes) == 2
    assert copies_that_fit([{"CPU": 0.75}], nodes) == 2


def test_the_best_epoch_of_a_tie_is_the_later_one_as_ray_train_ranks_checkpoints():
    # Ray Train keeps the later of tied checkpoints; the published model and the epoch
    # named in metrics.json and the model card must be the same one.
    history = [
        {"epoch": 1, "val_f1_macro": 0.5, "val_loss": 0.4},
        {"epoch": 2, "val_f1_macro": 1.0, "val_loss": 0.2},
        {"epoch": 3, "val_f1_macro": 1.0, "val_loss": 0.2},
        {"epoch": 4, "val_f1_macro": 0.9, "val_loss": 0.3},
    ]
    assert best_epoch(history, "val_f1_macro", "max") == 3
    assert best_epoch(history, "val_loss", "min") == 3
    assert best_epoch(history, "val_loss", "max") == 1
    assert best_epoch([], "val_loss", "min") is None


def test_workers_read_splits_whole_where_the_stored_ids_fit_and_the_split_is_small():
    def report(rows=1000, model="tiny-bert", max_length=16, stored=True):
        return DataReport(
            splits={"train": {"rows": rows}}, tokens={"ids_stored": stored, "model": model, "max_length": max_length}
        )

    def cfg(*overrides):
        return build_config(overrides=["model.name=tiny-bert", "data.max_length=16", *overrides])

    assert reads_whole_splits(cfg(), report())
    assert not reads_whole_splits(cfg("train.data_feed=ray_data"), report())
    assert not reads_whole_splits(cfg("data.augment.enabled=true"), report())  # tokenized anew every epoch
    assert not reads_whole_splits(cfg(), report(max_length=32))  # ids for another length: Ray Data tokenizes
    assert not reads_whole_splits(cfg(), report(rows=10**7))  # 640 MB of ids per worker: streamed
    assert reads_whole_splits(cfg("train.data_feed=whole"), report(rows=10**7))  # the user's word wins
    with pytest.raises(
        RaybmError,
        match="data_feed=whole needs the token ids .* tiny-bert at max_length 16 "
        r"\(stored: for other at max_length 16\)",
    ):
        reads_whole_splits(cfg("train.data_feed=whole"), report(model="other"))
    with pytest.raises(ConfigError, match="data_feed=whole does not work with data.augment"):
        cfg("train.data_feed=whole", "data.augment.enabled=true")


def test_checkpoint_copies_of_workers_that_died_are_removed_and_live_ones_kept(tmp_path):
    import subprocess
    import sys

    from raybm.train.checkpoints import checkpoint_scratch

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        for pid in (dead.pid, alive.pid):
            (tmp_path / str(pid) / "epoch-1").mkdir(parents=True)
        mine = checkpoint_scratch(str(tmp_path))
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([str(alive.pid), os.path.basename(mine)])
        assert (tmp_path / str(alive.pid) / "epoch-1").is_dir()
    finally:
        alive.kill()


def test_a_cpu_runs_bf16_autocast_only_when_asked_and_never_fp16():
    import torch

    cpu = torch.device("cpu")
    assert amp_settings(cpu, "bf16") == (torch.bfloat16, False)
    for other in ("auto", "fp32", "fp16"):
        assert amp_settings(cpu, other) == (None, False), other
    assert [precision_name(d) for d in (torch.bfloat16, torch.float16, None)] == ["bf16", "fp16", "fp32"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.cpu_offload=true"], r"train.cpu_offload offloads FSDP's shards; set train.parallelism=fsdp"),
        (["train.cpu_offload=true", "train.parallelism=fsdp", "train.use_gpu=no"], r"drop train.cpu_offload"),
        (["train.quantize_base=nf4"], r"quantizes the frozen base of a LoRA run; set train.strategy=lora"),
        (["train.quantize_base=nf4", "train.strategy=lora", "train.parallelism=fsdp"], r"use parallelism ddp"),
        (["train.quantize_base=nf4", "train.strategy=lora", "train.use_gpu=no"], r"needs GPU workers"),
    ],
)
def test_offload_and_4bit_settings_that_cannot_work_are_refused_by_the_config(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_config(overrides=overrides)
