"""The hourglass diffusion transformer (HDiT; Crowson, Baumann et al. 2024, arXiv 2401.11605).

A pixel-space transformer whose cost grows about linearly with the pixel count: the image is cut
into `patch_size` x `patch_size` patches, each level after the first halves the token map (token
merge) and the way up doubles it again (token split, merged with the skip by a learned lerp).
Self-attention is local (shifted windows) at every level but the lowest, which attends globally.
Positions enter through axial RoPE (and, with `HDiTSpec.absolute_pos`, as features of each token's
place in the image at the ingress: RoPE alone gives offsets only); the timestep and the pooled
prompt drive every AdaRMSNorm through a mapping network; the prompt's tokens are read by
cross-attention at `HDiTSpec.cross_attention_levels`. Same call as the UNet:
`forward(x (B, C, H, W), t (B,), text)` -> (B, C, H, W), eps or v per `ModelSpec.prediction`, for
any H, W that are multiples of `HDiTSpec.downsampling`.

Plain PyTorch: windows are batched into `scaled_dot_product_attention` (no NATTEN). Depends on
torch, the config types, the text encoding and the UNet's timestep embedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from socarrat.config import ModelSpec
from socarrat.models.text import TextEncoding
from socarrat.models.unet import timestep_embedding

ROPE_BASE = 100.0  # slowest axial frequency turns once per ~350 tokens: longer than any map we make
ABS_FREQS = 4  # HDiTSpec.absolute_pos: octaves of the place features, periods from the side to 1/8 of it


def zero_init(layer: nn.Linear) -> nn.Linear:
    """Residual branches and the output start at zero, so a fresh model is the identity + 0."""
    nn.init.zeros_(layer.weight)
    return layer


def merge_patches(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, H, W, C) -> (B, H/p, W/p, p*p*C): each p x p block of tokens becomes one token."""
    b, h, w, c = x.shape
    return x.reshape(b, h // p, p, w // p, p, c).transpose(2, 3).reshape(b, h // p, w // p, p * p * c)


def split_patches(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, H, W, p*p*C) -> (B, H*p, W*p, C): the inverse of `merge_patches`."""
    b, h, w, c = x.shape
    return x.reshape(b, h, w, p, p, c // (p * p)).transpose(2, 3).reshape(b, h * p, w * p, c // (p * p))


def rope_angles(h: int, w: int, stride: int, head_dim: int, device: torch.device) -> torch.Tensor:
    """Axial RoPE angles (h, w, head_dim/2): half the frequencies turn with the row, half with the
    column. Positions are token centres in level-0 token units (`stride` = 2**level), so a merged
    token sits where the four it replaces sat, and windows see the same offsets at any image size."""
    freqs = ROPE_BASE ** -(torch.arange(head_dim // 4, device=device) / (head_dim // 4))
    centres = lambda n: (torch.arange(n, device=device) + 0.5) * stride
    return axial_angles(centres(h), centres(w), freqs)


def place_features(h: int, w: int, device: torch.device) -> torch.Tensor:
    """(h, w, 4 * ABS_FREQS) sines and cosines of each token centre's place in the image, scaled to
    [-1, 1] along each side, so "left" or "top" reads the same at any size."""
    freqs = torch.pi * 2.0 ** torch.arange(ABS_FREQS, device=device)
    places = lambda n: (torch.arange(n, device=device) + 0.5) / n * 2 - 1  # token centres, -1..1 across
    angles = axial_angles(places(h), places(w), freqs)
    return torch.cat([angles.sin(), angles.cos()], -1)


def axial_angles(rows: torch.Tensor, cols: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """(h, w, 2F) angles of an (h, w) grid: row position x F frequencies, then column position x F."""
    h, w = len(rows), len(cols)
    return torch.cat([(rows[:, None, None] * freqs).expand(h, w, -1), (cols[None, :, None] * freqs).expand(h, w, -1)], -1)


def rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Apply RoPE to x (B, h, w, heads, head_dim) with angles (h, w, head_dim/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = angles.cos()[:, :, None], angles.sin()[:, :, None]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


def cosine_similarity(q: torch.Tensor, k: torch.Tensor,
                      scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k normalised so that attention's logits (sdpa's default 1/sqrt(d) included) are their
    cosine similarities times `scale` (one per head, shaped to broadcast against q without its last
    dim): bounded whatever the weights do (HDiT's cosine-similarity attention, QK-norm). None: q and
    k as given."""
    if scale is None:
        return q, k
    d = q.shape[-1]  # an RMS-normed vector has length sqrt(d): q.k / sqrt(d) = scale * cos
    return (F.rms_norm(q, (d,)) * (scale[..., None] / d**0.5)).to(q.dtype), F.rms_norm(k, (d,)).to(k.dtype)


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, shift: bool) -> torch.Tensor:
    """Attention within window x window tiles of a token map (Swin; Liu et al. 2021, arXiv 2103.14030).

    q, k, v: (B, H, W, heads, d) -> (B, H, W, heads, d). A window at least the map's size is plain
    global attention. The map is padded to a multiple of the window; shifted tiles are offset by half
    a window and wrap around. A token attends to the tokens of its tile that lie within a window of
    it in the unshifted map: that rules out the padding and the pairs that meet only by wrapping.
    """
    b, h, w = q.shape[:3]
    wh, ww = min(window, h), min(window, w)
    sh, sw = (wh // 2 if h > wh else 0, ww // 2 if w > ww else 0) if shift else (0, 0)
    ph, pw = -h % wh, -w % ww
    nh, nw = (h + ph) // wh, (w + pw) // ww

    def tiles(x: torch.Tensor) -> torch.Tensor:  # (n, H + ph, W + pw, *rest) -> (n * tiles, wh * ww, *rest)
        rest = x.shape[3:]
        x = x.roll((-sh, -sw), dims=(1, 2))
        return x.reshape(-1, nh, wh, nw, ww, *rest).transpose(2, 3).reshape(-1, wh * ww, *rest)

    mask = None
    if sh or sw or ph or pw:
        grid = torch.stack(torch.meshgrid(torch.arange(h + ph), torch.arange(w + pw), indexing="ij"), -1).to(q.device)
        where = tiles(grid[None])  # (tiles, T, 2): each tile member's place in the unshifted map
        near = ((where[:, :, None] - where[:, None]).abs() < torch.tensor([wh, ww], device=q.device)).all(-1)
        real = (where[..., 0] < h) & (where[..., 1] < w)
        # A padding query may attend anything near (its output is cropped): no row is all masked.
        mask = (near & (real[:, None, :] | ~real[:, :, None])).repeat(b, 1, 1)[:, None]
    heads, d = q.shape[3:]
    q, k, v = (tiles(F.pad(x, (0, 0, 0, 0, 0, pw, 0, ph))).transpose(1, 2) for x in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)  # (B * tiles, T, heads, d)
    out = out.reshape(b, nh, nw, wh, ww, heads, d).transpose(2, 3).reshape(b, h + ph, w + pw, heads, d)
    return out.roll((sh, sw), dims=(1, 2))[:, :h, :w]


class AdaRMSNorm(nn.Module):
    """RMSNorm whose per-channel scale is 1 + a zero-initialised linear map of the conditioning."""

    def __init__(self, width: int, cond_width: int):
        super().__init__()
        self.linear = zero_init(nn.Linear(cond_width, width, bias=False))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x (B, h, w, C), cond (B, D) -> (B, h, w, C)."""
        return F.rms_norm(x, x.shape[-1:]) * (1 + self.linear(cond))[:, None, None]


def logit_scale(width: int, head_dim: int, qk_norm: bool) -> nn.Parameter | None:
    """The learned per-head logit scale of cosine-similarity attention (starts at 10), or None."""
    return nn.Parameter(torch.full((width // head_dim,), 10.0)) if qk_norm else None


class SelfAttention(nn.Module):
    """AdaRMSNorm, then multi-head self-attention with axial RoPE, windowed unless `window` is None."""

    def __init__(self, width: int, head_dim: int, cond_width: int, window: int | None, shift: bool, qk_norm: bool):
        super().__init__()
        self.head_dim, self.window, self.shift = head_dim, window, shift
        self.norm = AdaRMSNorm(width, cond_width)
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.scale = logit_scale(width, head_dim, qk_norm)
        self.out = zero_init(nn.Linear(width, width, bias=False))

    def forward(self, x: torch.Tensor, cond: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        q, k, v = self.qkv(self.norm(x, cond)).view(b, h, w, 3, c // self.head_dim, self.head_dim).unbind(3)
        q, k = cosine_similarity(q, k, self.scale)
        out = window_attention(rotate(q, angles), rotate(k, angles), v, self.window or max(h, w), self.shift)
        return x + self.out(out.reshape(b, h, w, c))


class CrossAttention(nn.Module):
    """AdaRMSNorm, then attention from every token to the prompt's (unpadded) tokens."""

    def __init__(self, width: int, head_dim: int, cond_width: int, text_width: int, qk_norm: bool):
        super().__init__()
        self.head_dim = head_dim
        self.norm = AdaRMSNorm(width, cond_width)
        self.q = nn.Linear(width, width, bias=False)
        self.kv = nn.Linear(text_width, 2 * width, bias=False)
        self.scale = logit_scale(width, head_dim, qk_norm)
        self.out = zero_init(nn.Linear(width, width, bias=False))

    def forward(self, x: torch.Tensor, cond: torch.Tensor, text: TextEncoding) -> torch.Tensor:
        b, h, w, c = x.shape
        heads = c // self.head_dim
        q = self.q(self.norm(x, cond)).view(b, h * w, heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(text.tokens.to(q.dtype)).view(b, -1, 2, heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = cosine_similarity(q, k, None if self.scale is None else self.scale[:, None])
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=text.mask[:, None, None, :])
        return x + self.out(out.transpose(1, 2).reshape(b, h, w, c))


class FeedForward(nn.Module):
    """AdaRMSNorm, then a GEGLU MLP (3x expansion)."""

    def __init__(self, width: int, cond_width: int):
        super().__init__()
        self.norm = AdaRMSNorm(width, cond_width)
        self.up = nn.Linear(width, 6 * width, bias=False)
        self.down = zero_init(nn.Linear(3 * width, width, bias=False))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        a, gate = self.up(self.norm(x, cond)).chunk(2, dim=-1)
        return x + self.down(a * F.gelu(gate))


class TransformerLayer(nn.Module):
    """Self-attention, cross-attention to the prompt (where `cross`), feed-forward; all residual."""

    def __init__(self, width: int, head_dim: int, cond_width: int, text_width: int, window: int | None,
                 shift: bool, cross: bool, qk_norm: bool):
        super().__init__()
        self.attn = SelfAttention(width, head_dim, cond_width, window, shift, qk_norm)
        self.cross = CrossAttention(width, head_dim, cond_width, text_width, qk_norm) if cross else None
        self.ff = FeedForward(width, cond_width)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, angles: torch.Tensor, text: TextEncoding) -> torch.Tensor:
        x = self.attn(x, cond, angles)
        if self.cross is not None:
            x = self.cross(x, cond, text)
        return self.ff(x, cond)


class MappingNetwork(nn.Module):
    """Timestep + pooled prompt -> the conditioning vector (B, width) that every AdaRMSNorm reads."""

    def __init__(self, width: int, depth: int, text_width: int):
        super().__init__()
        self.width = width
        self.time_in = nn.Linear(width, width, bias=False)
        self.text_in = nn.Linear(text_width, width, bias=False)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.RMSNorm(width), nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
            for _ in range(depth)
        )

    def forward(self, t: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        x = self.time_in(timestep_embedding(t, self.width)) + self.text_in(pooled.float())
        for block in self.blocks:
            x = x + block(x)
        return F.rms_norm(x, (self.width,))


class HDiT(nn.Module):
    """forward(x (B, C, H, W), t (B,), text) -> model output (B, C, H, W), eps or v per the spec."""

    def __init__(self, spec: ModelSpec, text_width: int):
        super().__init__()
        self.spec, hs = spec, spec.hdit
        widths, top, pixels = hs.widths, len(hs.widths) - 1, hs.patch_size**2 * spec.in_channels
        self.mapping = MappingNetwork(hs.mapping_width, hs.mapping_depth, text_width)
        self.patch_in = nn.Linear(pixels, widths[0], bias=False)
        # Absolute place (HDiTSpec.absolute_pos) enters once, at the ingress, from zero.
        self.place_in = zero_init(nn.Linear(4 * ABS_FREQS, widths[0], bias=False)) if hs.absolute_pos else None

        def level(lv: int) -> nn.ModuleList:  # one pass through level lv; odd layers shift their windows
            window, cross = None if lv == top else hs.window, lv in hs.cross_attention_levels
            return nn.ModuleList(
                TransformerLayer(widths[lv], hs.head_dim, hs.mapping_width, text_width, window, i % 2 == 1, cross,
                                 hs.qk_norm)
                for i in range(hs.depths[lv])
            )

        self.down = nn.ModuleList(level(lv) for lv in range(top))
        self.middle = level(top)
        self.up = nn.ModuleList(level(lv) for lv in range(top))
        self.merge = nn.ModuleList(nn.Linear(4 * a, b, bias=False) for a, b in zip(widths, widths[1:]))
        self.split = nn.ModuleList(nn.Linear(b, 4 * a, bias=False) for a, b in zip(widths, widths[1:]))
        # The skip merge is a learned per-channel lerp between the skip and the split tokens.
        self.skip_mix = nn.ParameterList(nn.Parameter(torch.full((a,), 0.5)) for a in widths[:-1])
        self.norm_out = nn.RMSNorm(widths[0])
        self.patch_out = zero_init(nn.Linear(widths[0], pixels, bias=False))

    def _run(self, layers: nn.ModuleList, x: torch.Tensor, cond: torch.Tensor, lv: int, text: TextEncoding) -> torch.Tensor:
        angles = rope_angles(x.shape[1], x.shape[2], 2**lv, self.spec.hdit.head_dim, x.device)
        for layer in layers:
            x = layer(x, cond, angles, text)
        return x

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: TextEncoding) -> torch.Tensor:
        p = self.spec.hdit.patch_size
        cond = self.mapping(t, text.pooled)
        h = self.patch_in(merge_patches(x.permute(0, 2, 3, 1), p))
        if self.place_in is not None:
            h = h + self.place_in(place_features(h.shape[1], h.shape[2], h.device)).to(h.dtype)
        skips = []
        for lv, layers in enumerate(self.down):
            h = self._run(layers, h, cond, lv, text)
            skips.append(h)
            h = self.merge[lv](merge_patches(h, 2))
        h = self._run(self.middle, h, cond, len(self.down), text)
        for lv in reversed(range(len(self.up))):
            up = split_patches(self.split[lv](h), 2)
            h = self._run(self.up[lv], skips[lv] + self.skip_mix[lv] * (up - skips[lv]), cond, lv, text)
        return split_patches(self.patch_out(self.norm_out(h)), p).permute(0, 3, 1, 2)
