"""AWQ GEMM and compressed-tensors layouts, and checkpoint save / load."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lowbit.errors import LowbitError, ModelLoadError, QuantizationError
from lowbit.quant import checkpoint as ckpt
from lowbit.quant.checkpoint import load_quantized, save_quantized, storage_scale_dtype
from lowbit.quant.formats import awq_gemm
from lowbit.quant.formats import compressed_tensors as ct
from lowbit.quant.primitives import pack_int32, quantize_weight
from lowbit.layers.qweight import QuantizedWeight

GROUPS = [32, 64, 128, -1]


def _qw(bits=4, group_size=32, sym=False, out=32, inp=256, seed=0, scale_dtype=torch.float16) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.05
    return quantize_weight(w, bits, group_size, sym=sym, scale_dtype=scale_dtype)


def _same(a: QuantizedWeight, b: QuantizedWeight) -> None:
    assert torch.equal(a.q, b.q)
    assert torch.equal(a.zeros, b.zeros)
    assert torch.equal(a.scales, b.scales)
    assert (a.bits, a.group_size, a.sym) == (b.bits, b.group_size, b.sym)


# ============================================================================= AWQ GEMM


@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("sym", [False, True])
def test_awq_round_trip(group_size, sym):
    qw = _qw(group_size=group_size, sym=sym)
    t = awq_gemm.pack(qw)
    g = qw.group_size
    assert t["qweight"].dtype == torch.int32 and t["qweight"].shape == (256, 32 // 8)
    assert t["qzeros"].dtype == torch.int32 and t["qzeros"].shape == (256 // g, 32 // 8)
    assert t["scales"].dtype == torch.float16 and t["scales"].shape == (256 // g, 32)
    _same(awq_gemm.unpack(t, group_size), qw)


def _vllm_style_awq_dequant(qweight, qzeros, scales, group_size):
    """Independent reference: vLLM reads column j of each 8-column block at bit shift
    4 * [0, 4, 1, 5, 2, 6, 3, 7][j] and computes (q - z) * s on the [in, out] layout."""
    shifts = torch.tensor([0, 16, 4, 20, 8, 24, 12, 28], dtype=torch.int64)

    def unpack(x):
        x = x.to(torch.int64) & 0xFFFFFFFF
        return ((x.unsqueeze(-1) >> shifts) & 0xF).reshape(x.shape[0], -1)

    w, z = unpack(qweight), unpack(qzeros)
    z = z.repeat_interleave(group_size, dim=0)
    s = scales.float().repeat_interleave(group_size, dim=0)
    return ((w - z) * s).t()


@pytest.mark.parametrize("sym", [False, True])
def test_awq_matches_reference_dequant(sym):
    qw = _qw(sym=sym, group_size=64)
    t = awq_gemm.pack(qw)
    ref = _vllm_style_awq_dequant(t["qweight"], t["qzeros"], t["scales"], 64)
    assert torch.equal(ref, qw.dequantize())


def test_awq_rejects_what_it_cannot_hold():
    with pytest.raises(QuantizationError):
        awq_gemm.pack(_qw(bits=3))
    with pytest.raises(QuantizationError):
        awq_gemm.pack(_qw(out=12))
    with pytest.raises(QuantizationError):
        awq_gemm.quantization_config(8, 128)


def test_awq_config():
    cfg = awq_gemm.quantization_config(4, 128, True, ["model.layers.0.mlp.down_proj"])
    assert cfg == {
        "quant_method": "awq",
        "bits": 4,
        "group_size": 128,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": ["model.layers.0.mlp.down_proj"],
    }


# ============================================================================= compressed-tensors


def _args(bits, group_size, sym):
    return ct.weight_args(ct.quantization_config(bits, group_size, sym)["config_groups"]["group_0"])


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("sym", [False, True])
def test_ct_round_trip(bits, group_size, sym):
    qw = _qw(bits=bits, group_size=group_size, sym=sym, out=40)
    t = ct.pack(qw, torch.float16)
    assert t["weight_packed"].dtype == torch.int32 and t["weight_packed"].shape == (40, 256 * bits // 32)
    assert t["weight_scale"].shape == (40, 256 // qw.group_size) and t["weight_scale"].dtype == torch.float16
    assert t["weight_shape"].tolist() == [40, 256]
    if sym:
        assert "weight_zero_point" not in t
    else:
        assert t["weight_zero_point"].dtype == torch.int32
        assert t["weight_zero_point"].shape == (-(-40 * bits // 32), 256 // qw.group_size)
    _same(ct.unpack(t, _args(bits, group_size, sym)), qw)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("group_size", [32, -1])
def test_ct_library_decompresses_our_tensors(bits, sym, group_size):
    """compressed-tensors' own PackedQuantizationCompressor, given the scheme parsed from our
    config, reproduces QuantizedWeight.dequantize() bit for bit."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    qw = _qw(bits=bits, group_size=group_size, sym=sym, out=48, inp=128, scale_dtype=torch.bfloat16)
    scheme = QuantizationConfig.model_validate(ct.quantization_config(bits, group_size, sym)).config_groups["group_0"]
    out = PackedQuantizationCompressor.decompress(ct.pack(qw, torch.bfloat16), scheme)
    assert out["weight"].dtype == torch.bfloat16
    assert torch.equal(out["weight"], qw.dequantize().to(torch.bfloat16))


