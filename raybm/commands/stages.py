"""The commands that run stages: ``data``, ``train``, ``tune``, ``pipeline``, ``soup``."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from raybm.commands.common import add_config_args, is_override, print_test_metrics, start
from raybm.commands.console import QuietConsole
from raybm.config import load_config, pipeline_stages
from raybm.local_paths import private_temp_dir
from raybm.pipeline import pipeline_name, run_pipeline
from raybm.preflight import preflight
from raybm.storage.layout import CONSOLE_LOG_FILE
from raybm.storage.records import PipelineSummary
from raybm.storage.results import Results
from raybm.train.driver import run_training
from raybm.tune.leaderboard import format_leaderboard, format_values
from raybm.tune.soup import check_soup_inputs, run_soup
from raybm.tune.sweep import run_sweep

if TYPE_CHECKING:
    from raybm.config import JobConfig
    from raybm.data.sources import Source


def cmd_data(args: argparse.Namespace) -> int:
    """`raybm data`."""
    from raybm.data import format_report, run_data_stage

    cfg = load_config(args.config, args.overrides)
    prepared = run_data_stage(cfg, source=start(cfg, stages=["data"]), force=args.force)
    print()
    print(format_report(prepared.report))
    print(f"\nPrepared dataset: {prepared.path}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """`raybm train`."""
    cfg = load_config(args.config, args.overrides)
    start(cfg, stages=["data", "train"])
    result = run_training(cfg)
    print(f"\nTest metrics of the best checkpoint (epoch {result.metrics.best_epoch}):")
    print_test_metrics(result.metrics.test)
    print(f"\nModel folder: {result.model_dir}\nRun folder:   {result.run_dir}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    """`raybm tune`."""
    cfg = load_config(args.config, args.overrides)
    start(cfg, stages=["data", "tune"])
    result = run_sweep(cfg, resume=args.resume, retry_errored=args.retry_errored)
    print(f"\nLeaderboard ({cfg.tune.metric}, best first):")
    print(format_leaderboard(result.leaderboard, cfg.tune.metric))
    w = result.winner
    values = format_values(w.values)
    print(f"\nWinner: trial {w.trial} ({values}), best epoch {w.best_epoch}.")
    soup = w.handed_on_soup
    if soup is not None:
        print(
            f"Handed on: the {soup['method']} soup of {len(soup['ingredients'])} trial(s) "
            f"({', '.join(soup['ingredients'])}), validation {soup['metric']} {soup['validation']:.4f}."
        )
    cost, budget = w.cost, w.latency_budget
    if cost:
        print(
            f"Serving cost: {cost['params']:,} parameters, {cost['size_mb']} MB, median single-sentence latency "
            f"{cost['latency_p50_ms']} ms (PyTorch, 1 thread)"
            + (
                ""
                if not budget
                else f"; within tune.max_latency_ms {budget['max_latency_ms']}"
                if budget["met"]
                else f"; NO trial met tune.max_latency_ms {budget['max_latency_ms']}"
            )
            + "."
        )
    print(f"Validation {w.metric} of the handed-on model: {w.validation:.4f}. Test metrics:")
    print_test_metrics(w.test)
    print(f"\nModel folder: {result.model_dir}\nSweep folder: {result.sweep_dir}")
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    """`raybm pipeline`; with --quiet, only the headlines on the terminal (the rest in a log)."""
    overrides = list(args.overrides)
    if args.stages:
        overrides.append(f"pipeline.stages=[{args.stages}]")
    cfg = load_config(args.config, overrides)
    stages = pipeline_stages(cfg)
    if not args.quiet:
        summary = run_pipeline(cfg, source=start(cfg, stages=stages))
        _next_steps(cfg, summary, print)
        return 0
    source = preflight(cfg, stages)  # its errors show as always, before anything is redirected
    log_path = console_log_path(cfg, source)
    with QuietConsole(log_path) as console:
        console.say(f"raybm pipeline: Ray's, Tune's and ONNX's output goes to {log_path}")
        summary = run_pipeline(cfg, source=start(cfg, stages=stages, source=source), log=console.log, say=console.say)
        _next_steps(cfg, summary, console.say)
    return 0


def console_log_path(cfg: JobConfig, source: Source) -> str:
    """Where a quiet pipeline writes everything: ``console.log`` in its folder under a local
    results root, else in the system's temp folder."""
    from raybm.data.pipeline import dataset_name

    results = Results.from_config(cfg.storage)
    name = pipeline_name(cfg, dataset_name(cfg, source))
    if results.remote:
        return os.path.join(private_temp_dir("logs"), f"{name}.log")
    return os.path.join(results.pipeline_dir(name), CONSOLE_LOG_FILE)


