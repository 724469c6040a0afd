"""Tokenization on Ray Data, and training-only text augmentation in the workers.

``Tokenize`` and ``CountTokens`` are callable classes that Ray Data runs as tasks through
``raybm.data.udf.map_batches_cached``: the tokenizer loads once per worker process, not per
batch, and no actor pool has to start. Batches stream through; nothing is collected on the
driver.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa

from raybm.config import AugmentConfig, DataConfig, ModelConfig, StorageConfig
from raybm.data.splitting import text_key
from raybm.runtime import quiet_tokenizers

if TYPE_CHECKING:
    from ray.data import Dataset
    from transformers import PreTrainedTokenizerBase

# Characters of scripts written without spaces between words (CJK ideographs, kana, hangul).
_UNSPACED = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")


def augment_units(text: str) -> tuple[list[str], str]:
    """(the units augmentation works on, what joins them again): words for text written with
    spaces, characters for Chinese, Japanese or Korean, where one "word" split by spaces
    can be the whole text."""
    if _UNSPACED.search(text):
        return [c for c in text if not c.isspace()], ""
    return text.split(), " "


def augment_text(text: str, cfg: AugmentConfig, rng: np.random.Generator, mask_token: str, pad_token: str) -> str:
    """Random crop, padding, replacement and deletion of words (of characters in Chinese,
    Japanese or Korean text), each by its probability."""
    words, joiner = augment_units(text)
    if len(words) > 1 and rng.random() < cfg.crop_prob:
        keep = max(1, int(np.ceil(len(words) * rng.uniform(cfg.crop_min_ratio, 1.0))))
        start = int(rng.integers(0, len(words) - keep + 1))
        words = words[start : start + keep]
    if cfg.replace_prob > 0:
        words = [mask_token if rng.random() < cfg.replace_prob else w for w in words]
    if cfg.delete_prob > 0 and len(words) > 1:
        kept = [w for w in words if rng.random() >= cfg.delete_prob]
        words = kept or [words[int(rng.integers(0, len(words)))]]
    if rng.random() < cfg.pad_prob:
        for _ in range(int(rng.integers(1, cfg.pad_max_tokens + 1))):
            words.insert(int(rng.integers(0, len(words) + 1)), pad_token)
    return joiner.join(words)


class _WithTokenizer:
    def __init__(self, model: str, trust_remote_code: bool = False, storage: dict | None = None) -> None:
        quiet_tokenizers()
        from raybm.models.build import load_tokenizer, resolve_model_source

        # An s3:// base model: fetched to this task's node (the driver's copy is on its own disk).
        source = resolve_model_source(model, StorageConfig(**(storage or {}))) if model.startswith("s3://") else model
        self.tokenizer = load_tokenizer(source, trust_remote_code)


class AugmentCollate:
    """``iter_torch_batches(collate_fn=...)`` of a training split of texts: each text
    augmented for the epoch (``for_epoch``), then tokenized and padded. The change to a text
    is seeded by the text, ``data.seed`` and the epoch: the same in every run and on every
    worker, different from one epoch to the next."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, augment: AugmentConfig, max_length: int, padding: str, seed: int = 0
    ) -> None:
        self.tokenizer, self.augment = tokenizer, augment
        self.max_length, self.padding, self.seed = max_length, padding, seed
        self.epoch = 0

    def for_epoch(self, epoch: int) -> AugmentCollate:
        """This collate, augmenting as in ``epoch`` (0-based)."""
        self.epoch = epoch
        return self

    def texts(self, texts: list[str]) -> list[str]:
        """The texts as this epoch augments them."""
        tok, salt = self.tokenizer, f"augment:{self.seed}:{self.epoch}"
        return [
            augment_text(
                t,
                self.augment,
                np.random.default_rng(text_key(t, salt)),
                tok.mask_token or tok.unk_token,
                tok.pad_token or tok.unk_token,
            )
            for t in texts
        ]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        enc = self.tokenizer(
            self.texts([str(t) for t in batch["text"]]),
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
            padding="max_length" if self.padding == "max_length" else "longest",
        )
        labels = batch["labels"] if "labels" in batch else batch["label"]
        return {
            "input_ids": enc["input_ids"].long(),
            "attention_mask": enc["attention_mask"].long(),
            "labels": torch.from_numpy(np.array(labels, dtype=np.int64)),
        }


class Tokenize(_WithTokenizer):
    """Text -> ``input_ids``, ``attention_mask`` (and ``labels``) for a batch.

    ``padding="max_length"`` gives fixed-width int64 arrays; ``"longest"`` gives one
    variable-length array per row, padded per training batch by ``pad_collate``.
    """

    def __init__(
        self, model: str, max_length: int, padding: str, trust_remote_code: bool = False, storage: dict | None = None
    ) -> None:
        super().__init__(model, trust_remote_code, storage)
        self.max_length = max_length
        self.padding = padding

    def __call__(self, batch: pd.DataFrame) -> dict[str, np.ndarray]:
        texts = batch["text"].astype(str).tolist()
        enc = self.tokenizer(
            texts,
            truncation=True,
            max_length=self.max_length,
            padding="max_length" if self.padding == "max_length" else False,
        )
        out: dict[str, np.ndarray] = {}
        for key in ("input_ids", "attention_mask"):
            rows = [np.asarray(r, dtype=np.int64) for r in enc[key]]
            if self.padding == "max_length":
                out[key] = np.stack(rows)
            else:
                col: np.ndarray = np.empty(len(rows), dtype=object)
                col[:] = rows
                out[key] = col
        if "label" in batch:
            out["labels"] = batch["label"].to_numpy(dtype=np.int64)
        return out


