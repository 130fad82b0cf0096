"""Turn a llama.cpp GGUF file into a plain Hugging Face model directory (float32 safetensors).

Why: a GGUF is the easiest small model to ship (the default model comes as one), but the rest of
lowbit, and transformers, read HF directories. We dequantize every tensor to float32, rename it,
undo the row permutation llama.cpp applies to llama's q/k projections, and rebuild config.json,
the tokenizer and generation_config.json from the GGUF metadata.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelLoadError, UnsupportedArchitectureError
from ..layers.rotary import RopeConfig, base_inv_frequencies, scaled_inv_frequencies
from ..fsio import check_target, publish_dir
from .registry import ArchSpec, gguf_architectures

GGUF_MAGIC = b"GGUF"


# GGUF per-block tensor stem -> HF module path inside model.layers.N
_BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
ROPE_FREQS = "rope_freqs.weight"


def gguf_spec(arch: str) -> ArchSpec:
    """The registered architecture llama.cpp calls `arch`, or UnsupportedArchitectureError."""
    specs = gguf_architectures()
    if arch not in specs:
        raise UnsupportedArchitectureError(
            f"GGUF architecture {arch!r} is not supported (supported: {', '.join(sorted(specs))})"
        )
    return specs[arch]


@dataclass
class HyperParams:
    """The numbers config.json needs, read from `{arch}.*` and `tokenizer.ggml.*` metadata."""

    arch: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    vocab_size: int
    tie_word_embeddings: bool
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    rope_scaling: dict[str, Any] | None = None

    def to_config(self) -> dict[str, Any]:
        spec = gguf_spec(self.arch)
        eos = self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else (self.eos_token_ids or None)
        cfg: dict[str, Any] = {
            "architectures": [spec.name],
            "model_type": spec.model_type,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "vocab_size": self.vocab_size,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "use_cache": True,
            "torch_dtype": "float32",
            **spec.gguf_config,
        }
        return cfg


# ---------------------------------------------------------------- reading the file


def open_gguf(path: Path):
    """A GGUFReader on `path`, or ModelLoadError naming the file when it is not a sound GGUF."""
    from gguf import GGUFReader

    if not path.is_file():
        raise ModelLoadError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelLoadError(f"{path} is not a GGUF file (bad magic bytes {magic!r})")
    try:
        reader = GGUFReader(path, "r")
    except Exception as exc:  # the reader raises ValueError/IndexError/struct errors on damage
        raise ModelLoadError(f"{path} is a truncated or corrupt GGUF file ({type(exc).__name__}: {exc})") from None
    parts = reader.fields.get("split.count")
    if parts is not None and int(parts.contents()) > 1:
        raise ModelLoadError(f"{path} is one part of a split GGUF ({int(parts.contents())} parts); "
                             "merge them first (llama-gguf-split --merge)")
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise ModelLoadError(f"{path} is truncated: tensor {t.name} ends past the end of the file")
    return reader


_MISSING = object()


def _meta(reader, key: str, default: Any = _MISSING) -> Any:
    """One metadata value as a Python object; ModelLoadError if required and absent."""
    f = reader.fields.get(key)
    if f is None:
        if default is _MISSING:
            raise ModelLoadError(f"GGUF metadata lacks required key {key!r}")
        return default
    return f.contents()


def _f32(x: float) -> float:
    """GGUF stores floats as float32: give back the short decimal a human wrote (1e-05, not 9.99e-06)."""
    return float(str(np.float32(x)))


def read_hparams(reader, tensor_shapes: dict[str, tuple[int, ...]]) -> HyperParams:
    arch = _meta(reader, "general.architecture")
    gguf_spec(arch)  # refuses an architecture we cannot import before anything else is read
    hidden = int(_meta(reader, f"{arch}.embedding_length"))
    heads = int(_meta(reader, f"{arch}.attention.head_count"))
    kv_heads = int(_meta(reader, f"{arch}.attention.head_count_kv", heads))
    head_dim = int(_meta(reader, f"{arch}.attention.key_length", hidden // heads))
    rope_dim = int(_meta(reader, f"{arch}.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise UnsupportedArchitectureError(f"partial rotary embedding ({rope_dim} of {head_dim} dims) is not supported")
    if "token_embd.weight" not in tensor_shapes:
        raise ModelLoadError("GGUF has no token_embd.weight tensor")
    eos = _meta(reader, "tokenizer.ggml.eos_token_id", None)
    eot = _meta(reader, "tokenizer.ggml.eot_token_id", None)
    eos_ids = [int(i) for i in dict.fromkeys(x for x in (eos, eot) if x is not None)]
    bos = _meta(reader, "tokenizer.ggml.bos_token_id", None)
    pad = _meta(reader, "tokenizer.ggml.padding_token_id", None)
    return HyperParams(
        arch=arch,
        hidden_size=hidden,
        intermediate_size=int(_meta(reader, f"{arch}.feed_forward_length")),
        num_hidden_layers=int(_meta(reader, f"{arch}.block_count")),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=_f32(_meta(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        rope_theta=_f32(_meta(reader, f"{arch}.rope.freq_base", 10000.0)),
        max_position_embeddings=int(_meta(reader, f"{arch}.context_length")),
        vocab_size=tensor_shapes["token_embd.weight"][0],
        tie_word_embeddings="output.weight" not in tensor_shapes,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=eos_ids,
        pad_token_id=None if pad is None else int(pad),
    )


# ---------------------------------------------------------------- tensors


def dequantize_tensor(t) -> np.ndarray:
    """A reader tensor as float32 in numpy (row-major, HF) orientation: GGUF lists dims fastest-first."""
    from gguf import quants

    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    try:
        out = quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise ModelLoadError(f"tensor {t.name}: cannot dequantize GGML type {t.tensor_type.name}") from None
    return np.ascontiguousarray(out, dtype=np.float32).reshape(shape)


def unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row reorder.

    Its converter views each head's rows as (2, head_dim/2) -- the two halves HF's rotate_half pairs
    up -- and transposes that to (head_dim/2, 2), interleaving the pairs for ggml's rope. So we view
    them as (head_dim/2, 2) and transpose back. Works for weights (rows, cols) and biases (rows,).
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ModelLoadError(f"cannot un-permute {rows} rows into {n_head} rope heads")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_tensor_name(name: str) -> str | None:
    """HF parameter name for a GGUF tensor name, None when we do not know it."""
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK_TENSORS:
        if parts[3] in ("weight", "bias"):
            return f"model.layers.{parts[1]}.{_BLOCK_TENSORS[parts[2]]}.{parts[3]}"
    return None


def expected_shapes(hp: HyperParams) -> dict[str, tuple[int, ...]]:
    """Every HF tensor the architecture needs, with its shape: what the file must provide, exactly."""
    spec = gguf_spec(hp.arch)
    h, f, d = hp.hidden_size, hp.intermediate_size, hp.head_dim
    q, kv = hp.num_attention_heads * d, hp.num_key_value_heads * d
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (hp.vocab_size, h),
        "model.norm.weight": (h,),
    }
    if not hp.tie_word_embeddings:
        shapes["lm_head.weight"] = (hp.vocab_size, h)
    for i in range(hp.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (f, h),
            p + "mlp.up_proj.weight": (f, h),
            p + "mlp.down_proj.weight": (h, f),
        })
        if spec.qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
        if spec.qk_norm:
            shapes.update({p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)})
    return shapes


def convert_tensors(reader, hp: HyperParams) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """All weights under HF names as float32, plus llama.cpp's rope_freqs (None when absent)."""
    spec = gguf_spec(hp.arch)
    want = expected_shapes(hp)
    out: dict[str, np.ndarray] = {}
    rope_freqs = None
    for t in reader.tensors:
        if t.name == ROPE_FREQS:
            rope_freqs = dequantize_tensor(t)
            continue
        name = hf_tensor_name(t.name)
        if name is None or name not in want:
            raise ModelLoadError(f"unexpected tensor {t.name!r} for GGUF architecture {hp.arch!r}")
        w = dequantize_tensor(t)
        if w.shape != want[name]:
            raise ModelLoadError(f"tensor {t.name} has shape {w.shape}, metadata implies {want[name]}")
        if spec.gguf_permuted_qk and ".self_attn.q_proj." in name:
            w = unpermute_rope_rows(w, hp.num_attention_heads)
        elif spec.gguf_permuted_qk and ".self_attn.k_proj." in name:
            w = unpermute_rope_rows(w, hp.num_key_value_heads)
        out[name] = w
    missing = sorted(set(want) - set(out))
    if missing:
        raise ModelLoadError(f"GGUF lacks {len(missing)} tensors the architecture needs, e.g. {missing[0]}")
    return out, rope_freqs


