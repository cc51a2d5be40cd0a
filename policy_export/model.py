"""The BlockPilot policy network: a small MLP classifier over candidate block sizes.

Shaped like the authors' (AMAP-ML/BlockPilot): hidden layers with ReLU and dropout 0.2, and a
residual connection between consecutive hidden layers. They used two hidden layers of 2048 over
the prefill logits; our input is ~2300 target-layer features and the training set is a few
hundred prompts, so the default is narrower (256). The feature normalisation lives inside the
module as buffers, so the exported ONNX graph takes the raw features `prefill_features` returns.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
from torch import nn

from blockpilot.runtime.policy import PolicyFeatureSpec


@dataclass
class PolicyModelConfig:
    input_dim: int
    num_classes: int
    hidden_size: int = 256
    num_hidden_layers: int = 2
    dropout: float = 0.2

    def to_dict(self) -> dict:
        return asdict(self)


class PolicyMLP(nn.Module):
    """raw features [batch, D] -> (x - mean) / std -> hidden layers -> logits [batch, C]."""

    def __init__(self, config: PolicyModelConfig, mean: torch.Tensor | None = None, std: torch.Tensor | None = None):
        super().__init__()
        if config.num_hidden_layers < 1 or config.hidden_size < 1 or config.num_classes < 2:
            raise ValueError(f"policy MLP needs >= 1 hidden layer, hidden size >= 1 and >= 2 classes, got {config}")
        self.config = config
        self.register_buffer("feature_mean", torch.zeros(config.input_dim) if mean is None else
                             torch.as_tensor(mean, dtype=torch.float32).clone())
        self.register_buffer("feature_std", torch.ones(config.input_dim) if std is None else
                             torch.as_tensor(std, dtype=torch.float32).clone())
        if self.feature_mean.shape != (config.input_dim,) or self.feature_std.shape != (config.input_dim,):
            raise ValueError(f"normalisation vectors must have {config.input_dim} entries")
        self.input = nn.Linear(config.input_dim, config.hidden_size)
        self.hidden = nn.ModuleList(nn.Linear(config.hidden_size, config.hidden_size)
                                    for _ in range(config.num_hidden_layers - 1))
        self.dropout = nn.Dropout(config.dropout)
        self.output = nn.Linear(config.hidden_size, config.num_classes)

    @classmethod
    def for_spec(cls, spec: PolicyFeatureSpec, num_classes: int, **kwargs) -> "PolicyMLP":
        """A fresh policy for `spec`'s features, normalised with its mean/std (identity if it has none)."""
        mean = torch.tensor(spec.mean) if spec.mean is not None else None
        std = torch.tensor(spec.std) if spec.std is not None else None
        return cls(PolicyModelConfig(spec.dim, num_classes, **kwargs), mean, std)

    def always(self, class_index: int) -> "PolicyMLP":
        """A copy that picks class `class_index` for every input: the same graph (it exports, loads and
        checks like any policy), with zero output weights and that class's bias above the others'."""
        if not 0 <= class_index < self.config.num_classes:
            raise ValueError(f"class {class_index} is not one of this policy's {self.config.num_classes}")
        constant = copy.deepcopy(self).eval()
        with torch.no_grad():
            constant.output.weight.zero_()
            constant.output.bias.zero_()
            constant.output.bias[class_index] = 1.0
        return constant

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = (features - self.feature_mean) / self.feature_std
        h = self.dropout(torch.relu(self.input(x)))
        for layer in self.hidden:
            h = h + self.dropout(torch.relu(layer(h)))  # residual between hidden layers
        return self.output(h)