@pytest.mark.parametrize("bits", [3, 5, 6, 7])
def test_ct_reads_legacy_padded_packing(bits):
    """compressed-tensors <= 0.17 packed 32 // bits values a word; the width tells them apart."""
    qw = _qw(bits=bits, group_size=32, out=40)
    t = {
        "weight_packed": pack_int32(qw.q, bits, "padded"),
        "weight_scale": qw.scales.half(),
        "weight_zero_point": pack_int32(qw.zeros.t().contiguous(), bits, "padded").t().contiguous(),
        "weight_shape": torch.tensor([40, 256]),
    }
    _same(ct.unpack(t, _args(bits, 32, False), version="0.17.1"), qw)


def test_ct_reads_unpacked_signed_zero_points():
    """Before zero-point packing, asymmetric checkpoints stored signed int8 zeros [out, groups]."""
    qw = _qw(bits=4, group_size=64)
    t = ct.pack(qw, torch.float16)
    t["weight_zero_point"] = (qw.zeros.to(torch.int16) - 8).to(torch.int8)
    _same(ct.unpack(t, _args(4, 64, False)), qw)


def test_ct_config_shape():
    cfg = ct.quantization_config(4, 128, True)
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "pack-quantized"
    w = cfg["config_groups"]["group_0"]["weights"]
    assert (w["num_bits"], w["type"], w["symmetric"], w["strategy"], w["group_size"]) == (4, "int", True, "group", 128)
    assert cfg["ignore"] == ["lm_head"]
    w = ct.quantization_config(8, -1, False)["config_groups"]["group_0"]["weights"]
    assert (w["strategy"], w["group_size"]) == ("channel", None)


def test_ct_refuses_activation_quantization():
    group = {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "int"}, "input_activations": {"num_bits": 8}}
    with pytest.raises(QuantizationError):
        ct.weight_args(group)


# ============================================================================= checkpoints

HF_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16", "hidden_size": 64}
LINEARS = ["self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj"]


def _model(fmt: str, bits=4, group_size=32, sym=False, layers=2):
    scale_dtype = storage_scale_dtype(fmt, HF_CONFIG)
    quantized, fp = {}, {}
    for i in range(layers):
        for j, lin in enumerate(LINEARS):
            quantized[f"model.layers.{i}.{lin}"] = _qw(bits, group_size, sym, out=64, inp=64, seed=10 * i + j, scale_dtype=scale_dtype)
        fp[f"model.layers.{i}.input_layernorm.weight"] = torch.randn(64, dtype=torch.bfloat16)
        fp[f"model.layers.{i}.self_attn.q_proj.bias"] = torch.randn(64, dtype=torch.bfloat16)
    fp["model.layers.1.mlp.down_proj.weight"] = torch.randn(64, 64, dtype=torch.bfloat16)  # kept in full precision
    fp["model.embed_tokens.weight"] = torch.randn(128, 64, dtype=torch.bfloat16)
    fp["lm_head.weight"] = fp["model.embed_tokens.weight"]  # tied: shares storage
    return quantized, fp


