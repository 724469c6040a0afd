"""A small from-scratch baseline: TextCNN over the same tokenizer's ids.

It is a regular Hugging Face model (config + safetensors), registered with the Auto
classes when raybm.models.build is imported, so training, checkpoints, evaluation and
prediction treat it like any transformer: ``model.name=textcnn``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput


class TextCNNConfig(PretrainedConfig):
    """The TextCNN baseline's config: vocabulary, embedding and filter sizes."""

    model_type = "raybm-textcnn"

    def __init__(
        self,
        vocab_size: int = 30522,
        embed_dim: int = 128,
        num_filters: int = 100,
        kernel_sizes: tuple[int, ...] | list[int] = (3, 4, 5),
        dropout: float = 0.5,
        pad_token_id: int = 0,
        **kwargs: Any,
    ) -> None:
        module = __name__.rsplit(".", 1)[-1]  # this file, copied into saved folders (raybm.models.registry)
        kwargs.setdefault(
            "auto_map",
            {
                "AutoConfig": f"{module}.TextCNNConfig",
                "AutoModelForSequenceClassification": f"{module}.TextCNNForSequenceClassification",
            },
        )
        super().__init__(pad_token_id=pad_token_id, **kwargs)
        self.vocab_size = vocab_size
        self.embed_dim = embed_dim
        self.num_filters = num_filters
        self.kernel_sizes = list(kernel_sizes)
        self.dropout = dropout


class TextCNNEncoder(nn.Module):
    """Embeddings, parallel 1-d convolutions, max-pooling over time."""

    def __init__(self, config: TextCNNConfig) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(config.vocab_size, config.embed_dim, padding_idx=config.pad_token_id)
        self.convs = nn.ModuleList(nn.Conv1d(config.embed_dim, config.num_filters, k) for k in config.kernel_sizes)
        self.min_length = max(config.kernel_sizes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Max-pooled convolution features of each sequence."""
        x = self.embeddings(input_ids)
        if attention_mask is not None:
            x = x * attention_mask.unsqueeze(-1).to(x.dtype)
        x = x.transpose(1, 2)
        if x.shape[-1] < self.min_length:  # short batches: pad time to the widest kernel
            x = F.pad(x, (0, self.min_length - x.shape[-1]))
        return torch.cat([F.relu(conv(x)).amax(dim=-1) for conv in self.convs], dim=-1)


class TextCNNForSequenceClassification(PreTrainedModel):
    """The TextCNN baseline as a Hugging Face sequence classifier."""

    config_class = TextCNNConfig
    base_model_prefix = "textcnn"

    def __init__(self, config: TextCNNConfig) -> None:
        super().__init__(config)
        self.textcnn = TextCNNEncoder(config)
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(config.num_filters * len(config.kernel_sizes), config.num_labels)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Conv1d)):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.1)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **_: object,
    ) -> SequenceClassifierOutput:
        """Logits (and the loss, given labels), as a Hugging Face classifier returns them."""
        logits = self.classifier(self.dropout(self.textcnn(input_ids, attention_mask)))
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)