class CountTokens(_WithTokenizer):
    """Adds ``n_tokens``, the untruncated token count of each text (for the data report),
    and ``input_ids``, the text tokenized as training reads it (truncated at
    ``max_length``, not padded; ``list<int32>``): stored with the prepared splits, so that
    no training run or sweep trial of this dataset tokenizes again."""

    def __init__(
        self, model: str, max_length: int, trust_remote_code: bool = False, storage: dict | None = None
    ) -> None:
        super().__init__(model, trust_remote_code, storage)
        self.max_length = max_length
        # A fast tokenizer's own encoder, as transformers calls it without truncation or
        # padding (the same ids, special tokens included), minus the offsets and the
        # BatchEncoding around them: 1.2x the texts a second.
        self.encoder = None
        if getattr(self.tokenizer, "is_fast", False) and hasattr(self.tokenizer.backend_tokenizer, "encode_batch_fast"):
            self.encoder = copy.deepcopy(self.tokenizer.backend_tokenizer)
            self.encoder.no_truncation()
            self.encoder.no_padding()

    def _untruncated(self, texts: list[str]) -> list[list[int]]:
        if self.encoder is not None:
            return [e.ids for e in self.encoder.encode_batch_fast(texts, add_special_tokens=True)]
        ids_only = {"padding": False, "return_attention_mask": False, "return_token_type_ids": False}  # 1.3x faster
        return self.tokenizer(texts, truncation=False, **ids_only)["input_ids"]

    def __call__(self, batch: pd.DataFrame) -> pa.Table:
        texts = batch["text"].astype(str).tolist()
        ids_only = {"padding": False, "return_attention_mask": False, "return_token_type_ids": False}
        counted = self._untruncated(texts)
        kept = list(counted)  # a text within max_length tokenizes the same truncated or not
        long = [i for i, ids in enumerate(counted) if len(ids) > self.max_length]
        if long:
            cut = self.tokenizer([texts[i] for i in long], truncation=True, max_length=self.max_length, **ids_only)[
                "input_ids"
            ]
            for i, ids in zip(long, cut):
                kept[i] = ids
        table = pa.Table.from_pandas(batch, preserve_index=False)
        table = table.append_column("n_tokens", pa.array([len(r) for r in counted], type=pa.int64()))
        return table.append_column("input_ids", pa.array(kept, type=pa.list_(pa.int32())))


def tokenize_dataset(
    ds: Dataset,
    data: DataConfig,
    model: ModelConfig,
    storage: StorageConfig | None = None,
    *,
    concurrency: int = 1,
    num_cpus: float = 0.25,
) -> Dataset:
    """Lazily tokenize a Dataset with columns text and label (never augmented: training
    workers augment texts themselves, per epoch, with ``AugmentCollate``); ``storage``
    reaches an ``s3://`` base model."""
    from raybm.data.udf import map_batches_cached

    return map_batches_cached(
        ds,
        Tokenize,
        dict(
            model=model.name,
            max_length=data.max_length,
            padding=data.padding,
            trust_remote_code=model.trust_remote_code,
            storage=dataclasses.asdict(storage or StorageConfig()),
        ),
        concurrency=concurrency,
        batch_format="pandas",
        batch_size=256,
        num_cpus=num_cpus,
    )


def _collate_base():
    try:
        from ray.data.collate_fn import NumpyBatchCollateFn

        return NumpyBatchCollateFn
    except ImportError:  # pragma: no cover - older Ray
        return object


class PadCollate(_collate_base()):  # type: ignore[misc]  # Ray's base class where this Ray has it
    """``iter_torch_batches(collate_fn=PadCollate())``: pads each batch to its longest row
    (to ``width`` when given: ``data.padding=max_length``)."""

    def __init__(self, pad_id: int = 0, width: int | None = None) -> None:
        self.pad_id = pad_id
        self.width = width

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        return pad_collate(batch, self.pad_id, self.width)


def pad_collate(batch: dict[str, np.ndarray], pad_id: int = 0, width: int | None = None) -> dict[str, Any]:
    """Pad a batch of variable-length rows to its longest row (or to ``width``) with
    ``pad_id`` (the tokenizer's: a decoder finds each text's last token by it); returns
    torch tensors ``input_ids``, ``attention_mask`` and ``labels``. Rows without an
    ``attention_mask`` (token ids stored by the data stage) attend to every token they
    have; the labels column may be ``labels`` or the prepared splits' ``label``."""
    import torch

    out: dict[str, Any] = {}
    ids = batch["input_ids"]
    labels = batch["labels"] if "labels" in batch else batch.get("label")
    if ids.dtype != object and ids.ndim == 2 and (width is None or ids.shape[1] == width):  # already fixed width
        out["input_ids"] = torch.from_numpy(np.array(ids, dtype=np.int64))  # a copy: Ray's arrays are read-only
        mask = batch.get("attention_mask")
        out["attention_mask"] = (
            torch.ones_like(out["input_ids"]) if mask is None else torch.from_numpy(np.array(mask, dtype=np.int64))
        )
        if mask is not None and pad_id:  # rows padded with 0 upstream (whole splits): the model's pad id
            out["input_ids"][out["attention_mask"] == 0] = pad_id
    else:
        rows = list(ids)
        masks = batch.get("attention_mask")
        size = width or max(len(r) for r in rows)
        arr: np.ndarray = np.full((len(rows), size), pad_id, dtype=np.int64)
        att: np.ndarray = np.zeros((len(rows), size), dtype=np.int64)
        for i, r in enumerate(rows):
            arr[i, : len(r)] = r
            att[i, : len(r)] = 1 if masks is None else masks[i]
        out["input_ids"], out["attention_mask"] = torch.from_numpy(arr), torch.from_numpy(att)
    if labels is not None:
        out["labels"] = torch.from_numpy(np.array(labels, dtype=np.int64))
    return out
