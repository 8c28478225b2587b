"""A small VQ tokenizer: images (B, 3, H, W) in [-1, 1] <-> tokens (B, H/f, W/f) long.

Convolutional encoder and decoder around a codebook of `TokenSpec.codebook_size` entries, looked up
by cosine similarity (codes and encoder outputs are l2-normalised, as in ViT-VQGAN, Yu et al. 2022,
which keeps most codes in use without a separate codebook-learning schedule). Codes that go unused
are restarted on encoder outputs from the current batch. Trained with reconstruction + codebook +
commitment losses (van den Oord et al. 2017); on flat-coloured shapes a perceptual or adversarial
term does not pay for itself. Depends on torch and the spec only.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from socarrat.config import TokenSpec
from socarrat.models.unet import group_norm


class _Res(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(group_norm(channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
                                  group_norm(channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class VQ(nn.Module):
    """encode(images) -> tokens, decode(tokens) -> images, loss(images) -> (loss, stats)."""

    def __init__(self, spec: TokenSpec, beta: float = 0.25, restart_after: int = 50):
        super().__init__()
        self.spec, self.beta, self.restart_after = spec, beta, restart_after
        ch = spec.vq_channels
        enc: list[nn.Module] = [nn.Conv2d(3, ch[0], 3, padding=1)]
        for cin, cout in zip(ch, ch[1:] + ch[-1:]):
            enc += [_Res(cin), nn.Conv2d(cin, cout, 4, stride=2, padding=1)]
        self.encoder = nn.Sequential(*enc, _Res(ch[-1]), group_norm(ch[-1]), nn.SiLU(), nn.Conv2d(ch[-1], spec.code_dim, 1))
        dec: list[nn.Module] = [nn.Conv2d(spec.code_dim, ch[-1], 3, padding=1), _Res(ch[-1])]
        for cin, cout in zip(ch[::-1], ch[::-1][1:] + ch[:1]):
            dec += [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(cin, cout, 3, padding=1), _Res(cout)]
        self.decoder = nn.Sequential(*dec, group_norm(ch[0]), nn.SiLU(), nn.Conv2d(ch[0], 3, 3, padding=1))
        self.codebook = nn.Parameter(F.normalize(torch.randn(spec.codebook_size, spec.code_dim), dim=1))
        self.register_buffer("idle_steps", torch.zeros(spec.codebook_size, dtype=torch.long), persistent=False)

    def _latents(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> unit-norm encoder outputs (B, h, w, D)."""
        return F.normalize(self.encoder(images).permute(0, 2, 3, 1).float(), dim=-1)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) float in [-1, 1] -> tokens (B, H/f, W/f) long."""
        return self._nearest(self._latents(images), F.normalize(self.codebook, dim=1))

    @staticmethod
    def _nearest(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        """Index of the most similar unit code for each unit latent (B, h, w, D), in float32 even under
        autocast (bf16 similarities pick a code that is not the nearest for ~2% of the tokens)."""
        with torch.autocast(z.device.type, enabled=False):
            return (z.float() @ codebook.float().T).argmax(-1)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens (B, h, w) long -> images (B, 3, h*f, w*f) float, about [-1, 1]."""
        codes = F.normalize(self.codebook, dim=1)[tokens].permute(0, 3, 1, 2)
        return self.decoder(codes.to(self.decoder[0].weight.dtype))

    def loss(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Reconstruction + codebook + beta * commitment loss of a training batch (B, 3, H, W), and the
        reconstruction loss alone (detached: a training step reads nothing back from the device)."""
        z = self._latents(images)
        if self.training:  # before the lookup: the codebook must not change between forward and backward
            self._restart_idle_codes(z.detach())
        codebook = F.normalize(self.codebook, dim=1)
        tokens = self._nearest(z, codebook)
        q = codebook[tokens]
        codebook_loss = F.mse_loss(q, z.detach())
        commitment = F.mse_loss(z, q.detach())
        q = z + (q - z).detach()  # straight-through gradient to the encoder
        recon = F.mse_loss(self.decoder(q.permute(0, 3, 1, 2).to(images.dtype)).float(), images.float())
        if self.training:
            with torch.no_grad():
                self.idle_steps.add_(1).index_fill_(0, tokens.flatten(), 0)
        return recon + codebook_loss + self.beta * commitment, {"recon": recon.detach()}

    @torch.no_grad()
    def _restart_idle_codes(self, z: torch.Tensor) -> None:
        """Codes unused for `restart_after` batches move onto random encoder outputs z (B, h, w, D).
        Masked, not indexed by the idle codes' positions: finding them would wait for the device."""
        idle = (self.idle_steps >= self.restart_after)[:, None]
        flat = z.reshape(-1, z.shape[-1])
        candidates = flat[torch.randint(len(flat), (len(self.codebook),), device=flat.device)]
        self.codebook.copy_(torch.where(idle, candidates.to(self.codebook.dtype), self.codebook))
        self.idle_steps.masked_fill_(idle[:, 0], 0)
        if dist.is_initialized():  # DDP ranks restart on different batches: keep rank 0's codebook
            dist.broadcast(self.codebook.data, 0)
