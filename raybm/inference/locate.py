"""Where a model is: the one answer to "which model folder does this command mean".

Every command that takes a model (``predict``, ``evaluate``, ``export``, ``serve``,
``soup``, the pipeline's later stages and ``serve run raybm.serve.app:build_app``) finds
it here. A user names a model as

- a model folder, or a run or sweep folder (its ``model/``), local or ``s3://``;
- the name of a run or sweep under the results root (``storage.root``, local or S3);
- nothing: the model this config's own job produced (its sweep's winner when the config
  has a search space, else its training run's best model);
- a version in MLflow's Model Registry: ``models:/<name>/<version>``, ``.../latest`` or
  ``models:/<name>@<alias>`` (``tracking.mlflow_uri``), downloaded once into
  ``<root>/registry/<name>-v<version>/model/``.

The answer is a local absolute path or an ``s3://`` URI, always of a folder that holds a
label map; ``local_model`` fetches an ``s3://`` one into the model cache.
"""

from __future__ import annotations

import os
import tempfile

import pyarrow.fs as pafs

from raybm.config import JobConfig, run_name_for, sweep_name_for
from raybm.errors import RaybmError
from raybm.storage.fs import is_s3, resolve_uri
from raybm.storage.layout import LABEL_MAP_FILE, MODEL_DIR, RUNS, SWEEPS
from raybm.storage.model_cache import fetch_model
from raybm.storage.results import Results
from raybm.tracking.registry import download_version, is_registered_model, resolve_version


def locate_model(spec: str | None, cfg: JobConfig, flag: str = "--model", shared: bool = False) -> str:
    """The model folder ``spec`` names (see the module docstring), as a local absolute path
    or an ``s3://`` URI; a RaybmError naming ``flag`` when there is none.

    ``shared``: the model feeds work that writes to, or runs beside, an S3 results root
    (export, serve, soup): with an S3 root it must be on S3 too, not in a local folder."""
    results = Results.from_config(cfg.storage)
    if not spec:
        return config_model(cfg, results)
    if is_registered_model(spec):
        return registered_model(spec, cfg, results)
    if shared and results.remote and not is_s3(spec) and ("/" in spec or os.sep in spec):
        raise RaybmError(
            f"{flag} {spec!r}: with an S3 storage.root ({results.root}), give an s3:// model "
            f"folder or the name of a run or sweep under it"
        )
    if is_s3(spec):
        fs, base = resolve_uri(spec, cfg.storage)
        for folder in (base, f"{base.rstrip('/')}/{MODEL_DIR}"):
            if fs.get_file_info(f"{folder}/{LABEL_MAP_FILE}").type != pafs.FileType.NotFound:
                return f"s3://{folder}"
        raise RaybmError(f"{flag} {spec!r}: no model folder there (one with {LABEL_MAP_FILE}), nor in its {MODEL_DIR}/")
    local_ok = not (shared and results.remote)
    for folder in (spec, os.path.join(spec, MODEL_DIR)) if local_ok else ():
        if os.path.isfile(os.path.join(folder, LABEL_MAP_FILE)):
            return os.path.abspath(folder)
    is_name = "/" not in spec and os.sep not in spec
    if is_name:  # a run or sweep under the results root
        for kind in (SWEEPS, RUNS):
            folder = results.path(kind, spec, MODEL_DIR)
            if results.exists(results.join(folder, LABEL_MAP_FILE)):
                return results.uri(folder) if results.remote else os.path.abspath(folder)
    where = f" or a run/sweep name under {results.root}" if is_name else ""
    raise RaybmError(
        f"{flag} {spec!r}: not a model folder (one with {LABEL_MAP_FILE} and model.safetensors), "
        f"a run or sweep folder{where}"
    )


def registered_model(spec: str, cfg: JobConfig, results: Results) -> str:
    """The folder of the registered model ``spec`` (``models:/...``) under the results root,
    downloaded from MLflow the first time (a version never changes); path or URI."""
    name, version = resolve_version(cfg.tracking, spec)
    folder = results.join(results.registry_dir(name, version), MODEL_DIR)
    if not (results.is_complete(folder) and results.exists(results.join(folder, LABEL_MAP_FILE))):
        with tempfile.TemporaryDirectory(prefix="raybm-registry-") as tmp:
            local = download_version(cfg.tracking, name, version, os.path.join(tmp, MODEL_DIR))
            if not os.path.isfile(os.path.join(local, LABEL_MAP_FILE)):
                raise RaybmError(
                    f"{spec}: version {version} of {name!r} is not a raybm model folder (no {LABEL_MAP_FILE})"
                )
            results.upload_dir(local, folder)
    return results.uri(folder) if results.remote else os.path.abspath(folder)


def config_model(cfg: JobConfig, results: Results | None = None) -> str:
    """The model this config's job produced: its sweep's winner when the config has a search
    space, else its training run's best model (path or URI); an error when it is not there."""
    from raybm.data.pipeline import dataset_name
    from raybm.data.sources import resolve_source

    results = results or Results.from_config(cfg.storage)
    dataset = dataset_name(cfg, resolve_source(cfg.data, cfg.storage))
    if cfg.tune.search_space:
        folder, what = results.sweep_dir(sweep_name_for(cfg, dataset)), "raybm tune"
    else:
        folder, what = results.run_dir(run_name_for(cfg, dataset)), "raybm train"
    if not results.is_complete(folder):
        raise RaybmError(
            f"no finished model for this config at {results.uri(folder)}; run `{what} --config ...` "
            f"first, or pass --model <folder>"
        )
    model = results.join(folder, MODEL_DIR)
    return results.uri(model) if results.remote else os.path.abspath(model)


def local_model(located: str, cfg: JobConfig) -> str:
    """A local folder for a located model: itself, or an ``s3://`` one fetched into the
    model cache (``raybm.storage.model_cache.fetch_model``)."""
    return fetch_model(located, cfg.storage) if is_s3(located) else located


def model_name(located: str) -> str:
    """The name of a located model: the run or sweep it belongs to (``.../<name>/model``),
    else the folder's own name."""
    parts = located.rstrip("/").rstrip(os.sep).replace(os.sep, "/").split("/")
    return parts[-2] if parts[-1] == MODEL_DIR and len(parts) > 1 else parts[-1]
