"""Training on a shared local Ray with a tiny random BERT and tiny data."""

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from safetensors.torch import load_file

from raybm.config import build_config
from raybm.data import load_split, run_data_stage
from raybm.errors import RaybmError
from raybm.inference.evaluate import score_dataset
from raybm.storage.results import Results
from raybm.train.driver import run_training
from raybm.tune.sweep import run_sweep
from tests.helpers import make_frame

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def data_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("train-data") / "reviews.csv"
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
            "train.lr=0.003",
            "train.warmup_ratio=0",
            "train.log_every_steps=100",
            *overrides,
        ]
    )


def quiet(_):
    pass


def test_training_learns_and_writes_the_documented_layout(ray_local, tmp_path, data_csv, mlflow_server):
    # Batches of 8: 12 steps an epoch (with 16, the loss fell 0.698 -> 0.591 in one run, short
    # of the check below).
    cfg = config(
        tmp_path,
        data_csv,
        "train.epochs=4",
        "train.keep_checkpoints=2",
        "train.batch_size=8",
        f"tracking.mlflow_uri={mlflow_server}",
        "tracking.experiment=train-tests",
    )
    said = []
    run_data_stage(cfg, log=quiet)  # Ray Data's own actors start here, not with the run
    before = set(ray_local._private.state.actors())
    result = run_training(cfg, log=said.append)
    assert any("on the test split in the training worker" in line for line in said), said  # no Ray Data job
    assert any("splits read whole by each worker" in line for line in said), said  # nor in the loop
    # Ray Train's process chain, less what this run does not need on a local Ray: no Ray Data
    # dataset manager (the workers read no Ray Dataset), no preemption watcher, no autoscaling
    # coordinator, no placement-group cleaner (the driver's Ray ends with it).
    started = {a["ActorClassName"] for k, a in ray_local._private.state.actors().items() if k not in before}
    assert {"TrainController", "RayTrainWorker"} <= started, started
    assert not started & {
        "DatasetManager",
        "PreemptionWatcher",
        "_AutoscalingCoordinatorActor",
        "PlacementGroupCleaner",
    }, started
    losses = [h["train_loss"] for h in result.history]
    assert len(losses) == 4 and losses[-1] < losses[0] * 0.8
    assert result.history[-1]["val_accuracy"] >= 0.8

    run = Path(result.run_dir)
    assert {"config.yaml", "metrics.json", "history.json", "model", "_SUCCESS", "test_predictions.parquet"} <= set(
        os.listdir(run)
    )
    assert len([d for d in os.listdir(run) if d.startswith("checkpoint_2")]) == 2  # best K kept
    model = run / "model"
    assert {"model.safetensors", "config.json", "label_map.json", "raybm_config.yaml", "tokenizer.json"} <= set(
        os.listdir(model)
    )
    assert not (model / "train_state.pt").exists()  # optimizer state stays in the checkpoints
    # Calibration: each epoch fits a temperature on validation; the published model keeps the
    # best epoch's, and the test metrics say how calibrated its confidences are.
    assert all(h["val_temperature"] > 0 and 0 <= h["val_ece_calibrated"] <= 1 for h in result.history)
    calibration = json.loads((model / "calibration.json").read_text())
    test = result.metrics.test
    assert calibration["fitted_on"] == "validation" and calibration["temperature"] == test["temperature"]
    assert 0 <= test["ece"] <= 1 and 0 <= test["ece_calibrated"] <= 1

    metrics = json.loads((run / "metrics.json").read_text())
    test = metrics["test"]
    card = (model / "README.md").read_text()  # the model card, with the measured test scores
    assert f"| {test['accuracy']:.4f} | {test['f1_macro']:.4f} |" in card
    assert f"the checkpoint of epoch {metrics['best_epoch']} of 4" in card
    assert "| precision | fp32 |" in card  # train.precision=auto on a CPU: what the loop ran in
    assert set(test) >= {"accuracy", "precision_macro", "recall_macro", "f1_macro", "per_class", "confusion_matrix"}
    assert test["examples"] == 12 and test["accuracy"] >= 0.8
    assert metrics["best_epoch"] in range(1, 5)
    # evaluating the saved model folder gives the same test numbers
    again = score_dataset(str(model), load_split(Results.from_config(cfg.storage), metrics["dataset"], "test"), 16)
    assert again["confusion_matrix"] == test["confusion_matrix"]
    # every test example's prediction, for error analysis, agreeing with the metrics
    preds = pd.read_parquet(run / "test_predictions.parquet")
    assert list(preds.columns) == ["text", "label", "pred", "confidence", "prob_0", "prob_1"] and len(preds) == 12
    assert (preds["label"] == preds["pred"]).mean() == pytest.approx(test["accuracy"])
    assert preds[["prob_0", "prob_1"]].sum(axis=1).to_numpy() == pytest.approx(1.0, abs=1e-5)
    assert set(preds["text"]) == set(
        load_split(Results.from_config(cfg.storage), metrics["dataset"], "test").to_pandas()["text"]
    )
    # TensorBoard's own reader finds the run's curves: the training loss and learning rate by
    # step (12 steps an epoch, a point at each progress line), the validation scores by epoch.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(run / "tensorboard"))
    board.Reload()
    loss, val_f1 = board.Scalars("train/loss"), board.Scalars("val/f1_macro")
    assert [e.step for e in loss] == [12, 24, 36, 48] and [e.step for e in val_f1] == [12, 24, 36, 48]
    assert [e.value for e in loss] == pytest.approx(losses, rel=1e-5)  # one point an epoch: the epoch's mean
    assert [e.value for e in val_f1] == pytest.approx([h["val_f1_macro"] for h in result.history], rel=1e-5)
    assert [e.value for e in board.Scalars("train/lr")] == pytest.approx([h["lr"] for h in result.history], rel=1e-5)
    # The same run in MLflow, as its tracking server tells it to any client.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    [tracked] = client.search_runs([client.get_experiment_by_name("train-tests").experiment_id])
    assert tracked.info.run_name == result.run_name and tracked.info.status == "FINISHED"
    assert tracked.data.params["train.lr"] == "0.003" and tracked.data.params["model.name"] == "tiny-bert"
    assert tracked.data.tags["raybm.dataset"] == metrics["dataset"] and tracked.data.tags["raybm.kind"] == "run"
    f1 = client.get_metric_history(tracked.info.run_id, "val_f1_macro")
    assert sorted((m.step, m.value) for m in f1) == [
        (h["epoch"], pytest.approx(h["val_f1_macro"])) for h in result.history
    ]
    assert tracked.data.metrics["test_f1_macro"] == pytest.approx(test["f1_macro"])
    assert {"model_card.md", "metrics.json", "confusion_matrix.json", "history.json", "data_report.json"} <= {
        a.path for a in client.list_artifacts(tracked.info.run_id)
    }


