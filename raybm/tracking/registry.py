"""MLflow's Model Registry: the pipeline's model as a registered version, and
``models:/<name>/<version>`` as a model raybm's commands can take.

A registered version points at the ``model/`` artifacts of the MLflow run that produced
the model (the training run, or the sweep's parent run: found by the results folder it
records, ``raybm.storage``); the export variants go beside it as ``exports/<variant>/``.
Its tags hold the test metrics, the dataset, the base model and the raybm folder it came
from; registering the same model folder again gives back the version it already has.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Any

from raybm.config import JobConfig, TrackingConfig
from raybm.errors import RaybmError
from raybm.tracking.runs import TEST_METRICS, experiment_id, log_run, mlflow_client

if TYPE_CHECKING:
    from mlflow import MlflowClient

MODEL_URI_SCHEME = "models:/"
MODEL_ARTIFACTS = "model"
EXPORT_ARTIFACTS = "exports"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")
_SPEC = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+|latest)|@(?P<alias>[A-Za-z0-9_-]+))$")


def is_registered_model(spec: str | None) -> bool:
    """Whether ``spec`` names a registered model (``models:/...``)."""
    return spec is not None and spec.startswith(MODEL_URI_SCHEME)


def check_model_name(name: str) -> str:
    """``name`` if MLflow and raybm's results folder can both use it, else a RaybmError."""
    if not _NAME.match(name):
        raise RaybmError(
            f"registered model name {name!r}: use letters, digits, '.', '_' and '-' (set tracking.registered_model)"
        )
    return name


