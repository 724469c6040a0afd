"""Sweeps on Ray Tune, each trial a Ray Train run of a tiny random BERT on tiny data."""

import csv
import json
import os
from pathlib import Path

import pytest
import torch

from raybm.config import build_config
from raybm.errors import RaybmError
from raybm.tune.leaderboard import format_leaderboard
from raybm.tune.soup import run_soup
from raybm.tune.sweep import run_sweep
from tests.helpers import make_frame

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ray_tune():
    """A local Ray as raybm starts one: no dashboard, so no state API, and so no help from
    Ray Train's placement-group cleaner for a stopped trial (the sweep frees it itself)."""
    import ray
    import ray.data

    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def data_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("tune-data") / "reviews.csv"
    make_frame(60).to_csv(path, index=False)
    return path


def config(root, data_csv, *overrides):
    return build_config(
        overrides=[
            f"storage.root={root}",
            f"data.source={data_csv}",
            "data.text_column=body",
            "data.label_column=sentiment",
            "data.max_length=16",
            "model.name=tiny-bert",
            "train.batch_size=16",
            "train.warmup_ratio=0",
            "train.log_every_steps=100",
            "train.cpus_per_worker=0.5",
            "tune.max_concurrent_trials=2",
            *overrides,
        ]
    )


def quiet(_):
    pass


@pytest.fixture(scope="module")
def asha_sweep(ray_tune, tmp_path_factory, data_csv, mlflow_server):
    """One ASHA sweep with a greedy soup, shared by the tests below: (config, result, root).
    One learning rate that learns, three that cannot (lr ~ 0): ASHA (rungs at epochs 1
    and 2) must stop at least one of the three once the good trial has reported. Batches
    of 4 (24 steps an epoch): the good trial must already be ahead at a rung (with 6 steps
    an epoch it could still tie the others at epoch 2, and ASHA stops none of a tie)."""
    root = tmp_path_factory.mktemp("asha")
    cfg = config(
        root,
        data_csv,
        "train.epochs=3",
        "train.batch_size=4",
        "tune.num_samples=1",
        "tune.soup=greedy",
        "tune.soup_size=2",
        "tune.search_space={train.lr: 'grid([3e-3, 1e-11, 1e-12, 2e-12])'}",
        f"tracking.mlflow_uri={mlflow_server}",
        "tracking.experiment=sweep-tests",
    )
    return cfg, run_sweep(cfg, log=quiet), root


def test_asha_stops_weak_trials_and_ranks_every_trial(asha_sweep):
    _, result, _ = asha_sweep
    board = result.leaderboard
    assert len(board) == 4
    assert [row.rank for row in board] == [1, 2, 3, 4]
    assert board[0].get("train.lr") == 3e-3 and board[0].get("val_f1_macro") >= 0.8
    assert any(row.status == "stopped" and row.epochs_run < 3 for row in board), board
    assert all(row.best_checkpoint and row.seconds > 0 for row in board)
    for row in board:  # per-epoch curves for the dashboard
        assert [h["epoch"] for h in row.history] == list(range(1, row.epochs_run + 1))
    table = format_leaderboard(board, "val_f1_macro")
    assert "train.lr" in table.splitlines()[0] and "latency_p50_ms" in table.splitlines()[0]
    assert len(table.splitlines()) == 6


