"""GPTQ / AWQ-GPTQ: the algorithm on one weight (beats RTN where inputs correlate, equals RTN
when they do not, act order permutes back exactly), the quantize pipeline end to end in every
format, and loading AutoGPTQ / GPTQModel checkpoints built here by hand from the documented
layout (both zero-point conventions, desc_act on and off, 4 and 8 bits)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import make_tiny_model
from lowbit.errors import ModelLoadError, QuantizationError
from lowbit.models.loader import build_fp_model
from lowbit.models.registry import resolve_config
from lowbit.models.weights import iter_tensors
from lowbit.quant.awq_config import AwqConfig
from lowbit.quant.formats import actorder
from lowbit.quant.gptq import GptqConfig, HessianAccumulator, gptq_quantize, unpermute_columns
from lowbit.quant.loader import load_model
from lowbit.quant.pipeline import quantize
from lowbit.quant.primitives import quantize_weight_searched
from lowbit.quant.rtn import QuantSpec

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def correlated_inputs(n=2048, d=128, seed=0):
    """Tokens whose channels are strongly correlated and of very different size (as in LLMs)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5
    x = torch.randn(n, d, generator=g) @ mix + 0.2 * torch.randn(n, d, generator=g)
    return x * (torch.rand(d, generator=g) * 4 + 0.2)


def hessian_of(x):
    acc = HessianAccumulator(x.shape[1])
    for chunk in x.split(500):
        acc.add(chunk)
    return acc.hessian()


# ----------------------------------------------------------------------------- one weight


@pytest.mark.parametrize("bits,gs,sym,order", [
    (4, 32, False, None), (3, 64, False, None), (4, 32, True, None), (8, -1, False, None),
    (4, 32, False, "group"), (3, 16, True, "group"), (4, 64, False, "weight"),
])
def test_gptq_beats_rtn_on_correlated_inputs(bits, gs, sym, order):
    x = correlated_inputs()
    h = hessian_of(x)
    w = torch.randn(96, 128, generator=torch.Generator().manual_seed(1))
    spec = QuantSpec(bits, gs, sym)
    r = gptq_quantize(w, h, spec, GptqConfig(act_order=order))
    direct = lambda wq: float(((x @ (wq - w).t()) ** 2).mean())  # noqa: E731 - the definition itself
    assert direct(r.dequantize()) == pytest.approx(r.err, rel=1e-3)  # the reported error is the real one
    assert direct(spec.quantize(w).dequantize()) == pytest.approx(r.err_rtn, rel=1e-3)
    assert r.err < 0.75 * r.err_rtn
    assert (r.perm is not None) == (order == "group")


@pytest.mark.parametrize("bits,gs,sym", [(4, 32, False), (3, 16, True), (8, -1, False), (4, 128, False)])
def test_identity_hessian_gives_exactly_rtn(bits, gs, sym):
    """Uncorrelated, equal inputs: no column can absorb another's error, GPTQ is plain RTN."""
    w = torch.randn(40, 128, generator=torch.Generator().manual_seed(2))
    spec = QuantSpec(bits, gs, sym)
    r = gptq_quantize(w, 2 * torch.eye(128), spec, GptqConfig(block_size=32, grid="minmax"))
    q = spec.quantize(w)
    assert r.perm is None
    assert torch.equal(r.qweight.q, q.q) and torch.equal(r.qweight.scales, q.scales) and torch.equal(r.qweight.zeros, q.zeros)