def test_early_stopping(ray_local, tmp_path, data_csv):
    # lr 0 never improves: stops after 1 + patience epochs
    cfg = config(
        tmp_path,
        data_csv,
        "train.epochs=6",
        "train.lr=1e-12",
        "train.early_stopping_patience=2",
        "train.metric=val_loss",
        "train.mode=min",
    )
    result = run_training(cfg, log=quiet)
    assert len(result.history) == 3 and result.metrics.early_stopped


def test_the_worker_scores_the_best_epoch_on_test_not_the_last(ray_local, tmp_path, data_csv):
    # "Best" by the highest validation loss: epoch 1 of a model that learns (batches of 4, 24
    # steps an epoch), so the worker must load epoch 1's weights back before scoring test.
    cfg = config(
        tmp_path,
        data_csv,
        "train.epochs=2",
        "train.batch_size=4",
        "train.metric=val_loss",
        "train.mode=max",
        "name=worst-first",
    )
    said = []
    result = run_training(cfg, log=said.append)
    assert any("in the training worker" in line for line in said), said
    losses = [h["val_loss"] for h in result.history]
    assert result.metrics.best_epoch == losses.index(max(losses)) + 1
    test = result.metrics.test
    preds = pd.read_parquet(Path(result.run_dir) / "test_predictions.parquet")
    # The published model (the best epoch's checkpoint) gives the same probabilities.
    from raybm.inference.loading import load_predictor

    probs = load_predictor(result.model_dir, "torch", max_length=16).predict(preds["text"].tolist())
    np.testing.assert_allclose(preds[["prob_0", "prob_1"]].to_numpy(), probs, atol=1e-4)
    assert (
        test["confusion_matrix"]
        == score_dataset(
            result.model_dir, load_split(Results.from_config(cfg.storage), result.metrics.dataset, "test"), 16
        )["confusion_matrix"]
    )


def test_rerun_with_the_same_name_resumes(ray_local, tmp_path, data_csv):
    # Through Ray Data this time (the other runs here read the splits whole), and the rerun
    # switches to whole splits: how the workers read is not part of the recipe.
    said = []
    # Batches of 4 (24 steps an epoch): enough to learn in 2 epochs.
    first = run_training(
        config(
            tmp_path, data_csv, "name=resume-me", "train.epochs=2", "train.batch_size=4", "train.data_feed=ray_data"
        ),
        log=said.append,
    )
    assert any("splits streamed by Ray Data" in line for line in said), said
    assert [h["resumed_from_epoch"] for h in first.history] == [0, 0]
    assert first.history[-1]["val_accuracy"] >= 0.8 and first.metrics.test["examples"] == 12
    marker = os.path.join(first.run_dir, "_SUCCESS")
    assert os.path.exists(marker)
    # While the rerun writes, the old run's _SUCCESS is gone: the folder never reads as complete.
    seen = []
    second = run_training(
        config(tmp_path, data_csv, "name=resume-me", "train.epochs=3", "train.batch_size=4"),
        log=lambda line: seen.append((line, os.path.exists(marker))),
    )
    assert [h["epoch"] for h in second.history] == [1, 2, 3]
    assert second.history[-1]["resumed_from_epoch"] == 2  # only epoch 3 ran again
    after_training = [done for line, done in seen if line.startswith(("Scored", "Scoring"))]
    assert after_training == [False], seen
    assert os.path.exists(marker)