def test_the_sweep_folder_holds_the_leaderboard_and_a_tested_winner_with_its_card(asha_sweep):
    _, result, _ = asha_sweep
    board, sweep = result.leaderboard, Path(result.sweep_dir)
    assert {"config.yaml", "leaderboard.csv", "leaderboard.json", "winner.json", "model", "_SUCCESS"} <= set(
        os.listdir(sweep)
    )
    with open(sweep / "leaderboard.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["trial"] for r in rows] == [row.trial for row in board]
    assert {
        "rank",
        "trial",
        "train.lr",
        "val_f1_macro",
        "epochs_run",
        "status",
        "best_checkpoint",
        "seconds",
        "params",
        "size_mb",
        "latency_p50_ms",
    } <= set(rows[0])
    winner = json.loads((sweep / "winner.json").read_text())
    assert winner["trial"] == board[0].trial and winner["values"] == {"train.lr": 3e-3}
    assert winner["test"]["examples"] == 12 and winner["test"]["accuracy"] >= 0.8 and winner["version"] == 1
    assert {"model.safetensors", "config.json", "label_map.json", "_SUCCESS", "README.md"} <= set(
        os.listdir(sweep / "model")
    )
    card = (sweep / "model" / "README.md").read_text()
    assert "winner of a raybm sweep" in card and f"trial {result.winner.trial} (" in card
    assert f"| {result.winner.test['accuracy']:.4f} |" in card
    assert "| precision | fp32 |" in card and all(row.precision == "fp32" for row in result.leaderboard)
    assert not (sweep / "model" / "train_state.pt").exists()
    # Every trial's curves for TensorBoard, in its own folder: one validation point an epoch it ran.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for row in board:
        events = EventAccumulator(str(Path(row.best_checkpoint).parent / "tensorboard"))  # the trial's folder
        events.Reload()
        assert len(events.Scalars("val/f1_macro")) == row.epochs_run, row.trial
        assert events.Scalars("train/loss") and events.Scalars("train/lr"), row.trial


def test_the_sweep_is_a_parent_run_in_mlflow_with_a_child_per_trial(asha_sweep, mlflow_server):
    from mlflow.tracking import MlflowClient

    _, result, _ = asha_sweep
    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("sweep-tests").experiment_id])
    [parent] = [r for r in runs if r.data.tags["raybm.kind"] == "sweep"]
    assert parent.info.run_name == result.name and parent.data.tags["raybm.winner"] == result.winner.trial
    assert parent.data.metrics["test_accuracy"] == pytest.approx(result.winner.test["accuracy"])
    assert {"leaderboard.json", "winner.json", "model_card.md"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)
    }
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {row.trial for row in result.leaderboard}
    for row in result.leaderboard:
        child = children[row.trial]
        assert float(child.data.params["train.lr"]) == row.get("train.lr")  # the trial's own config
        assert child.data.tags["raybm.trial_status"] == row.status
        assert child.data.tags["raybm.stopped_by_scheduler"] == str(row.status == "stopped").lower()
        assert len(client.get_metric_history(child.info.run_id, "val_f1_macro")) == row.epochs_run
    assert any(row.status == "stopped" for row in result.leaderboard)  # ASHA's stop shows in MLflow


def test_the_greedy_soup_hands_on_the_mean_of_what_it_kept(asha_sweep):
    # The greedy soup starts from the winner, tries the runner-up, and hands on the mean of
    # what it kept, which is never worse on validation than the winner alone.
    _, result, _ = asha_sweep
    board, winner = result.leaderboard, result.winner
    soup = winner.soup
    assert soup["method"] == "greedy" and soup["ingredients"][0] == board[0].trial
    assert [t["model"] for t in soup["tried"]] == [board[1].trial]
    assert soup["validation"] >= soup["best_single"] == pytest.approx(board[0].get("val_f1_macro"))
    assert winner.validation == (soup["validation"] if len(soup["ingredients"]) > 1 else board[0].get("val_f1_macro"))
    kept = [row for row in board if row.trial in soup["ingredients"]]
    assert_weights_are_the_mean(Path(result.sweep_dir) / "model", [row.best_checkpoint for row in kept])


def test_serving_cost_is_measured_once_for_the_architecture_all_trials_share(asha_sweep):
    _, result, _ = asha_sweep
    board, winner = result.leaderboard, result.winner
    assert len({(row.params, row.get("latency_p50_ms")) for row in board}) == 1
    assert board[0].params > 0 and board[0].size_mb > 0 and board[0].get("latency_p50_ms") > 0
    assert winner.cost == {k: board[0].get(k) for k in ("params", "size_mb", "latency_p50_ms")}
    assert winner.latency_budget is None and board[0].within_budget is None


def test_the_same_sweep_again_is_read_back_and_nothing_reruns(asha_sweep):
    cfg, result, _ = asha_sweep
    winner_file = Path(result.sweep_dir) / "winner.json"
    written = winner_file.stat().st_mtime_ns
    again = run_sweep(cfg, log=quiet)
    assert again.winner == result.winner and winner_file.stat().st_mtime_ns == written


