"""The training loss beyond cross-entropy: distillation from a teacher, and the L1 penalty."""

from __future__ import annotations

from typing import TYPE_CHECKING

from raybm.inference.loading import load_model_folder

if TYPE_CHECKING:
    import torch
    from torch import nn


def load_teacher(folder: str, device: torch.device) -> nn.Module:
    """The distillation teacher, frozen, in eval mode."""
    teacher, _, _ = load_model_folder(folder)
    teacher.to(device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def distill_loss(
    student_logits: torch.Tensor, teacher: nn.Module, batch: dict[str, torch.Tensor], temperature: float
) -> torch.Tensor:
    """KL divergence between the teacher's and the student's softened distributions,
    scaled by T^2 so its gradients keep their size as T changes (Hinton et al.)."""
    import torch

    with torch.no_grad():
        soft = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    return (
        torch.nn.functional.kl_div(
            torch.log_softmax(student_logits / temperature, dim=-1),
            torch.softmax(soft / temperature, dim=-1),
            reduction="batchmean",
        )
        * temperature**2
    )


def l1_penalty(model: nn.Module) -> torch.Tensor:
    """The sum of absolute weights of the matrices being trained (biases and norms excluded)."""
    return sum(p.abs().sum() for p in model.parameters() if p.requires_grad and p.dim() > 1)