def test_predict_file_through_ray_data_keeps_order(ray_local, tmp_path, tiny_model_dir):
    from raybm.inference.predict import PREDICTED_LABEL, predict_file

    texts = [f"review number {i} {'great' if i % 3 else 'awful'}" for i in range(300)]
    texts[7], texts[150] = None, " "  # kept, unlabelled
    src = tmp_path / "in.jsonl"
    pd.DataFrame({"n": range(300), "text": texts}).to_json(src, orient="records", lines=True)
    via_ray, local = tmp_path / "ray.csv", tmp_path / "local.csv"
    assert predict_file(tiny_model_dir, str(src), str(via_ray), max_length=32, use_ray=True, probabilities=True) == (
        300,
        2,
    )
    predict_file(tiny_model_dir, str(src), str(local), max_length=32, use_ray=False, probabilities=True)
    a, b = pd.read_csv(via_ray), pd.read_csv(local)
    assert a["n"].tolist() == list(range(300))
    assert a[PREDICTED_LABEL].isna().tolist() == [i in (7, 150) for i in range(300)]
    assert a[PREDICTED_LABEL].fillna("").tolist() == b[PREDICTED_LABEL].fillna("").tolist()
    np.testing.assert_allclose(a[["prob_negative", "prob_positive"]], b[["prob_negative", "prob_positive"]], atol=1e-5)