@pytest.mark.parametrize("fmt", ["awq", "compressed-tensors"])
@pytest.mark.parametrize("sym", [False, True])
def test_save_load_round_trip(tmp_path, fmt, sym):
    quantized, fp = _model(fmt, sym=sym)
    out = save_quantized(tmp_path / "q", hf_config=HF_CONFIG, fp_tensors=fp, quantized=quantized, fmt=fmt)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama"
    loaded = load_quantized(out)
    assert (loaded.fmt, loaded.bits, loaded.group_size, loaded.sym) == (fmt, 4, 32, sym)
    assert set(loaded.quantized) == set(quantized)
    for name, qw in quantized.items():
        _same(loaded.quantized[name], qw)
    assert set(loaded.fp_tensors) == set(fp)
    want_dtype = torch.float16 if fmt == "awq" else torch.bfloat16
    for name, t in fp.items():
        assert loaded.fp_tensors[name].dtype == want_dtype
        assert torch.equal(loaded.fp_tensors[name], t.to(want_dtype))
    assert "model.layers.1.mlp.down_proj" in loaded.modules_to_not_convert
    if fmt == "awq":
        assert config["torch_dtype"] == "float16" and config["quantization_config"]["quant_method"] == "awq"
        assert config["quantization_config"]["zero_point"] is True
    else:
        assert config["torch_dtype"] == "bfloat16"
        assert config["quantization_config"]["ignore"][0] == "lm_head"


def test_ct_stores_fp_tensors_in_model_dtype(tmp_path):
    quantized, fp = _model("compressed-tensors")
    fp = {k: v.float() for k, v in fp.items()}  # a float32 pipeline
    out = save_quantized(tmp_path / "q", hf_config=HF_CONFIG, fp_tensors=fp, quantized=quantized, fmt="compressed-tensors")
    loaded = load_quantized(out)
    assert {t.dtype for t in loaded.fp_tensors.values()} == {torch.bfloat16}


def test_ct_keeps_float16_scales_exact_in_a_bfloat16_model(tmp_path):
    """Scales rounded to float16 (not bfloat16 values) are stored as float16, not rounded again."""
    quantized = {"model.layers.0.mlp.up_proj": _qw(out=64, inp=64, scale_dtype=torch.float16)}
    out = save_quantized(tmp_path / "q", hf_config=HF_CONFIG, fp_tensors={}, quantized=quantized, fmt="compressed-tensors")
    loaded = load_quantized(out)
    _same(loaded.quantized["model.layers.0.mlp.up_proj"], quantized["model.layers.0.mlp.up_proj"])


def test_per_channel_config(tmp_path):
    quantized, fp = _model("compressed-tensors", bits=8, group_size=-1)
    out = save_quantized(tmp_path / "q", hf_config=HF_CONFIG, fp_tensors=fp, quantized=quantized, fmt="compressed-tensors")
    loaded = load_quantized(out)
    assert loaded.group_size == -1 and loaded.bits == 8
    for name, qw in quantized.items():
        _same(loaded.quantized[name], qw)


def test_sharded_save(tmp_path):
    quantized, fp = _model("compressed-tensors")
    out = save_quantized(
        tmp_path / "q", hf_config=HF_CONFIG, fp_tensors=fp, quantized=quantized, fmt="compressed-tensors",
        max_shard_bytes=20_000,
    )
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] > 0
    loaded = load_quantized(out)
    for name, qw in quantized.items():
        _same(loaded.quantized[name], qw)


def test_side_files_copied(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "tokenizer.json").write_text("{}")
    (src / "generation_config.json").write_text("{}")
    (src / "model.safetensors").write_bytes(b"not copied")
    quantized, fp = _model("awq")
    out = save_quantized(
        tmp_path / "q", hf_config=HF_CONFIG, fp_tensors=fp, quantized=quantized, fmt="awq",
        copy_files_from=src, extra_files={"lowbit.json": b'{"a": 1}'},
    )
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    assert (out / "lowbit.json").read_bytes() == b'{"a": 1}'
    load_quantized(out)  # the source folder's weights were not copied over ours


def test_existing_output_needs_force(tmp_path):
    quantized, fp = _model("awq")
    kw = dict(hf_config=HF_CONFIG, fp_tensors=fp, quantized=quantized, fmt="awq")
    out = save_quantized(tmp_path / "q", **kw)
    (out / "marker").write_text("old")
    with pytest.raises(LowbitError):
        save_quantized(out, **kw)
    assert (out / "marker").is_file()
    save_quantized(out, force=True, **kw)
    assert not (out / "marker").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # no temp or backup folders left