# ---------------------------------------------------------------- rope scaling


def _llama3_factors(dim: int, theta: float, factor: float, low: float, high: float, orig: int) -> np.ndarray:
    """The per-frequency divisors Llama 3.1 rope scaling implies (llama.cpp stores them as rope_freqs):
    the unscaled frequencies over the scaled ones, as the decoder's rotary computes both."""
    rope = RopeConfig(theta=float(theta), type="llama3", factor=float(factor), low_freq_factor=float(low),
                      high_freq_factor=float(high), original_max_position_embeddings=int(orig))
    return (base_inv_frequencies(dim, theta) / scaled_inv_frequencies(dim, rope)).numpy()


def llama3_scaling_from_freqs(freqs: np.ndarray, hp: HyperParams, orig: int) -> dict[str, Any]:
    """Recover Llama-3 rope_scaling from the stored divisors.

    Between the two plateaus (1 and `factor`) the reciprocal divisor is linear in 1/wavelength; two
    such points fix low/high_freq_factor. The result does not depend on `orig` (only orig/low and
    orig/high matter), so the metadata's value or Llama 3.1's 8192 both reproduce the same rope.
    """
    freqs = np.asarray(freqs, dtype=np.float64).reshape(-1)
    factor = float(freqs.max())
    if freqs.size != hp.head_dim // 2 or factor <= 1.0 or abs(freqs.min() - 1.0) > 1e-4:
        raise ModelLoadError("rope_freqs.weight does not look like Llama-3 rope scaling factors")
    inv_freq = base_inv_frequencies(hp.head_dim, hp.rope_theta).numpy()
    x = inv_freq / (2 * math.pi)  # 1 / wavelength
    tol = 1e-4 * factor
    mid = (np.abs(freqs - 1.0) > tol) & (np.abs(freqs - factor) > tol)
    if mid.sum() >= 2:
        smooth = (1.0 / freqs[mid] - 1.0 / factor) / (1.0 - 1.0 / factor)
        a, b = np.polyfit(x[mid], smooth, 1)  # smooth = orig/(high-low) * x - low/(high-low)
        span = orig / a
        low = -b * span
        high = low + span
    elif mid.sum() == 0:
        # no dims in the ramp: any ramp between the last unscaled and the first scaled dim fits
        unscaled, scaled = x[freqs < 1.0 + tol], x[freqs > factor - tol]
        edge = math.sqrt(unscaled.min() * scaled.max())
        low, high = orig * edge * 0.999, orig * edge * 1.001
    else:
        raise ModelLoadError("cannot recover Llama-3 rope scaling from rope_freqs.weight (one ramp dim)")
    check = _llama3_factors(hp.head_dim, hp.rope_theta, factor, low, high, orig)
    if not np.allclose(check, freqs, rtol=1e-3, atol=1e-4):
        raise ModelLoadError("rope_freqs.weight does not follow Llama-3 rope scaling; cannot map it")
    return {
        "rope_type": "llama3",
        "factor": _f32(factor),
        "low_freq_factor": round(float(low), 4),
        "high_freq_factor": round(float(high), 4),
        "original_max_position_embeddings": int(orig),
    }


