"""SmoothQuant W8A8 (lowbit/quant/smoothquant.py) end to end on tiny random models: smoothing keeps
the fp function, quantize -> save (compressed-tensors int-quantized) -> load (W8A8Linear) ->
generate, engine greedy tokens equal to a dense fake-quantized W8A8 reference on a mixed batch,
vLLM-style W8A8 checkpoints load, unsupported activation schemes are refused, and W4A8
(activation_dtype int8) stays close to W4A16."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_tiny_model
from lowbit.engine.args import EngineArgs
from lowbit.engine.llm_engine import LLMEngine
from lowbit.engine.sampling_params import SamplingParams
from lowbit.errors import LowbitError, ModelLoadError, QuantizationError
from lowbit.layers.linear import QuantLinear
from lowbit.layers.linear_int8 import W4A8Linear, W8A8Linear
from lowbit.models.loader import read_hf_config
from lowbit.models.registry import resolve_config
from lowbit.models.weights import SafetensorsCheckpoint
from lowbit.quant import smoothquant as SQ
from lowbit.quant.activations import ActivationStore, run_layer
from lowbit.quant.awq_config import AwqConfig, scale_groups
from lowbit.quant.loader import load_model
from lowbit.quant.pipeline import build_layer, quantize
from lowbit.models.transformer import rotary_for

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def calib_ids(n=8, t=32, seed=0):
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def w8a8_dir(tmp_path_factory):
    """A tiny llama (no GQA, so the v -> o group is smoothed too) quantized with SmoothQuant."""
    root = tmp_path_factory.mktemp("sq")
    src, out = root / "m", root / "q"
    make_tiny_model("llama", src, num_key_value_heads=4)
    quantize(src, "smoothquant", 8, -1, True, fmt="compressed-tensors", out_dir=out, calib_ids=calib_ids(),
             calib_samples=8, calib_seqlen=32, progress=False, awq_config=AwqConfig(search_samples=4))
    return src, out


def test_smoothing_keeps_the_fp_function(tmp_path):
    make_tiny_model("llama", tmp_path / "m", num_key_value_heads=4)
    cfg = resolve_config(read_hf_config(tmp_path / "m"))
    layer = build_layer(cfg, SafetensorsCheckpoint(tmp_path / "m"), 0)
    rotary = rotary_for(cfg)
    h = torch.randn(2, 16, cfg.hidden_size)
    h[..., 3] *= 30
    before = run_layer(layer, h, rotary)
    x_max = {g.inspect: torch.rand(cfg.hidden_size if g.inspect in ("self_attn", "mlp", "self_attn.o_proj")
                                   else cfg.intermediate_size) * 10 + 0.1 for g in scale_groups(layer)}
    w_before = layer.self_attn.q_proj.weight.clone()
    SQ._smooth(layer, scale_groups(layer), x_max, 0.5)
    assert not torch.equal(layer.self_attn.q_proj.weight, w_before)
    torch.testing.assert_close(run_layer(layer, h, rotary), before, rtol=1e-4, atol=1e-4)


def test_smoothing_scales_follow_the_formula():
    x_max = torch.tensor([8.0, 1.0, 0.0])
    w = torch.tensor([[2.0, -0.5, 1.0], [1.0, 4.0, -1.0]])
    s = SQ.smoothing_scales(x_max, [w], 0.5)
    torch.testing.assert_close(s, torch.tensor([(8 / 2) ** 0.5, (1 / 4) ** 0.5, (1e-5) ** 0.5 / 1.0]))


def test_smoothquant_search_never_loses_to_no_smoothing(tmp_path):
    make_tiny_model("llama", tmp_path / "m")
    cfg = resolve_config(read_hf_config(tmp_path / "m"))
    layer = build_layer(cfg, SafetensorsCheckpoint(tmp_path / "m"), 0)
    store = ActivationStore()
    h = torch.randn(4, 24, cfg.hidden_size)
    h[..., 7] *= 50  # outlier channel: what smoothing is for
    store.append(h)
    qweights, res = SQ.smoothquant_layer(layer, rotary_for(cfg), store, AwqConfig(search_samples=2), index=0)
    assert set(res.losses) == {"none", "0.3", "0.4", "0.5", "0.6", "0.7", "0.8", "0.9"}
    assert 0 <= res.err_best <= res.err_none
    assert all(qw.bits == 8 and qw.sym and qw.group_size == qw.in_features for qw in qweights.values())
    assert isinstance(layer.self_attn.q_proj, SQ.FakeW8A8)  # the next layer calibrates on W8A8 outputs


def test_checkpoint_layout_is_compressed_tensors_int_quantized(w8a8_dir):
    _, out = w8a8_dir
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "compressed-tensors" and qcfg["format"] == "int-quantized"
    group = qcfg["config_groups"]["group_0"]
    assert group["weights"] | {"num_bits": 8, "strategy": "channel", "symmetric": True, "type": "int"} == group["weights"]
    act = group["input_activations"]
    assert (act["num_bits"], act["dynamic"], act["strategy"], act["symmetric"]) == (8, True, "token", True)
    tensors = load_file(str(out / "model.safetensors"))
    w, s = tensors["model.layers.0.self_attn.q_proj.weight"], tensors["model.layers.0.self_attn.q_proj.weight_scale"]
    assert w.dtype == torch.int8 and int(w.min()) >= -127 and s.shape == (w.shape[0], 1)
    report = json.loads((out / "quant_report.json").read_text())
    assert report["method"] == "smoothquant" and len(report["totals"]["alphas"]) == 2


def test_w8a8_checkpoint_loads_and_stays_close_to_fp(w8a8_dir):
    src, out = w8a8_dir
    q = load_model(out, with_tokenizer=False).model
    assert isinstance(q.model.layers[0].self_attn.qkv_proj, W8A8Linear)
    assert isinstance(q.model.layers[1].mlp.down_proj, W8A8Linear)
    fp = load_model(src, with_tokenizer=False).model
    x = calib_ids(2, 24, seed=3)
    a, b = fp.compute_logits(fp(x)), q.compute_logits(q(x))
    assert torch.isfinite(b).all() and float((a - b).norm() / a.norm()) < 0.05


class DenseW8A8(torch.nn.Module):
    """The dense fake-quantized reference of a W8A8Linear: int8 per-token x (torch rounding),
    dequantized int8 weights, one float matmul."""

    def __init__(self, layer: W8A8Linear) -> None:
        super().__init__()
        self.w, self.bias = layer.dequantize(), layer.bias

    def forward(self, x):
        return torch.nn.functional.linear(SQ.fake_int8_per_token(x), self.w, self.bias)


def _dense_reference(model):
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, W8A8Linear):
                setattr(parent, name, DenseW8A8(child))
    return model


@torch.no_grad()
def dense_greedy(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model.compute_logits(model(torch.tensor([ids])))[0, -1].argmax()))
    return ids[len(prompt):]


def test_engine_greedy_matches_the_dense_fake_quantized_reference(w8a8_dir):
    _, out = w8a8_dir
    engine = LLMEngine(EngineArgs(model=str(out), kv_cache_memory=2**20, block_size=8, max_num_batched_tokens=16))
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 17, 40, 1, 9)]
    for i, p in enumerate(prompts):  # chunked prefills mixed with decodes in the same steps
        engine.add_request(f"r{i}", p, GREEDY)
    final = {}
    while engine.has_unfinished():
        final.update({o.request_id: o for o in engine.step() if o.finished})
    ref = _dense_reference(load_model(out, with_tokenizer=False).model)
    for i, p in enumerate(prompts):
        assert final[f"r{i}"].outputs[0].token_ids == dense_greedy(ref, p, 10), f"prompt {i}"


def test_vllm_style_w8a8_checkpoint_loads(tmp_path):
    """llm-compressor's W8A8 layout: int8 weight, bf16 weight_scale [out, 1], zero weight_zero_point."""
    src = tmp_path / "m"
    fp = make_tiny_model("llama", src)
    tensors, cfg = load_file(str(src / "model.safetensors")), json.loads((src / "config.json").read_text())
    out = {}
    for k, t in tensors.items():
        if k.endswith("_proj.weight") and ".layers." in k:
            q, s = SQ.int8_weight(t)
            m = k[: -len(".weight")]
            out[k], out[m + ".weight_scale"] = q, s.to(torch.bfloat16).unsqueeze(1)
            out[m + ".weight_zero_point"] = torch.zeros(q.shape[0], 1, dtype=torch.int8)
        else:
            out[k] = t
    act = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True,
           "observer": "memoryless", "group_size": None, "actorder": None, "block_structure": None, "observer_kwargs": {}}
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "int-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": act, "output_activations": None,
                                      "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel",
                                                  "dynamic": False, "group_size": None}}},
        "ignore": ["lm_head"], "kv_cache_scheme": None,
    }
    dst = tmp_path / "w8a8"
    dst.mkdir()
    save_file(out, str(dst / "model.safetensors"))
    (dst / "config.json").write_text(json.dumps(cfg))
    q = load_model(dst, with_tokenizer=False).model
    assert isinstance(q.model.layers[0].mlp.gate_up_proj, W8A8Linear)
    x = calib_ids(1, 16, seed=4)
    with torch.no_grad():
        want = fp(x).logits
    got = q.compute_logits(q(x))
    assert float((got - want).norm() / want.norm()) < 0.05

    cfg["quantization_config"]["config_groups"]["group_0"]["input_activations"]["dynamic"] = False
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="input_activations"):
        load_model(dst, with_tokenizer=False)


