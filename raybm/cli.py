"""``raybm <stage> --config FILE [key=value ...]``: thin wrappers over the stages."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from raybm.config import JobConfig, build_config, describe, load_config
from raybm.errors import RaybmError
from raybm.results import EXPORTS


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML job config (see jobs/configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. train.lr=3e-5 data.max_length=64")


def _cmd_data(args: argparse.Namespace) -> int:
    from raybm.data import format_report, run_data_stage

    cfg = load_config(args.config, args.overrides)
    prepared = run_data_stage(cfg, source=_start(cfg, ["data"]), force=args.force)
    print()
    print(format_report(prepared.report))
    print(f"\nPrepared dataset: {prepared.path}")
    return 0


def _start(cfg, stages: list[str]):
    """Check what needs no Ray (``raybm.pipeline.preflight``), then join or start Ray and
    check that every node sees the job's paths. Returns the resolved data source."""
    from raybm.pipeline import preflight
    from raybm.runtime import check_shared_paths, ensure_ray, quiet_ray_data

    source = preflight(cfg, stages)  # storage, data, model and key problems fail before Ray starts
    print(f"raybm: running on {ensure_ray(cfg.ray)}", flush=True)
    check_shared_paths(cfg)
    quiet_ray_data()
    return source


def _print_test_metrics(test: dict) -> None:
    print(f"  accuracy {test['accuracy']:.4f}  macro-F1 {test['f1_macro']:.4f}  "
          f"precision {test['precision_macro']:.4f}  recall {test['recall_macro']:.4f}  ({test['examples']} examples)")
    for lab, m in test["per_class"].items():
        print(f"    {lab:<12} precision {m['precision']:.3f} recall {m['recall']:.3f} f1 {m['f1']:.3f} "
              f"support {m['support']}")


def _cmd_train(args: argparse.Namespace) -> int:
    from raybm.train.driver import run_training

    cfg = load_config(args.config, args.overrides)
    _start(cfg, ["data", "train"])
    result = run_training(cfg)
    print(f"\nTest metrics of the best checkpoint (epoch {result.metrics['best_epoch']}):")
    _print_test_metrics(result.metrics["test"])
    print(f"\nModel folder: {result.model_dir}\nRun folder:   {result.run_dir}")
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from raybm.tune.soup import is_used
    from raybm.tune.leaderboard import format_leaderboard, format_values
    from raybm.tune.sweep import run_sweep

    cfg = load_config(args.config, args.overrides)
    _start(cfg, ["data", "tune"])
    result = run_sweep(cfg, resume=args.resume, retry_errored=args.retry_errored)
    print(f"\nLeaderboard ({cfg.tune.metric}, best first):")
    print(format_leaderboard(result.leaderboard, cfg.tune.metric))
    w = result.winner
    values = format_values(w["values"])
    print(f"\nWinner: trial {w['trial']} ({values}), best epoch {w['best_epoch']}.")
    soup = w.get("soup")
    if is_used(soup):
        print(f"Handed on: the {soup['method']} soup of {len(soup['ingredients'])} trial(s) "
              f"({', '.join(soup['ingredients'])}), validation {soup['metric']} {soup['validation']:.4f}.")
    cost, budget = w.get("cost"), w.get("latency_budget")
    if cost:
        print(f"Serving cost: {cost['params']:,} parameters, {cost['size_mb']} MB, median single-sentence latency "
              f"{cost['latency_p50_ms']} ms (PyTorch, 1 thread)"
              + ("" if not budget else f"; within tune.max_latency_ms {budget['max_latency_ms']}" if budget["met"]
                 else f"; NO trial met tune.max_latency_ms {budget['max_latency_ms']}") + ".")
    print(f"Validation {w['metric']} of the handed-on model: {w['validation']:.4f}. Test metrics:")
    _print_test_metrics(w["test"])
    print(f"\nModel folder: {result.model_dir}\nSweep folder: {result.sweep_dir}")
    return 0


