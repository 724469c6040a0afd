"""Model soups: one model whose weights are the mean of several fine-tuned models' weights.

Models fine-tuned from the same pretrained weights (a sweep's trials, runs with another
seed, learning rate or number of epochs) can be averaged weight by weight into one model
that costs no more to run than any of them and is often better than the best of them
(Wortsman et al., 2022, "Model soups"). Two recipes:

- ``greedy``: start from the best candidate by validation, add the others best first and
  keep each only when the soup's validation score does not drop. Never worse than the best
  candidate on validation; the test split is not looked at.
- ``uniform``: the mean of every candidate.

Weights are summed one model at a time (memory: about three models' weights), in float32,
from safetensors files only. Models whose weight names or shapes differ (another
architecture, a cropped encoder) are skipped with a message.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from raybm.errors import ConfigError, RaybmError
from raybm.inference.loading import model_info, read_label_map
from raybm.inference.locate import locate_model
from raybm.metrics import soup_metric
from raybm.models.card import write_model_card
from raybm.storage.fs import is_s3
from raybm.storage.layout import (
    CONFIG_FILE,
    EPOCH_METRICS_FILE,
    METRICS_FILE,
    MODEL_CARD_FILE,
    MODEL_CONFIG_FILE,
    MODEL_DIR,
    PREDICTIONS_FILE,
    RUNS,
    SOUP_FILE,
    SUCCESS_MARKER,
    TRAIN_STATE_FILE,
    WEIGHTS_FILE,
    WEIGHTS_INDEX_FILE,
    weight_files,
)
from raybm.storage.lease import Lease, hold_lease
from raybm.storage.model_cache import fetch_model
from raybm.storage.records import RunRecord, soup_used
from raybm.storage.results import Results
from raybm.train.publish import publish_model, score_model_uri

if TYPE_CHECKING:
    from raybm.config import JobConfig

# Files of a training checkpoint that do not describe the averaged model.
_NOT_COPIED = (TRAIN_STATE_FILE, EPOCH_METRICS_FILE, SUCCESS_MARKER, MODEL_CARD_FILE)


@dataclass
class Soup:
    """A model soup: the chosen model's folder, how it was made, and its validation score."""

    folder: str  # local folder of the chosen model (a copy of the best candidate when nothing was added)
    method: str
    metric: str
    ingredients: list[str]  # candidate names in the soup, best first
    validation: float  # the soup's validation score
    best_single: float  # the best candidate's validation score, scored the same way
    tried: list[dict[str, Any]] = field(default_factory=list)  # greedy: every step, kept or not

    @property
    def used(self) -> bool:
        """Whether the soup is the model handed on (``raybm.storage.records.soup_used``)."""
        return soup_used(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        """The soup's record, as written into ``winner.json`` and ``soup.json``."""
        return {
            "method": self.method,
            "metric": self.metric,
            "ingredients": self.ingredients,
            "validation": self.validation,
            "best_single": self.best_single,
            "tried": self.tried,
        }


def _load(folder: str) -> dict:
    from safetensors.torch import load_file

    files = weight_files(folder)
    if files is None:
        raise RaybmError(f"{folder}: no {WEIGHTS_FILE} (soups are made from safetensors weights only)")
    return {k: v for path in files for k, v in load_file(path).items()}


def _shapes(state: dict) -> dict[str, tuple]:
    return {k: (tuple(v.shape), v.is_floating_point()) for k, v in state.items()}


class _Sum:
    """A running float32 sum of compatible state dicts."""

    def __init__(self, first: dict) -> None:
        self.template = first
        self.shapes = _shapes(first)
        self.total = {k: v.float().clone() if v.is_floating_point() else v for k, v in first.items()}
        self.count = 1

    def compatible(self, state: dict) -> bool:
        return _shapes(state) == self.shapes

    def add(self, state: dict) -> None:
        for k, v in state.items():
            if v.is_floating_point():
                self.total[k] += v.float()
        self.count += 1

    def mean(self, extra: dict | None = None) -> dict:
        """The mean of the sum, or of the sum plus ``extra`` (the sum itself is left as it is)."""
        n = self.count + (extra is not None)
        out = {}
        for k, t in self.template.items():
            if not t.is_floating_point():
                out[k] = t
            elif extra is None:
                out[k] = (self.total[k] / n).to(t.dtype)
            else:
                out[k] = ((self.total[k] + extra[k].float()) / n).to(t.dtype)
        return out


def write_model(source: str, state: dict, out: str, info: dict[str, Any] | None = None) -> str:
    """A model folder at ``out``: ``source``'s config, tokenizer and label map with ``state``
    as its weights (and ``soup.json`` when ``info`` is given)."""
    from safetensors.torch import save_file

    shutil.copytree(
        source,
        out,
        ignore=shutil.ignore_patterns(*_NOT_COPIED, WEIGHTS_FILE, WEIGHTS_INDEX_FILE, "model-*-of-*.safetensors"),
    )
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(out, WEIGHTS_FILE), metadata={"format": "pt"})
    if info is not None:
        with open(os.path.join(out, SOUP_FILE), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=2)
    return out


