"""What every command shares: the config arguments, the one start (checks, then Ray, then
the paths every node must see), the test metrics printout."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from raybm.preflight import preflight
from raybm.runtime import check_shared_paths, ensure_ray, quiet_ray_data
from raybm.serve.ingress import ray_env

if TYPE_CHECKING:
    from raybm.config import JobConfig
    from raybm.data.sources import Source


def add_config_args(p: argparse.ArgumentParser) -> None:
    """``--config FILE`` and dotted ``key=value`` overrides."""
    p.add_argument("--config", "-c", help="YAML job config (see jobs/configs/)")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=3e-5 data.max_length=64"
    )


def start(
    cfg: JobConfig,
    *,
    stages: list[str] | None = None,
    source: Source | None = None,
    paths: dict[str, str] | None = None,
    root: bool = True,
    shared: bool = True,
) -> Source | None:
    """The one start of every command that runs on Ray, in this order:

    1. the checks that need no Ray (``raybm.preflight.preflight`` of ``stages``; none
       without ``stages``, and done already when ``source`` is given);
    2. Ray joined or started (with Serve's switches, ``raybm.serve.ingress.ray_env``);
    3. on a cluster, every local path the work reads must be one all nodes see: the
       config's, ``paths`` (``{flag: path}``), and ``storage.root`` unless ``root`` is false
       (skipped with ``shared=False``: the command reads no path);
    4. Ray Data's progress bars off when the output is not a terminal.

    Returns the resolved data source (None without ``stages``)."""
    if source is None and stages is not None:
        source = preflight(cfg, stages)  # storage, data, model and key problems fail before Ray starts
    print(f"raybm: running on {ensure_ray(cfg.ray, ray_env(cfg.serve))}", flush=True)
    if shared:
        check_shared_paths(cfg, paths, root=root)
    quiet_ray_data()
    return source


def print_test_metrics(test: dict | None) -> None:
    """Test metrics, overall and per class."""
    if not test:
        print("  (not scored on a test split)")
        return
    print(
        f"  accuracy {test['accuracy']:.4f}  macro-F1 {test['f1_macro']:.4f}  "
        f"precision {test['precision_macro']:.4f}  recall {test['recall_macro']:.4f}  ({test['examples']} examples)"
    )
    for lab, m in test["per_class"].items():
        print(
            f"    {lab:<12} precision {m['precision']:.3f} recall {m['recall']:.3f} f1 {m['f1']:.3f} "
            f"support {m['support']}"
        )


def is_override(arg: str) -> bool:
    """Whether a positional argument is a dotted ``key=value`` override (not a path)."""
    key = arg.split("=", 1)[0]
    return "=" in arg and "." in key and "/" not in key