def _next_steps(cfg: JobConfig, summary: PipelineSummary, say: Callable[[str], object]) -> None:
    """What to look at next: the dashboard, predictions, a server."""
    model = summary.trained_model()
    root = cfg.storage.root
    say("\nNext:")
    say(f"  raybm dashboard --root {root}          # the runs, the model, its errors; try it")
    if model:
        say(f'  raybm predict --model {model} --text "..." --explain')
        say(f"  raybm serve --model {model}")


def cmd_soup(args: argparse.Namespace) -> int:
    """`raybm soup`."""
    # `--models a b key=value`: argparse hands the overrides to --models; take them back.
    models = [m for m in args.models if not is_override(m)]
    cfg = load_config(args.config, [*args.overrides, *(m for m in args.models if is_override(m))])
    check_soup_inputs(cfg, models, args.data, args.name)  # mistakes fail before Ray starts
    start(cfg, paths={f"--models {m}": m for m in models if os.path.isdir(os.path.expanduser(m))})
    out = run_soup(cfg, models, args.data, args.name, args.method)
    soup = out["soup"]
    print(f"\nSoup ({soup['method']}) of {len(soup['ingredients'])} model(s): {', '.join(soup['ingredients'])}")
    print(f"  validation {soup['metric']} {soup['validation']:.4f} (best model alone {soup['best_single']:.4f})")
    print("Test metrics:")
    print_test_metrics(out["test"])
    print(f"\nModel folder: {out['model_dir']}\nRun folder:   {out['run_dir']}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the stage commands to the ``raybm`` parser."""
    p = sub.add_parser("data", help="clean, de-duplicate, split and report a dataset")
    add_config_args(p)
    p.add_argument("--force", action="store_true", help="rebuild even if the dataset is already prepared")
    p.set_defaults(func=cmd_data)
    p = sub.add_parser("train", help="fine-tune a model on Ray Train and score it on the test split")
    add_config_args(p)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("tune", help="search config values with Ray Tune; the winner is scored on the test split")
    add_config_args(p)
    p.add_argument(
        "--resume",
        action="store_true",
        help="finish an interrupted sweep (finished trials are kept); an interrupted sweep is also resumed without it",
    )
    p.add_argument("--retry-errored", action="store_true", help="when resuming, run failed trials again")
    p.set_defaults(func=cmd_tune)
    p = sub.add_parser(
        "pipeline",
        help="the whole job: data, train or tune, test, export, deploy (skips what "
        "is done, resumes what was interrupted)",
    )
    add_config_args(p)
    p.add_argument("--stages", help="comma-separated stages to run (default: pipeline.stages)")
    p.add_argument(
        "--quiet",
        action="store_true",
        help="only a line a stage, the leaderboard and the smoke "
        "test's answers on the terminal; everything else (Ray, Tune, ONNX) in console.log",
    )
    p.set_defaults(func=cmd_pipeline)
    p = sub.add_parser(
        "soup",
        help="average the weights of fine-tuned models of one base model into one "
        "model (a model soup), picked on validation, scored on test",
    )
    add_config_args(p)
    p.add_argument(
        "--models",
        nargs="+",
        required=True,
        metavar="MODEL",
        help="run or sweep names under storage.root, model folders, or s3:// folders (2 or more)",
    )
    p.add_argument(
        "--data",
        required=True,
        help="the prepared dataset they were trained on (a name under "
        "<storage.root>/data/): its validation split picks the soup, its test split scores it",
    )
    p.add_argument("--name", required=True, help="the new run's name: the soup is written to runs/<name>/")
    p.add_argument(
        "--method",
        default="greedy",
        choices=["greedy", "uniform"],
        help="greedy (default): add models best first, keep each only if validation "
        "tune.metric does not drop; uniform: average them all",
    )
    p.set_defaults(func=cmd_soup)