def test_scoring_a_folder_of_files_into_a_folder_of_parquet_keeps_every_row_in_order(
    ray_local, tmp_path, tiny_model_dir
):
    import pyarrow.parquet as pq

    from raybm.cli import main
    from raybm.inference.batch import find_inputs, score_to_folder
    from raybm.inference.predict import PREDICTED_LABEL, predict_file
    from raybm.storage.layout import SUCCESS_MARKER

    texts = [f"review number {i} {'great' if i % 3 else 'awful'}" for i in range(2000)]
    texts[11] = None  # kept, unlabelled
    frame = pd.DataFrame({"id": range(2000), "text": texts, "score": np.linspace(0, 1, 2000)})
    src = tmp_path / "in"
    src.mkdir()
    for i in range(4):  # four files, named so that name order is row order; several model batches each
        frame.iloc[500 * i : 500 * (i + 1)].to_parquet(src / f"part-{i}.parquet", index=False)
    (src / "_SUCCESS").write_text("")  # markers and hidden files are no input
    cfg = build_config(overrides=["predict.concurrency=1"])
    out = tmp_path / "scored"
    assert (
        main(
            [
                "predict",
                "--model",
                tiny_model_dir,
                "--input",
                str(src / "part-*.parquet"),
                "--output",
                str(out),
                "--max-length",
                "32",
                "--probabilities",
                "predict.concurrency=1",
            ]
        )
        == 0
    )
    assert (out / SUCCESS_MARKER).exists() and not (tmp_path / "scored.partial").exists()
    table = pq.read_table(sorted(str(f) for f in out.glob("*.parquet")))
    assert str(table.schema.field("id").type) == "int64" and str(table.schema.field("score").type) == "double"
    got = table.to_pandas()
    assert got["id"].tolist() == list(range(2000))  # every row, in input order
    assert got[PREDICTED_LABEL].isna().tolist() == [i == 11 for i in range(2000)]
    local = tmp_path / "local.parquet"
    frame.to_parquet(tmp_path / "whole.parquet", index=False)
    predict_file(
        tiny_model_dir, str(tmp_path / "whole.parquet"), str(local), max_length=32, use_ray=False, probabilities=True
    )
    want = pd.read_parquet(local)
    assert got[PREDICTED_LABEL].fillna("").tolist() == want[PREDICTED_LABEL].fillna("").tolist()
    np.testing.assert_allclose(got["prob_positive"], want["prob_positive"], atol=1e-5)
    # An output that exists is never overwritten; a path that matches nothing is named.
    with pytest.raises(RaybmError, match="already exists; give a new folder"):
        score_to_folder(
            tiny_model_dir, find_inputs(str(src), cfg.storage), str(out), "text", storage=cfg.storage, log=quiet
        )
    with pytest.raises(RaybmError, match=r"no \.csv, \.tsv, \.jsonl or \.parquet file there"):
        find_inputs(str(src / "*.csv"), cfg.storage)
    with pytest.raises(RaybmError, match="no text column 'body'"):
        score_to_folder(
            tiny_model_dir,
            find_inputs(str(src), cfg.storage),
            str(tmp_path / "other"),
            "body",
            storage=cfg.storage,
            log=quiet,
        )
    assert not (tmp_path / "other").exists() and not (tmp_path / "other.partial").exists()
    # A fixed pool the nodes cannot hold fails at once (Ray would wait for it), leaving nothing.
    with pytest.raises(RaybmError, match=r"5 model actor\(s\) of 1 CPU\(s\) do not fit this Ray's nodes"):
        score_to_folder(
            tiny_model_dir,
            find_inputs(str(src), cfg.storage),
            str(tmp_path / "big"),
            "text",
            storage=cfg.storage,
            concurrency=5,
            log=quiet,
        )
    assert not (tmp_path / "big").exists() and not (tmp_path / "big.partial").exists()

    # Interrupted after two of the four files: the folder stays unpublished with those two;
    # the same job run again scores only the other two, and the result is the whole, in order.
    def interrupt_after_two(path, done=[]):  # noqa: B006 - the list counts calls across both runs
        done.append(path)
        if len(done) == 2:
            raise KeyboardInterrupt

    inputs = find_inputs(str(src), cfg.storage)
    again = tmp_path / "again"
    with pytest.raises(KeyboardInterrupt):
        score_to_folder(
            tiny_model_dir,
            inputs,
            str(again),
            "text",
            storage=cfg.storage,
            max_length=32,
            probabilities=True,
            concurrency=1,
            log=quiet,
            on_file_done=interrupt_after_two,
        )
    partial = tmp_path / "again.partial"
    assert not again.exists() and not (partial / SUCCESS_MARKER).exists()
    assert sorted(f.name for f in partial.glob("*.parquet")) == ["part-00000-0000.parquet", "part-00001-0000.parquet"]
    with pytest.raises(RaybmError, match=r"other settings \(probabilities\)"):
        score_to_folder(tiny_model_dir, inputs, str(again), "text", storage=cfg.storage, max_length=32, log=quiet)
    lines, finished = [], []
    score_to_folder(
        tiny_model_dir,
        inputs,
        str(again),
        "text",
        storage=cfg.storage,
        max_length=32,
        probabilities=True,
        concurrency=1,
        log=lines.append,
        on_file_done=finished.append,
    )
    assert any("2 of 4 input file(s) already scored" in line for line in lines), lines
    assert [os.path.basename(p) for p in finished] == ["part-2.parquet", "part-3.parquet"]
    resumed = pq.read_table(sorted(str(f) for f in again.glob("*.parquet"))).to_pandas()
    pd.testing.assert_frame_equal(resumed, got, check_exact=False, atol=1e-5)


def test_evaluate_any_file_with_the_model_label_map(ray_local, tmp_path, tiny_model_dir):
    from raybm.errors import DataError
    from raybm.inference.evaluate import score_source

    df = pd.DataFrame(
        {
            "review": ["nice one", "awful", "<b>great</b>", "", "meh"],
            "stars": ["positive", "negative", "positive", "negative", "neutral"],
        }
    )
    src = tmp_path / "eval.csv"
    df.to_csv(src, index=False)
    cfg = build_config(
        overrides=[
            f"data.source={src}",
            "data.text_column=review",
            "data.label_column=stars",
            "data.exclude_labels=[neutral]",
        ]
    )
    m = score_source(tiny_model_dir, cfg)
    assert m["examples"] == 3 and m["dropped"] == {"missing_text": 1, "excluded_label": 1}
    # the CLI, with every example's prediction written for a look at the mistakes
    from raybm.cli import main
    from raybm.inference.evaluate import Classify

    out = tmp_path / "pred.jsonl"
    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                tiny_model_dir,
                "--data",
                str(src),
                "data.text_column=review",
                "data.label_column=stars",
                "data.exclude_labels=[neutral]",
                "--predictions",
                str(out),
            ]
        )
        == 0
    )
    got = pd.read_json(out, lines=True)
    assert list(got.columns) == [
        "text",
        "label",
        "predicted_label",
        "correct",
        "confidence",
        "prob_negative",
        "prob_positive",
    ]
    assert got["text"].tolist() == ["nice one", "awful", "great"] and got["label"].tolist() == [
        "positive",
        "negative",
        "positive",
    ]
    probs = Classify(tiny_model_dir).predict(["nice one", "awful", "great"])
    assert got["predicted_label"].tolist() == [["negative", "positive"][i] for i in probs.argmax(1)]
    assert got["correct"].tolist() == (got["label"] == got["predicted_label"]).tolist()
    assert (1 - got["correct"].mean()) * 3 == pytest.approx(3 - m["accuracy"] * 3)
    with pytest.raises(DataError, match=r"\['neutral'\] are not classes of this model"):
        score_source(
            tiny_model_dir,
            build_config(overrides=[f"data.source={src}", "data.text_column=review", "data.label_column=stars"]),
        )