@pytest.mark.parametrize("kw", [dict(w_bit=4), dict(group_size=32), dict(fmt="awq")])
def test_smoothquant_refuses_what_is_not_w8a8(tmp_path, kw):
    make_tiny_model("llama", tmp_path / "m")
    args = dict(method="smoothquant", w_bit=8, group_size=-1, sym=True, fmt="compressed-tensors",
                out_dir=tmp_path / "out", progress=False, calib_ids=calib_ids()) | kw
    with pytest.raises(QuantizationError, match="W8A8"):
        quantize(tmp_path / "m", **args)
    assert not (tmp_path / "out").exists()


def test_w4a8_engine_is_close_to_w4a16(tmp_path):
    src, out = tmp_path / "m", tmp_path / "q"
    make_tiny_model("llama", src)
    quantize(src, "rtn", 4, 32, fmt="compressed-tensors", out_dir=out, progress=False)
    base = dict(model=str(out), kv_cache_memory=2**20, block_size=8)
    w4a16, w4a8 = LLMEngine(EngineArgs(**base)), LLMEngine(EngineArgs(**base, activation_dtype="int8"))
    assert isinstance(w4a8.runner.model.model.layers[0].self_attn.qkv_proj, W4A8Linear)
    assert isinstance(w4a16.runner.model.model.layers[0].self_attn.qkv_proj, QuantLinear)
    x = calib_ids(2, 20, seed=6)
    a = w4a16.runner.model.compute_logits(w4a16.runner.model(x))
    b = w4a8.runner.model.compute_logits(w4a8.runner.model(x))
    assert 0 < float((a - b).norm() / a.norm()) < 0.03
    with pytest.raises(LowbitError, match="activation_dtype"):
        EngineArgs(activation_dtype="int4")
    with pytest.raises(LowbitError, match="4-bit weight checkpoint"):
        LLMEngine(EngineArgs(model=str(src), kv_cache_memory=2**20, block_size=8, activation_dtype="int8"))
