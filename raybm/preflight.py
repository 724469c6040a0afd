"""The checks before Ray starts, for every command: they need no Ray and cost seconds, so
a wrong bucket, data path, model name, setting or missing key fails at once instead of
after Ray's start (or a cluster's queue)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from raybm.config import JobConfig, pipeline_stages
from raybm.errors import RaybmError
from raybm.extras import require
from raybm.inference.locate import config_model
from raybm.storage.results import Results
from raybm.tracking import check_tracking
from raybm.tracking.registry import registered_name
from raybm.train.driver import teacher_labels

if TYPE_CHECKING:
    from raybm.data.sources import Source


def preflight(cfg: JobConfig, stages: list[str] | None = None) -> Source:
    """The checks before Ray starts, for every command that runs ``stages`` (default: the
    pipeline's): they need no Ray and cost seconds. The storage is reachable (bucket,
    credentials), the data source exists, the model and its tokenizer load, the training
    settings (and those a sweep can sample) fit the model's architecture, a distillation
    teacher is a model folder, an API key is set for deploy, export or deploy without a
    train or tune stage have a model. Returns the resolved source."""
    from raybm.data.sources import resolve_source
    from raybm.models.catalog import check_model
    from raybm.models.strategies import check_fits_architecture

    Results.from_config(cfg.storage).check_reachable()
    check_tracking(cfg.tracking)
    source = resolve_source(cfg.data, cfg.storage)
    if cfg.tracking.mlflow_uri and cfg.tracking.register:
        registered_name(cfg, source.name)
    check_model(cfg.model, cfg.storage)
    check_fits_architecture(cfg)
    teacher_labels(cfg.train.distill_from)
    stages = pipeline_stages(cfg) if stages is None else stages
    if "deploy" in stages:
        require("serve", "the deploy stage")
        from raybm.serve.app import read_api_key

        read_api_key(cfg.serve)
    if "export" in stages and any(v.startswith("onnx") for v in cfg.export.variants):
        require("export", "the export stage's ONNX variants")
    if not {"train", "tune"} & set(stages) and {"export", "deploy"} & set(stages):
        trained_model(cfg)  # export or deploy alone need a model trained earlier
    return source


def trained_model(cfg: JobConfig) -> str:
    """The model this config's train or tune stage made earlier (a path or URI); a clear
    error when none."""
    try:
        return config_model(cfg)
    except RaybmError as e:  # nothing trained yet: say it in the pipeline's terms
        stage = "tune" if cfg.tune.search_space else "train"
        raise RaybmError(
            f"{str(e).split(';')[0]}; add the {stage} stage (--stages {stage},...) or run "
            f"`raybm {stage}` with this config first"
        ) from None
