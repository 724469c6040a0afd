"""The commands that use a trained model: ``evaluate``, ``predict``, ``export``, ``serve``."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from raybm.commands.common import add_config_args, print_test_metrics, start
from raybm.config import JobConfig, build_config, load_config
from raybm.errors import RaybmError
from raybm.export.variants import TRAINED, run_export
from raybm.extras import require
from raybm.inference.loading import model_info, read_label_map
from raybm.inference.locate import local_model, locate_model, model_name
from raybm.runtime import cluster_address
from raybm.serve.client import post_texts
from raybm.serve.ingress import say_direct_urls
from raybm.storage.fs import is_s3
from raybm.storage.records import ExportManifest
from raybm.storage.results import Results

MAX_LENGTH_HELP = (
    "longest token sequence (default: the length the model was trained with, as the model server "
    "uses, so both give the same answer)"
)


def cmd_evaluate(args: argparse.Namespace) -> int:
    """`raybm evaluate`."""
    from raybm.data import load_split
    from raybm.inference.evaluate import score_dataset, score_source
    from raybm.inference.predict import check_output_folder, file_format

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
    # Scored by Ray Data on any node: the model (and a data file) must be where all see them.
    start(cfg, paths={"--checkpoint": args.checkpoint}, root=prepared)
    want = bool(args.predictions)
    if prepared:
        scored = score_dataset(
            args.checkpoint, load_split(results, args.data, args.split), args.max_length, predictions=want
        )
    else:
        scored = score_source(args.checkpoint, cfg, predictions=want, max_length=args.max_length)
    metrics, frame = scored if want else (scored, None)
    if prepared:
        print(f"{args.checkpoint} on {args.data}/{args.split}:")
    else:
        dropped = ", ".join(f"{k} {v}" for k, v in metrics["dropped"].items()) or "none"
        print(f"{args.checkpoint} on {args.data} (every row; dropped: {dropped}):")
    print_test_metrics(metrics)
    if frame is not None:
        from raybm.inference.evaluate import named_predictions
        from raybm.inference.predict import write_frame

        frame = named_predictions(frame, read_label_map(args.checkpoint))
        write_frame(frame, args.predictions)
        print(f"every example's prediction written to {args.predictions} ({int((~frame['correct']).sum())} wrong)")
    if args.output:
        tmp = f"{args.output}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(metrics, f, indent=2)
        os.replace(tmp, args.output)  # never a half-written file under the name asked for
        print(f"metrics written to {args.output}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """`raybm predict`."""
    from raybm.inference.batch import is_folder_job
    from raybm.inference.predict import explain_texts, format_prediction, predict_file, predict_texts

    cfg = load_config(args.config, args.overrides)
    located = locate_model(args.model, cfg)
    if args.text is None and args.input and args.output and is_folder_job(args.input, args.output):
        args.model = located  # an s3:// model is fetched by each node's model actors
        return _score_to_folder(cfg, args)
    args.model = local_model(located, cfg)
    if args.text is not None:
        if args.input:
            raise RaybmError("give --text or --input, not both")
        empty = [i + 1 for i, t in enumerate(args.text) if not t.strip()]
        if empty:
            raise RaybmError(f"--text number {empty[0]} is empty")
        if args.explain:
            require("serve", "--explain", ("captum",))
            for line in explain_texts(args.model, args.text, args.max_length):
                print(line)
            return 0
        for text, (label, confidence) in zip(args.text, predict_texts(args.model, args.text, args.max_length)):
            print(format_prediction(text, label, confidence))
        return 0
    if args.explain:
        raise RaybmError("--explain works with --text (one JSON line per text, with its words' weights)")
    if not args.input or not args.output:
        raise RaybmError('give --text "...", or --input FILE --output FILE')
    use_ray = True if args.ray else None
    if use_ray is None and os.path.isfile(args.input):
        from raybm.inference.predict import IN_PROCESS_MAX_BYTES

        use_ray = os.path.getsize(args.input) > IN_PROCESS_MAX_BYTES or None
    if use_ray:
        # Labelled by Ray Data on any node: the model and the input must be where all see them.
        start(cfg, paths={"--model": args.model, "--input": args.input}, root=False)
    done = predict_file(
        args.model,
        args.input,
        args.output,
        args.text_column,
        args.max_length,
        use_ray=use_ray,
        probabilities=args.probabilities,
        log=lambda line: print(line, flush=True),
    )
    print(
        f"labelled {done.rows - done.unlabelled} rows -> {args.output}"
        + (
            f"; {done.unlabelled} row(s) with no text in {args.text_column!r} kept with an empty label"
            if done.unlabelled
            else ""
        )
    )
    return 0


def _score_to_folder(cfg: JobConfig, args: argparse.Namespace) -> int:
    """`raybm predict --input <file, folder or glob, local or s3://> --output <folder>`: a Ray Data job."""
    from raybm.inference.batch import find_inputs, score_to_folder

    p = cfg.predict
    inputs = find_inputs(args.input, cfg.storage)  # before Ray starts: a wrong path fails at once
    # Read and written by Ray Data on any node.
    start(cfg, paths={"--model": args.model, "--input": args.input, "--output": args.output}, root=False)
    score_to_folder(
        args.model,
        inputs,
        args.output,
        args.text_column,
        storage=cfg.storage,
        probabilities=args.probabilities,
        max_length=args.max_length,
        threads=p.threads,
        batch_size=p.batch_size,
        cpus_per_actor=p.cpus_per_actor,
        gpus_per_actor=p.gpus_per_actor,
        concurrency=p.concurrency,
        log=lambda line: print(line, flush=True),
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """`raybm export`."""
    cfg = load_config(args.config, args.overrides)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else None
    if any(v.startswith("onnx") for v in (variants or cfg.export.variants)):
        require("export", "raybm export of ONNX variants")
    if any(v in TRAINED for v in (variants or cfg.export.variants)):
        start(cfg, paths={"--model": args.model})  # distilled and pruned variants train on any node
    result = run_export(cfg, args.model, variants)
    print(f"\nExports of {result.name} in {result.folder}:")
    print(format_exports(result.reference, result.manifests))
    if result.mobile:
        print(f'\nMobile artifact: {result.mobile} (run it without raybm: python {result.mobile}/predict.py "text")')
    return 0


def format_exports(reference: dict | None, manifests: dict[str, ExportManifest]) -> str:
    """The exports as a table: size, accuracy, agreement with the reference, latency."""
    rows = [("variant", "MB", "accuracy", "macro-F1", "agree", "p50 ms (1 thread)")]

    def fmt(v, spec):
        return format(v, spec) if isinstance(v, (int, float)) else "-"

    if reference:
        rows.append(
            (
                "source (reference)",
                fmt(reference.get("model_bytes", 0) / 1e6, ".1f"),
                fmt(reference.get("accuracy"), ".4f"),
                fmt(reference.get("f1_macro"), ".4f"),
                "1.000",
                fmt(reference.get("latency_p50_ms"), ".2f"),
            )
        )
    for v, m in manifests.items():
        mm = m.measured
        rows.append(
            (
                v,
                fmt(m.model_bytes / 1e6, ".1f"),
                fmt(mm.get("accuracy"), ".4f"),
                fmt(mm.get("f1_macro"), ".4f"),
                fmt(mm.get("agreement_with_reference"), ".3f"),
                fmt(mm.get("latency_p50_ms"), ".2f"),
            )
        )
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows)


def cmd_serve(args: argparse.Namespace) -> int:
    """`raybm serve`."""
    require("serve", "raybm serve")
    from raybm.serve.app import DEFAULT_LOADER, for_model, read_api_key
    from raybm.serve.deploy import deploy, stop_app, wait_until_interrupted

    cfg = load_config(args.config, args.overrides)
    if args.list or args.stop:
        return _manage_apps(cfg, args)
    Results.from_config(cfg.storage).check_reachable()
    model_dir = locate_model(args.model, cfg, shared=True)
    s = for_model(cfg.serve, model_dir)
    storage = None
    if is_s3(model_dir):  # replicas fetch the model from S3 themselves (on whichever node they run)
        card, storage = {"name": model_name(model_dir)}, cfg.storage
    else:
        card = model_info(model_dir)
    read_api_key(s)  # a missing key fails before Ray starts
    if args.detach and not cluster_address(cfg.ray):
        raise RaybmError(
            "--detach leaves the server running on a Ray cluster; without one (ray.address or "
            "RAY_ADDRESS) the server lives only as long as this command"
        )
    start(cfg, paths={"--model": model_dir})
    print(f"Deploying {card['name']} ({model_dir}), backend {s.backend} ...", flush=True)
    url = deploy(cfg, model_dir, args.loader or DEFAULT_LOADER, storage=storage)
    test: Any = card.get("test_metrics") or {}
    if test:
        print(f"  test accuracy {test['accuracy']:.4f}  macro-F1 {test['f1_macro']:.4f}  labels {card['labels']}")
    print(f"Serving at {url}/predict  (API docs: {url}/docs, metadata: {url}/metadata)")
    say_direct_urls(s, print)
    key = os.environ.get(s.api_key_env, "") if s.api_key_env else ""
    key_header = f" -H 'X-API-Key: ${s.api_key_env}'" if key else ""
    print(
        f"  curl -s {url}/predict -H 'Content-Type: application/json'{key_header} "
        f'-d \'{{"texts": ["what a great day"]}}\'',
        flush=True,
    )
    if args.send:
        for text, p in zip(args.send, post_texts(url, args.send, api_key=key or None)):
            print(f"  {p['label']:<10} {p['confidence']:.3f}  {text}")
    if args.detach:
        print(
            f"Left running on the cluster as the application {s.app_name!r}; stop it with "
            f"`raybm serve --stop {s.app_name}`."
        )
        return 0
    from ray import serve

    if args.exit:
        stop_app(s.app_name)  # this model only: others on the same Serve keep serving
        if not cluster_address(cfg.ray):
            serve.shutdown()
        print(f"Stopped (--exit). To keep a server up: raybm serve --model {model_dir}")
        return 0
    print("Serving until Ctrl-C.", flush=True)
    wait_until_interrupted()
    stop_app(s.app_name)
    if not cluster_address(cfg.ray):
        serve.shutdown()
    print("Stopped.")
    return 0


def _manage_apps(cfg: JobConfig, args: argparse.Namespace) -> int:
    """`raybm serve --list` / `--stop NAME`: the models the running Serve hosts."""
    from raybm.serve.deploy import list_apps, stop_app

    if not cluster_address(cfg.ray):
        raise RaybmError(
            "--list and --stop manage the models on a Ray cluster (ray.address or RAY_ADDRESS); a "
            "local Ray's Serve lives only as long as the command that started it"
        )
    start(cfg, shared=False)
    if args.stop:
        stop_app(args.stop)
        print(f"Stopped {args.stop!r}; the other applications keep serving.")
        return 0
    apps = list_apps()
    if not apps:
        print("No model is being served on this Ray.")
    for app in apps:
        print(f"  {app['name']:<24} {app['status']:<10} {app['url'] or app['route_prefix'] or '-'}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the model commands to the ``raybm`` parser."""
    p = sub.add_parser("evaluate", help="score a model folder on a prepared dataset's split")
    add_config_args(p)
    p.add_argument(
        "--checkpoint",
        required=True,
        help="a model folder (runs/<run>/model or a checkpoint), a run "
        "or sweep folder, or a run/sweep name under storage.root",
    )
    p.add_argument(
        "--data",
        required=True,
        help="a prepared dataset name under <storage.root>/data/ (scores "
        "its --split), or any source data.source accepts (scores every row)",
    )
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p.add_argument("--max-length", type=int, help=MAX_LENGTH_HELP)
    p.add_argument("--output", help="also write the metrics as JSON here")
    p.add_argument(
        "--predictions",
        help="also write every example (text, label, predicted_label, correct, "
        "confidence, prob_<label>) to this .csv, .tsv, .jsonl or .parquet file",
    )
    p.set_defaults(func=cmd_evaluate)
    p = sub.add_parser("predict", help="label a text or a whole file with a model folder, without a server")
    add_config_args(p)
    p.add_argument(
        "--model",
        required=True,
        help="a model folder (runs/<run>/model), a run or sweep folder, a "
        "run/sweep name under storage.root, or models:/<name>/<version> (MLflow's registry)",
    )
    p.add_argument("--text", action="append", help="a text to label (repeat for several; one JSON line each)")
    p.add_argument(
        "--input",
        help="a CSV, TSV, JSONL or Parquet file to label; or, scored by a Ray Data job, a "
        "folder or glob of them (local or s3://)",
    )
    p.add_argument(
        "--output",
        help="where to write the input rows plus predicted_label and confidence: a file, "
        "or a new folder (local or s3://) of Parquet files marked _SUCCESS when complete",
    )
    p.add_argument("--text-column", default="text", help="the input's text column (default: text)")
    p.add_argument("--max-length", type=int, help=MAX_LENGTH_HELP)
    p.add_argument("--ray", action="store_true", help="stream through Ray Data (automatic for files over 20 MB)")
    p.add_argument(
        "--probabilities", action="store_true", help="with --input: also a prob_<label> column for every class"
    )
    p.add_argument(
        "--explain",
        action="store_true",
        help="with --text: also each word's weight toward the answer (occlusion, docs/serving.md)",
    )
    p.set_defaults(func=cmd_predict)
    p = sub.add_parser("export", help="export and compress a model (ONNX, int8, fp16, pruned, distilled)")
    add_config_args(p)
    p.add_argument(
        "--model",
        required=True,
        help="a model folder, a run or sweep folder, a run/sweep name, or models:/<name>/<version> (MLflow's registry)",
    )
    p.add_argument(
        "--variants", help="comma-separated: hf,onnx,int8,onnx-int8,fp16,pruned,distilled (default: export.variants)"
    )
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("serve", help="host a model on Ray Serve behind an HTTP API")
    add_config_args(p)
    p.add_argument(
        "--model",
        help="a model folder, a run or sweep folder, a run/sweep name under "
        "storage.root, or models:/<name>/<version> (default: the model this config's train or tune job "
        "produced)",
    )
    p.add_argument(
        "--send",
        action="append",
        metavar="TEXT",
        help="once serving, send this text over HTTP and print the answer (repeatable)",
    )
    p.add_argument("--exit", action="store_true", help="stop after deploying (and --send) instead of serving on")
    p.add_argument("--detach", action="store_true", help="on a Ray cluster: leave the server running and return")
    p.add_argument("--loader", help="model loader as module:function (default: raybm.inference.loading:load_predictor)")
    p.add_argument(
        "--list", action="store_true", help="on a Ray cluster: list the models being served, with their URLs"
    )
    p.add_argument("--stop", metavar="NAME", help="on a Ray cluster: stop the model served as NAME (see --list)")
    p.set_defaults(func=cmd_serve)