def _cmd_pipeline(args: argparse.Namespace) -> int:
    from raybm.config import pipeline_stages
    from raybm.pipeline import run_pipeline

    overrides = list(args.overrides)
    if args.stages:
        overrides.append(f"pipeline.stages=[{args.stages}]")
    cfg = load_config(args.config, overrides)
    summary = run_pipeline(cfg, source=_start(cfg, pipeline_stages(cfg)))
    print("\nStages:")
    for stage, info in summary["stages"].items():
        extra = ""
        if info.get("test"):
            extra = f"  test accuracy {info['test']['accuracy']:.4f} macro-F1 {info['test']['f1_macro']:.4f}"
            if len(info.get("soup") or []) > 1:
                extra += f" (soup of {len(info['soup'])} trials)"
        if info.get("reasons"):
            extra = "  " + "; ".join(info["reasons"])
        if info.get("url"):
            extra = f"  {info['url']}/predict"
        print(f"  {stage:<8} {info['status']:<8} {info['seconds']:>7.1f}s{extra}")
    return 0


def _is_override(arg: str) -> bool:
    key = arg.split("=", 1)[0]
    return "=" in arg and "." in key and "/" not in key


def _cmd_soup(args: argparse.Namespace) -> int:
    from raybm.runtime import check_shared_paths, ensure_ray, quiet_ray_data
    from raybm.tune.soup import check_soup_inputs, run_soup

    # `--models a b key=value`: argparse hands the overrides to --models; take them back.
    models = [m for m in args.models if not _is_override(m)]
    cfg = load_config(args.config, [*args.overrides, *(m for m in args.models if _is_override(m))])
    check_soup_inputs(cfg, models, args.data, args.name)  # mistakes fail before Ray starts
    print(f"raybm: running on {ensure_ray(cfg.ray)}", flush=True)
    check_shared_paths(cfg, {f"--models {m}": m for m in models if os.path.isdir(os.path.expanduser(m))})
    quiet_ray_data()
    out = run_soup(cfg, models, args.data, args.name, args.method)
    soup = out["soup"]
    print(f"\nSoup ({soup['method']}) of {len(soup['ingredients'])} model(s): {', '.join(soup['ingredients'])}")
    print(f"  validation {soup['metric']} {soup['validation']:.4f} (best model alone {soup['best_single']:.4f})")
    print("Test metrics:")
    _print_test_metrics(out["test"])
    print(f"\nModel folder: {out['model_dir']}\nRun folder:   {out['run_dir']}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from raybm.data import load_split
    from raybm.inference.evaluate import score_dataset, score_source
    from raybm.inference.locate import local_model, locate_model
    from raybm.inference.predict import check_output_folder, file_format
    from raybm.results import Results
    from raybm.runtime import check_shared_paths, ensure_ray, quiet_ray_data

    cfg = load_config(args.config, args.overrides)
    args.checkpoint = local_model(locate_model(args.checkpoint, cfg, flag="--checkpoint"), cfg)
    for flag, path in (("--output", args.output), ("--predictions", args.predictions)):
        if path:  # checked now, not after the scoring
            check_output_folder(path, flag)
    if args.predictions:
        file_format(args.predictions, "--predictions")
    results = Results.from_config(cfg.storage)
    prepared = args.data in results.list_datasets()
    if not prepared:  # a file, folder, glob or built-in corpus, read with the data.* options
        cfg = build_config({**cfg.to_dict(), "data": {**cfg.to_dict()["data"], "source": args.data}})
        from raybm.data.sources import resolve_source

        resolve_source(cfg.data, cfg.storage)
    ensure_ray(cfg.ray)
    # Scored by Ray Data on any node: the model (and a data file) must be where all see them.
    check_shared_paths(cfg, {"--checkpoint": args.checkpoint}, root=prepared)
    quiet_ray_data()
    want = bool(args.predictions)
    if prepared:
        scored = score_dataset(args.checkpoint, load_split(results, args.data, args.split), cfg.data.max_length,
                               predictions=want)
    else:
        scored = score_source(args.checkpoint, cfg, predictions=want)
    metrics, frame = scored if want else (scored, None)
    if prepared:
        print(f"{args.checkpoint} on {args.data}/{args.split}:")
    else:
        dropped = ", ".join(f"{k} {v}" for k, v in metrics["dropped"].items()) or "none"
        print(f"{args.checkpoint} on {args.data} (every row; dropped: {dropped}):")
    _print_test_metrics(metrics)
    if frame is not None:
        from raybm.inference.loading import read_label_map
        from raybm.inference.evaluate import named_predictions
        from raybm.inference.predict import write_frame

        frame = named_predictions(frame, read_label_map(args.checkpoint))
        write_frame(frame, args.predictions)
        print(f"every example's prediction written to {args.predictions} ({int((~frame['correct']).sum())} wrong)")
    if args.output:
        import json

        tmp = f"{args.output}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(metrics, f, indent=2)
        os.replace(tmp, args.output)  # never a half-written file under the name asked for
        print(f"metrics written to {args.output}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from raybm.inference.locate import local_model, locate_model
    from raybm.inference.predict import format_prediction, predict_file, predict_texts

    cfg = load_config(args.config, args.overrides)
    args.model = local_model(locate_model(args.model, cfg), cfg)
    if args.text is not None:
        if args.input:
            raise RaybmError("give --text or --input, not both")
        empty = [i + 1 for i, t in enumerate(args.text) if not t.strip()]
        if empty:
            raise RaybmError(f"--text number {empty[0]} is empty")
        for text, (label, confidence) in zip(args.text, predict_texts(args.model, args.text, args.max_length)):
            print(format_prediction(text, label, confidence))
        return 0
    if not args.input or not args.output:
        raise RaybmError("give --text \"...\", or --input FILE --output FILE")
    use_ray = True if args.ray else None
    if use_ray is None and os.path.isfile(args.input):
        from raybm.inference.predict import IN_PROCESS_MAX_BYTES

        use_ray = os.path.getsize(args.input) > IN_PROCESS_MAX_BYTES or None
    if use_ray:
        from raybm.runtime import check_shared_paths, ensure_ray, quiet_ray_data

        ensure_ray(cfg.ray)
        # Labelled by Ray Data on any node: the model and the input must be where all see them.
        check_shared_paths(cfg, {"--model": args.model, "--input": args.input}, root=False)
        quiet_ray_data()
    done = predict_file(args.model, args.input, args.output, args.text_column, args.max_length, use_ray=use_ray,
                        probabilities=args.probabilities, log=lambda line: print(line, flush=True))
    print(f"labelled {done.rows - done.unlabelled} rows -> {args.output}"
          + (f"; {done.unlabelled} row(s) with no text in {args.text_column!r} kept with an empty label"
             if done.unlabelled else ""))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from raybm.inference.loading import model_card
    from raybm.inference.locate import locate_model, model_name
    from raybm.results import Results, is_s3
    from raybm.runtime import check_shared_paths, cluster_address, ensure_ray
    from raybm.serve.app import DEFAULT_LOADER, read_api_key
    from raybm.serve.deploy import deploy, wait_until_interrupted
    from raybm.serve.client import post_texts

    cfg = load_config(args.config, args.overrides)
    s = cfg.serve
    Results.from_config(cfg.storage).check_reachable()
    model_dir = locate_model(args.model, cfg, shared=True)
    storage = None
    if is_s3(model_dir):  # replicas fetch the model from S3 themselves (on whichever node they run)
        card, storage = {"name": model_name(model_dir)}, cfg.storage
    else:
        card = model_card(model_dir)
    read_api_key(s)  # a missing key fails before Ray starts
    if args.detach and not cluster_address(cfg.ray):
        raise RaybmError("--detach leaves the server running on a Ray cluster; without one (ray.address or "
                         "RAY_ADDRESS) the server lives only as long as this command")
    print(f"raybm: running on {ensure_ray(cfg.ray)}", flush=True)
    check_shared_paths(cfg, {"--model": model_dir})
    print(f"Deploying {card['name']} ({model_dir}), backend {s.backend} ...", flush=True)
    url = deploy(cfg, model_dir, args.loader or DEFAULT_LOADER, storage=storage)
    test = card.get("test_metrics") or {}
    if test:
        print(f"  test accuracy {test['accuracy']:.4f}  macro-F1 {test['f1_macro']:.4f}  labels {card['labels']}")
    print(f"Serving at {url}/predict  (API docs: {url}/docs, metadata: {url}/metadata)")
    key = os.environ.get(s.api_key_env, "") if s.api_key_env else ""
    key_header = f" -H 'X-API-Key: ${s.api_key_env}'" if key else ""
    print(f"  curl -s {url}/predict -H 'Content-Type: application/json'{key_header} "
          f"-d '{{\"texts\": [\"what a great day\"]}}'", flush=True)
    if args.send:
        for text, p in zip(args.send, post_texts(url, args.send, api_key=key or None)):
            print(f"  {p['label']:<10} {p['confidence']:.3f}  {text}")
    if args.detach:
        print(f"Left running on the cluster; stop it with `serve delete {s.app_name}`.")
        return 0
    from ray import serve

    if args.exit:
        serve.shutdown()
        print(f"Stopped (--exit). To keep a server up: raybm serve --model {model_dir}")
        return 0
    print("Serving until Ctrl-C.", flush=True)
    wait_until_interrupted()
    serve.shutdown()
    print("Stopped.")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from raybm.export.variants import TRAINED, run_export

    cfg = load_config(args.config, args.overrides)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else None
    if any(v in TRAINED for v in (variants or cfg.export.variants)):
        from raybm.runtime import ensure_ray, quiet_ray_data

        print(f"raybm: running on {ensure_ray(cfg.ray)}", flush=True)
        quiet_ray_data()
    result = run_export(cfg, args.model, variants)
    print(f"\nExports of {result.name} in {result.folder}:")
    print(format_exports(result.reference, result.manifests))
    if result.mobile:
        print(f"\nMobile artifact: {result.mobile} (run it without raybm: python {result.mobile}/predict.py \"text\")")
    return 0


def format_exports(reference: dict | None, manifests: dict) -> str:
    rows = [("variant", "MB", "accuracy", "macro-F1", "agree", "p50 ms (1 thread)")]

    def fmt(v, spec):
        return format(v, spec) if isinstance(v, (int, float)) else "-"

    if reference:
        rows.append(("source (reference)", fmt(reference.get("model_bytes", 0) / 1e6, ".1f"),
                     fmt(reference.get("accuracy"), ".4f"), fmt(reference.get("f1_macro"), ".4f"), "1.000",
                     fmt(reference.get("latency_p50_ms"), ".2f")))
    for v, m in manifests.items():
        mm = m.get("measured", {})
        rows.append((v, fmt(m["model_bytes"] / 1e6, ".1f"), fmt(mm.get("accuracy"), ".4f"),
                     fmt(mm.get("f1_macro"), ".4f"), fmt(mm.get("agreement_with_reference"), ".3f"),
                     fmt(mm.get("latency_p50_ms"), ".2f")))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows)


def _cmd_dashboard(args: argparse.Namespace) -> int:
    import raybm.dashboard.pages as pages
    from raybm.results import Results

    cfg = load_config(args.config, args.overrides)
    root = args.root or cfg.storage.root
    Results(root, cfg.storage).check_reachable()
    script = pages.__file__  # also a Streamlit script (dashboards/app.py shows the same page)
    env = dict(os.environ, RAYBM_RESULTS=root)
    if args.serve_url:
        env["RAYBM_SERVE_URL"] = args.serve_url
    flags = [x for key, value in pages.STREAMLIT_SETTINGS.items() for x in (f"--{key}", json.dumps(value).strip('"'))]
    cmd = [sys.executable, "-m", "streamlit", "run", script, "--server.address", args.host,
           "--server.port", str(args.port), *flags, "--", "--root", root]
    print(f"raybm dashboard on http://{args.host}:{args.port} over {root} (Ctrl-C stops it)", flush=True)
    if "://" not in root and not os.path.isdir(root):
        print(f"raybm dashboard: {os.path.abspath(root)} does not exist yet; its pages fill in as jobs write "
              f"there (check --root or storage.root)", flush=True)
    # Become Streamlit (same process id), so stopping this command stops the server too.
    os.execve(sys.executable, cmd, env)
    return 0  # not reached


def _cmd_list(args: argparse.Namespace) -> int:
    """What a results folder holds, best test score first: the dashboard's Jobs page as text."""
    import pandas as pd

    from raybm.dashboard.data import DashboardData

    cfg = load_config(args.config, args.overrides)
    root = args.root or cfg.storage.root
    data = DashboardData(root, cfg.storage)
    data.results.check_reachable()
    jobs = data.jobs_frame()
    datasets = data.results.list_datasets()
    exports = data.names(EXPORTS, complete_only=False)  # an export marks each variant, not itself
    if jobs.empty and not datasets:
        print(f"nothing under {root} yet: `raybm data`, `raybm train` or `raybm pipeline` write there")
        return 0
    print(f"{root}: {len(jobs)} run(s) and sweep(s), {len(datasets)} prepared dataset(s), {len(exports)} export(s)")
    if not jobs.empty:
        jobs = jobs.sort_values(["test macro-F1", "started"] if args.sort == "test" else ["started"],
                                ascending=False, na_position="last")
        jobs["started"] = [t.strftime("%Y-%m-%d %H:%M") if isinstance(t, pd.Timestamp) else "-" for t in jobs["started"]]
        cols = ["kind", "name", "status", "started", "minutes", "base model", "dataset", "best validation",
                "test accuracy", "test macro-F1"]
        print()
        jobs["minutes"] = [f"{m:.1f}" if pd.notna(m) else "-" for m in jobs["minutes"]]
        print(jobs[cols].to_string(index=False, na_rep="-", float_format=lambda v: f"{v:.4f}"))
    for title, names in (("datasets", datasets), ("exports", exports)):
        if names:
            print(f"\n{title}: {', '.join(names)}")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    if args.describe:
        print(describe_text(markdown=args.markdown), end="")
        return 0
    cfg = load_config(args.config, args.overrides)
    print(cfg.to_yaml(), end="")
    return 0


def describe_text(markdown: bool = False) -> str:
    """Every config key with its default and meaning (plain text, or docs/config.md)."""
    rows = describe(JobConfig)
    if not markdown:
        return "".join(f"{key} = {default}\n    {doc}\n" for key, default, doc in rows)
    out = ["# Config reference\n\n",
           "Generated by `raybm config --describe --markdown > docs/config.md`; a test keeps it current.\n",
           "Set keys in a YAML file (sections `data:`, `train:` ...) or override them on the command line\n",
           "as dotted `key=value` (`train.lr=3e-5`).\n"]
    section = None
    for key, default, doc in rows:
        top = key.split(".")[0] if "." in key else ""
        if top != section:
            section = top
            out.append(f"\n## {top or 'job'}\n\n| key | default | meaning |\n|---|---|---|\n")
        cell = doc.replace("|", "\\|")
        out.append(f"| `{key}` | `{default}` | {cell} |\n")
    return "".join(out)


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    from raybm import __version__

    found = []
    for dist in ("ray", "torch", "transformers", "onnxruntime", "streamlit"):
        try:
            found.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            found.append(f"{dist} (not installed)")
    return f"raybm {__version__} ({', '.join(found)}; Python {sys.version.split()[0]})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raybm", description="Fine-tune pretrained transformers on Ray.")
    parser.add_argument("--version", action="version", version=_versions(),
                        help="raybm's version and those of the libraries it runs on (for bug reports)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("data", help="clean, de-duplicate, split and report a dataset")
    _add_config_args(p)
    p.add_argument("--force", action="store_true", help="rebuild even if the dataset is already prepared")
    p.set_defaults(func=_cmd_data)
    p = sub.add_parser("train", help="fine-tune a model on Ray Train and score it on the test split")
    _add_config_args(p)
    p.set_defaults(func=_cmd_train)
    p = sub.add_parser("tune", help="search config values with Ray Tune; the winner is scored on the test split")
    _add_config_args(p)
    p.add_argument("--resume", action="store_true",
                   help="finish an interrupted sweep (finished trials are kept); an interrupted sweep "
                        "is also resumed without it")
    p.add_argument("--retry-errored", action="store_true", help="when resuming, run failed trials again")
    p.set_defaults(func=_cmd_tune)
    p = sub.add_parser("pipeline", help="the whole job: data, train or tune, test, export, deploy (skips what "
                       "is done, resumes what was interrupted)")
    _add_config_args(p)
    p.add_argument("--stages", help="comma-separated stages to run (default: pipeline.stages)")
    p.set_defaults(func=_cmd_pipeline)
    p = sub.add_parser("soup", help="average the weights of fine-tuned models of one base model into one "
                       "model (a model soup), picked on validation, scored on test")
    _add_config_args(p)
    p.add_argument("--models", nargs="+", required=True, metavar="MODEL",
                   help="run or sweep names under storage.root, model folders, or s3:// folders (2 or more)")
    p.add_argument("--data", required=True, help="the prepared dataset they were trained on (a name under "
                   "<storage.root>/data/): its validation split picks the soup, its test split scores it")
    p.add_argument("--name", required=True, help="the new run's name: the soup is written to runs/<name>/")
    p.add_argument("--method", default="greedy", choices=["greedy", "uniform"],
                   help="greedy (default): add models best first, keep each only if validation "
                        "tune.metric does not drop; uniform: average them all")
    p.set_defaults(func=_cmd_soup)
    p = sub.add_parser("evaluate", help="score a model folder on a prepared dataset's split")
    _add_config_args(p)
    p.add_argument("--checkpoint", required=True, help="a model folder (runs/<run>/model or a checkpoint), a run "
                   "or sweep folder, or a run/sweep name under storage.root")
    p.add_argument("--data", required=True, help="a prepared dataset name under <storage.root>/data/ (scores "
                   "its --split), or any source data.source accepts (scores every row)")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p.add_argument("--output", help="also write the metrics as JSON here")
    p.add_argument("--predictions", help="also write every example (text, label, predicted_label, correct, "
                   "confidence, prob_<label>) to this .csv, .tsv, .jsonl or .parquet file")
    p.set_defaults(func=_cmd_evaluate)
    p = sub.add_parser("predict", help="label a text or a whole file with a model folder, without a server")
    _add_config_args(p)
    p.add_argument("--model", required=True, help="a model folder (runs/<run>/model), a run or sweep folder, or a "
                   "run/sweep name under storage.root")
    p.add_argument("--text", action="append", help="a text to label (repeat for several; one JSON line each)")
    p.add_argument("--input", help="a CSV, TSV, JSONL or Parquet file to label")
    p.add_argument("--output", help="where to write the input rows plus predicted_label and confidence")
    p.add_argument("--text-column", default="text", help="the input's text column (default: text)")
    p.add_argument("--max-length", type=int, default=128, help="longest token sequence (default: 128)")
    p.add_argument("--ray", action="store_true", help="stream through Ray Data (automatic for files over 20 MB)")
    p.add_argument("--probabilities", action="store_true",
                   help="with --input: also a prob_<label> column for every class")
    p.set_defaults(func=_cmd_predict)
    p = sub.add_parser("export", help="export and compress a model (ONNX, int8, fp16, pruned, distilled)")
    _add_config_args(p)
    p.add_argument("--model", required=True, help="a model folder, a run or sweep folder, or a run/sweep name")
    p.add_argument("--variants", help="comma-separated: hf,onnx,int8,onnx-int8,fp16,pruned,distilled "
                   "(default: export.variants)")
    p.set_defaults(func=_cmd_export)
    p = sub.add_parser("serve", help="host a model on Ray Serve behind an HTTP API")
    _add_config_args(p)
    p.add_argument("--model", help="a model folder, a run or sweep folder, or a run/sweep name under "
                   "storage.root (default: the model this config's train or tune job produced)")
    p.add_argument("--send", action="append", metavar="TEXT",
                   help="once serving, send this text over HTTP and print the answer (repeatable)")
    p.add_argument("--exit", action="store_true", help="stop after deploying (and --send) instead of serving on")
    p.add_argument("--detach", action="store_true", help="on a Ray cluster: leave the server running and return")
    p.add_argument("--loader", help="model loader as module:function (default: raybm.inference.loading:load_predictor)")
    p.set_defaults(func=_cmd_serve)
    p = sub.add_parser("dashboard", help="open the Streamlit dashboard over a results folder")
    _add_config_args(p)
    p.add_argument("--root", help="results folder or s3:// URI (default: storage.root)")
    p.add_argument("--serve-url", help="a raybm model server for the Try it page (e.g. http://127.0.0.1:8000)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8501)
    p.set_defaults(func=_cmd_dashboard)
    p = sub.add_parser("list", help="list the runs, sweeps, datasets and exports in a results folder")
    _add_config_args(p)
    p.add_argument("--root", help="results folder or s3:// URI (default: storage.root)")
    p.add_argument("--sort", choices=["test", "started"], default="test",
                   help="best test macro-F1 first (default), or newest first")
    p.set_defaults(func=_cmd_list)
    p = sub.add_parser("config", help="print the resolved config, or every key with --describe")
    _add_config_args(p)
    p.add_argument("--describe", action="store_true", help="list every config key, its default and meaning")
    p.add_argument("--markdown", action="store_true", help="with --describe: as a Markdown table")
    p.set_defaults(func=_cmd_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except RaybmError as e:
        print(f"raybm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"raybm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