def test_failed_write_leaves_nothing_visible(tmp_path):
    quantized, fp = _model("awq")
    kw = dict(hf_config=HF_CONFIG, fp_tensors=fp, quantized=quantized, fmt="awq")
    with pytest.raises(LowbitError):  # fails after the weights were written
        save_quantized(tmp_path / "q", extra_files={"../escape": b""}, **kw)
    assert list(tmp_path.iterdir()) == []
    out = save_quantized(tmp_path / "q", **kw)
    (out / "marker").write_text("old")
    with pytest.raises(LowbitError):  # a failed forced rewrite keeps the old checkpoint intact
        save_quantized(out, force=True, extra_files={"a/b": b""}, **kw)
    assert (out / "marker").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_save_refuses_mixed_parameters(tmp_path):
    quantized, fp = _model("compressed-tensors")
    quantized["model.layers.0.mlp.up_proj"] = _qw(bits=4, group_size=64, out=64, inp=64)
    with pytest.raises(QuantizationError):
        save_quantized(tmp_path / "q", hf_config=HF_CONFIG, fp_tensors=fp, quantized=quantized, fmt="compressed-tensors")
    assert not (tmp_path / "q").exists()


def test_awq_refuses_out_of_range_fp16(tmp_path):
    quantized, fp = _model("awq")
    fp["model.norm.weight"] = torch.full((64,), 1e6)
    with pytest.raises(LowbitError):
        save_quantized(tmp_path / "q", hf_config=HF_CONFIG, fp_tensors=fp, quantized=quantized, fmt="awq")


def _write_config(folder: Path, qcfg: dict | None):
    folder.mkdir(exist_ok=True)
    cfg = dict(HF_CONFIG)
    if qcfg is not None:
        cfg["quantization_config"] = qcfg
    (folder / "config.json").write_text(json.dumps(cfg))


def test_corrupt_and_truncated_safetensors(tmp_path):
    quantized, fp = _model("awq")
    out = save_quantized(tmp_path / "q", hf_config=HF_CONFIG, fp_tensors=fp, quantized=quantized, fmt="awq")
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        load_quantized(out)
    (out / "model.safetensors").write_bytes(b"\x00garbage" * 4)
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        load_quantized(out)


def test_pickle_checkpoints_refused(tmp_path):
    folder = tmp_path / "m"
    _write_config(folder, awq_gemm.quantization_config(4, 128))
    (folder / "pytorch_model.bin").write_bytes(b"PK\x03\x04")
    with pytest.raises(ModelLoadError, match="pickle") as e:
        load_quantized(folder)
    assert "pytorch_model.bin" in str(e.value)
    with pytest.raises(ModelLoadError, match="pickle"):
        load_quantized(folder / "pytorch_model.bin")


def test_unquantized_and_unsupported_refused(tmp_path):
    folder = tmp_path / "m"
    _write_config(folder, None)
    save_file({"a": torch.zeros(2)}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="not a quantized"):
        load_quantized(folder)
    _write_config(folder, {"quant_method": "gptq", "bits": 4})
    with pytest.raises(ModelLoadError, match="GPTQ-quantized but no qweight"):
        load_quantized(folder)
    _write_config(folder, {**awq_gemm.quantization_config(4, 128), "version": "gemv"})
    with pytest.raises(ModelLoadError, match="gemv"):
        load_quantized(folder)