def test_raybm_soup_over_two_trials_makes_a_run_picked_on_validation_and_scored_on_test(asha_sweep):
    # `raybm soup` over two trials' checkpoints: a new run, ranked and picked on validation,
    # scored on test, in the layout of a training run.
    from raybm.dashboard.data import DashboardData

    cfg, result, root = asha_sweep
    board, winner = result.leaderboard, result.winner
    pair = [board[1].best_checkpoint, board[0].best_checkpoint]
    out = run_soup(cfg, pair, winner.dataset, "two-trials", "uniform", log=quiet)
    run = root / "runs" / "two-trials"
    assert out["run_dir"] == str(run) and (run / "_SUCCESS").exists()
    assert {"model", "metrics.json", "config.yaml", "test_predictions.parquet"} <= set(os.listdir(run))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test"]["examples"] == 12 and metrics["dataset"] == winner.dataset
    assert metrics["soup"]["method"] == "uniform" and metrics["soup"]["ingredients"] == pair[::-1]  # best first
    assert metrics["model"] == "tiny-bert" and (run / "model" / "soup.json").exists()
    assert metrics["validation"] == {"val_f1_macro": metrics["soup"]["validation"]}
    listed = {job.name: job for job in DashboardData(str(root)).jobs()}
    assert listed["two-trials"].best == metrics["soup"]["validation"] and listed["two-trials"].complete
    assert_weights_are_the_mean(run / "model", pair)
    with pytest.raises(RaybmError, match="already exists"):
        run_soup(cfg, pair, winner.dataset, "two-trials", log=quiet)
    with pytest.raises(RaybmError, match="at least two"):
        run_soup(cfg, pair[:1], winner.dataset, "one", log=quiet)
    with pytest.raises(RaybmError, match="no prepared dataset"):
        run_soup(cfg, pair, "no-such-data", "other", log=quiet)


def assert_weights_are_the_mean(model_dir, checkpoints):
    from safetensors.torch import load_file

    got = load_file(str(Path(model_dir) / "model.safetensors"))
    states = [load_file(str(Path(c) / "model.safetensors")) for c in checkpoints]
    for key, value in got.items():
        want = sum(s[key].float() for s in states) / len(states)
        assert torch.allclose(value.float(), want, atol=1e-6), key


@pytest.mark.parametrize("first, holder", [("auto", "tune"), ("ray_train", "trials")])
def test_failed_trials_are_reported_then_retried_from_their_checkpoint(ray_tune, tmp_path, data_csv, first, holder):
    # Each trial's worker raises at the start of epoch 2 and may not restart: both fail.
    # Begun with a worker group per trial (as sweeps did before trials ran in their own
    # process), the sweep resumed with the default runner goes on as it began.
    overrides = [
        "train.epochs=2",
        "train.lr=3e-3",
        "train.fail_at_epoch=2",
        "tune.scheduler=fifo",
        "tune.num_samples=1",
        "name=retried",
        "tune.search_space={train.weight_decay: 'grid([0.0, 0.01])'}",
    ]
    with pytest.raises(RaybmError, match="--retry-errored"):
        run_sweep(config(tmp_path, data_csv, *overrides, f"tune.trial_runner={first}"), log=quiet)
    # Retrying resumes each trial's Train run from its epoch-1 checkpoint (the failure
    # hook fires only in a fresh attempt), so both finish.
    cfg = config(tmp_path, data_csv, *overrides)
    result = run_sweep(cfg, resume=True, retry_errored=True, log=quiet)
    assert [row.status for row in result.leaderboard] == ["completed", "completed"]
    for row in result.leaderboard:
        assert [h["epoch"] for h in row.history][-1] == 2
        assert row.history[-1]["resumed_from_epoch"] == 1
        assert f"/{holder}/{row.trial}/checkpoint_" in row.best_checkpoint
    assert result.winner.test["examples"] == 12