def test_two_ddp_workers_with_gradual_unfreezing(ray_local, tmp_path):
    # Two data-parallel workers (gloo on CPU): DDP must cope with layers that unfreeze
    # mid-run, and validation must count every example exactly once across the shards
    # (an odd number of validation rows: 8 positive + 7 negative).
    df = make_frame(75)
    odd = tmp_path / "odd.csv"
    df.drop(df[df.sentiment == "neg"].index[:5]).to_csv(odd, index=False)
    cfg = config(
        tmp_path,
        odd,
        "train.epochs=3",
        "train.num_workers=2",
        "train.cpus_per_worker=0.5",
        "train.strategy=gradual",
        "train.unfreeze_every=1",
    )
    result = run_training(cfg, log=quiet)
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    counts = [h["trainable_params"] for h in result.history]
    assert counts[0] < counts[1] < counts[2]
    report = json.loads((Path(cfg.storage.root) / "data" / result.metrics.dataset / "report.json").read_text())
    assert report["splits"]["validation"]["rows"] == 15
    assert all(h["val_examples"] == 15 for h in result.history)
    assert result.metrics.test["examples"] == report["splits"]["test"]["rows"]


def test_two_ddp_workers_train_on_ray_s_public_path_where_raybm_s_shortcuts_do_not_apply(
    ray_local, tmp_path, data_csv, monkeypatch, capfd
):
    # Another Ray version (or RAYBM_RAY_PATCHES=0): Ray Train's own TorchTrainer and
    # TorchConfig, said once; the run is the same run.
    from raybm import ray_patches

    monkeypatch.setenv(ray_patches.SWITCH_ENV, "0")
    ray_patches.reset()
    try:
        cfg = config(tmp_path, data_csv, "train.epochs=1", "train.num_workers=2", "train.cpus_per_worker=0.5")
        result = run_training(cfg, log=quiet)
        assert not ray_patches.applies()
    finally:
        monkeypatch.delenv(ray_patches.SWITCH_ENV)
        ray_patches.reset()
    assert [h["epoch"] for h in result.history] == [1] and result.metrics.test["examples"] > 0
    said = capfd.readouterr().err
    assert said.count("public TorchTrainer path") == 1, said[-2000:]
    assert ray_patches.applies()  # back on the pinned Ray


def test_two_fsdp_workers_shard_train_resume_on_three_and_save_a_whole_model(
    ray_local, tmp_path, data_csv, tiny_model_dir
):
    # FSDP on CPU workers (gloo): each worker holds half of every layer and writes its own
    # shards into each checkpoint (no full copy anywhere); a failed worker (injected at the
    # start of epoch 2) resumes from the shards, optimizer state included; a rerun with 3
    # workers and one more epoch resumes from the 2 ranks' shards (DCP reshards); the
    # published model is a whole one, made from the shards. The weights come streamed from
    # the model folder's file into the shards (no rank builds the whole model).
    from raybm.inference.loading import load_model_folder
    from raybm.models.build import build_classifier

    # Batches of 4: 12 steps an epoch per worker (with 16, 3 steps an epoch learned too little
    # to pass the accuracy check every time).
    # 4 epochs: with 3, one full-suite run ended at validation accuracy 0.5 (loss 0.75 -> 0.69).
    settings = (
        "train.cpus_per_worker=0.5",
        "train.parallelism=fsdp",
        "train.layerwise_lr_decay=0.8",
        "train.max_failures=1",
        "train.batch_size=4",
        "train.keep_checkpoints=5",
        "name=fsdp-reshard",
        f"model.name={tiny_model_dir}",
    )
    cfg = config(tmp_path, data_csv, *settings, "train.epochs=3", "train.num_workers=2", "train.fail_at_epoch=2")
    first = run_training(cfg, log=quiet)
    assert [h["resumed_from_epoch"] for h in first.history] == [0, 1, 1]
    checkpoints = sorted(c for c in Path(first.run_dir).glob("checkpoint_*") if c.is_dir())
    assert len(checkpoints) == 3
    for c in checkpoints:  # the ranks' shards, merged by Ray; no whole copy of the weights
        files = sorted(f.name for f in (c / "shards").glob("*.safetensors"))
        assert json.loads((c / "shards.json").read_text())["files"] == files and not (c / "model.safetensors").exists()
        assert {f.split("-model-")[0] for f in files} == {"shard-00001", "shard-00002"}
    cfg = config(tmp_path, data_csv, *settings, "train.epochs=4", "train.num_workers=3")
    result = run_training(cfg, log=quiet)
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4]
    assert [h["resumed_from_epoch"] for h in result.history] == [0, 1, 1, 3]
    newest = max(c for c in Path(result.run_dir).glob("checkpoint_*") if c.is_dir())  # names sort by time
    assert {f.name.split("-model-")[0] for f in (newest / "shards").glob("*.safetensors")} == {
        "shard-00001",
        "shard-00002",
        "shard-00003",
    }
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert max(h["val_accuracy"] for h in result.history) >= 0.8  # the best epoch is the one published
    model, _, labels = load_model_folder(result.model_dir)
    fresh = build_classifier(cfg.model, labels)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in fresh.state_dict().items()}
    assert not any(n.startswith(("shards", "train_state")) for n in os.listdir(result.model_dir))
    assert result.history[0]["trainable_params"] == sum(p.numel() for p in fresh.parameters())  # not one shard's
    again = score_dataset(
        result.model_dir, load_split(Results.from_config(cfg.storage), result.metrics.dataset, "test"), 16
    )
    assert again["confusion_matrix"] == result.metrics.test["confusion_matrix"]
    # The driver's scoring of the published model applies its temperature as the worker did.
    assert again["temperature"] == result.metrics.test["temperature"]
    assert again["ece_calibrated"] == pytest.approx(result.metrics.test["ece_calibrated"], abs=1e-4)


