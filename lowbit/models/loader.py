"""Turn whatever the user names (default model, HF dir, .gguf file, hub id) into a model directory,
and build fp models from it. Loading any checkpoint, quantized ones included, is
lowbit/quant/loader.py's `load_model` (quantized formats sit above the models)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelLoadError
from .config import ModelConfig
from .tokenizer import fast_tokenizer_or_none
from .transformer import CausalLM

DEFAULT_ALIASES = ("smollm2-135m", "default")


@dataclass
class LoadedModel:
    model: CausalLM
    tokenizer: Any
    config: ModelConfig
    path: Path
    quantization: dict[str, Any] | None = None  # the checkpoint's quantization_config, if any
    shard: Any = None  # the tensor-parallel ShardPlan this rank's model was cut to (None: whole model)


def resolve_model_dir(spec: str | os.PathLike | None) -> Path:
    """Default alias -> cached default model; *.gguf -> imported HF dir; dir -> itself; org/name -> hub."""
    if spec is None or str(spec) in DEFAULT_ALIASES:
        from .default import ensure_default_model

        return ensure_default_model()
    p = Path(spec).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return _imported_gguf_dir(p)
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ModelLoadError(f"{p}: directory has no config.json (expected a Hugging Face model directory)")
        return p
    if p.exists():
        raise ModelLoadError(f"{p}: not a model directory or a .gguf file")
    s = str(spec)
    if s.count("/") == 1 and not s.startswith((".", "/", "~")):
        return _download_from_hub(s)
    raise ModelLoadError(f"{p}: no such file or directory")


def _imported_gguf_dir(gguf: Path) -> Path:
    from .default import cache_root
    from .gguf_import import convert_gguf_to_hf

    st = gguf.stat()
    out = cache_root() / "gguf-imports" / f"{gguf.stem}-{st.st_size}-{int(st.st_mtime)}"
    if not (out / "config.json").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        convert_gguf_to_hf(gguf, out)
    return out


def _download_from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except Exception as e:  # offline, unknown repo, gated...
        raise ModelLoadError(
            f"could not fetch {repo_id!r} from the Hugging Face hub ({type(e).__name__}); this machine may be "
            "offline. Pass a local model directory (config.json + *.safetensors + tokenizer) or a .gguf file instead."
        ) from None


def read_hf_config(model_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{model_dir / 'config.json'}: unreadable config ({e})") from None


def load_tokenizer(model_dir: Path):
    """The model's tokenizer: lowbit's FastTokenizer when the files allow it (the same results as
    transformers' without importing it at start-up; see models/tokenizer.py), else transformers'."""
    fast = fast_tokenizer_or_none(model_dir)
    if fast is not None:
        return fast
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:
        raise ModelLoadError(f"{model_dir}: cannot load tokenizer ({type(e).__name__}: {e})") from None


def build_fp_model(cfg: ModelConfig, tensors) -> CausalLM:
    """Build on the meta device, then assign fp32 tensors: no second copy of the weights in memory."""
    with torch.device("meta"):
        model = CausalLM(cfg)
    expected = {k for k in model.state_dict() if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    state: dict[str, torch.Tensor] = {}
    for name, t in tensors:
        if name in expected:
            state[name] = t.to(torch.float32)
    missing = sorted(expected - state.keys())
    if not cfg.tie_word_embeddings and missing == ["lm_head.weight"]:
        raise ModelLoadError("checkpoint has no lm_head.weight but config says tie_word_embeddings=false")
    if missing:
        raise ModelLoadError(f"checkpoint is missing {len(missing)} tensors, e.g. {', '.join(missing[:3])}")
    for name, t in state.items():
        want = model.get_parameter(name).shape
        if t.shape != want:
            raise ModelLoadError(f"tensor {name} has shape {tuple(t.shape)}, config implies {tuple(want)}")
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    model.requires_grad_(False)
    return model.eval()