def read_rope_scaling(reader, hp: HyperParams, rope_freqs: np.ndarray | None) -> dict[str, Any] | None:
    """config.json rope_scaling from `{arch}.rope.scaling.*` metadata or a rope_freqs tensor."""
    arch = hp.arch
    kind = _meta(reader, f"{arch}.rope.scaling.type", None)
    factor = _meta(reader, f"{arch}.rope.scaling.factor", None)
    orig = _meta(reader, f"{arch}.rope.scaling.original_context_length", None)
    if rope_freqs is not None:
        if kind not in (None, "none"):
            raise ModelLoadError(f"GGUF has both rope_freqs.weight and rope scaling type {kind!r}")
        return llama3_scaling_from_freqs(rope_freqs, hp, int(orig) if orig else 8192)
    if kind in (None, "none") or factor is None or float(factor) == 1.0:
        return None
    if kind not in ("linear", "yarn"):
        raise ModelLoadError(f"unsupported rope scaling type {kind!r} in GGUF metadata")
    scaling: dict[str, Any] = {"rope_type": kind, "factor": _f32(factor)}
    if orig:
        scaling["original_max_position_embeddings"] = int(orig)
    return scaling


# ---------------------------------------------------------------- writing the directory


def write_weights(tensors: dict[str, np.ndarray], out: Path) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})


