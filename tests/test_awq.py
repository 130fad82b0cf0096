"""AWQ / RTN on tiny random models: exact scale folding, AWQ beats RTN where it should, guards,
and the quantize pipeline end to end (checkpoint loadable, report written, errors up front)."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_model
from lowbit.errors import LowbitError, QuantizationError
from lowbit.layers.rotary import RotaryEmbedding
from lowbit.models.loader import read_hf_config
from lowbit.quant.loader import load_model
from lowbit.models.registry import resolve_config
from lowbit.models.weights import SafetensorsCheckpoint
from lowbit.quant import awq as A
from lowbit.quant import awq_clip as C
from lowbit.quant import awq_scale as S
from lowbit.quant import capture as Cap
from lowbit.quant.activations import ActivationStore, propagate, run_layer
from lowbit.quant.awq_config import AwqConfig, LayerCapture, scale_groups
from lowbit.quant.pipeline import build_layer, quantize
from lowbit.quant.rtn import QuantSpec, fake_quantize_model_, linear_names

ARCHS = ["llama", "llama3", "mistral", "qwen2", "qwen3"]


def tiny_layer(tmp_path: Path, arch: str, **overrides):
    d = tmp_path / arch
    make_tiny_model(arch, d, **overrides)
    cfg = resolve_config(read_hf_config(d))
    layer = build_layer(cfg, SafetensorsCheckpoint(d), 0)
    rotary = RotaryEmbedding(cfg.head_dim, 512, cfg.rope)
    return layer, rotary, cfg


def store_of(h: torch.Tensor, per_chunk: int = 2) -> ActivationStore:
    s = ActivationStore()
    for i in range(0, h.shape[0], per_chunk):
        s.append(h[i : i + per_chunk])
    return s


# ----------------------------------------------------------------------------- folding


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kv_heads", [2, 4])  # 4 == num_heads: the v -> o group exists too
def test_scale_folding_leaves_the_fp_function_unchanged(tmp_path, arch, kv_heads):
    layer, rotary, cfg = tiny_layer(tmp_path, arch, num_key_value_heads=kv_heads)
    groups = scale_groups(layer)
    names = [g.name for g in groups]
    has_vo = kv_heads == cfg.num_heads and cfg.q_size == cfg.hidden_size
    assert names == (["qkv", "v_o", "gate_up", "up_down"] if has_vo else ["qkv", "gate_up", "up_down"])
    h = torch.randn(2, 16, cfg.hidden_size)
    ref = run_layer(layer, h, rotary)
    before_down = layer.mlp.down_proj.weight.clone()
    g = torch.Generator().manual_seed(1)
    for grp in groups:
        n_in = layer.get_submodule(grp.linears[0]).in_features
        S.apply_scales(layer, grp, torch.rand(n_in, generator=g) * 4 + 0.25)
    out = run_layer(layer, h, rotary)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    # not vacuous: the weights did change
    assert not torch.allclose(layer.mlp.down_proj.weight, before_down)


def test_folding_changes_weights(tmp_path):
    layer, rotary, cfg = tiny_layer(tmp_path, "qwen2", num_key_value_heads=4)
    before = {n: p.clone() for n, p in layer.state_dict().items()}
    for k, grp in enumerate(scale_groups(layer)):  # a different scale per group: 2, 3, 4, 5
        n_in = layer.get_submodule(grp.linears[0]).in_features
        S.apply_scales(layer, grp, torch.full((n_in,), 2.0 + k))
    after = layer.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert {"input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.v_proj.bias",
            "self_attn.q_proj.weight", "mlp.down_proj.weight", "mlp.up_proj.weight"} <= changed
    torch.testing.assert_close(after["self_attn.q_proj.weight"], before["self_attn.q_proj.weight"] * 2)
    torch.testing.assert_close(after["self_attn.v_proj.bias"], before["self_attn.v_proj.bias"] / 3)
    torch.testing.assert_close(after["mlp.up_proj.weight"], before["mlp.up_proj.weight"] * 4 / 5)


# ----------------------------------------------------------------------------- search quality


def outlier_setup(tmp_path, arch="llama"):
    """A layer whose inputs have a few large channels (what AWQ exploits)."""
    layer, rotary, cfg = tiny_layer(tmp_path, arch)
    torch.manual_seed(0)
    with torch.no_grad():
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight[:4] *= 25.0
    h = torch.randn(8, 32, cfg.hidden_size)
    return layer, rotary, cfg, h


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("bits", [3, 4])
def test_awq_output_error_is_at_most_rtn_with_outlier_channels(tmp_path, arch, bits):
    layer, rotary, cfg, h = outlier_setup(tmp_path, arch)
    spec = QuantSpec(bits=bits, group_size=32)
    cfg_awq = AwqConfig(search_samples=None, chunk_tokens=128)
    qweights, res = A.awq_quantize_layer(layer, rotary, store_of(h), spec, cfg_awq)
    assert set(qweights) == set(linear_names(layer))
    assert 0 < res.err_awq <= res.err_rtn
    assert res.err_awq < 0.8 * res.err_rtn  # with outliers the gain is substantial
    for g in res.groups:
        assert g.loss_awq <= g.loss_rtn + 1e-12 and len(g.losses) == 20 and not g.fallback
    # the layer now computes what the checkpoint will: its weights are the dequantized ones
    for n, qw in qweights.items():
        assert torch.equal(layer.get_submodule(n).weight, qw.dequantize())


def test_clip_search_never_increases_the_group_error():
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    w[:, 5] *= 8  # a few large weights make clipping worthwhile
    x = torch.randn(200, 64)
    spec = QuantSpec(bits=3, group_size=32)
    max_val, before, after = C.search_clip(w, x, spec, AwqConfig())
    assert max_val.shape == (16, 2)
    assert after <= before and after < before  # some group benefits
    org = w.reshape(16, 2, 32).abs().amax(-1)
    assert bool((max_val <= org + 1e-7).all()) and bool((max_val >= 0.5 * org - 1e-7).all())


def test_grid_scales_are_normalised_and_finite():
    x_mean = torch.tensor([0.0, 1.0, 4.0, float("inf")])
    s = S.grid_scales(x_mean, None, 0.5)
    assert torch.isfinite(s).all()
    s = S.grid_scales(torch.tensor([1.0, 4.0, 16.0]), None, 0.5)
    assert float(s.max() * s.min()) == pytest.approx(1.0)
    assert torch.equal(S.grid_scales(torch.tensor([1.0, 4.0]), None, 0.0), torch.ones(2))


# ----------------------------------------------------------------------------- guards


def test_nan_activations_fall_back_to_no_scaling_with_a_warning(tmp_path):
    layer, rotary, cfg = tiny_layer(tmp_path, "llama")
    h = torch.randn(4, 16, cfg.hidden_size)
    h[0, 3, 7] = float("nan")
    with pytest.warns(RuntimeWarning, match="no finite loss"):
        qweights, res = A.awq_quantize_layer(layer, rotary, store_of(h), QuantSpec(4, 32), AwqConfig(search_samples=None))
    assert all(g.fallback and g.ratio is None for g in res.groups)
    for qw in qweights.values():
        assert torch.isfinite(qw.scales).all()
    json.dumps([g.__dict__ for g in res.groups], allow_nan=False)  # report stays valid JSON


def test_activation_store_keeps_fp32_for_values_fp16_cannot_hold():
    s = ActivationStore()
    s.append(torch.ones(1, 2, 3))
    s.append(torch.full((1, 2, 3), 1e6))
    chunks = list(s._chunks)
    assert chunks[0].dtype == torch.float16 and chunks[1].dtype == torch.float32
    assert [float(c.max()) for c in s] == [1.0, 1e6]


def test_group_size_that_does_not_divide_is_refused_before_any_work(tmp_path):
    make_tiny_model("llama", tmp_path / "m")
    out = tmp_path / "out"
    with pytest.raises(QuantizationError, match="group size 48 does not divide"):
        quantize(tmp_path / "m", "rtn", 4, 48, fmt="compressed-tensors", out_dir=out, progress=False)
    assert not out.exists() and list(tmp_path.iterdir()) == [tmp_path / "m"]


def test_auto_group_size_takes_the_largest_that_divides_every_layer():
    from lowbit.quant.pipeline import auto_group_size, resolve_config

    base = dict(architectures=["LlamaForCausalLM"], vocab_size=64, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
    def g(hidden, inter):
        return auto_group_size(resolve_config(base | dict(hidden_size=hidden, intermediate_size=inter)))
    assert g(4096, 11008) == 128
    assert g(576, 1536) == 64  # SmolLM2-135M: 576 = 4.5 x 128
    assert g(96, 160) == 32
    assert g(72, 72) == -1


def test_default_group_size_is_auto_on_the_cli(tmp_path):
    from lowbit.cli import main

    make_tiny_model("llama", tmp_path / "m")
    out = tmp_path / "out"
    assert main(["quantize", "--model", str(tmp_path / "m"), "--method", "rtn", "--out", str(out), "--quiet"]) == 0
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["group_size"] in (128, 64, 32)


@pytest.mark.parametrize("kw,match", [
    (dict(w_bit=3, fmt="awq"), "4-bit weights only"),
    (dict(w_bit=9, fmt="compressed-tensors"), "bits must be"),
    (dict(method="hqq"), "unknown method"),
    (dict(fmt="gguf"), "unknown format"),
])
def test_bad_requests_are_clear_errors(tmp_path, kw, match):
    make_tiny_model("llama", tmp_path / "m")
    args = dict(method="rtn", w_bit=4, group_size=32, fmt="awq", out_dir=tmp_path / "out", progress=False) | kw
    with pytest.raises(LowbitError, match=match):
        quantize(tmp_path / "m", **args)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- end to end


def calib_ids(n=8, t=32, seed=0):
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch,fmt,bits,gs", [
    ("llama", "awq", 4, 32),
    ("qwen2", "compressed-tensors", 3, 16),
    ("qwen3", "compressed-tensors", 8, -1),
])
def test_awq_end_to_end_writes_a_loadable_checkpoint(tmp_path, arch, fmt, bits, gs):
    src = tmp_path / "m"
    make_tiny_model(arch, src, num_key_value_heads=4)
    out = tmp_path / "q"
    rep = quantize(src, "awq", bits, gs, fmt=fmt, out_dir=out, calib_ids=calib_ids(), calib_samples=8,
                   calib_seqlen=32, progress=False, awq_config=AwqConfig(search_samples=4))
    assert rep.quantized_linears == 2 * 7 and len(rep.layers) == 2
    report = json.loads((out / "quant_report.json").read_text())
    assert report["method"] == "awq" and report["layers"][0]["groups"][0]["name"] == "qkv"
    vo = {"v_o"} if arch != "qwen3" else set()  # qwen3's tiny config has q_size != hidden: no v -> o group
    assert {g["name"] for g in report["layers"][0]["groups"]} == {"qkv", "gate_up", "up_down"} | vo
    assert "model.embed_tokens" in report["modules_to_not_convert"] and "lm_head" in report["modules_to_not_convert"]
    assert (out / "quant_report.png").read_bytes()[:4] == b"\x89PNG"

    q = load_model(out, with_tokenizer=False)
    assert q.quantization is not None
    fp = load_model(src, with_tokenizer=False)
    x = calib_ids(1, 24, seed=5)
    a = fp.model.compute_logits(fp.model(x))
    b = q.model.compute_logits(q.model(x))
    rel = float((a - b).norm() / a.norm())
    assert torch.isfinite(b).all() and rel < {3: 0.5, 4: 0.3, 8: 0.02}[bits]

    with pytest.raises(LowbitError, match="already exists"):
        quantize(src, "awq", bits, gs, fmt=fmt, out_dir=out, calib_ids=calib_ids(), calib_samples=8, calib_seqlen=32, progress=False)
    assert json.loads((out / "quant_report.json").read_text()) == report  # untouched


def test_rtn_checkpoint_equals_rtn_of_the_source_weights(tmp_path):
    src = tmp_path / "m"
    make_tiny_model("llama", src)
    out = tmp_path / "q"
    rep = quantize(src, "rtn", 4, 32, fmt="compressed-tensors", out_dir=out, progress=False)
    assert rep.calibration is None and not (out / "quant_report.png").exists()
    q = load_model(out, with_tokenizer=False).model
    ref = load_model(src, with_tokenizer=False).model
    fake_quantize_model_(ref, QuantSpec(4, 32, scale_dtype=torch.float32))
    x = calib_ids(2, 16)
    torch.testing.assert_close(q.compute_logits(q(x)), ref.compute_logits(ref(x)), rtol=1e-4, atol=1e-4)


def test_force_replaces_and_no_scratch_is_left(tmp_path):
    src = tmp_path / "m"
    make_tiny_model("mistral", src)
    out = tmp_path / "q"
    quantize(src, "rtn", 4, 32, out_dir=out, progress=False)
    quantize(src, "awq", 4, 32, out_dir=out, force=True, calib_ids=calib_ids(), calib_samples=8,
             calib_seqlen=32, progress=False)
    assert json.loads((out / "quant_report.json").read_text())["method"] == "awq"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "q"]


@pytest.mark.slow
def test_real_model_awq_w4_g64_beats_rtn(tmp_path, shared_data):
    from lowbit.eval.perplexity import perplexity, read_eval_text, tokenize_stream

    text = read_eval_text(shared_data / "wikitext-2-raw" / "wiki.test.raw")
    ppl = {}
    for method in ("rtn", "awq"):
        out = tmp_path / method
        quantize(None, method, 4, 64, fmt="awq", out_dir=out, calib_samples=32, progress=False,
                 awq_config=AwqConfig(search_samples=8))
        lm = load_model(out)
        ppl[method] = perplexity(lm.model, tokenize_stream(lm.tokenizer, text), 2048, max_windows=2).ppl
    assert ppl["awq"] < ppl["rtn"]


# ----------------------------------------------------------------------------- command line


def add_byte_tokenizer(model_dir: Path) -> None:
    """A 256-token byte-level tokenizer, so tiny random models can take text (calibration, eval)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(model_dir)


