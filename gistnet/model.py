"""GistNet: the b children of a tree node -> one vector in the frozen LM's input-embedding space.

Children are token embeddings (an L1 gist) or L1 gists (an L2 gist). For L1, GistNet reads the
frozen LM's own hidden states of the block (its first ``lm_layer`` layers run over the block alone):
unlike input embeddings they are contextual, so "what this block says" is already half-digested.
A bidirectional self-attention encoder over the children (with in-block position and level
embeddings; never causal, never CLS pooling) is read out by a learned-query attention pool and an
MLP. The output is built on a *benign centred selection* of the children (DESIGN §7):

    gist = m + s * (c / rms(c) + delta),   c = sum_i alpha_i (child_i - m)

where ``m`` is the mean embedding of *running text* (measured on the training text) and ``s`` the
RMS deviation of text tokens from it. ``alpha`` are the pooling attention's weights over the
children: uniform at initialisation (the query starts at zero), so an untrained GistNet (``delta``
= 0: the last layer starts at zero) gives the centred block mean re-scaled to the typical token
distance; with ``alpha`` on one child, the gist is that child's own embedding up to its length.
Anchoring on ``m`` rather than the vocabulary mean keeps a selected token recognisable (the
figures are in ``benchmarks/results/gistnet.json`` and docs/gistnet.md). There is no output
normalisation (an output
LayerNorm made collapse to one vector easy). One network serves every level (a level embedding tells
them apart).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from megacontext.tree import ConfigError


@dataclass(frozen=True)
class GistNetConfig:
    """GistNet sizes (defaults: 1.16M parameters at d_model 576)."""

    d_model: int = 576
    """Width of the LM's input embeddings (GistNet's input and output)."""
    d: int = 192
    """Internal width."""
    n_layers: int = 2
    """Bidirectional self-attention layers over the children."""
    n_heads: int = 4
    """Attention heads (must divide d)."""
    block_size: int = 32
    """b: children per node."""
    max_level: int = 2
    """Highest gist level (sizes the level embedding)."""
    lm_layer: int = 6
    """L1 input: hidden states after this many LM layers over the block alone (0: raw token
    embeddings)."""
    dropout: float = 0.0
    """Dropout inside the encoder."""

    def __post_init__(self) -> None:
        for name in ("d_model", "d", "n_layers", "n_heads", "block_size", "max_level"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.d % self.n_heads:
            raise ConfigError(f"n_heads ({self.n_heads}) must divide d ({self.d})")
        if self.lm_layer < 0:
            raise ConfigError(f"lm_layer must be >= 0, got {self.lm_layer}")

    def to_dict(self) -> dict:
        return asdict(self)


class GistNet(nn.Module):
    """``forward(features, children, level)``: features (n, b, d_model) what the encoder reads (LM
    hidden states for L1, the children themselves for L2); children (n, b, d_model) the child
    embeddings (token embeddings / L1 gists) for the centred-mean base. Returns (n, d_model)."""

    def __init__(
        self, config: GistNetConfig, centre: Tensor | None = None, sigma: float = 1.0
    ) -> None:
        super().__init__()
        self.config = c = config
        centre = (
            torch.zeros(c.d_model) if centre is None else centre.detach().float().reshape(c.d_model)
        )
        self.register_buffer("centre", centre.clone())
        self.register_buffer("sigma", torch.tensor(float(sigma)))
        self.in_norm = nn.LayerNorm(c.d_model)
        self.in_proj = nn.Linear(c.d_model, c.d)
        self.pos = nn.Embedding(c.block_size, c.d)
        self.level = nn.Embedding(c.max_level + 1, c.d)
        layer = nn.TransformerEncoderLayer(
            c.d, c.n_heads, 2 * c.d, c.dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, c.n_layers, enable_nested_tensor=False)
        self.query = nn.Parameter(
            torch.zeros(1, 1, c.d)
        )  # uniform pooling weights at initialisation
        self.pool = nn.MultiheadAttention(c.d, c.n_heads, batch_first=True)
        self.out = nn.Sequential(
            nn.LayerNorm(c.d), nn.Linear(c.d, 2 * c.d), nn.GELU(), nn.Linear(2 * c.d, c.d_model)
        )
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    @classmethod
    def for_lm(cls, config: GistNetConfig, text_embeddings: Tensor) -> GistNet:
        """A GistNet whose output statistics match running text: ``text_embeddings`` (n, d_model)
        are
        the LM's input embeddings of a stretch of training text."""
        text = text_embeddings.detach().float()
        centre = text.mean(0)
        return cls(config, centre, float((text - centre).pow(2).mean().sqrt()))

    def centred_base(self, children: Tensor, weights: Tensor | None = None) -> Tensor:
        """c / rms(c) with c = sum_i w_i (child_i - centre) (uniform w: the centred mean)."""
        centred = children.float() - self.centre
        c = centred.mean(1) if weights is None else torch.einsum("nb,nbd->nd", weights, centred)
        return c / c.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-6)

    def forward(self, features: Tensor, children: Tensor, level: int) -> Tensor:
        cfg = self.config
        if features.dim() != 3 or features.shape[1:] != (cfg.block_size, cfg.d_model):
            raise ValueError(
                f"features must be (n, b={cfg.block_size}, d_model={cfg.d_model}), got "
                f"{tuple(features.shape)}"
            )
        if children.shape != features.shape:
            raise ValueError(
                f"children {tuple(children.shape)} must match features {tuple(features.shape)}"
            )
        if not 1 <= level <= cfg.max_level:
            raise ValueError(f"level must be in 1..{cfg.max_level}, got {level}")
        x = (
            self.in_proj(self.in_norm(features.float()))
            + self.pos.weight
            + self.level.weight[level]
        )
        x = self.encoder(x)
        pooled, alpha = self.pool(self.query.expand(x.shape[0], -1, -1), x, x, need_weights=True)
        delta = self.out(pooled[:, 0])
        return self.centre + self.sigma * (self.centred_base(children, alpha[:, 0]) + delta)

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


class SoftPrompt(nn.Module):
    """Content control: free vectors that ignore the text, one per gist slot of a context
    (``forward(n_slots)`` -> (n_slots, d_model)); initialised like GistNet's untrained output."""

    def __init__(self, n_slots: int, centre: Tensor, sigma: float, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        d = centre.numel()
        self.vectors = nn.Parameter(centre.float() + sigma * torch.randn(n_slots, d, generator=g))

    def forward(self, n_slots: int) -> Tensor:
        if n_slots > self.vectors.shape[0]:
            raise ValueError(
                f"at most {self.vectors.shape[0]} soft-prompt slots, asked for {n_slots}"
            )
        return self.vectors[:n_slots]
