"""Model families behind one interface, the one `Generator` and the trainers use:

- `encode(prompts)` -> conditioning; `forward(x, t, text)` -> the denoiser's output;
- `truncated(prompts)` -> whether each prompt is longer than the text encoder's context (its end cut);
- `latent_shape(height_px, width_px)` -> (C, h, w) of the state a sampler works on (UserError for a
  size the model cannot make) and `pixel_multiple`, the step that sizes must be multiples of;
- `decode(x)` -> (B, 3, H, W) pixels in [-1, 1] (identity for pixel-space models).

One family a module; `build_model(spec)` is the only place that dispatches on `ModelSpec.family`.
Samplers never import this package: they take a `denoise` callable.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from socarrat.config import ModelSpec, check_size
from socarrat.errors import UserError
from socarrat.models.hdit import HDiT
from socarrat.models.paella import TokenModel
from socarrat.models.text import TextEncoding, build_text_encoder
from socarrat.models.unet import UNet


class GaussianModel(nn.Module):
    """A text encoder + a denoiser (`spec.backbone`: UNet or HDiT) that predicts eps or v (`spec.prediction`)."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        if spec.in_channels != 3:  # latents need a decoder, which only diffusers checkpoints bring
            raise UserError(f"in_channels={spec.in_channels}: a Socarrat Gaussian model works on RGB pixels (3)")
        self.spec = spec
        self.text = build_text_encoder(spec.text)
        backbone = {"unet": UNet, "hdit": HDiT}[spec.backbone]
        # Held under the backbone's own name ("unet", "hdit"): checkpoints' state-dict keys start with it.
        self.add_module(spec.backbone, backbone(spec, self.text.width))

    def encode(self, prompts: Sequence[str]) -> TextEncoding:
        """Prompts (B strings) -> conditioning for `forward`."""
        return self.text(prompts)

    def truncated(self, prompts: Sequence[str]) -> list[bool]:
        return self.text.truncated(prompts)

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: TextEncoding) -> torch.Tensor:
        """x (B, C, H, W), t (B,) timesteps in [0, train_timesteps) -> (B, C, H, W)."""
        return getattr(self, self.spec.backbone)(x, t, text)

    @property
    def pixel_multiple(self) -> int:
        return self.spec.downsampling

    def latent_shape(self, height_px: int, width_px: int) -> tuple[int, int, int]:
        """(C, H, W) of the state sampled for a height_px x width_px image (pixel space: the same)."""
        check_size(height_px, width_px, self.pixel_multiple)
        return self.spec.in_channels, height_px, width_px

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Sampled state (B, C, H, W) -> pixels (B, 3, H, W) in [-1, 1]: already pixels here."""
        return x


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_model(spec: ModelSpec) -> GaussianModel | TokenModel:
    """A randomly initialised model of the family `spec` describes."""
    return TokenModel(spec) if spec.family == "token" else GaussianModel(spec)