def test_cli_quantize_then_eval(tmp_path, capsys):
    from lowbit.cli import main

    src = tmp_path / "m"
    make_tiny_model("llama", src)
    add_byte_tokenizer(src)
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(f"Document {i}: the quick brown fox jumps over the lazy dog." * 3 for i in range(40)))
    out = tmp_path / "q"
    rc = main(["quantize", "--model", str(src), "--method", "awq", "--w-bit", "4", "--group-size", "32",
               "--calib", str(calib), "--calib-samples", "4", "--calib-seqlen", "64", "--search-samples", "2",
               "--format", "compressed-tensors", "--out", str(out), "--quiet"])
    assert rc == 0 and (out / "config.json").exists() and (out / "tokenizer.json").exists()
    report = json.loads((out / "quant_report.json").read_text())
    assert report["calibration"]["samples"] == 4 and report["calibration"]["source"] == str(calib)

    text = tmp_path / "eval.txt"
    text.write_text(" = Title = \n \n" + " some words here .\n" * 60)
    capsys.readouterr()
    assert main(["eval", "ppl", "--model", str(out), "--dataset", str(text), "--seqlen", "64", "--quiet"]) == 0
    assert "perplexity" in capsys.readouterr().out
    plot = tmp_path / "cmp.png"
    assert main(["eval", "compare", "--models", str(src), str(out), "--labels", "FP", "AWQ", "--dataset", str(text),
                 "--seqlen", "64", "--max-windows", "2", "--plot", str(plot), "--quiet"]) == 0
    table = capsys.readouterr().out
    assert "FP" in table and "AWQ" in table and "compressed-tensors W4 g32" in table
    assert plot.read_bytes()[:4] == b"\x89PNG"

    # bad input: one line on stderr, exit code 2, nothing overwritten
    assert main(["quantize", "--model", str(src), "--method", "rtn", "--group-size", "32", "--out", str(out), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["eval", "compare", "--models", str(src), str(out), "--labels", "one"]) == 2
    assert "labels" in capsys.readouterr().err



def test_search_tokens_do_not_over_sample_each_blocks_first_token(tmp_path):
    """A stride dividing the block length would pick every block's first token (the attention
    sink, with huge activations) 8x more often than it occurs; the sample must be unbiased."""
    mask = Cap.sample_tokens(64 * 512, 4096)
    assert int(mask.sum()) == 4096
    assert int(mask.view(64, 512)[:, 0].sum()) <= 3 * 64 * 4096 // (64 * 512)  # expected 8; a stride of 8 takes 64
    assert torch.equal(mask, Cap.sample_tokens(64 * 512, 4096))  # seeded: reproducible
    assert bool(Cap.sample_tokens(100, None).all()) and bool(Cap.sample_tokens(100, 500).all())
    layer, rotary, cfg = tiny_layer(tmp_path, "llama")
    cap = A.capture(layer, rotary, store_of(torch.randn(8, 32, cfg.hidden_size)), n_search=2, n_tokens=100)
    assert cap.inputs["mlp"].shape[0] == 100 and cap.inputs["self_attn"].shape[:2] == (2, 32)


# ----------------------------------------------------------------------------- heavy tokens


def test_heavy_tokens_streamed_in_chunks_equal_the_global_top_k():
    g = torch.Generator().manual_seed(0)
    score, rows = torch.rand(1000, generator=g), torch.randn(1000, 3, generator=g)
    heavy = Cap.HeavyTokens(17)
    for i in range(0, 1000, 64):
        heavy.offer(score[i : i + 64], torch.arange(i, min(i + 64, 1000)), rows[i : i + 64], -rows[i : i + 64])
    want = score.topk(17).indices
    assert sorted(heavy.index.tolist()) == sorted(want.tolist())
    order = heavy.index.argsort()
    torch.testing.assert_close(heavy.rows[0][order], rows[heavy.index[order]])
    torch.testing.assert_close(heavy.rows[1][order], -rows[heavy.index[order]])


def test_capture_keeps_every_sink_token_at_its_true_weight(tmp_path):
    """One token per sequence with a massive activation (the attention sink): the random sample
    would hold ~1 of them; the capture must hold all of them, each weighted as one token of the
    whole calibration set, so the weighted sample mean estimates the all-token mean."""
    layer, rotary, cfg = tiny_layer(tmp_path, "llama")
    h = torch.randn(64, 32, cfg.hidden_size)
    h[:, 5] *= 200.0  # position 5 of every sequence
    store = store_of(h, per_chunk=16)
    full = A.capture(layer, rotary, store, n_search=1, n_tokens=None)
    cap = A.capture(layer, rotary, store, n_search=1, n_tokens=40, n_heavy=16)
    for name in ("mlp", "mlp.down_proj", "self_attn.o_proj"):
        x, w = cap.inputs[name], cap.weights[name]
        assert x.shape[0] == w.shape[0] and abs(float(w.mean()) - 1.0) < 1e-5
        big = full.inputs[name].pow(2).sum(1).topk(16).indices
        for row in full.inputs[name][big]:  # every heavy row is kept, exactly once
            assert int((x == row).all(1).sum()) == 1
        heavy_w = w[: 16]
        assert torch.allclose(heavy_w, heavy_w[0].expand(16))  # heavy rows come first, weight of one token
        n_total = 64 * 32
        assert float(heavy_w[0]) == pytest.approx(x.shape[0] / n_total, rel=1e-4)
    # with every token captured the weights are all equal and the sample is the whole set
    few = A.capture(layer, rotary, store_of(h[:2]), n_search=1, n_tokens=None, n_heavy=16)
    assert 1 <= few.heavy["mlp"] <= 2 * (2 * 32 // A.HEAVY_MAX_SHARE)  # a minority (one per criterion) of a tiny calibration
    everything = A.capture(layer, rotary, store, n_search=1, n_tokens=None, n_heavy=16)
    assert everything.inputs["mlp"].shape[0] == 64 * 32
    torch.testing.assert_close(everything.weights["mlp"], torch.ones(64 * 32))


def test_weighted_losses_agree_between_the_gram_and_the_direct_path(tmp_path):
    layer, rotary, cfg = tiny_layer(tmp_path, "llama")
    lin = layer.mlp.down_proj
    x = torch.randn(300, lin.in_features) * torch.linspace(0.1, 3, 300).view(-1, 1)
    w = torch.linspace(3, 0.1, 300)  # the small rows weigh most
    w_fp = lin.weight.data.clone()
    lin.weight.data = QuantSpec(3, 32).fake(w_fp)
    gram, n = S.gram_of(x, w)
    via_gram = S.linear_loss(lin, w_fp, gram, n)()
    target = x @ w_fp.t()
    direct = S.chunked_loss(layer, "mlp.down_proj", x, target, rotary, 64, w)
    manual = float(((lin(x) - target).pow(2).sum(1) * w).sum() / (w.sum() * lin.out_features))
    assert via_gram == pytest.approx(manual, rel=1e-3) and direct == pytest.approx(manual, rel=1e-5)
    unweighted = S.chunked_loss(layer, "mlp.down_proj", x, target, rotary, 64)
    assert unweighted > 1.5 * manual  # the weights do change the loss


def test_clip_keeps_the_weight_a_rare_massive_token_needs():
    """A weight outlier read only by a rare token with a huge activation (how a middle layer writes
    the attention sink's massive activation): clipping it costs nothing on ordinary tokens, so a
    random sample that misses the rare token clips it away; the stratified sample keeps it."""
    g = torch.Generator().manual_seed(0)
    spec, cfg = QuantSpec(4, 32), AwqConfig()
    w = torch.randn(8, 64, generator=g) * 0.02
    w[:, 3] = 1.0  # the outlier column, read through input channel 3
    x = torch.randn(4096, 64, generator=g)
    x[:, 3] = 0.0
    x[::512, 3] = 300.0  # 8 of 4,096 tokens
    rnd = x[Cap.sample_tokens(4096, 512, seed=1)]
    assert int((rnd[:, 3] != 0).sum()) <= 3
    max_rnd, _, _ = C.search_clip(w, rnd[rnd[:, 3] == 0], spec, cfg)  # a sample that missed them
    xs, ws = C.stratified_sample(x, None, 512, 128)
    assert xs.shape[0] == 512 and int((xs[:, 3] != 0).sum()) == 8 and abs(float(ws.mean()) - 1) < 1e-5
    assert float(ws[0]) < float(ws[-1])  # the heavy rows stand for themselves only
    max_strat, _, _ = C.search_clip(w, xs, spec, cfg, ws)
    org = w[:, :32].abs().amax(1)
    assert bool((max_rnd[:, 0] < 0.9 * org).all())  # clipped away without the rare token
    assert bool((max_strat[:, 0] >= 0.9 * org).all())  # kept (to within one grid step or so) with it


def test_scale_search_leaves_the_heavy_rows_out(tmp_path):
    """The heavy tokens weigh nothing in the scale search (they stay in the clip search): its
    losses equal those of a capture that never held them."""
    layer, rotary, cfg = tiny_layer(tmp_path, "llama")
    h = torch.randn(8, 32, cfg.hidden_size)
    h[:, 0] *= 100.0
    cap = A.capture(layer, rotary, store_of(h), n_search=2, n_tokens=64, n_heavy=8)
    assert cap.heavy["mlp"] >= 8
    grp, spec = scale_groups(layer)[-2], QuantSpec(3, 32)
    _, got = S.search_scales(layer, grp, cap, spec, AwqConfig(), rotary)
    n = cap.heavy["mlp"]
    rest = LayerCapture(cap.h, cap.y, {**cap.inputs, "mlp": cap.inputs["mlp"][n:]},
                        {**cap.targets, "mlp": cap.targets["mlp"][n:]}, cap.abs_mean,
                        {**cap.weights, "mlp": cap.weights["mlp"][n:]})
    _, ref = S.search_scales(layer, grp, rest, spec, AwqConfig(), rotary)
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(ref.losses), rtol=1e-4, atol=1e-9)


def test_relative_loss_weights_each_token_by_its_residual_size(tmp_path):
    layer, rotary, cfg = tiny_layer(tmp_path, "llama")
    h = torch.randn(8, 32, cfg.hidden_size) * torch.linspace(0.5, 4, 32).view(1, -1, 1)
    plain = A.capture(layer, rotary, store_of(h), n_search=1, n_tokens=None)
    rel = A.capture(layer, rotary, store_of(h), n_search=1, n_tokens=None, relative=True)
    torch.testing.assert_close(rel.inputs["mlp"], plain.inputs["mlp"])
    h_ms = h.half().float().pow(2).mean(-1).reshape(-1)  # the store keeps float16
    want = 1 / h_ms
    torch.testing.assert_close(rel.weights["mlp"], want / want.mean(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(plain.weights["mlp"], torch.ones(8 * 32))
    # the per-channel mean |x| of the scale grid: weighted the same way (plain: the ordinary mean)
    x = plain.inputs["mlp"]  # every token, in the same order as want
    torch.testing.assert_close(plain.abs_mean["mlp"], x.abs().mean(0), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(rel.abs_mean["mlp"], (x.abs() * want[:, None]).sum(0) / want.sum(), rtol=1e-4, atol=1e-6)


def test_cli_ablation_flags_reach_the_config(tmp_path, monkeypatch):
    import lowbit.quant.pipeline as pipeline
    from lowbit.cli import main

    seen = []

    def fake_quantize(*args, awq_config=None, **kw):
        seen.append(awq_config)
        raise SystemExit(0)

    monkeypatch.setattr(pipeline, "quantize", fake_quantize)
    for extra in ([], ["--absolute-loss"], ["--duo-scaling", "off"], ["--no-clip"]):
        with pytest.raises(SystemExit):
            main(["quantize", "--model", str(tmp_path), "--out", str(tmp_path / "o"), "--quiet", *extra])
    assert [c.relative_loss for c in seen] == [True, False, True, True]
    assert [c.duo_scaling for c in seen] == [True, True, False, True]
    assert [c.clip for c in seen] == [True, True, True, False]


def test_removed_awq_options_are_refused(tmp_path, capsys):
    """duo_scaling is on or off ("both" never paid off); --no-duo-scaling was a second spelling."""
    from lowbit.cli import main

    with pytest.raises(ValueError, match="duo_scaling"):
        AwqConfig(duo_scaling="both")
    for args in (["--duo-scaling", "both"], ["--no-duo-scaling"]):
        with pytest.raises(SystemExit):
            main(["quantize", "--model", str(tmp_path), "--out", str(tmp_path / "o"), "--quiet", *args])
    assert not (tmp_path / "o").exists()
