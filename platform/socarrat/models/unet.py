"""The Gaussian-diffusion UNet: ResBlocks, timestep embedding, text cross-attention.

Works in pixel space or on latents (`ModelSpec.in_channels`) at any H, W that are multiples of
`ModelSpec.downsampling`. The pooled text vector is added to the timestep embedding (global
conditioning); the token embeddings are read by cross-attention at `attention_levels` only, where
the feature map is small. Depends on torch and the text encoder module.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from socarrat.config import ModelSpec
from socarrat.models.text import TextEncoding


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of timesteps t (B,) float -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm of about 4 channels a group, at most 32 groups; any width works (the group count
    is the largest that divides it)."""
    return nn.GroupNorm(math.gcd(min(32, channels // 4), channels), channels)


class ResBlock(nn.Module):
    """Two 3x3 convs; the embedding sets a per-channel scale and shift between them."""

    def __init__(self, cin: int, cout: int, emb_dim: int):
        super().__init__()
        self.norm1, self.conv1 = group_norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2, self.conv2 = group_norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x (B, cin, H, W); emb (B, emb_dim): the conditioning embedding after its SiLU."""
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        return self.skip(x) + self.conv2(F.silu(h))


class AttentionBlock(nn.Module):
    """Self-attention over pixels, then cross-attention to the prompt's tokens."""

    def __init__(self, channels: int, text_width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = group_norm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.cross_norm = nn.LayerNorm(channels)
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(text_width, 2 * channels)
        self.out = nn.Linear(channels, channels)
        self.cross_out = nn.Linear(channels, channels)
        for layer in (self.out, self.cross_out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.view(b, n, self.heads, c // self.heads).transpose(1, 2)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        b, h, n, d = x.shape
        return x.transpose(1, 2).reshape(b, n, h * d)

    def forward(self, x: torch.Tensor, text: TextEncoding) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)
        q, k, v = (self._split(part) for part in self.qkv(h).chunk(3, dim=-1))
        h = x.flatten(2).transpose(1, 2) + self.out(self._merge(F.scaled_dot_product_attention(q, k, v)))
        k, v = (self._split(part) for part in self.kv(text.tokens.to(h.dtype)).chunk(2, dim=-1))
        mask = text.mask[:, None, None, :]
        attn = F.scaled_dot_product_attention(self._split(self.q(self.cross_norm(h))), k, v, attn_mask=mask)
        h = h + self.cross_out(self._merge(attn))
        return h.transpose(1, 2).reshape(b, c, hgt, wid)


class UNet(nn.Module):
    """forward(x (B, C, H, W), t (B,), text) -> model output (B, C_out, H, W): eps or v per the spec
    (C_out = C), or a token model's logits (C_out = codebook size)."""

    def __init__(self, spec: ModelSpec, text_width: int, in_channels: int | None = None, out_channels: int | None = None):
        super().__init__()
        self.spec = spec
        ch = spec.channels
        emb_dim = 4 * ch[0]
        self.time_mlp = nn.Sequential(nn.Linear(ch[0], emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.text_to_emb = nn.Linear(text_width, emb_dim)
        self.conv_in = nn.Conv2d(in_channels or spec.in_channels, ch[0], 3, padding=1)

        def level(cin: int, cout: int, lv: int) -> nn.ModuleList:
            blocks = [ResBlock(cin if i == 0 else cout, cout, emb_dim) for i in range(spec.res_blocks)]
            attn = [AttentionBlock(cout, text_width, spec.heads)] if lv in spec.attention_levels else []
            return nn.ModuleList(blocks + attn)

        self.down = nn.ModuleList(level(ch[max(lv - 1, 0)], c, lv) for lv, c in enumerate(ch))
        self.downsample = nn.ModuleList(nn.Conv2d(c, c, 3, stride=2, padding=1) for c in ch[:-1])
        self.middle = level(ch[-1], ch[-1], len(ch) - 1)
        self.up = nn.ModuleList(level(2 * c, c, lv) for lv, c in enumerate(ch))
        self.upsample = nn.ModuleList(nn.Conv2d(ch[lv + 1], ch[lv], 3, padding=1) for lv in range(len(ch) - 1))
        self.norm_out = group_norm(ch[0])
        self.conv_out = nn.Conv2d(ch[0], out_channels or in_channels or spec.in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @staticmethod
    def _run(blocks: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor, text: TextEncoding) -> torch.Tensor:
        for block in blocks:
            h = block(h, emb) if isinstance(block, ResBlock) else block(h, text)
        return h

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: TextEncoding) -> torch.Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.spec.channels[0]))
        emb = F.silu(emb + self.text_to_emb(text.pooled.to(emb.dtype)))  # once, not in every ResBlock
        h = self.conv_in(x)
        skips = []
        for lv, blocks in enumerate(self.down):
            h = self._run(blocks, h, emb, text)
            skips.append(h)
            if lv < len(self.downsample):
                h = self.downsample[lv](h)
        h = self._run(self.middle, h, emb, text)
        for lv in reversed(range(len(self.up))):
            if lv < len(self.upsample):
                h = self.upsample[lv](F.interpolate(h, scale_factor=2.0, mode="nearest"))
            h = self._run(self.up[lv], torch.cat([h, skips[lv]], dim=1), emb, text)
        return self.conv_out(F.silu(self.norm_out(h)))