def write_tokenizer(gguf_path: Path, out: Path, reader, context_length: int) -> None:
    """Rebuild the tokenizer (and chat template) with transformers' GGUF tokenizer reader."""
    if "tokenizer.ggml.model" not in reader.fields:
        raise ModelLoadError(f"{gguf_path} has no tokenizer metadata (tokenizer.ggml.model)")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"cannot build the tokenizer from {gguf_path}: {exc}") from None
    template = _meta(reader, "tokenizer.chat_template", None)
    if template and tok.chat_template != template:
        tok.chat_template = template
    tok.save_pretrained(str(out))
    _tidy_tokenizer_config(out, template, context_length)


def _tidy_tokenizer_config(out: Path, template: str | None, context_length: int) -> None:
    """Make tokenizer_config.json readable by any transformers >= 4.51 and by plain json readers.

    transformers 5 names its class TokenizersBackend (4.x has no such class; PreTrainedTokenizerFast
    is the name both know), stores load-time flags, and keeps the chat template only in a .jinja file.
    """
    path = out / "tokenizer_config.json"
    cfg = json.loads(path.read_text()) if path.exists() else {}
    for key in ("is_local", "local_files_only"):
        cfg.pop(key, None)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["model_max_length"] = context_length
    if template:
        cfg["chat_template"] = template
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def generation_config(hp: HyperParams) -> dict[str, Any]:
    eos = hp.eos_token_ids[0] if len(hp.eos_token_ids) == 1 else (hp.eos_token_ids or None)
    gen: dict[str, Any] = {"bos_token_id": hp.bos_token_id, "eos_token_id": eos}
    if hp.pad_token_id is not None:
        gen["pad_token_id"] = hp.pad_token_id
    return {k: v for k, v in gen.items() if v is not None}


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def build_hf_dir(gguf_path: Path, dest: Path) -> None:
    """Write config.json, model.safetensors, tokenizer and generation_config.json into `dest`."""
    reader = open_gguf(gguf_path)
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in reader.tensors}
    hp = read_hparams(reader, shapes)
    tensors, rope_freqs = convert_tensors(reader, hp)
    hp.rope_scaling = read_rope_scaling(reader, hp, rope_freqs)
    write_tokenizer(gguf_path, dest, reader, hp.max_position_embeddings)
    write_weights(tensors, dest)
    del tensors
    _write_json(dest / "generation_config.json", generation_config(hp))
    _write_json(dest / "config.json", hp.to_config())


def convert_gguf_to_hf(gguf_path: str | Path, out_dir: str | Path, *, force: bool = False) -> Path:
    """Convert a GGUF (llama / qwen2 / qwen3) to an HF float32 directory at `out_dir`; returns it.

    Built in a staging folder and published atomically (lowbit.fsio), so `out_dir` is either absent
    or complete. An existing `out_dir` is replaced only with force=True.
    """
    gguf_path, out_dir = Path(gguf_path).expanduser().resolve(), Path(out_dir).expanduser().absolute()
    check_target(out_dir, force, error=ModelLoadError, hint="pass force=True to replace it")
    with publish_dir(out_dir, replace=force, error=ModelLoadError) as staging:
        build_hf_dir(gguf_path, staging)
    return out_dir
