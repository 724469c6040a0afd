"""The data report: what the data stage read, dropped, kept and split, and its token
lengths (``report.json`` of a prepared dataset), and its short printed summary."""

from __future__ import annotations

import datetime as dt
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from raybm.config import JobConfig
from raybm.data import cleaning
from raybm.data.sources import Source
from raybm.storage.layout import SPLITS
from raybm.storage.records import DataReport

if TYPE_CHECKING:
    import pandas as pd


def build_report(
    cfg: JobConfig,
    src: Source,
    name: str,
    digest: str,
    mapper: cleaning.LabelMapper,
    rows_read: int,
    dropped: dict[str, int],
    conflicts: int,
    lengths: pd.DataFrame,
    started: float,
) -> DataReport:
    """The data report: rows read, dropped by reason, duplicates, split sizes, class balance, token lengths."""
    labels = mapper.labels
    splits: dict[str, Any] = {}
    for split in SPLITS:
        part = lengths[lengths["split"] == split]
        per_label = part["label"].value_counts().to_dict()
        splits[split] = {
            "rows": int(len(part)),
            "labels": {lab: int(per_label.get(i, 0)) for i, lab in enumerate(labels)},
            "truncated": int((part["n_tokens"] > cfg.data.max_length).sum()),
        }
    n_tokens = lengths["n_tokens"].to_numpy()
    pct = {f"p{q}": int(np.percentile(n_tokens, q)) for q in (50, 90, 95, 99)}
    truncated = int((n_tokens > cfg.data.max_length).sum())
    rows_kept = int(len(lengths))
    return DataReport(
        dataset=name,
        source=cfg.data.source,
        format=src.format,
        files=src.display_files,
        config_hash=digest,
        created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        elapsed_s=round(time.time() - started, 2),
        rows_read=int(rows_read),
        dropped={r: int(dropped.get(r, 0)) for r in cleaning.DROP_REASONS if dropped.get(r)},
        dropped_total=int(sum(dropped.values())),
        duplicates_with_conflicting_labels=int(conflicts),
        rows_kept=rows_kept,
        labels=labels,
        splits=splits,
        tokens={
            "model": cfg.model.name,
            "max_length": cfg.data.max_length,
            "mean": round(float(n_tokens.mean()), 2),
            **pct,
            "max": int(n_tokens.max()),
            "truncated_rows": truncated,
            "truncated_share": round(truncated / max(1, rows_kept), 4),
            "ids_stored": True,  # each split's input_ids column (SPLIT_COLUMNS)
        },
    )


def format_report(report: DataReport) -> str:
    """The data report as a short human-readable summary."""
    lines = [f"Dataset {report.dataset}  (source: {report.source})", f"  rows read {report.rows_read:>30}"]
    for reason, n in report.dropped.items():
        lines.append(f"    dropped: {reason:<22}{n:>7}")
    lines.append(f"  rows kept {report.rows_kept:>30}")
    if report.duplicates_with_conflicting_labels:
        lines.append(
            f"  ({report.duplicates_with_conflicting_labels} duplicated texts had conflicting "
            f"labels; the majority label was kept)"
        )
    labels = report.labels
    lines.append("")
    lines.append("  split        rows  " + "  ".join(f"{lab:>10}" for lab in labels))
    for split in report.splits:
        rows, counts = report.split_rows(split), report.label_counts(split)
        dist = "  ".join(f"{counts[lab]:>5} {100 * counts[lab] / max(1, rows):3.0f}%" for lab in labels)
        lines.append(f"  {split:<10}{rows:>7}  {dist}")
    t = report.tokens
    lines.append("")
    lines.append(
        f"  tokens ({t['model']}): mean {t['mean']}, p50 {t['p50']}, p95 {t['p95']}, "
        f"p99 {t['p99']}, max {t['max']}; {100 * t['truncated_share']:.2g}% "
        f"({t['truncated_rows']}) truncated at max_length {t['max_length']}"
    )
    return "\n".join(lines)