def registered_name(cfg: JobConfig, source_name: str) -> str:
    """The name the pipeline registers under: ``tracking.registered_model``, else
    ``data.name`` or ``<data source>-classifier``."""
    if cfg.tracking.registered_model:
        return check_model_name(cfg.tracking.registered_model)
    base = cfg.data.name or f"{source_name}-classifier"
    return check_model_name(re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-.") or "raybm-classifier")


def _model_run(client: MlflowClient, cfg: JobConfig, results_uri: str, test: dict[str, Any] | None) -> str:
    """The id of the MLflow run that recorded the raybm run or sweep at ``results_uri``;
    one made for the registration when none did (a run trained before MLflow was set)."""
    found = client.search_runs(
        [experiment_id(client, cfg.tracking.experiment)],
        filter_string=f"tags.`raybm.results` = '{results_uri}' and "
        f"tags.`raybm.kind` != 'trial'",  # a sweep's trials share its folder
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if found:
        return found[0].info.run_id
    run_id = log_run(
        cfg, os.path.basename(results_uri.rstrip("/")), "model", [], test, {}, tags={"raybm.results": results_uri}
    )
    if run_id is None:
        raise RaybmError(f"could not make an MLflow run for {results_uri}")
    return run_id


def register_model(
    cfg: JobConfig,
    name: str,
    model_folder: str,
    results_uri: str,
    test: dict[str, Any] | None,
    exports: dict[str, str] | None = None,
    tags: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Register the local model folder ``model_folder`` (of the raybm run or sweep at
    ``results_uri``) as a version of ``name``, with ``exports`` (variant -> local folder)
    beside it; the test metrics and ``tags`` become the version's tags. Returns
    ``{"name", "version", "uri"}``; the version the same folder already has when it was
    registered before. MLflow errors come up as RaybmError."""
    client = mlflow_client(cfg.tracking)
    if client is None:
        raise RaybmError("registering a model needs MLflow: set tracking.mlflow_uri")
    try:
        model_tag = f"{results_uri.rstrip('/')}/{MODEL_ARTIFACTS}"
        for v in client.search_model_versions(f"name = '{name}'"):
            if (v.tags or {}).get("raybm.model") == model_tag:
                return {
                    "name": name,
                    "version": int(v.version),
                    "uri": f"{MODEL_URI_SCHEME}{name}/{v.version}",
                    "new": False,
                }
        run_id = _model_run(client, cfg, results_uri, test)
        client.log_artifacts(run_id, model_folder, MODEL_ARTIFACTS)
        for variant, folder in sorted((exports or {}).items()):
            client.log_artifacts(run_id, folder, f"{EXPORT_ARTIFACTS}/{variant}")
        if not client.search_registered_models(f"name = '{name}'"):
            client.create_registered_model(name, description="Text classifiers fine-tuned by raybm.")
        version_tags = {
            "raybm.model": model_tag,
            "raybm.base_model": cfg.model.name,
            "raybm.exports": ",".join(sorted(exports or {})),
            **(tags or {}),
            **{
                f"test_{k}": str((test or {})[k]) for k in TEST_METRICS if isinstance((test or {}).get(k), (int, float))
            },
        }
        source = f"{client.get_run(run_id).info.artifact_uri}/{MODEL_ARTIFACTS}"
        version = client.create_model_version(
            name, source, run_id=run_id, tags=version_tags, description=_description(cfg, test, exports)
        )
    except RaybmError:
        raise
    except Exception as e:  # noqa: BLE001 - MLflow's own errors, said in raybm's words
        raise RaybmError(
            f"could not register {name!r} in MLflow at {cfg.tracking.mlflow_uri}: {type(e).__name__}: {e}"
        ) from None
    return {
        "name": name,
        "version": int(version.version),
        "uri": f"{MODEL_URI_SCHEME}{name}/{version.version}",
        "new": True,
    }


def _description(cfg: JobConfig, test: dict[str, Any] | None, exports: dict[str, str] | None) -> str:
    known = test or {}
    scores = ", ".join(f"{k} {known[k]:.4f}" for k in ("accuracy", "f1_macro") if isinstance(known.get(k), float))
    text = f"{cfg.model.name} fine-tuned by raybm" + (f"; test {scores}" if scores else "")
    if exports:
        text += f"; export variants under {EXPORT_ARTIFACTS}/: {', '.join(sorted(exports))}"
    return text + "."


def resolve_version(cfg: TrackingConfig, spec: str) -> tuple[str, int]:
    """(name, version number) of ``models:/<name>/<version>``, ``models:/<name>/latest`` or
    ``models:/<name>@<alias>``; a RaybmError that says what exists when there is no such one."""
    m = _SPEC.match(spec)
    if not m:
        raise RaybmError(
            f"{spec!r}: name a registered model as models:/<name>/<version>, models:/<name>/latest "
            f"or models:/<name>@<alias>"
        )
    client = mlflow_client(cfg)
    if client is None:
        raise RaybmError(f"{spec}: a registered model needs MLflow: set tracking.mlflow_uri to its tracking server")
    name = check_model_name(m["name"])
    try:
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
        if m["alias"]:
            return name, int(client.get_model_version_by_alias(name, m["alias"]).version)
    except Exception as e:  # noqa: BLE001 - an unknown alias or an unreachable server
        raise RaybmError(f"{spec}: {type(e).__name__}: {e}") from None
    if not versions:
        raise RaybmError(f"{spec}: no registered model {name!r} in MLflow at {cfg.mlflow_uri}")
    version = versions[-1] if m["version"] == "latest" else int(m["version"])
    if version not in versions:
        raise RaybmError(f"{spec}: {name!r} has versions {', '.join(map(str, versions))}")
    return name, version


def download_version(cfg: TrackingConfig, name: str, version: int, dest: str) -> str:
    """Download the model folder of version ``version`` of ``name`` into the new local
    folder ``dest``; returns ``dest``."""
    import mlflow.artifacts

    client = mlflow_client(cfg)
    uri = client.get_model_version_download_uri(name, str(version))
    os.makedirs(dest)
    mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dest, tracking_uri=cfg.mlflow_uri)
    inner = os.path.join(dest, MODEL_ARTIFACTS)  # MLflow puts the folder itself inside dst_path
    if os.path.isdir(inner) and not os.path.exists(os.path.join(dest, "config.json")):
        for entry in os.listdir(inner):
            os.replace(os.path.join(inner, entry), os.path.join(dest, entry))
        os.rmdir(inner)
    return dest
