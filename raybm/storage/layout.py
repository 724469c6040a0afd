"""The results tree: every name raybm writes under the results root, the one place.

The root is a local path or ``s3://bucket/prefix``. A folder without ``_SUCCESS`` is
incomplete and is never read as data. docs/results.md shows the tree below
(tests/unit/test_results.py keeps the two the same):

    <root>/
      data/<dataset>/                prepared dataset (raybm data)
        train/  validation/  test/   Parquet parts, columns: text (string), label (int64),
                                     input_ids (list<int32>: the text tokenized as training reads it)
        label_map.json               labels in id order, label_to_id, id_to_label, excluded raw values
        report.json                  the data report (see docs/data.md)
        config.yaml                  the resolved job config that produced it
        _SUCCESS                     written last
      runs/<run>/                    one training run (raybm train; docs/training.md)
        config.yaml                  the resolved job config
        checkpoint_<time>/           the best K checkpoints (Ray Train), with optimizer state:
          model.safetensors            the weights (or shards/ and shards.json: one file per FSDP rank)
          train_state.pt               optimizer, scheduler, RNG: what resuming needs
          epoch_metrics.json           the epoch's metrics
        checkpoint_manager_snapshot.json   Ray Train's record; a rerun with this name resumes from it
        model/                       the best checkpoint without optimizer state: what evaluate,
                                     predict, export and serve take:
          model.safetensors            its weights (or model.safetensors.index.json and the files it names)
          raybm_config.yaml            the job config it was trained with
          label_map.json               its labels
          calibration.json             its temperature, fitted on validation
          drift_reference.json         its training label mix and token-length bins (serving's drift check)
          README.md                    its model card (hub metadata, test scores, recipe, how to load it)
        history.json                 every epoch's metrics (and the points of the training curves)
        tensorboard/                 TensorBoard event files: loss and learning rate by step,
                                     validation scores by epoch (also in each sweep trial's folder)
        metrics.json                 the best checkpoint's test metrics
        test_predictions.parquet     every test example: text, label, pred, confidence, prob_<i>
        _SUCCESS                     written last
                                     (a run made by raybm soup has model/ with soup.json,
                                     metrics.json with the recipe and test metrics, config.yaml,
                                     test predictions; no checkpoints or history)
      sweeps/<sweep>/                hyperparameter sweeps (raybm tune; docs/tuning.md)
        tune/                        Ray Tune's experiment (sealed state); a trial in its own
                                     process keeps its checkpoints in its folder here
        trials/                      the trials' Ray Train runs (trials of several workers)
        leaderboard.json             every trial: its settings, best score, epochs, history
        leaderboard.csv              the same, one row a trial
        winner.json                  the best trial, its test metrics, the soup if one was made
        model/                       the winner's model (as a run's model/; soup.json when a soup)
        config.yaml  _SUCCESS
      exports/<name>/                exported and compressed models (raybm export; docs/export.md)
        <variant>/                   one variant, with manifest.json (method, size, measured numbers),
                                     model.onnx for the ONNX ones; built in a staging folder and
                                     renamed into place when complete
        mobile/                      the mobile artifact (ONNX + tokenizer + predict.py)
        summary.json                 the reference's numbers and every variant's manifest
      pipelines/<name>/              one pipeline (raybm pipeline / jobs/pipeline.py; docs/cluster.md)
        config.yaml                  the resolved job config
        summary.json                 every stage: status, seconds, outputs; the release gate;
                                     the MLflow registered version (registered: name, version, uri)
        console.log                  the whole output of a quiet pipeline (--quiet)
        _SUCCESS                     written when every stage finished
      registry/<name>-v<version>/    a version of MLflow's Model Registry (--model models:/...;
        model/                       docs/tracking.md), fetched once; _SUCCESS when whole
      .leases/<kind>-<name>          who writes that folder now (one writer at a time)
"""

from __future__ import annotations

import json
import os

# ---------------------------------------------------------------------------- the layout
# Every folder and file name raybm writes under the results root, and nowhere else
# (tests/unit/test_results.py greps the package for these literals).
# The folders under the root, one per kind of artifact (also the kinds of leases and staging).
DATASETS = "data"
RUNS = "runs"
SWEEPS = "sweeps"
EXPORTS = "exports"
PIPELINES = "pipelines"
LEASES = ".leases"  # who writes which folder now (raybm.storage.lease)
REGISTRY = "registry"  # models fetched from MLflow's Model Registry: registry/<name>-v<version>/model
SPLITS = ("train", "validation", "test")
# In every artifact folder.
SUCCESS_MARKER = "_SUCCESS"  # written last: the folder is complete
CONFIG_FILE = "config.yaml"  # the resolved job config that produced it
# A prepared dataset.
LABEL_MAP_FILE = "label_map.json"  # also in every model folder
CALIBRATION_FILE = "calibration.json"  # a model folder's temperature, fitted on validation
DRIFT_REFERENCE_FILE = "drift_reference.json"  # a model folder's training label mix and token-length bins
REPORT_FILE = "report.json"
# A training run or a sweep.
MODEL_DIR = "model"  # the published model
METRICS_FILE = "metrics.json"  # a run's test metrics
HISTORY_FILE = "history.json"  # a run's epochs
TENSORBOARD_DIR = "tensorboard"  # a run's (a trial's) TensorBoard event files: loss, lr, metrics
PREDICTIONS_FILE = "test_predictions.parquet"  # every test example: text, label, pred, confidence, prob_<i>
TUNE_DIR = "tune"  # a sweep's Ray Tune experiment
TRIALS_DIR = "trials"  # a sweep's trial runs
LEADERBOARD_JSON = "leaderboard.json"  # a sweep's leaderboard, every trial with its history
LEADERBOARD_CSV = "leaderboard.csv"  # the same, one row a trial, for spreadsheets
WINNER_FILE = "winner.json"
SOUP_FILE = "soup.json"
# A model folder (besides the tokenizer's and transformers' own files).
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = f"{WEIGHTS_FILE}.index.json"  # weights too large for one file: which file holds each tensor
MODEL_CONFIG_FILE = "raybm_config.yaml"  # the job config the model was trained with
MODEL_CARD_FILE = "README.md"
# A training checkpoint (a model folder plus these).
TRAIN_STATE_FILE = "train_state.pt"  # optimizer, scheduler, RNG: what resuming needs
EPOCH_METRICS_FILE = "epoch_metrics.json"
SHARDS_DIR = "shards"  # an FSDP checkpoint's model and optimizer state: one safetensors file per rank
SHARDS_INDEX_FILE = "shards.json"  # how many ranks wrote SHARDS_DIR, and whether it holds the model
# An export: one folder per variant, and a mobile bundle.
ONNX_FILE = "model.onnx"
VARIANT_FILE = "manifest.json"  # in each variant folder
MOBILE_DIR = "mobile"
# A pipeline.
CONSOLE_LOG_FILE = "console.log"  # a quiet pipeline's whole output (raybm pipeline --quiet)
SUMMARY_FILE = "summary.json"


def weight_files(folder: str) -> list[str] | None:
    """A local model folder's safetensors weight files: ``model.safetensors``, or the files
    its ``model.safetensors.index.json`` names (weights too large for one file); None if neither."""
    single = os.path.join(folder, WEIGHTS_FILE)
    if os.path.isfile(single):
        return [single]
    index = os.path.join(folder, WEIGHTS_INDEX_FILE)
    if not os.path.isfile(index):
        return None
    with open(index, encoding="utf-8") as f:
        return [os.path.join(folder, name) for name in sorted(set(json.load(f)["weight_map"].values()))]