@pytest.mark.parametrize("runner, holder", [("in_trial", "tune"), ("ray_train", "trials")])
def test_a_trial_whose_worker_dies_resumes_inside_the_sweep(ray_tune, tmp_path, data_csv, runner, holder):
    # Both places a trial trains: in its own process (Tune restarts the trial) and in a Ray
    # Train worker group (Ray Train restarts the group); the checkpoints are where each keeps them.
    cfg = config(
        tmp_path,
        data_csv,
        "train.epochs=2",
        "train.lr=3e-3",
        "train.fail_at_epoch=2",
        "train.max_failures=1",
        "tune.scheduler=fifo",
        "tune.num_samples=1",
        f"tune.trial_runner={runner}",
        "tune.search_space={train.seed: 'grid([0])'}",
    )
    lines = []
    result = run_sweep(cfg, log=lines.append)
    (row,) = result.leaderboard
    assert row.status == "completed"
    assert [h["resumed_from_epoch"] for h in row.history] == [0, 1]
    assert f"/{holder}/{row.trial}/checkpoint_" in row.best_checkpoint
    assert any("trains in its own process" in line for line in lines) == (runner == "in_trial")


def test_trials_of_several_workers_cannot_run_in_their_own_process(ray_tune, tmp_path, data_csv):
    cfg = config(
        tmp_path,
        data_csv,
        "train.num_workers=2",
        "tune.trial_runner=in_trial",
        "tune.search_space={train.seed: 'grid([0])'}",
    )
    with pytest.raises(
        RaybmError, match=r"tune.trial_runner=in_trial cannot .*train.num_workers=2 .*Set tune.trial_runner=auto"
    ):
        run_sweep(cfg, log=quiet)


def test_resume_without_an_interrupted_sweep_is_a_clear_error(ray_tune, tmp_path, data_csv):
    cfg = config(tmp_path, data_csv, "tune.search_space={train.lr: 'loguniform(1e-4, 1e-2)'}")
    with pytest.raises(RaybmError, match="no interrupted sweep"):
        run_sweep(cfg, resume=True, log=quiet)
    with pytest.raises(RaybmError, match="search_space is empty"):
        run_sweep(config(tmp_path, data_csv), log=quiet)


def test_a_trial_bigger_than_the_local_ray_is_refused_instead_of_waiting_forever(ray_tune, tmp_path, data_csv):
    cfg = config(tmp_path, data_csv, "train.cpus_per_worker=3", "tune.search_space={train.lr: 'grid([1e-3, 1e-4])'}")
    with pytest.raises(
        RaybmError,
        match=r"one trial \(1 worker\(s\)\) needs 3 CPU per worker, but the largest node "
        r"has 2 \(nodes: 1 node\(s\) with 2 CPU\)\. Lower train.cpus_per_worker",
    ):
        run_sweep(cfg, log=quiet)
    assert not (tmp_path / "sweeps").exists() or not any((tmp_path / "sweeps").rglob("trials/*"))


def test_concurrent_trials_follow_the_cluster(ray_tune, tmp_path, data_csv):
    from raybm.tune.trial import concurrent_trials, trial_bundles

    cfg = config(tmp_path, data_csv, "tune.max_concurrent_trials=null")  # 0.5 CPU workers, 2 CPUs
    assert trial_bundles(cfg, tokenizes=False) == [{"CPU": 0.5}]  # the trial's own function: memory only
    assert concurrent_trials(cfg, tokenizes=False) == 4
    assert concurrent_trials(cfg, tokenizes=True) == 2  # tokenizer actors too
    wide = config(tmp_path, data_csv, "tune.max_concurrent_trials=10", "train.num_workers=2")
    assert concurrent_trials(wide, tokenizes=False) == 2  # a local Ray cannot grow: clamped


def test_time_budget_ends_the_sweep_and_the_best_so_far_wins(ray_tune, tmp_path, data_csv):
    # (also the median-stopping scheduler's path: it may stop trials too, also "stopped")
    # (and a latency budget no trial can meet: the best trial still wins, and says so)
    # A 1-epoch trial that ends well inside the budget, then a 100,000-epoch one that the
    # budget cuts off, however fast the machine (a trial's own train.epochs decides "completed").
    cfg = config(
        tmp_path,
        data_csv,
        "train.epochs=3",
        "train.lr=3e-3",
        "tune.scheduler=median",
        "tune.max_concurrent_trials=1",
        "tune.num_samples=1",
        "tune.time_budget_s=40",
        "tune.max_latency_ms=0.0001",
        "tune.search_space={train.epochs: 'grid([1, 100000])'}",
    )
    result = run_sweep(cfg, log=quiet)
    statuses = {row.get("train.epochs"): row.status for row in result.leaderboard}
    assert statuses == {1: "completed", 100000: "stopped"}, result.leaderboard
    assert result.winner.trial == result.leaderboard[0].trial
    budget = result.winner.latency_budget
    assert budget["met"] is False and budget["trials_within"] == 0 and budget["max_latency_ms"] == 0.0001
    finished = [row for row in result.leaderboard if row.best_checkpoint]
    assert budget["fastest_ms"] == min(row.get("latency_p50_ms") for row in finished) > 0
    assert all(row.within_budget is False for row in finished)
    assert sum(row.epochs_run for row in result.leaderboard) < 1 + 100000