def test_act_order_group_permutes_back_to_the_right_weight():
    x = correlated_inputs(d=64, seed=3)
    h = hessian_of(x)
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(4))
    r = gptq_quantize(w, h, QuantSpec(4, 16), GptqConfig(act_order="group"))
    assert torch.equal(r.perm, torch.argsort(torch.diagonal(h), descending=True, stable=True))
    assert not torch.equal(r.perm, torch.arange(64))
    wq = r.dequantize()
    torch.testing.assert_close(wq[:, r.perm], r.qweight.dequantize())  # group-contiguous in perm order
    # the stored form: codes in channel order + g_idx, dequantized element by element
    stored = actorder.stored_columns(r.qweight, r.perm)
    g_idx = actorder.g_idx_of(r.perm, 16).long()
    ref = (stored.q.float() - stored.zeros.float()[:, g_idx]) * stored.scales[:, g_idx]
    torch.testing.assert_close(ref, wq)
    # the loader's regrouping: the same channels in each group (sorted within it), the same weight
    back, perm = actorder.regroup(stored, g_idx)
    for grp in range(4):
        assert sorted(perm[16 * grp : 16 * grp + 16].tolist()) == sorted(r.perm[16 * grp : 16 * grp + 16].tolist())
    torch.testing.assert_close(unpermute_columns(back.dequantize(), perm), wq, rtol=0, atol=0)
    assert float(((wq - w) @ h @ (wq - w).t()).trace()) / 48 == pytest.approx(r.err, rel=1e-3)


def test_act_order_weight_keeps_the_original_groups_and_grids():
    x = correlated_inputs(d=64, seed=5)
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(6))
    spec = QuantSpec(4, 16)
    h = hessian_of(x)
    r = gptq_quantize(w, h, spec, GptqConfig(act_order="weight", grid="minmax"))
    assert r.perm is None
    rtn = spec.quantize(w)
    assert torch.equal(r.qweight.scales, rtn.scales) and torch.equal(r.qweight.zeros, rtn.zeros)
    assert not torch.equal(r.qweight.q, rtn.q)
    # the default grid: each original group's range shrunk against diag(H), chosen up front
    r = gptq_quantize(w, h, spec, GptqConfig(act_order="weight"))
    searched = quantize_weight_searched(w, 4, 16, importance=torch.diagonal(h), scale_dtype=spec.scale_dtype)
    assert torch.equal(r.qweight.scales, searched.scales) and torch.equal(r.qweight.zeros, searched.zeros)
    assert not torch.equal(searched.scales, rtn.scales)


@pytest.mark.parametrize("order", [None, "group", "weight"])
def test_searched_grid_beats_minmax_at_3_bits(order):
    """The mse grid lowers GPTQ's own output error against the min/max grid at 3 bits."""
    x = correlated_inputs(seed=11)
    h = hessian_of(x)
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(12))
    w[::7, 3] *= 6.0  # outliers that min/max spends grid steps on
    spec = QuantSpec(3, 32)
    mse = gptq_quantize(w, h, spec, GptqConfig(act_order=order))
    minmax = gptq_quantize(w, h, spec, GptqConfig(act_order=order, grid="minmax"))
    assert mse.err < 0.97 * minmax.err
    assert mse.err_rtn == minmax.err_rtn  # both measured against the same plain RTN
    with pytest.raises(QuantizationError, match="grid"):
        GptqConfig(grid="absmax").validate()


def test_dead_inputs_and_bad_hessians():
    x = correlated_inputs(d=32, seed=7)
    x[:, 5] = 0.0  # a channel no calibration token uses
    w = torch.randn(8, 32)
    r = gptq_quantize(w, hessian_of(x), QuantSpec(4, 16))
    assert torch.isfinite(r.qweight.scales).all() and r.dequantize()[:, 5].abs().max() == 0
    with pytest.raises(QuantizationError, match="NaN or inf"):
        gptq_quantize(w, torch.full((32, 32), float("nan")), QuantSpec(4, 16))
    with pytest.raises(QuantizationError, match="dampening"):
        GptqConfig(damp=-1.0).validate()
    with pytest.raises(QuantizationError, match="act order"):
        gptq_quantize(w, 2 * torch.eye(32), QuantSpec(4, 16), GptqConfig(act_order="random"))


def test_clip_thresholds_bound_the_gptq_grid():
    x = correlated_inputs(d=64, seed=8)
    w = torch.randn(8, 64)
    mv = w.abs().reshape(8, 4, 16).amax(-1) * 0.6
    r = gptq_quantize(w, hessian_of(x), QuantSpec(4, 16), max_val=mv)
    span = r.qweight.scales * 15  # asymmetric grid: (max - min) / 15 per group
    assert bool((span <= 2 * mv * (1 + 1e-3) + 1e-6).all())


