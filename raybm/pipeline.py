"""The whole job in one command: data -> train or tune -> test -> export -> deploy.

``raybm pipeline --config job.yaml`` (or ``python jobs/pipeline.py``, the entrypoint that
``ray job submit`` runs) chains the stages of one config. Each stage first looks for its
output: a prepared dataset, a finished run or sweep, a finished export, and skips the stage
when it is there; an interrupted run or sweep resumes from its checkpoints. So rerunning the
same command after a failure (or a lost driver) picks up where it stopped.

Before deploying, the release gate compares the model's test macro-F1 and its median
single-sentence latency with ``pipeline.min_test_f1`` and ``pipeline.max_latency_ms``. A
model that misses either is not deployed: whatever is being served keeps serving, and the
summary says why.

Each pipeline writes ``<root>/pipelines/<name>/summary.json`` as it goes (stage, status,
seconds, outputs, gate), and ``_SUCCESS`` when every stage finished. The dashboard lists it.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from raybm.config import JobConfig, derived_name, pipeline_stages, run_name_for, sweep_name_for
from raybm.errors import RaybmError
from raybm.export.measure import measure
from raybm.export.variants import run_export
from raybm.inference.predict import in_words
from raybm.preflight import trained_model
from raybm.runtime import cluster_address
from raybm.serve.client import post_texts
from raybm.serve.ingress import say_direct_urls
from raybm.storage.fs import copy_to_local, is_s3, resolve_uri
from raybm.storage.layout import CONFIG_FILE, EXPORTS, METRICS_FILE, MODEL_DIR, SUMMARY_FILE, WINNER_FILE
from raybm.storage.model_cache import fetch_model
from raybm.storage.records import ExportManifest, PipelineSummary, RunRecord, Winner
from raybm.storage.results import Results
from raybm.tracking.registry import register_model, registered_name
from raybm.train.driver import run_training
from raybm.tune.leaderboard import format_leaderboard
from raybm.tune.sweep import run_sweep

if TYPE_CHECKING:
    from raybm.data.sources import Source


def pipeline_name(cfg: JobConfig, dataset: str) -> str:
    """The config's name, or one derived from what the pipeline produces (so rerunning some
    of its stages, or changing the gate, reports into the same summary)."""
    return derived_name(cfg, dataset, ("model", "train", "tune", "export"), "pipeline")


class _Summary:
    """summary.json, rewritten after every stage so a dashboard sees progress."""

    def __init__(self, results: Results, name: str, cfg: JobConfig, stages: list[str]) -> None:
        self.results, self.folder = results, results.pipeline_dir(name)
        self.record = PipelineSummary(
            name=name,
            status="running",
            stages_planned=stages,
            started_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            root=cfg.storage.root,
            ray=cluster_address(cfg.ray) or "local (embedded)",
            gate={"min_test_f1": cfg.pipeline.min_test_f1, "max_latency_ms": cfg.pipeline.max_latency_ms},
        )
        results.unmark_complete(self.folder)
        self.results.write_text(results.join(self.folder, CONFIG_FILE), cfg.to_yaml())
        self.write()

    def write(self) -> None:
        self.results.write_json(self.results.join(self.folder, SUMMARY_FILE), self.record.to_json())

    def stage(self, stage: str, info: dict[str, Any]) -> None:
        self.record.stages[stage] = info
        self.write()

    def finish(self, status: str) -> None:
        self.record.status, self.record.finished_at = status, time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.write()
        if status == "succeeded":
            self.results.mark_complete(self.folder)


@dataclass
class Output:
    """Where the pipeline writes (each stage gets it as ``shown``): ``log`` every detail,
    ``say`` the headlines (one line a stage, the leaderboard, the smoke test's answers),
    which a quiet terminal still shows."""

    log: Callable[[str], None]
    say: Callable[[str], None]


def run_pipeline(
    cfg: JobConfig,
    *,
    source: Source | None = None,
    log: Callable[[str], None] = print,
    say: Callable[[str], None] | None = None,
) -> PipelineSummary:
    """Run the configured stages; returns the summary (also written under pipelines/).
    ``log`` gets every line, ``say`` (default: ``log``) the headlines."""
    from raybm.data import run_data_stage
    from raybm.data.pipeline import dataset_name
    from raybm.data.sources import resolve_source

    out = Output(log, say or log)
    stages = pipeline_stages(cfg)
    results = Results.from_config(cfg.storage)
    started = time.time()
    out.say(f"Pipeline: {' -> '.join(stages)}  (results: {cfg.storage.root})")

    # Every later stage needs the dataset (and its name names the pipeline): it is prepared,
    # or found prepared, even when the data stage is not listed; then it is not reported
    # unless it fails.
    t0 = time.time()
    if source is None:
        source = resolve_source(cfg.data, cfg.storage)
    name = pipeline_name(cfg, dataset_name(cfg, source))
    summary = _Summary(results, name, cfg, stages)
    try:
        prepared = run_data_stage(cfg, source=source, log=log)
    except BaseException as e:
        _failed(summary, "data", t0, e)
        raise
    state: dict[str, Any] = {"dataset": prepared.name, "source": source.name}
    if "data" in stages:
        summary.stage(
            "data",
            {
                "status": "skipped" if prepared.reused else "done",
                "seconds": round(time.time() - t0, 1),
                "dataset": prepared.name,
                "path": prepared.path,
                "rows": prepared.report.rows_kept,
            },
        )
        out.say(stage_line("data", summary.record.stages["data"]))

    runners = {"train": _train, "tune": _tune, "export": _export, "deploy": _deploy}
    for stage in stages[1:] if stages[0] == "data" else stages:
        if stage == "deploy":  # what the release gate judges is registered whether or not it ships
            _register(cfg, results, state, out, summary)
        out.log(f"\n== pipeline stage: {stage}")
        out.say(f"  {stage:<7} ...")
        t0 = time.time()
        try:
            info = runners[stage](cfg, results, state, out)
        except BaseException as e:
            _failed(summary, stage, t0, e)
            raise
        info.setdefault("status", "done")
        info["seconds"] = round(time.time() - t0, 1)
        summary.stage(stage, info)
        out.say(stage_line(stage, info))
    if "deploy" not in stages:
        _register(cfg, results, state, out, summary)
    summary.record.seconds = round(time.time() - started, 1)
    summary.finish("succeeded")
    out.say(
        f"Pipeline {name!r} finished in {time.time() - started:.0f}s: "
        f"{results.uri(results.join(summary.folder, SUMMARY_FILE))}"
    )
    return summary.record


def stage_line(stage: str, info: dict[str, Any]) -> str:
    """One stage in one line: its status, time and what it gave."""
    extra = ""
    if info.get("rows"):
        extra = f"  {info['rows']} rows ({info.get('dataset')})"
    if info.get("test"):
        extra = f"  test accuracy {info['test']['accuracy']:.4f}, macro-F1 {info['test']['f1_macro']:.4f}"
        if len(info.get("soup") or []) > 1:
            extra += f" (soup of {len(info['soup'])} trials)"
    if info.get("reasons"):
        extra = "  " + "; ".join(info["reasons"])
    if info.get("url"):
        extra = f"  {info['url']}/predict"
    return f"  {stage:<7} {info['status']:<8} {info['seconds']:>6.1f}s{extra}"


def _failed(summary: _Summary, stage: str, t0: float, e: BaseException) -> None:
    summary.stage(
        stage,
        {
            "status": "failed",
            "seconds": round(time.time() - t0, 1),
            "error": f"{type(e).__name__}: {e}",
            "traceback": traceback.format_exc(limit=6)[-4000:],
        },
    )
    summary.finish("failed")


# ----------------------------------------------------------------------------- stages


def _model_stage_output(cfg: JobConfig, results: Results, state: dict[str, Any]) -> None:
    """The model a later stage needs when this pipeline did not train it (already trained
    by an earlier pipeline or command with the same config)."""
    if "model" in state:
        return
    state["model"] = trained_model(cfg)
    folder = posix_parent(resolve_uri(state["model"], cfg.storage)[1])
    for pointer, record in ((METRICS_FILE, RunRecord), (WINNER_FILE, Winner)):  # a run's, a sweep's
        path = results.join(folder, pointer)
        if results.exists(path):
            state["test"] = record.from_json(results.read_json(path), results.uri(path)).test
            break


def posix_parent(path: str) -> str:
    """The folder above ``path`` (a path or URI with ``/`` separators)."""
    return path.rstrip("/").rsplit("/", 1)[0] if "/" in path.rstrip("/") else path


def _train(cfg: JobConfig, results: Results, state: dict[str, Any], shown: Output) -> dict[str, Any]:
    run_dir = results.run_dir(run_name_for(cfg, state["dataset"]))
    if results.is_complete(run_dir):
        path = results.join(run_dir, METRICS_FILE)
        metrics = RunRecord.from_json(results.read_json(path), results.uri(path))
        shown.log(f"Run {metrics.run!r} is already complete: {results.uri(run_dir)}")
        state.update(model=results.uri(results.join(run_dir, MODEL_DIR)), test=metrics.test)
        return {"status": "skipped", "run": metrics.run, "model": state["model"], "test": _short(metrics.test)}
    result = run_training(cfg, log=shown.log)
    state.update(model=result.model_dir, test=result.metrics.test)
    return {
        "run": result.run_name,
        "model": result.model_dir,
        "best_epoch": result.metrics.best_epoch,
        "test": _short(result.metrics.test),
    }


def _tune(cfg: JobConfig, results: Results, state: dict[str, Any], shown: Output) -> dict[str, Any]:
    was_done = results.is_complete(results.sweep_dir(sweep_name_for(cfg, state["dataset"])))
    result = run_sweep(cfg, log=shown.log)
    if not was_done:
        shown.say(format_leaderboard(result.leaderboard, cfg.tune.metric))
    w = result.winner
    state.update(model=result.model_dir, test=w.test)
    return {
        "status": "skipped" if was_done else "done",
        "sweep": result.name,
        "model": result.model_dir,
        "trials": len(result.leaderboard),
        "winner": w.values,
        "validation": w.validation,
        "soup": (w.soup or {}).get("ingredients"),
        "cost": w.cost,
        "latency_budget": w.latency_budget,
        "test": _short(w.test),
    }


def _short(test: dict[str, Any] | None) -> dict[str, Any] | None:
    if not test:
        return None
    return {k: test[k] for k in ("accuracy", "f1_macro", "precision_macro", "recall_macro", "examples") if k in test}


def _export(cfg: JobConfig, results: Results, state: dict[str, Any], shown: Output) -> dict[str, Any]:
    _model_stage_output(cfg, results, state)
    name = os.path.basename(posix_parent(state["model"]))
    out = results.export_dir(name)
    summary_path = results.join(out, SUMMARY_FILE)
    if results.exists(summary_path):
        done = {
            v: ExportManifest.from_json(m, f"{results.uri(summary_path)}: {v}")
            for v, m in (results.read_json(summary_path).get("variants") or {}).items()
        }
        if set(cfg.export.variants) <= set(done) and (not results.remote or results.is_complete(out)):
            shown.log(f"Exports of {name!r} are already there: {results.uri(out)}")
            state["export"] = results.uri(out)
            return {"status": "skipped", "folder": results.uri(out), "variants": _variants(done)}
    result = run_export(cfg, state["model"], log=shown.log)
    state["export"] = result.folder
    return {"folder": result.folder, "variants": _variants(result.manifests), "mobile": result.mobile}


def _register(cfg: JobConfig, results: Results, state: dict[str, Any], shown: Output, summary: _Summary) -> None:
    """With MLflow (``tracking.mlflow_uri``, ``tracking.register``): the pipeline's model,
    and its export variants, as a version in MLflow's Model Registry, noted in the summary
    (``registered``). A failure is said and noted; the model is in the results folder."""
    if not (
        cfg.tracking.mlflow_uri and cfg.tracking.register and {"train", "tune", "export"} & set(summary.record.stages)
    ):
        return
    _model_stage_output(cfg, results, state)
    name = registered_name(cfg, state["source"])
    export = state.get("export")
    try:
        with tempfile.TemporaryDirectory(prefix="raybm-register-") as tmp:
            model = copy_to_local(state["model"], cfg.storage, os.path.join(tmp, MODEL_DIR))
            exports: dict[str, str] = {
                v: copy_to_local(f"{export.rstrip('/')}/{v}", cfg.storage, os.path.join(tmp, EXPORTS, v))
                for v in cfg.export.variants
                if export and results.exists(resolve_uri(f"{export.rstrip('/')}/{v}", cfg.storage)[1])
            }
            got = register_model(
                cfg,
                name,
                model,
                posix_parent(state["model"]),
                state.get("test"),
                exports,
                tags={"raybm.dataset": state["dataset"], "raybm.pipeline": summary.record.name},
            )
    except RaybmError as e:
        shown.say(f"raybm: WARNING: not registered in MLflow: {e}")
        summary.record.registered = {"name": name, "error": str(e)}
    else:
        shown.say(
            f"  registered {got['uri']}{'' if got['new'] else ' (already)'} in MLflow at {cfg.tracking.mlflow_uri}"
        )
        summary.record.registered = {k: got[k] for k in ("name", "version", "uri")}
    summary.write()


def _variants(manifests: dict[str, ExportManifest]) -> dict[str, Any]:
    out = {}
    for v, m in manifests.items():
        measured = m.measured
        out[v] = {
            "model_bytes": m.model_bytes,
            "accuracy": measured.get("accuracy"),
            "f1_macro": measured.get("f1_macro"),
            "latency_p50_ms": measured.get("latency_p50_ms"),
        }
    return out


def serving_folder(cfg: JobConfig, state: dict[str, Any]) -> tuple[str, Literal["torch", "int8", "onnx"]]:
    """(model folder URI, backend) that the deploy stage serves: the ONNX int8 export for
    ``serve.backend=onnx`` (or ``auto`` when it exists), else the trained model."""
    backend = cfg.serve.backend
    export = state.get("export")
    if backend in ("onnx", "auto") and export:
        for v in ("onnx-int8", "onnx"):
            if v in cfg.export.variants:
                return f"{export.rstrip('/')}/{v}", "onnx"
    if backend == "onnx":
        raise RaybmError(
            "serve.backend=onnx needs an ONNX export: add onnx-int8 or onnx to export.variants "
            "and the export stage to pipeline.stages"
        )
    return state["model"], ("torch" if backend == "auto" else backend)


def release_gate(cfg: JobConfig, test: dict[str, Any] | None, latency_ms: float | None) -> list[str]:
    """Reasons not to deploy (empty: deploy)."""
    p, reasons = cfg.pipeline, []
    if p.min_test_f1 is not None:
        if not test:
            reasons.append("no test metrics for this model")
        elif test["f1_macro"] < p.min_test_f1:
            reasons.append(f"test macro-F1 {test['f1_macro']:.4f} < pipeline.min_test_f1 {p.min_test_f1}")
    if p.max_latency_ms is not None and latency_ms is not None and latency_ms > p.max_latency_ms:
        reasons.append(f"median latency {latency_ms:.1f} ms > pipeline.max_latency_ms {p.max_latency_ms}")
    return reasons


def _deploy(cfg: JobConfig, results: Results, state: dict[str, Any], shown: Output) -> dict[str, Any]:
    from raybm.serve.app import for_model, read_api_key
    from raybm.serve.deploy import deploy, wait_until_interrupted

    _model_stage_output(cfg, results, state)
    folder, backend = serving_folder(cfg, state)
    latency = None
    if cfg.pipeline.max_latency_ms is not None:
        with tempfile.TemporaryDirectory(prefix="raybm-gate-") as tmp:
            local = fetch_model(folder, cfg.storage, os.path.join(tmp, MODEL_DIR)) if is_s3(folder) else folder
            timed = measure(local, backend, None, None, cfg.pipeline.latency_samples)
        latency = timed["latency_p50_ms"]
        shown.log(f"release gate: median single-sentence latency {latency:.1f} ms ({backend})")
    test = state.get("test")
    reasons = release_gate(cfg, test, latency)
    info: dict[str, Any] = {
        "model": folder,
        "backend": backend,
        "latency_p50_ms": latency,
        "test_f1_macro": (test or {}).get("f1_macro"),
    }
    if reasons:
        shown.log(
            "release gate: NOT deploying - " + "; ".join(reasons) + ". Whatever is being served now keeps serving."
        )
        return {**info, "status": "held", "reasons": reasons}
    shown.log(f"release gate: passed; deploying {folder} ({backend})")
    served = dataclasses.replace(cfg, serve=dataclasses.replace(cfg.serve, backend=backend))
    url = deploy(served, folder, storage=cfg.storage if is_s3(folder) else None)
    key = os.environ.get(cfg.serve.api_key_env, "") if cfg.serve.api_key_env else ""
    read_api_key(cfg.serve)
    info["url"] = url
    texts = cfg.pipeline.smoke_texts
    if texts:
        answers = post_texts(url, texts, api_key=key or None)
        for text, p in zip(texts, answers):
            shown.say(f"  {in_words(p['label'], p['confidence'], 1.0 if p.get('uncertain') else 0.0):<34} {text}")
        info["smoke_test"] = [
            {"text": t, "label": p["label"], "confidence": p["confidence"]} for t, p in zip(texts, answers)
        ]
    shown.say(f"  served at {url}/predict")
    info["direct_urls"] = say_direct_urls(for_model(served.serve, folder), shown.say)
    if not cluster_address(cfg.ray):
        if cfg.pipeline.keep_serving:
            shown.log("Serving until Ctrl-C (pipeline.keep_serving).")
            wait_until_interrupted()
        from ray import serve

        serve.shutdown()
        shown.log(
            "Local Ray: the deployment ended with the pipeline (set pipeline.keep_serving=true to keep it, "
            "or run the job on a cluster)."
        )
        info["note"] = "embedded Ray: served for the smoke test, then stopped"
    return info