def test_workers_bigger_than_the_local_ray_are_refused_instead_of_waiting_forever(ray_local, tmp_path, data_csv):
    cfg = config(tmp_path, data_csv, "train.num_workers=2", "train.cpus_per_worker=1.5")
    with pytest.raises(
        RaybmError,
        match=r"training \(2 worker\(s\)\) needs 2 x \(1.5 CPU\) placed at once, more than "
        r"the nodes hold \(1 node\(s\) with 2 CPU\)\. Lower train.cpus_per_worker",
    ):
        run_training(cfg, log=quiet)
    cfg = config(tmp_path, data_csv, "train.worker_resources={nobody_has: 1}")
    with pytest.raises(RaybmError, match=r"needs 1 nobody_has per worker, but no node has any"):
        run_training(cfg, log=quiet)
    assert not (tmp_path / "runs").exists()  # refused before any work


def test_a_second_job_writing_the_same_run_is_refused_while_the_first_lives(ray_local, tmp_path, data_csv):
    import subprocess
    import sys

    from tests.unit.test_lease import HOLDER

    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER.replace('"r1"', '"busy"'), str(tmp_path), "60"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RaybmError, match=r"training run 'busy' is being written by another job"):
            run_training(config(tmp_path, data_csv, "name=busy"), log=quiet)
        assert not (tmp_path / "runs" / "busy").exists()  # nothing written
    finally:
        holder.kill()
        holder.wait()


def test_gpus_asked_of_a_local_ray_without_any_are_an_error_but_a_joined_cluster_may_add_them(ray_local, monkeypatch):
    import raybm.runtime
    from raybm.train.resources import asks_for_gpus

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(RaybmError, match="this local Ray has no GPUs"):
        asks_for_gpus("yes")
    assert asks_for_gpus("auto") is False and asks_for_gpus("no") is False
    # Joined through ray.address (no RAY_ADDRESS): GPU workers may still be on their way.
    monkeypatch.setattr(raybm.runtime, "_JOINED", True)
    assert asks_for_gpus("yes") is True


def test_a_teacher_with_other_labels_is_refused_before_training(ray_local, tmp_path, data_csv, tiny_model_dir):
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_model_dir, teacher)
    (teacher / "label_map.json").write_text(json.dumps({"labels": ["bad", "good", "meh"]}))
    cfg = config(tmp_path, data_csv, f"train.distill_from={teacher}")
    with pytest.raises(RaybmError, match=r"teacher's labels \['bad', 'good', 'meh'\] differ"):
        run_training(cfg, log=quiet)
    assert not (tmp_path / "runs").exists()  # refused before a run folder was made


def test_augmented_training_reads_texts_and_learns(ray_local, tmp_path, data_csv):
    # With data.augment on, the workers get the training split as text and augment it anew
    # every epoch (AugmentCollate; its per-epoch change is a unit test): the run trains,
    # learns and scores on test like any other.
    cfg = config(
        tmp_path,
        data_csv,
        "train.epochs=4",
        "train.batch_size=8",
        "data.augment.enabled=true",
        "data.augment.replace_prob=0.1",
    )
    result = run_training(cfg, log=quiet)
    losses = [h["train_loss"] for h in result.history]
    assert len(losses) == 4 and losses[-1] < losses[0] * 0.8, losses
    assert result.metrics.test["accuracy"] >= 0.75, result.metrics.test


