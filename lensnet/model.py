"""LensNet (DESIGN.md §5): a Perceiver-IO-style dual cross-attention scorer over the working context.

Each stack lets the few *tail gists* (what the model is about to read) cross-attend to the whole
working context, then lets every context entry cross-attend back to those updated tail gists;
nothing is causal and every attention has padding masks. A linear head gives one raw signed score
per entry (no tanh: targets are in nats). A learned *null* latent is always present among the
tail keys, so a snapshot with no tail gist (or no valid entry) still attends to something and never
produces NaN. Two inputs beyond DESIGN §5's list: each entry also sees the mean of its sibling group
(a collapse cost belongs to the whole group, which a per-entry model cannot otherwise know since
context entries never attend to each other), and tail gists carry a slot embedding (which one is
newest). Ordering follows nanoGPT: leaves first (MLP -> cross-attention block -> config -> model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sim.allocator import mask_illegal
from sim.tree import ConfigError

MAX_TAIL = 64


def group_mean(x: Tensor, group_id: Tensor) -> Tensor:
    """(B, N, d) mean of ``x`` over each entry's sibling group (same id within a snapshot); 0 where
    ``group_id`` < 0. One scatter-add over all snapshots, no loop."""
    b, n, d = x.shape
    valid = group_id >= 0
    key = torch.where(valid, group_id + n * torch.arange(b, device=x.device)[:, None], b * n).reshape(-1)  # (B*N,)
    sums = x.new_zeros(b * n + 1, d).index_add_(0, key, x.reshape(-1, d))
    counts = x.new_zeros(b * n + 1).index_add_(0, key, x.new_ones(b * n))
    mean = (sums / counts.clamp_min(1)[:, None])[key].reshape(b, n, d)
    return torch.where(valid[..., None], mean, torch.zeros_like(mean))


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
        """~0.8M params (d_model 128): CPU training on synthetic traces. Two wide heads: a match
        between a context key and a tail cue is a bilinear form that narrow heads only see in part."""
        return cls(d_model=d_model, d_lens=128, n_heads=2, n_stacks=2, dropout=0.0, **kw)


class LensNet(nn.Module):
    """Scores every working-context entry: positive = expand, negative = collapse cost."""

    def __init__(self, config: LensNetConfig) -> None:
        super().__init__()
        self.config = config
        d = config.d_lens
        self.proj = nn.Linear(config.d_model, d)
        self.level_emb = nn.Embedding(config.max_level + 1, d)
        self.feat = nn.Linear(2, d)  # (log2 span width / log2 b^max_level, log1p distance / 10)
        self.group_proj = nn.Linear(d, d)  # what the entry's sibling group holds (collapse costs are per group)
        self.tail_slot = nn.Embedding(MAX_TAIL, d)  # which tail slot (top level first, newest L1 last)
        self.null = nn.Parameter(torch.zeros(1, 1, d))
        self.stacks = nn.ModuleList(
            nn.ModuleList([CrossAttentionBlock(d, config.n_heads, config.dropout),
                           CrossAttentionBlock(d, config.n_heads, config.dropout)])
            for _ in range(config.n_stacks)
        )
        # Direct match features: one bilinear score per (entry, tail slot), fed to the head. The same
        # quantity as an attention logit, but without the softmax in the way its gradient is direct,
        # which is what lets a "this entry is what the tail is about to need" match be learnt fast.
        # Matched twice: the entry's own embedding, and its sibling group's mean embedding (for tokens,
        # the group mean is their block's clean content; a single token is noisy).
        self.match_q = nn.Linear(config.d_model, d, bias=False)
        self.match_qg = nn.Linear(config.d_model, d, bias=False)
        self.match_k = nn.Linear(config.d_model, d, bias=False)
        # one read-out per level: a needed block is worth +gain as a gist but -cost as tokens
        self.match_out = nn.Linear(2 * (MAX_TAIL + 1), d * (config.max_level + 1))
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
        if "group_id" in batch:
            x = x + self.group_proj(group_mean(x, batch["group_id"]))
        tail_mask = batch["tail_mask"].bool()
        n_tail = batch["tail_gists"].shape[1]
        if n_tail > MAX_TAIL:
            raise ValueError(f"at most {MAX_TAIL} tail gists, got {n_tail}")
        tail = (self.proj(batch["tail_gists"]) + self.level_emb(batch["tail_levels"].clamp(0, cfg.max_level))
                + self.tail_slot.weight[:n_tail])  # (B, T, d)
        b = x.shape[0]
        tail = torch.cat([self.null.expand(b, 1, -1), tail], dim=1)  # (B, 1+T, d)
        tail_pad = torch.cat([tail.new_zeros(b, 1, dtype=torch.bool), ~tail_mask], dim=1)
        # An all-padding snapshot would leave the tail with no key (NaN): let it attend to the
        # padding instead; its scores are zeroed below anyway.
        ctx_pad = ~valid & valid.any(-1, keepdim=True)
        # match features enter before the stacks, read out per level
        emb = batch["embeddings"]
        keys = self.match_k(batch["tail_gists"])  # (B, T, d)
        own = torch.einsum("bnd,btd->bnt", self.match_q(emb), keys)
        grp = emb if "group_id" not in batch else torch.where(
            (batch["group_id"] >= 0)[..., None], group_mean(emb, batch["group_id"]), emb)
        group = torch.einsum("bnd,btd->bnt", self.match_qg(grp), keys)
        match = torch.stack([own, group], -1)  # (B, N, T, 2)
        match = torch.where(tail_mask[:, None, :, None], match, torch.zeros_like(match)) / math.sqrt(self.config.d_lens)
        match = torch.nn.functional.pad(match, (0, 0, 0, MAX_TAIL + 1 - n_tail)).flatten(2)  # slot-aligned
        per_level = self.match_out(match).unflatten(-1, (cfg.max_level + 1, -1))  # (B, N, L, d)
        x = x + torch.gather(per_level, 2, levels[..., None, None].expand(-1, -1, 1, per_level.shape[-1])).squeeze(2)
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
