"""Model families behind one interface: `encode(prompts)` and `forward(x, t, text)`.

One family a module (`unet.py` today); `build_model(spec)` is the only place that dispatches on
`ModelSpec.family`. Samplers never import this package: they take a `denoise` callable.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from socarrat.config import ModelSpec
from socarrat.models.text import TextEncoding, build_text_encoder
from socarrat.models.unet import UNet


class GaussianModel(nn.Module):
    """A text encoder + a UNet that predicts eps or v (`spec.prediction`)."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.text = build_text_encoder(spec.text)
        self.unet = UNet(spec, self.text.width)

    def encode(self, prompts: Sequence[str]) -> TextEncoding:
        """Prompts (B strings) -> conditioning for `forward`."""
        return self.text(prompts)

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: TextEncoding) -> torch.Tensor:
        """x (B, C, H, W), t (B,) timesteps in [0, train_timesteps) -> (B, C, H, W)."""
        return self.unet(x, t, text)

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_model(spec: ModelSpec) -> GaussianModel:
    """A randomly initialised model of the family `spec` describes."""
    return GaussianModel(spec)