def average_models(folders: list[str], out: str) -> str:
    """The uniform mean of the models in ``folders`` as a model folder at ``out``."""
    total = _Sum(_load(folders[0]))
    for folder in folders[1:]:
        state = _load(folder)
        if not total.compatible(state):
            raise RaybmError(f"{folder}: its weights do not match {folders[0]}'s (another architecture?)")
        total.add(state)
    return write_model(folders[0], total.mean(), out)


def make_soup(
    candidates: list[tuple[str, str]],
    score: Callable[[str], dict[str, Any]],
    *,
    metric: str,
    mode: str = "max",
    method: str = "greedy",
    workdir: str,
    log: Callable[[str], None] = print,
) -> Soup:
    """Make a soup of ``candidates`` ((name, local model folder), best first) in ``workdir``.

    ``score(folder)`` returns a model folder's validation metrics (``score_dataset``);
    ``metric`` is its key to compare (``soup_metric``)."""
    if method not in ("greedy", "uniform"):
        raise ConfigError(f"soup method {method!r}: use greedy or uniform")
    if not candidates:
        raise RaybmError("a soup needs at least one model")
    better = (lambda a, b: a >= b) if mode == "max" else (lambda a, b: a <= b)
    first_name, first_folder = candidates[0]
    total = _Sum(_load(first_folder))
    best_single = float(score(first_folder)[metric])
    log(f"Soup ({method}) by validation {metric}: {first_name} alone scores {best_single:.4f}")
    current, ingredients, tried = best_single, [first_name], []
    step = 0
    for name, folder in candidates[1:]:
        state = _load(folder)
        if not total.compatible(state):
            log(f"  {name}: skipped, its weights do not match {first_name}'s (another architecture)")
            tried.append({"model": name, "kept": False, "reason": "weights do not match"})
            continue
        if method == "uniform":
            total.add(state)
            ingredients.append(name)
            continue
        step += 1
        trial = write_model(first_folder, total.mean(state), os.path.join(workdir, f"greedy-{step}"))
        value = float(score(trial)[metric])
        kept = better(value, current)
        tried.append({"model": name, metric: value, "kept": kept})
        log(f"  + {name}: {value:.4f} -> {'kept' if kept else 'left out'}")
        if kept:
            total.add(state)
            current = value
            ingredients.append(name)
        shutil.rmtree(trial, ignore_errors=True)
    info = {"method": method, "metric": metric, "ingredients": ingredients}
    out = write_model(first_folder, total.mean(), os.path.join(workdir, "soup"), info)
    if method == "uniform":
        current = float(score(out)[metric]) if len(ingredients) > 1 else best_single
        log(f"  uniform mean of {len(ingredients)} model(s): {current:.4f}")
    soup = Soup(out, method, metric, ingredients, current, best_single, tried)
    with open(os.path.join(out, SOUP_FILE), "w", encoding="utf-8") as f:
        json.dump(soup.to_dict(), f, indent=2)
    return soup


def check_soup_inputs(cfg: JobConfig, models: list[str], dataset: str, name: str) -> tuple[Results, str]:
    """``raybm soup``'s arguments, checked without Ray: (results, the new run's folder)."""
    if len(models) < 2:
        raise RaybmError("a soup needs at least two models (--models A B ...)")
    if len(set(models)) != len(models):
        raise RaybmError(f"--models lists a model twice: {models}")
    soup_metric(cfg.tune.metric)
    results = Results.from_config(cfg.storage)
    results.check_reachable()
    if dataset not in results.list_datasets():
        raise RaybmError(
            f"--data {dataset!r}: no prepared dataset of that name under {results.root}/data "
            f"(the one the models were trained on; `raybm data` prepares it)"
        )
    run_dir = results.run_dir(name)
    if results.exists(run_dir):
        raise RaybmError(f"--name {name!r}: {results.uri(run_dir)} already exists; pick another name or delete it")
    return results, run_dir


