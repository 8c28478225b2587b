"""The token family (Paella, Rampas et al. 2022, arXiv 2211.07292): a denoiser over VQ tokens.

Noising replaces a fraction of the tokens by random codebook entries; the denoiser (the same
conv U-Net with text cross-attention as the Gaussian family, over token embeddings) predicts the
clean tokens as logits. The noise level is a timestep t in [0, T): the fraction replaced is
`noise_fraction(t) = sin(pi/2 * t / (T - 1))`, 0 at t = 0 and 1 (all random) at t = T - 1; it is
Paella's cos(pi/2 * r) with r = 1 - t / (T - 1), so that t grows with noise as it does for the
Gaussian family (`socarrat.sampling.tokens.noise_fraction`, shared with the sampler). Depends on
torch, the spec, the text encoder, the U-Net, the VQ module and that function.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from socarrat.config import ModelSpec, check_size
from socarrat.errors import UserError
from socarrat.models.text import TextEncoding, build_text_encoder
from socarrat.models.unet import UNet
from socarrat.models.vq import VQ
from socarrat.sampling.tokens import noise_fraction


def add_noise(tokens: torch.Tensor, t: torch.Tensor, train_timesteps: int, codebook_size: int,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """Paella's noising: each token of (B, h, w) long becomes a uniformly random one with
    probability `noise_fraction(t)`, t (B,). Returns the noised tokens (B, h, w) long."""
    fraction = noise_fraction(t, train_timesteps).float().to(tokens.device)[:, None, None]
    replace = torch.rand(tokens.shape, generator=generator, device=tokens.device) < fraction
    random = torch.randint(codebook_size, tokens.shape, generator=generator, device=tokens.device)
    return torch.where(replace, random, tokens)


class TokenModel(nn.Module):
    """Text encoder + VQ tokenizer + token denoiser: `forward(tokens, t, text)` -> logits."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        if spec.token is None:
            raise UserError("a token model needs ModelSpec.token")
        self.spec = spec
        self.text = build_text_encoder(spec.text)
        self.vq = VQ(spec.token)
        self.embed = nn.Embedding(spec.token.codebook_size, spec.token.embed_dim)
        self.unet = UNet(spec, self.text.width, in_channels=spec.token.embed_dim, out_channels=spec.token.codebook_size)

    @property
    def codebook_size(self) -> int:
        return self.spec.token.codebook_size

    def encode(self, prompts: Sequence[str]) -> TextEncoding:
        """Prompts (B strings) -> conditioning for `forward`."""
        return self.text(prompts)

    def truncated(self, prompts: Sequence[str]) -> list[bool]:
        return self.text.truncated(prompts)

    def forward(self, tokens: torch.Tensor, t: torch.Tensor, text: TextEncoding) -> torch.Tensor:
        """Tokens (B, h, w) long at timesteps t (B,) -> logits of the clean tokens (B, K, h, w)."""
        return self.unet(self.embed(tokens).permute(0, 3, 1, 2), t, text)

    @property
    def pixel_multiple(self) -> int:
        return self.spec.downsampling

    def latent_shape(self, height_px: int, width_px: int) -> tuple[int, int]:
        """(h, w) of the token grid sampled for a height_px x width_px image."""
        check_size(height_px, width_px, self.pixel_multiple)
        f = self.spec.token.downsampling
        return height_px // f, width_px // f

    def tokenize(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) float in [-1, 1] -> tokens (B, H/f, W/f) long."""
        return self.vq.encode(images)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens (B, h, w) long -> pixels (B, 3, h*f, w*f) in [-1, 1]."""
        return self.vq.decode(tokens).clamp(-1, 1)
