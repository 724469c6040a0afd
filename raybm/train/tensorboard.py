"""TensorBoard event files of a training run or a sweep trial, in its results folder.

The training loop's rank 0 notes a point of the curves at each progress line (the optimizer
step, the mean training loss since the last point, the learning rate) and each epoch's
record carries them (``history.json``). When the run ends, the driver (for a sweep, the
sweep's driver, once per trial) writes them with each epoch's validation metrics and
throughput as TensorBoard scalars into ``<run>/tensorboard/``, local or on S3, so
``tensorboard --logdir <storage.root>`` shows every run and trial side by side.
Writing needs the ``tensorboard`` package (``pip install raybm[tracking]``); without it
raybm says so once and goes on.
"""

from __future__ import annotations

import sys
import tempfile
from typing import Any

from raybm.storage.layout import TENSORBOARD_DIR
from raybm.storage.results import Results

# Each epoch's record: these, under "val/" and "train/", at the epoch's last step.
EPOCH_SCALARS = {
    "val_loss": "val/loss",
    "val_accuracy": "val/accuracy",
    "val_f1_macro": "val/f1_macro",
    "val_precision_macro": "val/precision_macro",
    "val_recall_macro": "val/recall_macro",
    "train_loss": "train/epoch_loss",
    "samples_per_s": "train/samples_per_s",
}
_warned = False


def _writer_class():
    global _warned
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if not _warned:
            print(
                "raybm: TensorBoard event files are not written: the tensorboard package is not installed "
                "(pip install 'raybm[tracking]')",
                file=sys.stderr,
                flush=True,
            )
            _warned = True
        return None
    return SummaryWriter


def write_events(results: Results, folder: str, history: list[dict[str, Any]]) -> str | None:
    """Write the curves of ``history`` (a run's epoch records) as TensorBoard event files
    into ``<folder>/tensorboard``, replacing what was there; returns that folder, or None
    when there is nothing to write or TensorBoard is not installed."""
    writer_class = _writer_class()
    if writer_class is None or not history:
        return None
    with tempfile.TemporaryDirectory(prefix="raybm-tensorboard-") as tmp:
        writer = writer_class(log_dir=tmp)
        last_step = 0
        for record in history:
            for step, loss, lr in record.get("steps") or []:
                writer.add_scalar("train/loss", loss, int(step))
                writer.add_scalar("train/lr", lr, int(step))
                last_step = int(step)
            for key, tag in EPOCH_SCALARS.items():
                if isinstance(record.get(key), (int, float)):
                    writer.add_scalar(tag, float(record[key]), last_step)
            writer.add_scalar("epoch", float(record.get("epoch", 0)), last_step)
        writer.close()
        out = results.join(folder, TENSORBOARD_DIR)
        results.upload_dir(tmp, out)
    return out