# ----------------------------------------------------------------------------- pipeline


def calib_ids(n=8, t=32, seed=0):
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


def stored_reference(out: Path):
    """An fp model whose linears hold the checkpoint's weights dequantized element by element
    through g_idx (no regrouping, no folding): the reference the loaded model must match."""
    from safetensors import safe_open

    from lowbit.quant.formats import awq_gemm
    from lowbit.quant.formats import compressed_tensors as ct

    hf = json.loads((out / "config.json").read_text())
    qcfg = hf["quantization_config"]
    with safe_open(str(out / "model.safetensors"), framework="pt") as st:
        t = {k: st.get_tensor(k) for k in st.keys()}
    tensors = {}
    for k, v in t.items():
        module, _, leaf = k.rpartition(".")
        if leaf in ("qweight", "weight_packed"):
            if leaf == "qweight":
                qw = awq_gemm.unpack({n: t[f"{module}.{n}"] for n in awq_gemm.TENSOR_NAMES}, qcfg["group_size"])
            else:
                parts = {n: t[f"{module}.{n}"] for n in ct.TENSOR_NAMES if f"{module}.{n}" in t}
                qw = ct.unpack(parts, ct.weight_args(qcfg["config_groups"]["group_0"]), qcfg["version"])
            g_idx = t.get(f"{module}.weight_g_idx", torch.arange(qw.in_features) // qw.group_size).long()
            tensors[f"{module}.weight"] = (qw.q.float() - qw.zeros.float()[:, g_idx]) * qw.scales[:, g_idx]
        elif not k.endswith((".qzeros", ".scales", ".weight_scale", ".weight_zero_point", ".weight_shape", ".weight_g_idx")):
            tensors[k] = v
    return build_fp_model(resolve_config(hf), tensors.items())


def logits(model, ids):
    with torch.no_grad():
        return model.compute_logits(model(ids))


@pytest.mark.parametrize("method,fmt,bits,gs,order", [
    ("gptq", "awq", 4, 32, None),
    ("awq-gptq", "awq", 4, 32, None),
    ("gptq", "compressed-tensors", 3, 16, "group"),
    ("awq-gptq", "compressed-tensors", 4, -1, "group"),
    ("gptq", "compressed-tensors", 8, 32, "weight"),
])
def test_quantize_end_to_end_loads_what_was_stored(tmp_path, method, fmt, bits, gs, order):
    src = tmp_path / "m"
    make_tiny_model("llama", src, num_key_value_heads=4)
    out = tmp_path / "q"
    rep = quantize(src, method, bits, gs, fmt=fmt, out_dir=out, calib_ids=calib_ids(), calib_samples=8,
                   calib_seqlen=32, progress=False, awq_config=AwqConfig(search_samples=4),
                   gptq_config=GptqConfig(act_order=order))
    assert rep.quantized_linears == 14
    report = json.loads((out / "quant_report.json").read_text())
    assert report["method"] == method and report["gptq"]["act_order"] == order
    layer0 = report["layers"][0]
    assert layer0["err_rtn"] > 0 and len(layer0["linears"]) == 7
    assert (layer0["err_awq"] is not None) == (layer0["err_awq_gptq"] is not None) == (method == "awq-gptq")
    assert layer0["err_gptq"] is not None  # awq-gptq also measures GPTQ alone
    assert (out / "quant_report.png").read_bytes()[:4] == b"\x89PNG"
    permuted = order == "group" and gs != -1  # one group per row: the order within it is undone
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    if fmt == "compressed-tensors":
        assert qcfg["config_groups"]["group_0"]["weights"]["actorder"] == ("group" if permuted else order if order == "weight" else None)

    loaded = load_model(out, with_tokenizer=False)
    layer = loaded.model.model.layers[0]
    assert (type(layer.self_attn.qkv_proj).__name__ == "InputPermuted") == permuted
    assert type(layer.mlp.down_proj).__name__ == "QuantLinear"  # its permutation folds into gate/up
    ids = calib_ids(2, 24, seed=5)
    want, got = logits(stored_reference(out), ids), logits(loaded.model, ids)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-4
    fp = load_model(src, with_tokenizer=False)
    a = logits(fp.model, ids)
    assert float((a - got).norm() / a.norm()) < {3: 0.5, 4: 0.3, 8: 0.02}[bits]


def test_awq_format_refuses_group_act_order_before_any_work(tmp_path):
    src = tmp_path / "m"
    make_tiny_model("llama", src)
    with pytest.raises(QuantizationError, match="compressed-tensors"):
        quantize(src, "gptq", 4, 32, fmt="awq", out_dir=tmp_path / "q", calib_ids=calib_ids(),
                 gptq_config=GptqConfig(act_order="group"), progress=False)
    assert not (tmp_path / "q").exists()


def test_act_order_greedy_decode_through_the_engine(tmp_path):
    """The engine's lean decode loop calls the permuted linears directly: same tokens as the
    module path of the same loaded model."""
    from lowbit.engine.args import EngineArgs
    from lowbit.engine.llm_engine import LLMEngine
    from lowbit.engine.sampling_params import SamplingParams

    src = tmp_path / "m"
    make_tiny_model("llama", src)
    out = tmp_path / "q"
    quantize(src, "gptq", 4, 32, fmt="compressed-tensors", out_dir=out, calib_ids=calib_ids(), calib_samples=8,
             calib_seqlen=32, progress=False, awq_config=AwqConfig(search_samples=4),
             gptq_config=GptqConfig(act_order="group"))
    engine = LLMEngine(EngineArgs(model=str(out), kv_cache_memory=2**20, block_size=8))
    prompts = calib_ids(3, 9, seed=11).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    final = {}
    while engine.has_unfinished():
        final.update({o.request_id: o for o in engine.step() if o.finished})
    model = engine.runner.model
    for i, p in enumerate(prompts):
        ids, want = list(p), []
        for _ in range(8):
            want.append(int(logits(model, torch.tensor([ids]))[0, -1].argmax()))
            ids.append(want[-1])
        assert final[f"r{i}"].outputs[0].token_ids == want


# ----------------------------------------------------------------------------- AutoGPTQ layout


def pack_dense(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Independent packer for the GPTQ layout: value k of each row at global bit k * bits."""
    rows, n = values.shape
    words = torch.zeros(rows, (n * bits + 31) // 32, dtype=torch.int64)
    for k in range(n):
        w, off = divmod(k * bits, 32)
        v = values[:, k].to(torch.int64)
        words[:, w] |= (v << off) & 0xFFFFFFFF
        if off + bits > 32:
            words[:, w + 1] |= v >> (32 - off)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def gptq_tensors(w: torch.Tensor, bits: int, g: int, sym: bool, perm: torch.Tensor | None, v2: bool, seed: int):
    """AutoGPTQ tensors for w [out, in]: groups formed in perm order (desc_act) or in order;
    random-ish but valid codes around w. Returns (tensors, exact dequantized weight)."""
    out_f, in_f = w.shape
    gen = torch.Generator().manual_seed(seed)
    g_idx = torch.arange(in_f) // g
    if perm is not None:
        g_idx = torch.empty(in_f, dtype=torch.int64)
        g_idx[perm] = torch.arange(in_f) // g
    n_groups = in_f // g
    maxq = 2**bits - 1
    scales = (torch.rand(n_groups, out_f, generator=gen) * 0.02 + 0.005).half()
    zeros = torch.full((n_groups, out_f), 2 ** (bits - 1)) if sym else torch.randint(0, maxq + 1, (n_groups, out_f), generator=gen)
    zeros[0, :3] = 0  # zero point 0: the v1 "-1" wraps to all ones
    zeros[-1, :2] = maxq
    s, z = scales.float().t()[:, g_idx], zeros.t()[:, g_idx].float()
    q = torch.clamp(torch.round(w / s) + z, 0, maxq).to(torch.int64)
    stored_z = zeros if v2 else (zeros - 1) & maxq
    tensors = {
        "qweight": pack_dense(q, bits).t().contiguous(),  # [in words, out]: packed along the input dim
        "qzeros": pack_dense(stored_z, bits),
        "scales": scales,
        "g_idx": g_idx.to(torch.int32),
    }
    return tensors, (q.float() - z) * s


def make_gptq_checkpoint(src: Path, dst: Path, bits, g, sym, desc_act, v2, split_qkv=False):
    hf = json.loads((src / "config.json").read_text())
    dst.mkdir()
    tensors, ref = {}, {}
    for seed, (name, t) in enumerate(iter_tensors(src)):
        module, leaf = name.rsplit(".", 1)
        if leaf == "weight" and module.rsplit(".", 1)[-1] in LINEARS:
            in_f = t.shape[1]
            gen = torch.Generator().manual_seed(1000 * int(module.split(".")[2]) + in_f)  # q/k/v share it
            perm = torch.randperm(in_f, generator=gen) if desc_act else None
            if desc_act and split_qkv and module.endswith("k_proj"):
                perm = torch.randperm(in_f, generator=torch.Generator().manual_seed(seed))
            parts, ref[name] = gptq_tensors(t.float(), bits, g, sym, perm, v2, seed)
            tensors.update({f"{module}.{k}": v for k, v in parts.items()})
        else:
            tensors[name] = t.half()
            ref[name] = t.half().float()
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    qcfg = {"quant_method": "gptq", "bits": bits, "group_size": g, "desc_act": desc_act, "sym": sym,
            "checkpoint_format": "gptq_v2" if v2 else "gptq", "damp_percent": 0.01, "true_sequential": True}
    hf["quantization_config"] = qcfg
    (dst / "config.json").write_text(json.dumps(hf))
    return build_fp_model(resolve_config(hf), ref.items())


@pytest.mark.parametrize("bits,g,sym,desc_act,v2", [
    (4, 32, False, False, False),
    (4, 32, True, True, False),
    (4, 16, False, True, True),
    (8, 32, False, True, False),
    (8, 64, True, False, True),
])
def test_autogptq_checkpoint_loads_its_dequantized_weights(tmp_path, bits, g, sym, desc_act, v2):
    src = tmp_path / "fp"
    make_tiny_model("llama", src)
    ref = make_gptq_checkpoint(src, tmp_path / "q", bits, g, sym, desc_act, v2)
    loaded = load_model(tmp_path / "q", with_tokenizer=False)
    assert loaded.quantization["quant_method"] == "gptq"
    attn = loaded.model.model.layers[1].self_attn
    assert (type(attn.qkv_proj).__name__ == "InputPermuted") == desc_act
    ids = calib_ids(2, 20, seed=3)
    want, got = logits(ref, ids), logits(loaded.model, ids)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-4
    assert torch.equal(got[:, -1].argmax(-1), want[:, -1].argmax(-1))


def test_autogptq_qkv_with_different_orders_stay_unfused_and_legacy_config_file(tmp_path):
    src = tmp_path / "fp"
    make_tiny_model("qwen2", src)
    ref = make_gptq_checkpoint(src, tmp_path / "q", 4, 32, False, True, False, split_qkv=True)
    hf = json.loads((tmp_path / "q" / "config.json").read_text())
    (tmp_path / "q" / "quantize_config.json").write_text(json.dumps({k: v for k, v in hf.pop("quantization_config").items()
                                                                      if k != "quant_method"}))
    (tmp_path / "q" / "config.json").write_text(json.dumps(hf))  # AutoGPTQ < 0.5: the config beside config.json
    loaded = load_model(tmp_path / "q", with_tokenizer=False)
    attn = loaded.model.model.layers[0].self_attn
    assert attn.qkv_proj is None and type(attn.k_proj).__name__ == "InputPermuted"
    ids = calib_ids(2, 20, seed=4)
    want, got = logits(ref, ids), logits(loaded.model, ids)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-4


def test_autogptq_layouts_we_cannot_read_are_clear_errors(tmp_path):
    src = tmp_path / "fp"
    make_tiny_model("llama", src)
    make_gptq_checkpoint(src, tmp_path / "q", 4, 32, False, True, True)
    cfg_path = tmp_path / "q" / "config.json"
    hf = json.loads(cfg_path.read_text())
    for patch, match in [({"checkpoint_format": "marlin"}, "format 'marlin'"), ({"pack_dtype": "int16"}, "pack_dtype"),
                         ({"bits": 5}, "5 bits")]:
        cfg_path.write_text(json.dumps({**hf, "quantization_config": {**hf["quantization_config"], **patch}}))
        with pytest.raises(ModelLoadError, match=match):
            load_model(tmp_path / "q", with_tokenizer=False)
    # a g_idx whose groups are not all group_size wide has no group-contiguous layout
    from safetensors import safe_open

    cfg_path.write_text(json.dumps(hf))
    with safe_open(str(tmp_path / "q" / "model.safetensors"), framework="pt") as st:
        t = {k: st.get_tensor(k) for k in st.keys()}
    t["model.layers.0.mlp.down_proj.g_idx"] = torch.zeros_like(t["model.layers.0.mlp.down_proj.g_idx"])
    save_file(t, str(tmp_path / "q" / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="not all 32 columns wide"):
        load_model(tmp_path / "q", with_tokenizer=False)


def test_cli_gptq_flags(tmp_path, capsys):
    from lowbit.cli import main
    from test_awq import add_byte_tokenizer

    src = tmp_path / "m"
    make_tiny_model("llama", src)
    add_byte_tokenizer(src)
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(f"document {i} " + "some calibration text " * 8 for i in range(12)))
    rc = main(["quantize", "--model", str(src), "--method", "gptq", "--w-bit", "4", "--group-size", "32",
               "--calib", str(calib), "--calib-samples", "4", "--calib-seqlen", "32", "--format", "compressed-tensors",
               "--act-order", "--damp", "0.05", "--gptq-grid", "minmax", "--out", str(tmp_path / "q"), "--quiet"])
    assert rc == 0
    report = json.loads((tmp_path / "q" / "quant_report.json").read_text())
    assert report["gptq"] == {"damp": 0.05, "block_size": 128, "act_order": "group", "max_damp_tries": 5,
                              "grid": "minmax"}
    assert "GPTQ better than RTN" in capsys.readouterr().err
    rc = main(["quantize", "--model", str(src), "--method", "awq", "--act-order", "--out", str(tmp_path / "r")])
    assert rc == 2 and "gptq and awq-gptq only" in capsys.readouterr().err
    rc = main(["quantize", "--model", str(src), "--method", "rtn", "--act-order", "none", "--out", str(tmp_path / "r")])
    assert rc == 2 and "gptq and awq-gptq only" in capsys.readouterr().err
    rc = main(["quantize", "--model", str(src), "--method", "awq", "--gptq-grid", "mse", "--out", str(tmp_path / "r")])
    assert rc == 2 and "gptq and awq-gptq only" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_quantize_cli_act_order_default_is_weight():
    """No --act-order: GPTQ's default (weight); 'none' turns it off; a bare flag means group."""
    from lowbit.commands.quantize import _act_order

    assert GptqConfig().act_order == "weight"
    assert _act_order(None) == "weight" and _act_order("none") is None and _act_order("group") == "group"


@pytest.mark.slow
@pytest.mark.parametrize("bits,desc_act,sym", [(4, True, True), (4, False, False), (8, True, False)])
def test_gptqmodel_checkpoint_loads(tmp_path, bits, desc_act, sym):
    """A checkpoint GPTQModel itself quantized and saved (CPU), loaded here: every weight equals
    GPTQModel's own dequantization (it dequantizes in fp16) and greedy decoding agrees.
    Set LOWBIT_GPTQMODEL_PYTHON to a python with gptqmodel installed (see benchmarks/peers/gptqmodel_tiny.py)."""
    import os
    import subprocess

    from safetensors.torch import load_file

    from lowbit.quant.checkpoint import load_quantized
    from test_awq import add_byte_tokenizer

    py = os.environ.get("LOWBIT_GPTQMODEL_PYTHON")
    if not py:
        pytest.skip("LOWBIT_GPTQMODEL_PYTHON is not set")
    src, out = tmp_path / "fp", tmp_path / "q"
    make_tiny_model("llama", src, hidden_size=128, intermediate_size=256, num_key_value_heads=4)
    add_byte_tokenizer(src)
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "peers" / "gptqmodel_tiny.py"
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": "2", "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run([py, str(script), str(src), str(out), str(bits), str(int(desc_act)), str(int(sym)), "32"],
                   check=True, env=env, capture_output=True, timeout=1200)
    ref = load_file(str(out / "peer_reference.safetensors"))
    ck = load_quantized(out)
    assert ck.fmt == "gptq" and len(ck.quantized) == 14 and (len(ck.input_perms) == 14) == desc_act
    for name, qw in ck.quantized.items():
        w = unpermute_columns(qw.dequantize(), ck.input_perms.get(name))
        torch.testing.assert_close(w.half().float(), ref["W." + name], rtol=0, atol=0)
    lm = load_model(out, with_tokenizer=False)
    ids, got = ref["ids"][0].tolist(), []
    for _ in range(12):
        got.append(int(logits(lm.model, torch.tensor([ids + got]))[0, -1].argmax()))
    assert got == ref["greedy"][0, 8:].tolist()


@pytest.mark.parametrize("order", [None, "group", "weight"])
def test_shared_input_weights_round_as_they_would_alone(order):
    """q/k/v (and gate/up) are rounded in one stacked pass: each must get exactly its lone result,
    clip thresholds included (a weight without thresholds is not clipped)."""
    from lowbit.quant.gptq import gptq_quantize_shared
    torch.manual_seed(0)
    x = torch.randn(1024, 128) * torch.rand(128) * 3
    h = hessian_of(x)
    ws = [torch.randn(48, 128), torch.randn(16, 128), torch.randn(16, 128)]
    mvs = [None, ws[1].abs().reshape(16, 4, 32).amax(-1) * 0.8, None]
    cfg = GptqConfig(act_order=order)
    stacked = gptq_quantize_shared(ws, h, QuantSpec(4, 32), cfg, mvs)
    for w, mv, got in zip(ws, mvs, stacked):
        alone = gptq_quantize(w, h, QuantSpec(4, 32), cfg, mv)
        assert torch.equal(alone.qweight.q, got.qweight.q)
        assert torch.equal(alone.qweight.scales, got.qweight.scales) and torch.equal(alone.qweight.zeros, got.qweight.zeros)
        assert alone.err == got.err and alone.err_rtn == got.err_rtn
        assert (alone.perm is None) == (got.perm is None)


def test_sigterm_during_quantize_leaves_no_spill_folder(tmp_path):
    """`timeout` / a scheduler sends SIGTERM: lowbit quantize unwinds, removes its folder of
    finished layers and writes no output (by default Python would die with both in place)."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from test_awq import add_byte_tokenizer

    src = tmp_path / "m"
    make_tiny_model("llama", src, num_hidden_layers=40)
    add_byte_tokenizer(src)
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(f"document {i} " + "some calibration text " * 40 for i in range(64)))
    cmd = [sys.executable, "-m", "lowbit.cli", "quantize", "--model", str(src), "--method", "gptq",
           "--group-size", "32", "--calib", str(calib), "--calib-samples", "32", "--calib-seqlen", "256",
           "--out", str(tmp_path / "q"), "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    spill = []
    while time.time() < deadline and proc.poll() is None and not spill:
        spill = [p for p in tmp_path.glob(".q.layers-*") if any(p.iterdir())]
        time.sleep(0.05)
    assert spill, proc.communicate()[0].decode()[-2000:]
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    assert not list(tmp_path.glob(".q*")) and not (tmp_path / "q").exists()
