"""LensNet (DESIGN.md §5): a Perceiver-IO-style dual cross-attention scorer over the working context.

Each stack lets the few *tail gists* (what the model is about to read) cross-attend to the whole
working context, then lets every context entry cross-attend back to those updated tail gists;
nothing is causal and every attention has padding masks. A linear head gives one raw signed score
per entry (no tanh: targets are in nats). A learned *null* latent is always present among the
tail keys, so a snapshot with no tail gist (or no valid entry) still attends to something and never
produces NaN. Ordering follows nanoGPT: leaves first (MLP -> cross-attention block -> config -> model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sim.allocator import mask_illegal
from sim.tree import ConfigError


class MLP(nn.Module):
    def __init__(self, d: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class CrossAttentionBlock(nn.Module):
    """Pre-norm: x = x + Attn(LN(x), LN(ctx)); x = x + MLP(LN(x))."""

    def __init__(self, d: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.ln_q, self.ln_kv, self.ln_mlp = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, n_heads, dropout=dropout, batch_first=True)
        self.mlp = MLP(d, dropout)

    def forward(self, x: Tensor, ctx: Tensor, ctx_pad: Tensor) -> Tensor:
        # x (B, Q, d) queries; ctx (B, K, d) keys/values; ctx_pad (B, K) True = padding (ignored)
        kv = self.ln_kv(ctx)
        x = x + self.attn(self.ln_q(x), kv, kv, key_padding_mask=ctx_pad, need_weights=False)[0]
        return x + self.mlp(self.ln_mlp(x))


@dataclass(frozen=True)
class LensNetConfig:
    """LensNet sizes; defaults are the seed's (DESIGN §5). ``tiny``/``small`` are CPU presets."""

    d_model: int = 1024
    """Width of the node embeddings it reads (the LM's hidden size)."""
    d_lens: int = 512
    """Internal width."""
    n_heads: int = 8
    """Attention heads (must divide d_lens)."""
    n_stacks: int = 2
    """Stacks of [tail <- context] then [context <- tail] cross-attention."""
    dropout: float = 0.1
    """Dropout in attention and MLPs."""
    max_level: int = 2
    """Highest tree level (sizes the level embedding)."""
    block_size: int = 32
    """b, to scale the span-width feature."""

    def __post_init__(self) -> None:
        for name in ("d_model", "d_lens", "n_heads", "n_stacks"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.d_lens % self.n_heads:
            raise ConfigError(f"n_heads ({self.n_heads}) must divide d_lens ({self.d_lens})")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def tiny(cls, d_model: int, **kw) -> LensNetConfig:
        """~0.1M params: tests and quick CPU runs."""
        return cls(d_model=d_model, d_lens=32, n_heads=4, n_stacks=2, dropout=0.0, **kw)

    @classmethod
    def small(cls, d_model: int, **kw) -> LensNetConfig:
        """~0.5M params: CPU training on synthetic traces."""
        return cls(d_model=d_model, d_lens=64, n_heads=4, n_stacks=2, dropout=0.0, **kw)


class LensNet(nn.Module):
    """Scores every working-context entry: positive = expand, negative = collapse cost."""

    def __init__(self, config: LensNetConfig) -> None:
        super().__init__()
        self.config = config
        d = config.d_lens
        self.proj = nn.Linear(config.d_model, d)
        self.level_emb = nn.Embedding(config.max_level + 1, d)
        self.feat = nn.Linear(2, d)  # (log2 span width / log2 b^max_level, log1p distance / 10)
        self.null = nn.Parameter(torch.zeros(1, 1, d))
        self.stacks = nn.ModuleList(
            nn.ModuleList([CrossAttentionBlock(d, config.n_heads, config.dropout),
                           CrossAttentionBlock(d, config.n_heads, config.dropout)])
            for _ in range(config.n_stacks)
        )
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def _check(self, batch: dict[str, Tensor]) -> None:
        emb = batch["embeddings"]
        if emb.dim() != 3 or emb.shape[-1] != self.config.d_model:
            raise ValueError(
                f"embeddings must be (B, N, d_model={self.config.d_model}), got {tuple(emb.shape)}"
            )
        tail = batch["tail_gists"]
        if tail.dim() != 3 or tail.shape[-1] != self.config.d_model:
            raise ValueError(f"tail_gists must be (B, T, d_model={self.config.d_model}), got {tuple(tail.shape)}")
        if batch["levels"].numel() and int(batch["levels"].max()) > self.config.max_level:
            raise ValueError(f"levels exceed max_level={self.config.max_level}")

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """Raw scores (B, N); 0 on padding. Keys: embeddings (B,N,d), levels, span_width,
        distance_to_cursor, valid_mask (B,N); tail_gists (B,T,d), tail_levels, tail_mask (B,T)."""
        self._check(batch)
        cfg = self.config
        valid = batch["valid_mask"].bool()
        levels = batch["levels"].clamp(0, cfg.max_level)
        span = torch.log2(batch["span_width"].float().clamp_min(1)) / max(math.log2(cfg.block_size**cfg.max_level), 1)
        dist = torch.log1p(batch["distance_to_cursor"].float().clamp_min(0)) / 10
        x = self.proj(batch["embeddings"]) + self.level_emb(levels) + self.feat(torch.stack([span, dist], -1))  # (B, N, d)
        tail_mask = batch["tail_mask"].bool()
        tail = self.proj(batch["tail_gists"]) + self.level_emb(batch["tail_levels"].clamp(0, cfg.max_level))  # (B, T, d)
        b = x.shape[0]
        tail = torch.cat([self.null.expand(b, 1, -1), tail], dim=1)  # (B, 1+T, d)
        tail_pad = torch.cat([tail.new_zeros(b, 1, dtype=torch.bool), ~tail_mask], dim=1)
        # An all-padding snapshot would leave the tail with no key (NaN): let it attend to the
        # padding instead; its scores are zeroed below anyway.
        ctx_pad = ~valid & valid.any(-1, keepdim=True)
        for to_tail, to_ctx in self.stacks:
            tail = to_tail(tail, x, ctx_pad)
            x = to_ctx(x, tail, tail_pad)
        scores = self.head(self.ln_f(x)).squeeze(-1)  # (B, N)
        return torch.where(valid, scores, torch.zeros_like(scores))

    @torch.no_grad()
    def score(self, batch: dict[str, Tensor]) -> Tensor:
        """Inference: raw scores with illegal directions hard-masked (the allocator's own mask)."""
        can_expand = batch["expand_cost"] > 0
        can_collapse = batch["collapse_refund"] > 0
        return mask_illegal(self.forward(batch), can_expand, can_collapse)

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
