"""Checks across config keys, run on every config after its keys are typed."""

from __future__ import annotations

import dataclasses
import ipaddress
import typing
from typing import Any

from raybm.config.coerce import build_section, merge_raw
from raybm.config.naming import check_name
from raybm.config.search_space import CONTINUOUS, nested, parse_space
from raybm.config.stages import PIPELINE_STAGES, JobConfig, TrainConfig
from raybm.errors import ConfigError
from raybm.metrics import soup_metric


def pipeline_stages(cfg: JobConfig) -> list[str]:
    """The pipeline's stages as configured, or the default ones for this config."""
    if cfg.pipeline.stages:
        return list(cfg.pipeline.stages)
    return ["data", "tune" if cfg.tune.search_space else "train", "export", "deploy"]


def is_loopback(host: str) -> bool:
    """Whether a bind address reaches only this machine."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def check_job(cfg: JobConfig) -> None:
    """Every check across keys; a ConfigError naming the keys to change."""
    if cfg.name is not None:
        check_name(cfg.name, "name")
    if cfg.data.name is not None:
        check_name(cfg.data.name, "data.name")
    d = cfg.data
    if len(d.split) != 3:
        raise ConfigError(f"data.split: give three shares (train, validation, test), got {d.split}")
    if any(s <= 0 for s in d.split):
        raise ConfigError(f"data.split: every share must be > 0, got {d.split}")
    if abs(sum(d.split) - 1.0) > 1e-6:
        raise ConfigError(f"data.split: shares must add up to 1, got {d.split} (sum {sum(d.split):g})")
    if d.labels is not None:
        if len(d.labels) < 2:
            raise ConfigError(f"data.labels: a classifier needs at least 2 classes, got {d.labels}")
        if len(set(d.labels)) != len(d.labels):
            raise ConfigError(f"data.labels: class names repeat: {d.labels}")
    unknown_targets = sorted(set(d.label_values.values()) - set(d.labels or d.label_values.values()))
    if unknown_targets:
        raise ConfigError(f"data.label_values: maps to {unknown_targets}, which are not in data.labels {d.labels}")
    t = cfg.train
    if t.strategy in ("scratch", "lora") and t.freeze_layers:
        raise ConfigError("train.freeze_layers: only used with train.strategy=partial")
    if t.strategy == "lora" and t.layerwise_lr_decay < 1:
        raise ConfigError(
            "train.layerwise_lr_decay does not apply to train.strategy=lora (the base model is "
            "frozen; only the adapters and the head train); set it to 1"
        )
    if t.strategy == "lora" and t.keep_sparsity:
        raise ConfigError(
            "train.keep_sparsity does not work with train.strategy=lora (the merged adapters "
            "fill a pruned model's zeros); use strategy full"
        )
    if cfg.model.keep_layers is not None and t.freeze_layers > cfg.model.keep_layers:
        raise ConfigError(
            f"train.freeze_layers ({t.freeze_layers}) exceeds model.keep_layers ({cfg.model.keep_layers})"
        )
    if cfg.tune.max_latency_ms is not None and not cfg.tune.measure_cost:
        raise ConfigError("tune.max_latency_ms needs tune.measure_cost=true (latency is measured after the sweep)")
    if t.parallelism == "fsdp" and (t.l1 or t.keep_sparsity):
        raise ConfigError(
            f"train.parallelism=fsdp does not support train.{'l1' if t.l1 else 'keep_sparsity'} "
            f"(it works on whole weight matrices, which FSDP shards); use parallelism ddp"
        )
    _check_memory_settings(t)
    if t.data_feed == "whole" and d.augment.enabled:
        raise ConfigError(
            "train.data_feed=whole does not work with data.augment (augmented text is tokenized "
            "anew every epoch); use data_feed auto or ray_data"
        )
    if t.gpus_per_worker > 1 and t.gpus_per_worker != int(t.gpus_per_worker):
        raise ConfigError(f"train.gpus_per_worker: above 1 it must be a whole number, got {t.gpus_per_worker}")
    if d.clean.stop_words and d.language == "zh":
        raise ConfigError(
            "data.clean.stop_words: supported for English text only; set it to false for data.language=zh"
        )
    s = cfg.serve
    if s.max_replicas is not None and s.min_replicas > s.max_replicas:
        raise ConfigError(f"serve.min_replicas ({s.min_replicas}) exceeds serve.max_replicas ({s.max_replicas})")
    if not is_loopback(s.host) and not s.api_key_env and not s.allow_without_key:
        raise ConfigError(
            f"serve.host={s.host} listens beyond this machine without an API key: set "
            f"serve.api_key_env to a variable holding one (or serve.allow_without_key=true "
            f"behind a gateway that checks callers)"
        )
    if s.route_prefix and not s.route_prefix.startswith("/"):
        raise ConfigError(f"serve.route_prefix: must start with '/', got {s.route_prefix!r}")
    if s.backend in ("int8", "onnx") and s.gpus_per_replica:
        raise ConfigError(
            f"serve.backend={s.backend} runs on CPU only; set serve.gpus_per_replica=0 or use backend torch"
        )
    if cfg.tune.search_space:
        _check_search_space(cfg)
    if cfg.tune.soup != "none":
        try:
            soup_metric(cfg.tune.metric)
        except ConfigError as e:
            raise ConfigError(f"tune.soup={cfg.tune.soup}: {e}; set tune.metric to one, or tune.soup=none") from None
    stages = pipeline_stages(cfg)
    bad = [x for x in stages if x not in PIPELINE_STAGES]
    if bad:
        raise ConfigError(f"pipeline.stages: unknown stage(s) {bad}; choose from {', '.join(PIPELINE_STAGES)}")
    if len(set(stages)) != len(stages) or [x for x in PIPELINE_STAGES if x in stages] != list(stages):
        raise ConfigError(
            f"pipeline.stages: list each stage once, in the order {', '.join(PIPELINE_STAGES)}; got {stages}"
        )
    if "train" in stages and "tune" in stages:
        raise ConfigError("pipeline.stages: pick train (one run) or tune (a sweep), not both")
    if "tune" in stages and not cfg.tune.search_space:
        raise ConfigError(
            "pipeline.stages has tune, but tune.search_space is empty: add the settings to "
            "search, or use the train stage"
        )


def _check_memory_settings(t: TrainConfig) -> None:
    """Offload and 4-bit base weights: what they combine with."""
    if t.cpu_offload and t.parallelism != "fsdp":
        raise ConfigError("train.cpu_offload offloads FSDP's shards; set train.parallelism=fsdp (on GPU workers)")
    if t.cpu_offload and t.use_gpu == "no":
        raise ConfigError(
            "train.cpu_offload moves GPU workers' state to host memory; with train.use_gpu=no it "
            "is all in host memory already: drop train.cpu_offload"
        )
    if t.quantize_base != "none" and t.strategy != "lora":
        raise ConfigError(
            f"train.quantize_base={t.quantize_base} quantizes the frozen base of a LoRA run; set "
            f"train.strategy=lora (a fully trained model cannot train 4-bit weights)"
        )
    if t.quantize_base != "none" and t.parallelism == "fsdp":
        raise ConfigError(
            "train.quantize_base does not combine with train.parallelism=fsdp (4-bit weights are not "
            "sharded); use parallelism ddp: each GPU holds the whole 4-bit base"
        )
    if t.quantize_base != "none" and t.use_gpu == "no":
        raise ConfigError(
            "train.quantize_base needs GPU workers (bitsandbytes' 4-bit kernels are CUDA's); "
            "set train.use_gpu=auto or yes"
        )


def _key_type(key: str) -> Any:
    """The declared type of a dotted config key (None for an unknown key)."""
    tp: Any = JobConfig
    for part in key.split("."):
        if not dataclasses.is_dataclass(tp):
            return None
        tp = typing.get_type_hints(tp).get(part)
        if tp is None:
            return None
    return tp


def extreme_trials(cfg: JobConfig) -> list[JobConfig]:
    """``cfg`` itself, then one trial config per extreme value of each searched key (the
    checks that need more than the config, such as what the model's architecture allows,
    run on each)."""
    base = cfg.to_dict()
    base["tune"]["search_space"] = {}
    base["pipeline"]["stages"] = []
    trials = [cfg]
    parse_space(
        cfg.tune.search_space,
        lambda key, value, dist: trials.append(build_section(JobConfig, merge_raw(base, nested({key: value})), "")),
    )
    return trials


def _check_search_space(cfg: JobConfig) -> None:
    """Every searched key exists and every value a distribution can produce is valid."""
    base = cfg.to_dict()
    base["tune"]["search_space"] = {}
    base["pipeline"]["stages"] = []  # a trial is one training run, whatever the pipeline

    def check(key: str, value: Any, dist: Any) -> None:
        tp = _key_type(key)
        if tp is None:
            try:
                build_section(JobConfig, nested({key: value}), "")
            except ConfigError as e:
                raise ConfigError(f"tune.search_space: {e}") from None
        if dataclasses.is_dataclass(tp):
            raise ConfigError(f"tune.search_space.{key}: {key!r} is a section; search one of its keys")
        if (
            dist.kind in CONTINUOUS
            and tp is not None
            and int in (tp, *typing.get_args(tp))
            and float not in (tp, *typing.get_args(tp))
        ):
            raise ConfigError(
                f"tune.search_space.{key}: {key} takes whole numbers; use randint(lo, hi), "
                f"lograndint(lo, hi) or choice([...]) instead of {dist}"
            )
        try:
            trial = build_section(JobConfig, merge_raw(base, nested({key: value})), "")
            check_job(trial)
        except ConfigError as e:
            raise ConfigError(
                f"tune.search_space.{key}: {dist} allows {value!r}, which the config refuses: {e}"
            ) from None

    parse_space(cfg.tune.search_space, check)
