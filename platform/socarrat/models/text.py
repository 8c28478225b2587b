"""Text encoders: prompts -> token embeddings + pooled vector + mask.

Two kinds behind one interface (`TextEncoder.forward(prompts) -> TextEncoding`):
- `builtin`: open_clip's bundled BPE tokenizer (works offline) and a small transformer tower built
  from a `TextEncoderSpec` and trained together with the denoiser;
- `hf`: any local Hugging Face text model directory (tokenizer + model), frozen.
Nothing here downloads weights. Depends on torch, open_clip's tokenizer and (for `hf`) transformers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from socarrat.config import MAX_CONTEXT, TextEncoderSpec
from socarrat.errors import NotFoundError


@dataclass
class TextEncoding:
    """tokens (B, L, D) float, pooled (B, D) float, mask (B, L) bool (True = real token)."""

    tokens: torch.Tensor
    pooled: torch.Tensor
    mask: torch.Tensor

    def __getitem__(self, index) -> TextEncoding:
        return TextEncoding(self.tokens[index], self.pooled[index], self.mask[index])

    @staticmethod
    def cat(parts: Sequence[TextEncoding]) -> TextEncoding:
        return TextEncoding(*(torch.cat(xs) for xs in zip(*((p.tokens, p.pooled, p.mask) for p in parts))))


class TextEncoder(nn.Module):
    """Base class: `forward(prompts) -> TextEncoding`; `width` is D."""

    width: int

    def forward(self, prompts: Sequence[str]) -> TextEncoding:  # pragma: no cover - interface
        raise NotImplementedError

    def truncated(self, prompts: Sequence[str]) -> list[bool]:  # pragma: no cover - interface
        """Whether each prompt is longer than the context, so that `forward` saw it with its end cut."""
        raise NotImplementedError


class BuiltinTextEncoder(TextEncoder):
    """A small pre-LN transformer over open_clip's BPE tokens, trained with the model.

    The token table is factorised (vocab x embed_dim, then a linear map to width, as in ALBERT):
    open_clip's vocabulary has 49,408 entries, and a full-width table would dominate the size of
    a small bundled checkpoint.
    """

    def __init__(self, spec: TextEncoderSpec):
        super().__init__()
        self.context_length = spec.context_length
        self.width = spec.width
        self.token_embedding = nn.Embedding(len(_bpe().encoder), spec.embed_dim)
        self.token_projection = nn.Linear(spec.embed_dim, spec.width)
        self.positional_embedding = nn.Parameter(torch.randn(spec.context_length, spec.width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            spec.width, spec.heads, 4 * spec.width, dropout=0.0, activation="gelu",
            batch_first=True, norm_first=True,
        )
        self.transformer = nn.TransformerEncoder(layer, spec.layers, enable_nested_tensor=False)
        self.final_norm = nn.LayerNorm(spec.width)

    def token_ids(self, prompts: Sequence[str]) -> torch.Tensor:
        """(B, context_length) long BPE ids, 0-padded, truncated to the context length as open_clip
        does (the end cut, end-of-text kept as the last token)."""
        bpe, n = _bpe(), self.context_length
        ids = torch.zeros(len(prompts), n, dtype=torch.long)
        for row, prompt in zip(ids, prompts):
            tokens = [bpe.sot_token_id, *_bpe_tokens(prompt)[:n - 2], bpe.eot_token_id]
            row[:len(tokens)] = torch.tensor(tokens)
        return ids

    def truncated(self, prompts: Sequence[str]) -> list[bool]:
        return [len(_bpe_tokens(p)) + 2 > self.context_length for p in prompts]

    def forward(self, prompts: Sequence[str]) -> TextEncoding:
        device = self.positional_embedding.device
        ids = self.token_ids(prompts).to(device, non_blocking=True)  # a blocking copy would drain the GPU queue
        # The tokens run to end-of-text: padding is id 0, but so is "!" inside a word ("car!🔥").
        eot = (ids == _bpe().eot_token_id).int().argmax(1)
        mask = torch.arange(ids.shape[1], device=device) <= eot[:, None]
        x = self.token_projection(self.token_embedding(ids)) + self.positional_embedding
        x = self.final_norm(self.transformer(x, src_key_padding_mask=~mask))
        # Pool at the end-of-text token, as CLIP does: the last real token sees the whole prompt.
        pooled = x[torch.arange(len(ids), device=device), eot]
        return TextEncoding(x, pooled, mask)


@functools.cache
def _bpe():
    """open_clip's bundled BPE tokenizer (works offline)."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()  # its context length is not used: token_ids pads and cuts


# BPE is slow Python (~20 us a prompt: 5 ms of a GPU training step at batch 256) and prompts repeat
# (training captions, popular requests). Sized for a training set's distinct captions (the shapes
# set has ~30k); bounded (~30 MB at most), so that a server that sees endless new prompts keeps a fixed size.
@functools.lru_cache(maxsize=65536)
def _bpe_tokens(prompt: str) -> tuple[int, ...]:
    """The prompt's BPE ids (no start/end-of-text), at most the longest context's worth and one more:
    enough to fill any context (`TextEncoderSpec.context_length` <= MAX_CONTEXT) and to tell whether it was cut."""
    return tuple(_bpe().encode(prompt)[:MAX_CONTEXT - 1])


class HFTextEncoder(TextEncoder):
    """A frozen local Hugging Face text model (e.g. a CLIPTextModel directory)."""

    def __init__(self, spec: TextEncoderSpec):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        path = Path(spec.path or "")
        if not path.is_dir():
            raise NotFoundError(f"text encoder directory not found: {path}")
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).requires_grad_(False)
        self.width = self.model.config.hidden_size
        self.context_length = min(spec.context_length, self.tokenizer.model_max_length)

    def train(self, mode: bool = True) -> "HFTextEncoder":
        """The frozen model stays in eval mode (its dropout off) while the denoiser trains."""
        super().train(mode)
        self.model.eval()
        return self

    def truncated(self, prompts: Sequence[str]) -> list[bool]:
        return hf_truncated(self.tokenizer, prompts, self.context_length)

    def forward(self, prompts: Sequence[str]) -> TextEncoding:
        device = next(self.model.parameters()).device
        batch = self.tokenizer(
            list(prompts), padding="max_length", truncation=True,
            max_length=self.context_length, return_tensors="pt",
        ).to(device)
        out = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        mask = batch.attention_mask.bool()
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            pooled = (out.last_hidden_state * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return TextEncoding(out.last_hidden_state, pooled, mask)


def hf_truncated(tokenizer, prompts: Sequence[str], max_length: int) -> list[bool]:
    """Whether a Hugging Face tokenizer cuts each prompt at `max_length` tokens (special tokens
    counted): tokenized to one token more, so that a long prompt costs no more than a short one."""
    ids = tokenizer(list(prompts), truncation=True, max_length=max_length + 1).input_ids
    return [len(row) > max_length for row in ids]


def build_text_encoder(spec: TextEncoderSpec) -> TextEncoder:
    """The encoder a `TextEncoderSpec` describes (random init for `builtin`)."""
    return BuiltinTextEncoder(spec) if spec.kind == "builtin" else HFTextEncoder(spec)