def run_soup(
    cfg: JobConfig,
    models: list[str],
    dataset: str,
    name: str,
    method: str = "greedy",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """``raybm soup``: the soup of finished models (run or sweep names, model folders, or
    s3:// folders) as a new run ``runs/<name>/``: model/, metrics.json (the soup's test
    metrics and its recipe), config.yaml, test predictions. Candidates are ranked by their
    validation score on ``dataset`` first; the test split is scored once, at the end. The
    run is written under its lease (raybm.storage.lease), as every run is."""
    results, run_dir = check_soup_inputs(cfg, models, dataset, name)
    with hold_lease(results, RUNS, name, f"soup {name!r}", log=log) as lease:  # one writer per run name
        if results.exists(run_dir):  # written by another job since the check above
            raise RaybmError(f"--name {name!r}: {results.uri(run_dir)} already exists; pick another name or delete it")
        return _run_soup(cfg, results, run_dir, models, dataset, name, method, lease, log)


def _run_soup(
    cfg: JobConfig,
    results: Results,
    run_dir: str,
    models: list[str],
    dataset: str,
    name: str,
    method: str,
    lease: Lease,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """``run_soup`` under the run's lease."""
    import ray.train

    from raybm.data import load_split
    from raybm.inference.evaluate import calibrate_folder, score_dataset

    metric = soup_metric(cfg.tune.metric)
    labels = results.dataset_label_map(dataset)["labels"]
    with tempfile.TemporaryDirectory(prefix="raybm-soup-") as tmp:
        local = []
        for i, spec in enumerate(models):
            located = locate_model(spec, cfg, flag="--models", shared=True)
            folder = fetch_model(located, cfg.storage, os.path.join(tmp, f"in-{i}")) if is_s3(located) else located
            if read_label_map(folder) != labels:
                raise RaybmError(f"{spec}: its labels {read_label_map(folder)} are not {dataset}'s {labels}")
            local.append((spec, folder))
        validation = load_split(results, dataset, "validation").materialize()
        scores: dict[str, dict[str, Any]] = {}

        def score(folder: str) -> dict[str, Any]:
            if folder not in scores:
                scores[folder] = score_dataset(folder, validation, cfg.data.max_length)
            return scores[folder]

        log(f"Scoring {len(local)} models on {dataset}'s validation split")
        for spec, folder in local:
            log(f"  {spec}: {metric} {score(folder)[metric]:.4f}")
        sign = -1 if cfg.tune.mode == "max" else 1
        local.sort(key=lambda sf: sign * score(sf[1])[metric])
        soup = make_soup(
            local, score, metric=metric, mode=cfg.tune.mode, method=method, workdir=os.path.join(tmp, "work"), log=log
        )
        with open(os.path.join(soup.folder, SOUP_FILE), "w", encoding="utf-8") as f:
            json.dump({**soup.to_dict(), "dataset": dataset}, f, indent=2)
        calibrate_folder(soup.folder, validation, cfg.data.max_length)  # new weights: their own temperature

        base_model = model_info(soup.folder)["base_model"]
        lease.check()  # fencing: nothing is published by a job that lost its lease
        model_uri = publish_model(results, run_dir, ray.train.Checkpoint.from_directory(soup.folder))
        source_cfg = os.path.join(local[0][1], MODEL_CONFIG_FILE)
        if os.path.isfile(source_cfg):
            with open(source_cfg, encoding="utf-8") as f:
                results.write_text(results.join(run_dir, CONFIG_FILE), f.read())
    log("Scoring the soup on the test split")
    test = score_model_uri(
        results,
        model_uri,
        load_split(results, dataset, "test"),
        cfg.data.max_length,
        predictions_to=results.join(run_dir, PREDICTIONS_FILE),
    )
    metrics = RunRecord(
        run=name,
        dataset=dataset,
        model=base_model,
        soup={**soup.to_dict(), "models": models},
        validation={cfg.tune.metric: soup.validation},
        test=test,
    )
    results.write_json(results.join(run_dir, METRICS_FILE), metrics.to_json())

    write_model_card(
        results,
        results.join(run_dir, MODEL_DIR),
        name=name,
        kind="soup",
        dataset=dataset,
        test=test,
        notes=[
            f"the {soup.method} soup of {', '.join(soup.ingredients)} (from {', '.join(models)}), "
            f"validation {cfg.tune.metric} {soup.validation:.4f} against {soup.best_single:.4f} "
            f"for the best of them alone"
        ],
    )
    lease.check()
    results.mark_complete(run_dir)
    return {"run_dir": results.uri(run_dir), "model_dir": model_uri, **metrics.to_json()}
