"""The parts of a classifier (encoder layers, embeddings, head) and the fine-tuning
strategies that act on them: which layers train each epoch, and layer-wise learning rates."""

from __future__ import annotations

from raybm.errors import RaybmError


def encoder_layers(model):
    """The stack of encoder layers, bottom first."""
    import torch

    base = model.base_model
    for owner in (getattr(base, "encoder", None), getattr(base, "transformer", None), base):
        if owner is None:
            continue
        for attr in ("layer", "layers"):
            layers = getattr(owner, attr, None)
            if isinstance(layers, torch.nn.ModuleList):
                return list(layers)
    raise RaybmError(f"cannot find the encoder layers of {type(model).__name__}; use strategy=full")


def head_modules(model) -> list:
    """Modules outside the base model (classifier, pre-classifier) plus BERT's pooler."""
    base = model.base_model
    mods = [m for name, m in model.named_children() if m is not base]
    pooler = getattr(base, "pooler", None)
    return mods + ([pooler] if pooler is not None else [])


def _embeddings(model):
    base = model.base_model
    emb = getattr(base, "embeddings", None)
    if emb is None:
        raise RaybmError(f"cannot find the embeddings of {type(model).__name__}; use strategy=full")
    return emb


def trainable_layers(strategy: str, num_layers: int, epoch: int, freeze_layers: int = 0,
                     unfreeze_every: int = 1) -> tuple[bool, int]:
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


def apply_strategy(model, train_cfg, epoch: int, sizes: dict[int, int] | None = None) -> int:
    """Set ``requires_grad`` for ``epoch`` by the strategy; returns the trainable parameter
    count (``sizes``: each parameter's size by id, taken before FSDP sharded it)."""
    layers = encoder_layers(model) if train_cfg.strategy in ("partial", "gradual") else []
    if train_cfg.strategy in ("partial", "gradual"):
        emb_on, top = trainable_layers(train_cfg.strategy, len(layers), epoch, train_cfg.freeze_layers,
                                       train_cfg.unfreeze_every)
        for p in model.parameters():
            p.requires_grad = False
        for module in head_modules(model):
            for p in module.parameters():
                p.requires_grad = True
        for layer in layers[len(layers) - top:] if top else []:
            for p in layer.parameters():
                p.requires_grad = True
        for p in _embeddings(model).parameters():
            p.requires_grad = emb_on
    else:
        for p in model.parameters():
            p.requires_grad = True
    return sum((sizes or {}).get(id(p), p.numel()) for p in model.parameters() if p.requires_grad)


def param_groups(model, lr: float, weight_decay: float, layerwise_decay: float = 1.0) -> list[dict]:
    """Optimizer parameter groups: no weight decay on biases and norms; with layer-wise
    decay, layer i of n (0 = bottom) gets lr * decay^(n - i) and the embeddings
    lr * decay^(n + 1); the head gets lr."""
    scale: dict[int, float] = {}
    if layerwise_decay < 1.0:
        layers = encoder_layers(model)
        n = len(layers)
        for p in _embeddings(model).parameters():
            scale[id(p)] = layerwise_decay ** (n + 1)
        for i, layer in enumerate(layers):
            for p in layer.parameters():
                scale[id(p)] = layerwise_decay ** (n - i)
    groups: dict[tuple[float, bool], list] = {}
    for name, p in model.named_parameters():
        no_decay = p.dim() < 2 or "norm" in name.lower()
        key = (scale.get(id(p), 1.0), no_decay)
        groups.setdefault(key, []).append(p)
    return [{"params": ps, "lr": lr * s, "weight_decay": 0.0 if nd else weight_decay, "lr_scale": s}
            for (s, nd), ps in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1]))]
