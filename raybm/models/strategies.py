"""The fine-tuning strategies: which parts of a classifier train each epoch, and
layer-wise learning rates (the parts of each architecture: ``raybm.models.architectures``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from raybm.config import extreme_trials
from raybm.errors import RaybmError
from raybm.models.architectures import model_parts

if TYPE_CHECKING:
    from torch import nn

    from raybm.config import JobConfig, TrainConfig


def encoder_layers(model: nn.Module) -> list[nn.Module]:
    """The stack of transformer layers, bottom first."""
    return model_parts(model).layers


def trainable_layers(
    strategy: str, num_layers: int, epoch: int, freeze_layers: int = 0, unfreeze_every: int = 1
) -> tuple[bool, int]:
    """(embeddings trainable, how many top encoder layers are trainable) at ``epoch`` (0-based)."""
    if strategy in ("full", "scratch"):
        return True, num_layers
    if strategy == "partial":
        frozen = num_layers if freeze_layers == -1 else min(freeze_layers, num_layers)
        return False, num_layers - frozen
    # gradual: the head alone for the first unfreeze_every epochs, then one more layer from
    # the top every unfreeze_every epochs, and the embeddings once every layer is training.
    stage = epoch // unfreeze_every
    return stage > num_layers, min(num_layers, stage)


def apply_strategy(model: nn.Module, train_cfg: TrainConfig, epoch: int, sizes: dict[int, int] | None = None) -> int:
    """Set ``requires_grad`` for ``epoch`` by the strategy; returns the trainable parameter
    count (``sizes``: each parameter's size by id, taken before FSDP sharded it). LoRA's
    trainable parameters are set once, by PEFT, and left as they are."""
    if train_cfg.strategy in ("partial", "gradual"):
        parts = model_parts(model)
        layers = parts.layers
        emb_on, top = trainable_layers(
            train_cfg.strategy, len(layers), epoch, train_cfg.freeze_layers, train_cfg.unfreeze_every
        )
        for p in model.parameters():
            p.requires_grad = False
        trained = parts.head + (layers[len(layers) - top :] if top else []) + (parts.after if top else [])
        for module in trained:
            for p in module.parameters():
                p.requires_grad = True
        for module in parts.embeddings:
            for p in module.parameters():
                p.requires_grad = emb_on
    elif train_cfg.strategy != "lora":
        for p in model.parameters():
            p.requires_grad = True
    return sum((sizes or {}).get(id(p), p.numel()) for p in model.parameters() if p.requires_grad)


def param_groups(model: nn.Module, lr: float, weight_decay: float, layerwise_decay: float = 1.0) -> list[dict]:
    """Optimizer parameter groups: no weight decay on biases and norms; with layer-wise
    decay, layer i of n (0 = bottom) gets lr * decay^(n - i) and the embeddings
    lr * decay^(n + 1); the head gets lr. Under LoRA only the adapters and the head."""
    scale: dict[int, float] = {}
    if layerwise_decay < 1.0:
        parts = model_parts(model)
        n = len(parts.layers)
        for module in parts.embeddings:
            for p in module.parameters():
                scale[id(p)] = layerwise_decay ** (n + 1)
        for i, layer in enumerate(parts.layers):
            for p in layer.parameters():
                scale[id(p)] = layerwise_decay ** (n - i)
        for module in parts.after:  # a final norm: with the top layer
            for p in module.parameters():
                scale[id(p)] = layerwise_decay
    groups: dict[tuple[float, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad and getattr(model, "peft_config", None):  # LoRA: the frozen base stays out
            continue
        no_decay = p.dim() < 2 or "norm" in name.lower()
        key = (scale.get(id(p), 1.0), no_decay)
        groups.setdefault(key, []).append(p)
    return [
        {"params": ps, "lr": lr * s, "weight_decay": 0.0 if nd else weight_decay, "lr_scale": s}
        for (s, nd), ps in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1]))
    ]


def needs_of(train_cfg: TrainConfig) -> list[str]:
    """What of the architecture these training settings need: ``layers`` (a strategy that
    freezes or decays by layer), ``lora`` (its target modules), ``checkpointing``."""
    needs = []
    if train_cfg.strategy in ("partial", "gradual") or train_cfg.layerwise_lr_decay < 1:
        needs.append("layers")
    if train_cfg.strategy == "lora":
        needs.append("lora")
    if train_cfg.gradient_checkpointing:
        needs.append("checkpointing")
    return needs


def check_fits_architecture(cfg: JobConfig) -> None:
    """Refuse, before Ray starts, training settings the model's architecture cannot take,
    naming both: the job's own and those of every trial its sweep can sample (searched keys
    combine, so what any trial needs is checked against every model and LoRA target list a
    trial can have). The model is built on the meta device (no weights, no memory) only when
    a setting needs it."""
    trials = extreme_trials(cfg)
    needing = {
        need: next(t.train for t in trials if need in needs_of(t.train))
        for need in ("layers", "lora", "checkpointing")
        if any(need in needs_of(t.train) for t in trials)
    }
    if not needing:
        return
    # Only now: building a skeleton imports torch and transformers' modelling code.
    from raybm.models.architectures import model_type
    from raybm.models.build import classifier_skeleton, local_model, supports_checkpointing
    from raybm.models.lora import target_names

    skeletons: dict = {}
    for trial in trials:
        key = repr(trial.model)
        if key not in skeletons:
            skeletons[key] = classifier_skeleton(local_model(trial.model, cfg.storage), ["a", "b"])
        model = skeletons[key]
        where = f"model.name={trial.model.name} ({model_type(model)})"
        if "layers" in needing:
            try:
                model_parts(model)
            except RaybmError as e:
                t = needing["layers"]
                what = (
                    f"train.strategy={t.strategy}"
                    if t.strategy in ("partial", "gradual")
                    else f"train.layerwise_lr_decay={t.layerwise_lr_decay:g}"
                )
                raise RaybmError(
                    f"{where}: {what} works layer by layer, but {e}; use train.strategy=full and layerwise_lr_decay=1"
                ) from None
        if "lora" in needing:
            try:
                target_names(model, trial.train.lora_targets)
            except RaybmError as e:
                raise RaybmError(f"{where}: train.strategy=lora: {e}") from None
        if "checkpointing" in needing and not supports_checkpointing(model):
            raise RaybmError(
                f"{where}: train.gradient_checkpointing is not supported by this architecture; set it to false"
            )
