"""GistNet behind the tree's one gister interface, the frozen LM's block features, and checkpoints.

``GistNetGister(gistnet, lm)`` is a ``Gister``: ``(children [n, b, d], level) -> [n, d]``, so the
tree, labeller, environment and CLI use learned gists exactly as they use mean pooling.
``load_gistnet()`` reads the committed default checkpoint (``gistnet/checkpoints/``: safetensors
weights + a JSON card with the command, seed, steps, data split, validation metrics and the LM it
was trained on). ``resolve_gister`` picks the gister of a run and never falls back silently: 'auto'
uses means only when no checkpoint fits the LM (with a warning, and a name saying so that callers
record); an unreadable checkpoint is an error.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from gistnet.model import GistNet, GistNetConfig

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"
DEFAULT_CHECKPOINT = CHECKPOINT_DIR / "gistnet-smollm2.safetensors"


class GistNetCheckpointError(RuntimeError):
    """A GistNet checkpoint is missing, unreadable, or does not fit the LM it is used with."""


class GistNetMisfitError(GistNetCheckpointError):
    """A readable GistNet checkpoint made for another LM width, architecture or block size."""


class GistNetFallbackWarning(UserWarning):
    """``resolve_gister('auto')`` found no checkpoint that fits the LM and uses mean pooling."""


class LMPrefix:
    """The first ``k`` decoder layers of a frozen HF causal LM, run over each block alone (positions
    0..b-1, causal, no surrounding context): contextual per-token features of the block.

    Implemented by running the decoder with its layer list (and ``num_hidden_layers``) cut to ``k``
    for the call, restored afterwards; the result is the decoder's final RMSNorm of layer ``k``.
    ``autocast``: run it under bf16 autocast (training on CUDA)."""

    def __init__(self, lm, k: int, autocast: bool = False) -> None:
        self.decoder = lm.base_model
        self.k = k
        self.autocast = autocast
        self.dtype = next(lm.parameters()).dtype
        self.device = next(lm.parameters()).device
        n_layers = len(self.decoder.layers)
        if not 1 <= k <= n_layers:
            raise ValueError(f"lm_layer must be in 1..{n_layers}, got {k}")

    def __call__(self, embeds: torch.Tensor) -> torch.Tensor:
        """(n, b, d) input embeddings -> (n, b, d) float32 features (no gradient: the LM is frozen).
        """
        dec = self.decoder
        full_layers, full_n = dec.layers, dec.config.num_hidden_layers
        n, b, _ = embeds.shape
        pos = torch.arange(b, device=self.device)[None].expand(n, -1)
        mask = torch.ones(n, b, dtype=torch.long, device=self.device)
        try:
            dec.layers = torch.nn.ModuleList(list(full_layers)[: self.k])
            dec.config.num_hidden_layers = self.k
            with (
                torch.no_grad(),
                torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast),
            ):
                out = dec(
                    inputs_embeds=embeds.to(self.device, self.dtype),
                    position_ids=pos,
                    attention_mask=mask,
                    use_cache=False,
                )
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
            raise ValueError(
                f"GistNet expects children (n, {cfg.block_size}, {cfg.d_model}), got "
                f"{children.shape}"
            )
        out = []
        for s in range(0, children.shape[0], self.batch_size):
            x = torch.as_tensor(
                children[s : s + self.batch_size], dtype=torch.float32, device=self.device
            )
            feats = self.prefix(x) if (level == 1 and self.prefix is not None) else x
            out.append(self.gistnet(feats, x, level).cpu().numpy())
        return (
            np.concatenate(out).astype(children.dtype, copy=False)
            if out
            else np.zeros((0, cfg.d_model), children.dtype)
        )


def save_gistnet(model: GistNet, path: str | Path, card: dict) -> Path:
    """Weights as safetensors + ``<stem>.json`` card (config, and whatever ``card`` says)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={"config": json.dumps(model.config.to_dict())})
    path.with_suffix(".json").write_text(
        json.dumps({"config": model.config.to_dict(), **card}, indent=1) + "\n"
    )
    return path


def load_gistnet(path: str | Path | None = None, device: str | torch.device = "cpu") -> GistNet:
    """A GistNet from ``path`` (default: the committed checkpoint), in eval mode."""
    path = Path(path) if path is not None else DEFAULT_CHECKPOINT
    if not path.exists():
        raise GistNetCheckpointError(
            f"{path}: no GistNet checkpoint (train one: python -m gistnet.train, see the README)"
        )
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            config = GistNetConfig(**json.loads(f.metadata()["config"]))
        state = load_file(str(path))
    except Exception as err:
        raise GistNetCheckpointError(
            f"{path}: unreadable GistNet checkpoint ({type(err).__name__}: {err})"
        ) from err
    model = GistNet(config)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise GistNetCheckpointError(f"{path}: weights do not fit the config ({err})") from err
    return model.to(device).eval()