def test_the_plateau_schedule_halves_the_rate_when_validation_stops_improving(ray_local, tmp_path, data_csv):
    # lr ~ 0: validation never changes, so never improves after the first epoch; with
    # patience 1 the rate is halved after epoch 2, and epoch 3 trains at half of it.
    cfg = config(
        tmp_path,
        data_csv,
        "train.epochs=3",
        "train.lr=1e-12",
        "train.scheduler=plateau",
        "train.plateau_patience=1",
        "train.plateau_factor=0.5",
    )
    lrs = [h["lr"] for h in run_training(cfg, log=quiet).history]
    assert lrs == pytest.approx([1e-12, 1e-12, 5e-13]), lrs


def test_lora_on_a_decoder_two_ddp_workers_checkpointing_resume_and_a_merged_model(ray_local, tmp_path, data_csv):
    # A decoder whose config has no pad token, LoRA (PEFT) with gradient checkpointing,
    # gradient accumulation and bf16 autocast on two DDP workers, a worker failure at epoch 2
    # resumed from an adapter-only checkpoint; the published model is a plain merged model
    # folder that predict, export and serve load.
    from raybm.inference.loading import load_model_folder, load_predictor

    cfg = config(
        tmp_path,
        data_csv,
        "model.name=tiny-qwen2",
        "train.strategy=lora",
        "train.lora_rank=4",
        "train.lr=0.01",
        "train.gradient_checkpointing=true",
        "train.epochs=3",
        "train.num_workers=2",
        "train.cpus_per_worker=0.5",
        "train.batch_size=4",
        "train.grad_accum=2",
        "train.max_failures=1",
        "train.fail_at_epoch=2",
        "train.precision=bf16",
    )
    result = run_training(cfg, log=quiet)
    assert [h["resumed_from_epoch"] for h in result.history] == [0, 1, 1]
    assert [h["precision"] for h in result.history] == ["bf16"] * 3
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    full = load_model_folder(result.model_dir)[0]
    total = sum(p.numel() for p in full.parameters())
    assert all(h["trainable_params"] < total / 10 for h in result.history)
    checkpoints = sorted(c for c in Path(result.run_dir).glob("checkpoint_*") if c.is_dir())
    assert checkpoints and all(
        (c / "adapter_model.safetensors").exists() and not (c / "model.safetensors").exists() for c in checkpoints
    )
    adapter_mb = (checkpoints[-1] / "adapter_model.safetensors").stat().st_size / 1e6
    model_mb = (Path(result.model_dir) / "model.safetensors").stat().st_size / 1e6
    assert adapter_mb < model_mb / 10 and result.history[-1]["checkpoint_weights_mb"] < model_mb / 10
    published = set(os.listdir(result.model_dir))
    assert "model.safetensors" in published and not {"adapter_model.safetensors", "adapter_config.json"} & published
    assert full.config.pad_token_id is not None  # kept in the saved model: batches of any size work
    assert "LoRA (PEFT), merged into the weights: rank 4" in (Path(result.model_dir) / "README.md").read_text()
    probs = load_predictor(result.model_dir).predict(["great", "awful, would not buy again", "fine"])
    assert probs.shape == (3, 2)
    again = score_dataset(
        result.model_dir, load_split(Results.from_config(cfg.storage), result.metrics.dataset, "test"), 16
    )
    assert again["confusion_matrix"] == result.metrics.test["confusion_matrix"]


def test_lora_with_two_fsdp_workers_gradient_checkpointing_and_bf16(ray_local, tmp_path, data_csv):
    # Everything large models combine: adapters, sharded workers, recomputed activations and
    # bf16 autocast (on the CPU here; the same autocast region runs on a GPU), from a base
    # model whose weights come in several safetensors files (as large models' do).
    from raybm.models.build import build_classifier, load_tokenizer

    base = tmp_path / "multi-file-base"
    build_classifier(
        build_config(overrides=["model.name=tiny-bert"]).model, ["negative", "positive"], seed=3
    ).save_pretrained(base, max_shard_size="300KB")
    load_tokenizer("tiny-bert").save_pretrained(base)
    assert len(list(base.glob("model-*.safetensors"))) > 1 and (base / "model.safetensors.index.json").exists()
    cfg = config(
        tmp_path,
        data_csv,
        f"model.name={base}",
        "train.strategy=lora",
        "train.lr=0.01",
        "train.epochs=2",
        "train.num_workers=2",
        "train.cpus_per_worker=0.5",
        "train.parallelism=fsdp",
        "train.batch_size=4",
        "train.gradient_checkpointing=true",
        "train.precision=bf16",
        "train.max_failures=1",
        "train.fail_at_epoch=2",
    )
    result = run_training(cfg, log=quiet)
    assert [h["precision"] for h in result.history] == ["bf16", "bf16"]
    assert [h["resumed_from_epoch"] for h in result.history] == [0, 1]  # adapters whole, optimizer from shards
    checkpoints = sorted(c for c in Path(result.run_dir).glob("checkpoint_*") if c.is_dir())
    assert checkpoints and all((c / "adapter_model.safetensors").exists() for c in checkpoints)
    # Adapter-only weights; the optimizer's state in the ranks' shards, never the frozen base.
    for c in checkpoints:
        assert json.loads((c / "shards.json").read_text())["model"] is False
        assert not (c / "model.safetensors").exists()
        shard_keys = {k for f in (c / "shards").glob("*.safetensors") for k in load_file(f)}
        assert any("lora_" in k for k in shard_keys)
        assert all(k.startswith("optim.") and ("lora_" in k or "modules_to_save" in k) for k in shard_keys)
    # The sharded optimizer stepped the adapters: PEFT starts every LoRA B matrix at zero.
    # (Not the loss: on 60 random rows with a random model it moves by noise, up or down.)
    adapters = load_file(checkpoints[-1] / "adapter_model.safetensors")
    lora_b = [t for k, t in adapters.items() if "lora_B" in k]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b)
    assert "model.safetensors" in os.listdir(result.model_dir)


