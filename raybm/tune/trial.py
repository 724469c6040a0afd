"""One sweep trial: a Tune function trainable that trains in its own process (one worker)
or fits one ``TorchTrainer`` (``tune.trial_runner``), how many trials fit the cluster at
once, and freeing a stopped trial's workers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from raybm.config import JobConfig, build_config, merge_raw
from raybm.config.search_space import Distribution, nested
from raybm.errors import RaybmError
from raybm.placement import alive_nodes, copies_that_fit
from raybm.runtime import cluster_address
from raybm.storage.records import DataReport
from raybm.storage.results import Results
from raybm.train.driver import build_trainer, reads_whole_splits, tokenized_datasets, worker_config
from raybm.train.loop import run_worker
from raybm.train.resources import asks_for_gpus, resources_that_may_appear, worker_resources
from raybm.train.session import TrialSession

if TYPE_CHECKING:
    from ray.tune import Callback, PlacementGroupFactory

# Each trial's function only waits on its TorchTrainer; the workers reserve the real CPUs.
# It reserves memory, not a fraction of a CPU: fractions left on nodes add up to no node
# with a whole CPU for a 1-CPU worker (seen on a cluster of 1-CPU nodes).
TRIAL_DRIVER_MEMORY = 512 * 1024 * 1024
# Tokenizer actors of a trial that tokenizes its own data (two splits, 0.25 CPU each).
TRIAL_TOKENIZER_BUNDLES = [{"CPU": 0.25}, {"CPU": 0.25}]


def trial_config(base: dict[str, Any], params: dict[str, Any]) -> JobConfig:
    """The job config of one trial: the base config with the trial's sampled values."""
    raw = merge_raw(base, nested(params))
    raw["tune"] = dict(raw["tune"], search_space={})
    raw["pipeline"] = dict(raw.get("pipeline") or {}, stages=[])
    return build_config(raw)


IN_TRIAL, RAY_TRAIN = "in_trial", "ray_train"
# Searched settings that change a trial's resources or worker group: Tune reserves one
# trial's resources for every trial, so such sweeps fit a TorchTrainer per trial.
_WORKER_KEYS = (
    "train.num_workers",
    "train.parallelism",
    "train.data_feed",
    "train.cpus_per_worker",
    "train.gpus_per_worker",
    "train.worker_resources",
    "train.use_gpu",
)


def trial_runner(cfg: JobConfig, dists: list[Distribution], tokenizes: bool, whole: bool) -> str:
    """Where the sweep's trials train (``tune.trial_runner``): ``in_trial`` (the trial's own
    process is the one worker) or ``ray_train`` (a TorchTrainer per trial). ``whole``: the
    trials' workers read the prepared splits whole."""
    t = cfg.train
    why_not = [
        reason
        for reason, applies in [
            (f"train.num_workers={t.num_workers} (one worker only)", t.num_workers != 1),
            ("train.parallelism=fsdp", t.parallelism == "fsdp"),
            (
                "each trial tokenizes its data (the search changes data.* or model.name, or data.augment is on)",
                tokenizes,
            ),
            ("the splits stream through Ray Data (train.data_feed)", not tokenizes and not whole),
            (
                f"the search changes {', '.join(d.key for d in dists if d.key.startswith(_WORKER_KEYS))}",
                any(d.key.startswith(_WORKER_KEYS) for d in dists),
            ),
            (
                "the workers wait for resources the cluster may add (autoscaling, train.use_gpu=yes)",
                bool(resources_that_may_appear(cfg)),
            ),
        ]
        if applies
    ]
    wanted = cfg.tune.trial_runner
    if wanted == IN_TRIAL and why_not:
        raise RaybmError(
            f"tune.trial_runner=in_trial cannot run these trials in their own process: "
            f"{'; '.join(why_not)}. Set tune.trial_runner=auto (or ray_train)"
        )
    if wanted == "auto":
        return RAY_TRAIN if why_not else IN_TRIAL
    return wanted


def in_trial_resources(cfg: JobConfig) -> PlacementGroupFactory:
    """What a trial that trains in its own process reserves: its one worker's bundle."""
    from ray import tune

    return tune.PlacementGroupFactory([worker_resources(cfg.train, asks_for_gpus(cfg.train.use_gpu))])