def read_card(path: str | Path) -> dict:
    """The JSON card beside a checkpoint (``{}`` if there is none); an unreadable card is an error.
    """
    card = Path(path).with_suffix(".json")
    if not card.exists():
        return {}
    try:
        out = json.loads(card.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise GistNetCheckpointError(
            f"{card}: unreadable GistNet card ({type(err).__name__}: {err})"
        ) from err
    if not isinstance(out, dict):
        raise GistNetCheckpointError(f"{card}: a GistNet card must be a JSON object")
    return out


def lm_fingerprint(lm) -> dict:
    """What a checkpoint must match to fit an LM: its architecture, width, depth and vocabulary."""
    c = lm.config
    return {
        "model_type": getattr(c, "model_type", None),
        "hidden_size": int(c.hidden_size),
        "num_hidden_layers": int(c.num_hidden_layers),
        "vocab_size": int(c.vocab_size),
    }


def misfit(model: GistNet, card: dict, lm, block_size: int) -> str | None:
    """Why a loaded checkpoint does not fit ``lm`` and the tree's ``b`` (None when it fits). Cards
    written since the LM fingerprint was recorded are also matched against the LM's architecture."""
    d = int(lm.config.hidden_size)
    if (model.config.d_model, model.config.block_size) != (d, block_size):
        return f"checkpoint is for d_model={model.config.d_model}, b={model.config.block_size}"
    want = card.get("lm_fingerprint")
    have = lm_fingerprint(lm)
    if want is not None and want != have:
        return f"checkpoint was trained on an LM with {want}, this one has {have}"
    if model.config.lm_layer > have["num_hidden_layers"]:
        n_layers = have["num_hidden_layers"]
        return f"checkpoint reads LM layer {model.config.lm_layer}; this LM has {n_layers} layers"
    return None


def gistnet_gister_for(lm, block_size: int, path: str | Path | None = None) -> GistNetGister:
    """The default GistNet gister for ``lm``; refuses a checkpoint made for another LM or b."""
    path = Path(path) if path is not None else DEFAULT_CHECKPOINT
    model = load_gistnet(path, next(lm.parameters()).device)
    why = misfit(model, read_card(path), lm, block_size)
    if why is not None:
        raise GistNetMisfitError(
            f"{path}: {why}; this LM/tree is {lm_label(lm, block_size)} (use gister='mean' "
            "or train a GistNet for it)"
        )
    return GistNetGister(model, lm)


def lm_label(lm, block_size: int) -> str:
    """A short name of the LM and b for messages: '<name or class> d_model=<d> b=<b>'."""
    name = getattr(lm.config, "_name_or_path", "") or type(lm).__name__
    return f"{Path(str(name)).name or name} d_model={int(lm.config.hidden_size)} b={block_size}"


def resolve_gister(kind: str, lm, block_size: int, path: str | Path | None = None):
    """(gister, name) for the LM world.

    * 'gistnet': the committed checkpoint (``path`` overrides it); any problem is an error.
    * 'mean': the mean-pooling baseline. A name this function returned earlier that starts with
      'mean' (callers record the name and may pass it on) means the same.
    * 'auto': GistNet when the checkpoint fits the LM and b. Means only when it does not fit or
      there is no checkpoint file, and never silently: a ``GistNetFallbackWarning`` and the name
      'mean (no GistNet checkpoint fits <LM> d_model=<d> b=<b>: <why>)', which callers put in their
      results. An unreadable or corrupt checkpoint (or card) raises ``GistNetCheckpointError``.
    """
    from megacontext.tree import mean_gister

    if kind.startswith("mean"):
        return mean_gister, kind
    if kind not in ("auto", "gistnet"):
        raise ValueError(f"gister must be 'auto', 'gistnet' or 'mean', got {kind!r}")
    path = Path(path) if path is not None else DEFAULT_CHECKPOINT
    if kind == "gistnet":
        return gistnet_gister_for(lm, block_size, path), "gistnet"
    if not path.exists():
        why = "no checkpoint file"
    else:
        model = load_gistnet(
            path, next(lm.parameters()).device
        )  # unreadable: GistNetCheckpointError
        why = misfit(model, read_card(path), lm, block_size)
        if why is None:
            return GistNetGister(model, lm), "gistnet"
    name = f"mean (no GistNet checkpoint fits {lm_label(lm, block_size)}: {why})"
    warnings.warn(
        f"gister='auto' uses mean pooling, not GistNet ({path}): {name}",
        GistNetFallbackWarning,
        stacklevel=2,
    )
    return mean_gister, name
