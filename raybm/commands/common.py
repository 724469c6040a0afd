"""What every command shares: the config arguments, the start (checks, then Ray), the
test metrics printout."""

from __future__ import annotations

import argparse

from raybm.pipeline import preflight
from raybm.runtime import check_shared_paths, ensure_ray, quiet_ray_data
from raybm.serve.ingress import ray_env


def add_config_args(p: argparse.ArgumentParser) -> None:
    """``--config FILE`` and dotted ``key=value`` overrides."""
    p.add_argument("--config", "-c", help="YAML job config (see jobs/configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. train.lr=3e-5 data.max_length=64")


def start(cfg, stages: list[str], source=None):
    """Check what needs no Ray (``raybm.pipeline.preflight``; done already when ``source``
    is given), then join or start Ray and check that every node sees the job's paths.
    Returns the resolved data source."""
    if source is None:
        source = preflight(cfg, stages)  # storage, data, model and key problems fail before Ray starts
    print(f"raybm: running on {ensure_ray(cfg.ray, ray_env(cfg.serve))}", flush=True)
    check_shared_paths(cfg)
    quiet_ray_data()
    return source


def print_test_metrics(test: dict) -> None:
    """Test metrics, overall and per class."""
    print(f"  accuracy {test['accuracy']:.4f}  macro-F1 {test['f1_macro']:.4f}  "
          f"precision {test['precision_macro']:.4f}  recall {test['recall_macro']:.4f}  ({test['examples']} examples)")
    for lab, m in test["per_class"].items():
        print(f"    {lab:<12} precision {m['precision']:.3f} recall {m['recall']:.3f} f1 {m['f1']:.3f} "
              f"support {m['support']}")


def is_override(arg: str) -> bool:
    """Whether a positional argument is a dotted ``key=value`` override (not a path)."""
    key = arg.split("=", 1)[0]
    return "=" in arg and "." in key and "/" not in key