def test_a_relative_results_root_means_the_same_folder_inside_the_trials(ray_tune, tmp_path, data_csv, monkeypatch):
    # A Tune trial runs in its own trial folder: its workers must still read the dataset
    # and write under the results root the user meant (make demo's `storage.root: results`).
    monkeypatch.chdir(tmp_path)
    cfg = config(
        "results",
        data_csv,
        "train.epochs=1",
        "train.lr=3e-3",
        "train.data_feed=whole",
        "tune.search_space={train.seed: 'grid([1])'}",
    )
    result = run_sweep(cfg, log=quiet)
    assert result.leaderboard[0].status == "completed", result.leaderboard
    assert (tmp_path / "results" / "sweeps" / result.name / "_SUCCESS").exists()


def test_a_lora_sweep_searches_the_rank_measures_merged_models_and_soups_them(ray_tune, tmp_path, data_csv):
    # Trials keep adapter-only checkpoints; the serving cost, the soup and the winner's
    # published model are of the adapters merged into the base (a plain model folder).
    cfg = config(
        tmp_path,
        data_csv,
        "train.epochs=2",
        "train.lr=3e-3",
        "train.batch_size=4",
        "train.strategy=lora",
        "tune.scheduler=fifo",
        "tune.num_samples=1",
        "tune.soup=uniform",
        "tune.soup_size=2",
        "tune.search_space={train.lora_rank: 'grid([2, 4])'}",
    )
    result = run_sweep(cfg, log=quiet)
    board = result.leaderboard
    assert sorted(row.get("train.lora_rank") for row in board) == [2, 4] and all(r.status == "completed" for r in board)
    for row in board:
        assert (Path(row.best_checkpoint) / "adapter_model.safetensors").exists()
        assert not (Path(row.best_checkpoint) / "model.safetensors").exists()
    assert board[0].params == board[1].params > 1_000_000  # the merged model's, not the adapters'
    model_dir = Path(result.winner.model_dir)
    assert (model_dir / "model.safetensors").exists() and not (model_dir / "adapter_model.safetensors").exists()
    assert sorted(result.winner.soup["ingredients"]) == sorted(row.trial for row in board)
    assert "LoRA (PEFT)" in (model_dir / "README.md").read_text()


class _Planted:
    """What a bucket writer would plant: unpickling it runs a command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_resuming_a_sweep_with_planted_tune_state_runs_none_of_it(ray_tune, tmp_path, data_csv, capsys):
    import pickle

    from raybm.cli import main

    overrides = [
        f"storage.root={tmp_path}",
        f"data.source={data_csv}",
        "data.text_column=body",
        "data.label_column=sentiment",
        "data.max_length=16",
        "model.name=tiny-bert",
        "train.batch_size=16",
        "train.epochs=2",
        "train.fail_at_epoch=2",
        "train.cpus_per_worker=0.5",
        "tune.scheduler=fifo",
        "tune.num_samples=1",
        "name=planted",
        "tune.search_space={train.seed: 'grid([0])'}",
    ]
    assert main(["tune", *overrides]) == 2  # its one trial fails: an interrupted sweep to resume
    tune_dir = tmp_path / "sweeps" / "planted" / "tune"
    assert (tune_dir / "tuner.pkl").exists() and (tune_dir / ".raybm-seal-tuner.pkl").exists()
    marker = tmp_path / "EXECUTED"
    (tune_dir / "tuner.pkl").write_bytes(pickle.dumps(_Planted(marker)))
    capsys.readouterr()
    assert main(["tune", *overrides, "--resume", "--retry-errored"]) == 2
    err = capsys.readouterr().err
    assert (
        "sweep 'planted': refused to resume: tuner.pkl in its Ray Tune state does not carry a valid raybm seal" in err
    )
    assert not marker.exists()