def test_a_csv_labelled_through_ray_data_keeps_its_columns_as_written(ray_local, tmp_path, tiny_model_dir):
    """Through Ray Data (files over 20 MB) as in process: an id 007 stays 007, not 7."""
    from raybm.inference.predict import predict_file

    src = tmp_path / "in.csv"
    src.write_text("id,text,score\n007,great stuff,1.50\n010,awful,\n")
    outs = {}
    for use_ray in (True, False):
        out = tmp_path / f"out-{use_ray}.parquet"
        predict_file(tiny_model_dir, str(src), str(out), max_length=32, use_ray=use_ray)
        outs[use_ray] = pd.read_parquet(out)
    assert outs[True]["id"].tolist() == ["007", "010"] and outs[True]["score"].tolist() == ["1.50", ""]
    for column in ("id", "text", "score"):
        assert outs[True][column].tolist() == outs[False][column].tolist(), column


def test_a_run_that_cannot_fit_the_nodes_memory_is_refused_with_settings_that_would(ray_local, tmp_path, data_csv):
    # A 2B-parameter Llama-style model (config only: sizing reads no weights) trained in
    # full with DDP needs ~33 GB a worker: refused before any data work, naming LoRA.
    from transformers import LlamaConfig

    folder = tmp_path / "llama-2b"
    LlamaConfig(
        vocab_size=32000,
        hidden_size=2560,
        intermediate_size=6912,
        num_hidden_layers=24,
        num_attention_heads=20,
        num_key_value_heads=4,
        pad_token_id=0,
    ).save_pretrained(folder)
    cfg = config(tmp_path, data_csv, f"model.name={folder}", "train.cpus_per_worker=1")
    with pytest.raises(
        RaybmError,
        match=r"training [12],\d{3}M parameters on 1 worker\(s\) \(ddp\) needs about \d+\.\d GB "
        r"per worker .* more than the nodes hold .*Settings that fit: .*"
        r"train.strategy=lora.*train.check_memory=false runs it anyway",
    ):
        run_training(cfg, log=quiet)
    # A sweep is sized by its most demanding trial: full fine-tuning, where LoRA is one of those tried.
    sweep = config(
        tmp_path,
        data_csv,
        f"model.name={folder}",
        "train.cpus_per_worker=1",
        "tune.search_space={train.strategy: 'grid([lora, full])', train.lr: 'loguniform(1e-5, 1e-3)'}",
    )
    with pytest.raises(RaybmError, match=r"training [12],\d{3}M parameters on 1 worker\(s\) \(ddp\) needs about"):
        run_sweep(sweep, log=quiet)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()
    assert not (tmp_path / "sweeps").exists()
    lines = []
    small = config(tmp_path, data_csv, "train.epochs=1", "train.max_steps_per_epoch=1", "name=sized")
    run_training(small, log=lines.append)
    assert any(line.startswith("Memory estimate: 1M parameters") for line in lines)


def test_gpu_only_memory_settings_are_refused_on_cpu_workers_before_any_work(ray_local, tmp_path, data_csv):
    for overrides, message in (
        (["train.parallelism=fsdp", "train.cpu_offload=true"], r"train.cpu_offload needs GPU workers .* has no GPUs"),
        (
            ["train.strategy=lora", "train.quantize_base=nf4"],
            r"train.quantize_base=nf4 needs GPU workers .*"
            r"set train.quantize_base=none",
        ),
    ):
        with pytest.raises(RaybmError, match=message):
            run_training(config(tmp_path, data_csv, *overrides), log=quiet)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()