def _autoawq_pack(intweight: torch.Tensor) -> torch.Tensor:
    """AutoAWQ's packing loop restated: word col gets column col*8 + order_map[i] at bits 4i."""
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]
    rows, cols = intweight.shape
    out = torch.zeros(rows, cols // 8, dtype=torch.int64)
    for col in range(cols // 8):
        for i in range(8):
            out[:, col] |= intweight[:, col * 8 + order_map[i]].to(torch.int64) << (4 * i)
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def test_reads_third_party_autoawq_checkpoint(tmp_path):
    """A checkpoint laid out as AutoAWQ writes it (packed here by its loop, not by our packer),
    described by an early-AutoAWQ quant_config.json instead of config.json's quantization_config."""
    folder = tmp_path / "awq"
    _write_config(folder, None)
    (folder / "quant_config.json").write_text(json.dumps({"zero_point": True, "q_group_size": 64, "w_bit": 4, "version": "GEMM"}))
    qw = _qw(group_size=64, out=32, inp=128)
    tensors = {
        "model.layers.0.mlp.up_proj.qweight": _autoawq_pack(qw.q.t().contiguous()),
        "model.layers.0.mlp.up_proj.qzeros": _autoawq_pack(qw.zeros.t().contiguous()),
        "model.layers.0.mlp.up_proj.scales": qw.scales.t().half().contiguous(),
        "model.norm.weight": torch.ones(128, dtype=torch.float16),
    }
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    loaded = load_quantized(folder)
    assert loaded.fmt == "awq" and loaded.group_size == 64
    _same(loaded.quantized["model.layers.0.mlp.up_proj"], qw)
    assert list(loaded.fp_tensors) == ["model.norm.weight"]


@pytest.mark.parametrize("sym", [False, True])
def test_reads_checkpoint_compressed_by_the_library(tmp_path, sym):
    """Tensors produced by compressed-tensors' own observer math and compressor, config dumped by
    its own QuantizationConfig: load_quantized must dequantize to what the library does."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.quantization.utils import calculate_qparams

    qcfg = QuantizationConfig.model_validate(ct.quantization_config(4, 32, sym))
    scheme = qcfg.config_groups["group_0"]
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    groups = w.reshape(64, 4, 32)
    scale, zp = calculate_qparams(groups.amin(-1), groups.amax(-1), scheme.weights)
    dense = {"weight": w, "weight_scale": scale, "weight_zero_point": zp}
    packed = PackedQuantizationCompressor.compress(dense, scheme)
    reference = PackedQuantizationCompressor.decompress(packed, scheme)["weight"]

    folder = tmp_path / "llmc"
    qdict = qcfg.model_dump()
    qdict["quant_method"] = "compressed-tensors"
    qdict["version"] = "0.20.0"
    _write_config(folder, qdict)
    tensors = {f"model.layers.0.mlp.up_proj.{k}": v for k, v in packed.items()}
    tensors["model.norm.weight"] = torch.ones(128, dtype=torch.bfloat16)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    loaded = load_quantized(folder)
    qw = loaded.quantized["model.layers.0.mlp.up_proj"]
    assert qw.sym == sym and qw.group_size == 32
    assert torch.equal(qw.dequantize().to(torch.bfloat16), reference)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("bits,sym", [(4, False), (3, True)])
def test_transformers_loads_our_compressed_tensors_checkpoint(tmp_path, bits, sym):
    """End to end: transformers + compressed-tensors decompress our checkpoint to our weights."""
    pytest.importorskip("compressed_tensors")
    tf = pytest.importorskip("transformers")
    from transformers.utils.quantization_config import CompressedTensorsConfig

    cfg = tf.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    sd = tf.LlamaForCausalLM(cfg).to(torch.bfloat16).state_dict()
    hf = {**cfg.to_dict(), "torch_dtype": "bfloat16"}
    names = [k[: -len(".weight")] for k, v in sd.items() if v.dim() == 2 and ".layers." in k]
    scale_dtype = storage_scale_dtype("compressed-tensors", hf)
    quantized = {n: quantize_weight(sd[f"{n}.weight"].float(), bits, 32, sym=sym, scale_dtype=scale_dtype) for n in names}
    fp = {k: v for k, v in sd.items() if k[: -len(".weight")] not in quantized}
    out = save_quantized(tmp_path / "m", hf_config=hf, fp_tensors=fp, quantized=quantized, fmt="compressed-tensors")
    model = tf.AutoModelForCausalLM.from_pretrained(out, quantization_config=CompressedTensorsConfig(dequantize=True))
    loaded = model.state_dict()
    for name, qw in quantized.items():
        assert torch.equal(loaded[f"{name}.weight"], qw.dequantize().to(loaded[f"{name}.weight"].dtype)), name


def test_checkpoint_module_exports():
    assert ckpt.FORMATS == ("awq", "compressed-tensors")
    assert storage_scale_dtype("awq", {"torch_dtype": "bfloat16"}) == torch.float16
    assert storage_scale_dtype("compressed-tensors", {"dtype": "bfloat16"}) == torch.bfloat16
    assert os.path.basename(ckpt.INDEX_FILE) == "model.safetensors.index.json"