def run_trial_in_process(
    params: dict[str, Any], *, base: dict[str, Any], labels: list[str], report: DataReport, dataset: str
) -> None:
    """One Tune trial trained here, in the trial's own process (``tune.trial_runner``): its
    one worker reads the prepared dataset ``dataset`` whole and reports each epoch, with
    its checkpoint, to Tune."""
    cfg = trial_config(base, params)
    run_worker(worker_config(cfg, labels, report, predictions_to=None, whole_splits=dataset), TrialSession())


def run_trial(
    params: dict[str, Any],
    *,
    base: dict[str, Any],
    labels: list[str],
    report: DataReport,
    dataset: str,
    text_splits: dict,
    tokenized: dict | None,
    trials_path: str,
) -> None:
    """One Tune trial: a full Ray Train run of the trial's config; its workers read the
    prepared dataset ``dataset`` whole where they can (``train.data_feed``)."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = trial_config(base, params)
    results = Results.from_config(cfg.storage)
    # The trial id is stable across a resumed sweep, so the Train run of the same name
    # picks up its own last checkpoint.
    run_name = ray.tune.get_context().get_trial_id()
    whole = reads_whole_splits(cfg, report)
    if whole:
        datasets = {}
    else:
        datasets = tokenized if tokenized is not None else tokenized_datasets(cfg, text_splits)
    trainer = build_trainer(
        cfg,
        labels=labels,
        report=report,
        datasets=datasets,
        run_name=run_name,
        storage_path=trials_path,
        storage_filesystem=results.fs,
        callbacks=[TuneReportCallback()],
        whole_splits=dataset if whole else None,
    )
    trainer.fit()


def _release_placement_group(pg_hex: str | None) -> None:
    """Remove a trial's Ray Train placement group if it is still there."""
    if not pg_hex:
        return
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    try:
        pg_id = ray.PlacementGroupID(bytes.fromhex(pg_hex))
        if ray.util.placement_group_table(PlacementGroup(pg_id)).get("state") in ("CREATED", "PENDING", "RESCHEDULING"):
            remove_placement_group(PlacementGroup(pg_id))
    except Exception:  # noqa: BLE001 - already gone
        pass


def resource_releaser() -> Callback:
    """A Tune callback that frees a stopped trial's training workers.

    When the scheduler stops a trial, Tune ends the trial's actor at once, and the Ray
    Train run inside it never shuts its worker group down. Ray Train leaves the cleanup to
    a detached actor that polls the state API, which fails when the machine runs more than
    one Ray (and is slow under load); until then the stopped trial's CPUs or GPUs stay
    reserved and the next trials wait. Each training worker reports its placement group,
    so the driver removes it as soon as the trial ends.
    """
    from ray import tune

    class ReleaseTrialResources(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            _release_placement_group((trial.last_result or {}).get("placement_group"))

        def on_trial_error(self, iteration, trials, trial, **info):
            _release_placement_group((trial.last_result or {}).get("placement_group"))

    return ReleaseTrialResources()


def trial_bundles(cfg: JobConfig, tokenizes: bool) -> list[dict[str, float]]:
    """What one running trial holds, bundle by bundle: its workers, its tokenizer actors
    (the trial's own function reserves memory only)."""
    t = cfg.train
    return [worker_resources(t, asks_for_gpus(t.use_gpu))] * t.num_workers + (
        TRIAL_TOKENIZER_BUNDLES if tokenizes else []
    )


def concurrent_trials(cfg: JobConfig, tokenizes: bool) -> int:
    """Trials that fit the cluster at once (``tune.max_concurrent_trials`` wins if set)."""
    return trials_that_fit(cfg, trial_bundles(cfg, tokenizes), alive_nodes(), bool(cluster_address(cfg.ray)))


def trials_that_fit(
    cfg: JobConfig, bundles: list[dict[str, float]], nodes: list[dict[str, float]], on_cluster: bool
) -> int:
    """Trials whose bundles fit the nodes at once, node by node. GPU sweeps on an autoscaling
    cluster: ``tune.cluster_gpus`` over a trial's GPUs. At least 1."""
    gpus = sum(b.get("GPU", 0.0) for b in bundles)
    if gpus and cfg.tune.cluster_gpus:
        fits = max(1, int(cfg.tune.cluster_gpus // gpus))
    else:
        fits = max(1, copies_that_fit(bundles, nodes))
    wanted = cfg.tune.max_concurrent_trials
    if not wanted:
        return fits
    # A local Ray cannot grow: trials beyond what fits would only wait for workers. A
    # cluster may autoscale, so there the setting is taken as given.
    if wanted > fits and not cfg.tune.cluster_gpus and not on_cluster:
        return fits
    return wanted
