"""GistNet behind the tree's one gister interface, the frozen LM's block features, and checkpoints.

``GistNetGister(gistnet, lm)`` is a ``Gister``: ``(children [n, b, d], level) -> [n, d]``, so the
tree, labeller, environment and CLI use learned gists exactly as they use mean pooling.
``load_gistnet()`` reads the committed default checkpoint (``gistnet/checkpoints/``: safetensors
weights + a JSON card with the command, seed, steps, data split and held-out metrics).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from gistnet.model import GistNet, GistNetConfig

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"
DEFAULT_CHECKPOINT = CHECKPOINT_DIR / "gistnet-smollm2.safetensors"


class GistNetCheckpointError(RuntimeError):
    """A GistNet checkpoint is missing, unreadable, or does not fit the LM it is used with."""


class LMPrefix:
    """The first ``k`` decoder layers of a frozen HF causal LM, run over each block alone (positions
    0..b-1, causal, no surrounding context): contextual per-token features of the block.

    Implemented by running the decoder with its layer list (and ``num_hidden_layers``) cut to ``k``
    for the call, restored afterwards; the result is the decoder's final RMSNorm of layer ``k``."""

    def __init__(self, lm, k: int) -> None:
        self.decoder = lm.base_model
        self.k = k
        self.dtype = next(lm.parameters()).dtype
        self.device = next(lm.parameters()).device
        n_layers = len(self.decoder.layers)
        if not 1 <= k <= n_layers:
            raise ValueError(f"lm_layer must be in 1..{n_layers}, got {k}")

    def __call__(self, embeds: torch.Tensor) -> torch.Tensor:
        """(n, b, d) input embeddings -> (n, b, d) float32 features (no gradient: the LM is frozen)."""
        dec = self.decoder
        full_layers, full_n = dec.layers, dec.config.num_hidden_layers
        n, b, _ = embeds.shape
        pos = torch.arange(b, device=self.device)[None].expand(n, -1)
        mask = torch.ones(n, b, dtype=torch.long, device=self.device)
        try:
            dec.layers = torch.nn.ModuleList(list(full_layers)[: self.k])
            dec.config.num_hidden_layers = self.k
            with torch.no_grad():
                out = dec(inputs_embeds=embeds.to(self.device, self.dtype), position_ids=pos, attention_mask=mask,
                          use_cache=False)
        finally:
            dec.layers, dec.config.num_hidden_layers = full_layers, full_n
        return out.last_hidden_state.float()


class GistNetGister:
    """A tree ``Gister`` backed by GistNet (L1 reads the LM's block features, L2 the L1 gists)."""

    def __init__(self, gistnet: GistNet, lm=None, batch_size: int = 64) -> None:
        self.gistnet = gistnet.eval()
        cfg = gistnet.config
        if cfg.lm_layer > 0 and lm is None:
            raise ValueError("this GistNet reads LM features (lm_layer > 0): pass the LM")
        self.prefix = LMPrefix(lm, cfg.lm_layer) if cfg.lm_layer > 0 else None
        self.device = next(gistnet.parameters()).device
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, children: np.ndarray, level: int) -> np.ndarray:
        cfg = self.gistnet.config
        if children.ndim != 3 or children.shape[1:] != (cfg.block_size, cfg.d_model):
            raise ValueError(f"GistNet expects children (n, {cfg.block_size}, {cfg.d_model}), got {children.shape}")
        out = []
        for s in range(0, children.shape[0], self.batch_size):
            x = torch.as_tensor(children[s : s + self.batch_size], dtype=torch.float32, device=self.device)
            feats = self.prefix(x) if (level == 1 and self.prefix is not None) else x
            out.append(self.gistnet(feats, x, level).cpu().numpy())
        return np.concatenate(out).astype(children.dtype, copy=False) if out else np.zeros((0, cfg.d_model), children.dtype)


def save_gistnet(model: GistNet, path: str | Path, card: dict) -> Path:
    """Weights as safetensors + ``<stem>.json`` card (config, and whatever ``card`` says)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={"config": json.dumps(model.config.to_dict())})
    path.with_suffix(".json").write_text(json.dumps({"config": model.config.to_dict(), **card}, indent=1) + "\n")
    return path


def load_gistnet(path: str | Path | None = None, device: str | torch.device = "cpu") -> GistNet:
    """A GistNet from ``path`` (default: the committed checkpoint), in eval mode."""
    path = Path(path) if path is not None else DEFAULT_CHECKPOINT
    if not path.exists():
        raise GistNetCheckpointError(
            f"{path}: no GistNet checkpoint (train one: python -m gistnet.train, see the README)")
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            config = GistNetConfig(**json.loads(f.metadata()["config"]))
        state = load_file(str(path))
    except Exception as err:
        raise GistNetCheckpointError(f"{path}: unreadable GistNet checkpoint ({type(err).__name__}: {err})") from err
    model = GistNet(config)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise GistNetCheckpointError(f"{path}: weights do not fit the config ({err})") from err
    return model.to(device).eval()


def gistnet_gister_for(lm, block_size: int, path: str | Path | None = None) -> GistNetGister:
    """The default GistNet gister for ``lm``; refuses a checkpoint made for another width or b."""
    model = load_gistnet(path, next(lm.parameters()).device)
    d = int(lm.config.hidden_size)
    if (model.config.d_model, model.config.block_size) != (d, block_size):
        raise GistNetCheckpointError(
            f"GistNet checkpoint is for d_model={model.config.d_model}, b={model.config.block_size}; this LM/tree "
            f"has d_model={d}, b={block_size} (use gister='mean' or train a GistNet for it)")
    return GistNetGister(model, lm)


def resolve_gister(kind: str, lm, block_size: int):
    """(gister, name) for the LM world: 'gistnet' (the committed checkpoint; errors if it does not
    fit), 'mean' (baseline), or 'auto' (GistNet when its checkpoint fits the LM and b, else mean)."""
    from sim.tree import mean_gister

    if kind not in ("auto", "gistnet", "mean"):
        raise ValueError(f"gister must be 'auto', 'gistnet' or 'mean', got {kind!r}")
    if kind == "mean":
        return mean_gister, "mean"
    try:
        return gistnet_gister_for(lm, block_size), "gistnet"
    except GistNetCheckpointError:
        if kind == "gistnet":
            raise
        return mean_gister, "mean"
