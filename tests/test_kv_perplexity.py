"""Perplexity through the paged KV path (lowbit/eval/kv_perplexity.py) and the int4 KV scheme
(per-channel keys) that keeps it close to fp32."""
from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_model
from lowbit.engine.kv_cache import KVCachePool, KVCacheSpec
from lowbit.layers.kv_quant import dequantize, dequantize_channels, quantize, quantize_channels
from lowbit.eval.kv_perplexity import kv_spec_for, perplexity_with_kv_cache, tokens_per_budget
from lowbit.eval.perplexity import EvalError, perplexity
from lowbit.quant.loader import load_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(1)  # tiny ops: threads only add overhead on a busy machine
    path = tmp_path_factory.mktemp("tiny")
    make_tiny_model("llama", path)
    return load_model(path, with_tokenizer=False)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (3 * 40 + 7,), generator=torch.Generator().manual_seed(0))


# ---- fp32 pool == the plain forward ---------------------------------------------------------------


@pytest.mark.parametrize("chunk", [19, 13, 64])  # 13: chunks cut blocks; 19: 39 fed tokens end in a lone one (a decode step)
def test_fp32_kv_equals_plain_perplexity(tiny, ids, chunk):
    plain = perplexity(tiny.model, ids, seqlen=40)
    got = perplexity_with_kv_cache(tiny, ids, seqlen=40, kv_cache_dtype="fp32", chunk=chunk, block_size=8)
    assert (got.n_windows, got.n_tokens) == (plain.n_windows, plain.n_tokens) == (3, 3 * 39)
    assert got.ppl == pytest.approx(plain.ppl, rel=1e-5)
    assert got.kv_cache_dtype == "fp32" and got.chunk == chunk


def test_model_spec_and_max_windows(tiny, ids):
    by_path = perplexity_with_kv_cache(str(tiny.path), ids, seqlen=40, max_windows=2, kv_cache_dtype="auto")
    plain = perplexity(tiny.model, ids, seqlen=40, max_windows=2)
    assert by_path.n_windows == 2 and by_path.ppl == pytest.approx(plain.ppl, rel=1e-5)


# ---- quantized pools ------------------------------------------------------------------------------


def test_int8_close_but_not_identical(tiny, ids):
    fp = perplexity_with_kv_cache(tiny, ids, seqlen=40, kv_cache_dtype="fp32")
    q8 = perplexity_with_kv_cache(tiny, ids, seqlen=40, kv_cache_dtype="int8")
    assert q8.ppl != fp.ppl  # the cache really was quantized
    assert abs(q8.ppl / fp.ppl - 1) < 1e-3


def test_quantized_chunk_makes_chunk_size_irrelevant(tiny, ids):
    """Reading the chunk's own k/v back from the pool: every query sees what decode sees."""
    small = perplexity_with_kv_cache(tiny, ids, seqlen=40, kv_cache_dtype="int8", chunk=5)
    big = perplexity_with_kv_cache(tiny, ids, seqlen=40, kv_cache_dtype="int8", chunk=64)
    assert big.ppl == pytest.approx(small.ppl, rel=1e-6)
    # without it, one chunk covering the window never reads the cache: the exact fp32 result
    exact = perplexity_with_kv_cache(tiny, ids, seqlen=40, kv_cache_dtype="int8", chunk=64, quantized_chunk=False)
    assert exact.ppl == pytest.approx(perplexity(tiny.model, ids, seqlen=40).ppl, rel=1e-5)
    assert exact.ppl != big.ppl


def test_bad_arguments_raise_eval_errors(tiny, ids):
    with pytest.raises(EvalError, match="seqlen"):
        perplexity_with_kv_cache(tiny, ids, seqlen=1)
    with pytest.raises(EvalError, match="chunk"):
        perplexity_with_kv_cache(tiny, ids, seqlen=40, chunk=1)
    with pytest.raises(EvalError, match="fewer than one window"):
        perplexity_with_kv_cache(tiny, ids[:30], seqlen=40)
    with pytest.raises(EvalError, match="max windows"):
        perplexity_with_kv_cache(tiny, ids, seqlen=40, max_windows=0)
    with pytest.raises(Exception, match="kv_cache_dtype"):
        perplexity_with_kv_cache(tiny, ids, seqlen=40, kv_cache_dtype="int3")


# ---- the int4 scheme: keys per channel over each block's tokens ------------------------------------


def _keys_with_outlier_channels(n: int, H: int = 2, D: int = 64, seed: int = 0) -> torch.Tensor:
    """Like real keys: a few channels carry a large steady offset (KIVI's outlier channels)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(n, H, D, generator=g)
    k[..., [5, 37]] += 15.0
    k[..., 20] -= 12.0
    return k


def _fill(pool: KVCachePool, table: list[int], k: torch.Tensor, v: torch.Tensor, steps: list[int]) -> None:
    """Write k/v into `table` in steps of the given sizes (1 = a decode token)."""
    bs, t = pool.block_size, 0
    for n in steps:
        slots = torch.tensor([table[i // bs] * bs + i % bs for i in range(t, t + n)])
        pool.write(0, slots, k[t : t + n], v[t : t + n])
        t += n


def test_int4_channel_keys_beat_per_token_keys_on_outlier_channels():
    k = _keys_with_outlier_channels(48)
    pool = KVCachePool(KVCacheSpec(1, 2, 64, 16, "int4"), 4)
    _fill(pool, [3, 0, 2], k, torch.randn(48, 2, 64), [48])
    got, _ = pool.gather(0, torch.tensor([3, 0, 2]))
    per_token = dequantize(*quantize(k, "int4"), "int4")
    err_channel, err_token = (got - k).pow(2).mean().sqrt(), (per_token - k).pow(2).mean().sqrt()
    assert err_channel < err_token / 3


def test_int4_decode_appends_stay_close_to_one_shot_and_keep_full_blocks():
    k = _keys_with_outlier_channels(40, seed=1)
    v = torch.randn(40, 2, 64)
    table = [6, 1, 4]
    one_shot = KVCachePool(KVCacheSpec(1, 2, 64, 16, "int4"), 8)
    _fill(one_shot, table, k, v, [40])
    appended = KVCachePool(KVCacheSpec(1, 2, 64, 16, "int4"), 8)
    _fill(appended, table, k, v, [16, 5] + [1] * 19)  # a full block, a chunk, then decode tokens
    a, av = appended.gather(0, torch.tensor(table))
    b, bv = one_shot.gather(0, torch.tensor(table))
    assert torch.equal(a[:16], b[:16])  # block 6 was filled by one write and never touched again
    assert torch.equal(av[:40], bv[:40])  # V stays per token: identical however it is written
    step = (k.amax(0) - k.amin(0)) / 15  # per channel, over the whole sequence: an upper bound per block
    assert ((a[:40] - k).abs() <= 2 * step).all()  # re-rounding on a wider range costs <= half a step each
    assert (a[:40] - k).pow(2).mean() < 1.5 * (b[:40] - k).pow(2).mean()


def test_int4_appends_inside_the_range_leave_earlier_codes_alone():
    pool = KVCachePool(KVCacheSpec(1, 2, 64, 16, "int4"), 2)
    k = torch.rand(12, 2, 64) * 8 - 4
    k[0], k[1] = -5.0, 5.0  # the block's range, set by its first write
    v = torch.randn(12, 2, 64)
    _fill(pool, [1], k, v, [6])
    codes, ranges = pool.k[0][1, :6].clone(), pool.k_sz[0][1].clone()
    _fill(pool, [1], k, v, [6, 1, 1, 3, 1])  # the same 6 rows again (a restart), then appends inside
    assert torch.equal(pool.k[0][1, :6], codes) and torch.equal(pool.k_sz[0][1], ranges)
    k[11, 0, 3] = 9.0  # one channel grows: only that channel's codes may move
    _fill(pool, [1], k, v, [11, 1])
    moved = (pool.k[0][1, :6] != codes).nonzero()[:, 1:].unique(dim=0).tolist()
    assert moved and all(h == 0 and c == 3 for h, c in moved)  # byte 3 of head 0 holds channels 3 and 35


def test_int4_reused_block_ignores_stale_rows():
    pool = KVCachePool(KVCacheSpec(1, 1, 64, 16, "int4"), 2)
    _fill(pool, [1], torch.full((16, 1, 64), 1000.0), torch.zeros(16, 1, 64), [16])  # a previous owner
    k = torch.randn(3, 1, 64)
    _fill(pool, [1], k, torch.zeros(3, 1, 64), [2, 1])  # a new sequence from offset 0
    got, _ = pool.gather(0, torch.tensor([1]))
    assert (got[:3] - k).abs().max() < (k.amax(0) - k.amin(0)).max() / 15  # the 1000s widened nothing


def test_int4_requantizing_an_unchanged_range_is_exact():
    x = _keys_with_outlier_channels(32).view(2, 16, 2, 64)
    q, sz = quantize_channels(x)
    assert sz.dtype == torch.float16 and sz.shape == (2, 2, 2, 64) and q.shape == (2, 16, 2, 32)
    q2, sz2 = quantize_channels(dequantize_channels(q, sz))
    assert torch.equal(q, q2) and torch.equal(sz, sz2)


def test_int4_copy_blocks_carries_the_channel_ranges():
    pool = KVCachePool(KVCacheSpec(2, 2, 64, 16, "int4"), 4)
    k = _keys_with_outlier_channels(10)
    _fill(pool, [2], k, torch.randn(10, 2, 64), [10])
    pool.copy_blocks([2], [0])
    assert all(torch.equal(a, b) for a, b in zip(pool.gather(0, torch.tensor([2])), pool.gather(0, torch.tensor([0]))))


@pytest.mark.parametrize("dtype", ["fp32", "int8", "int4"])
@pytest.mark.parametrize("D,bs", [(64, 16), (16, 8), (128, 32)])
def test_capacity_accounting_matches_the_allocated_bytes(dtype, D, bs):
    spec = KVCacheSpec(3, 2, D, bs, dtype)
    pool = KVCachePool(spec, 5)
    assert pool.nbytes() == 5 * spec.bytes_per_block
    assert tokens_per_budget(spec, 10 * spec.bytes_per_block + 1) == 10 * bs


def test_default_model_capacity_multiples():
    """SmolLM2-135M shapes (30 layers, 3 kv heads, head_dim 64), block 16."""
    per_token = {d: KVCacheSpec(30, 3, 64, 16, d).bytes_per_block // 16 for d in ("fp32", "int8", "int4")}
    assert per_token == {"fp32": 46080, "int8": 12960, "int4": 7920}  # int4: K 32+16 B, V 32+8 B per head


# ---- the real default model ---------------------------------------------------------------------


@pytest.mark.slow
def test_real_model_kv_quantization_costs_little_perplexity(default_model_dir, shared_data):
    from lowbit.eval.perplexity import read_eval_text, tokenize_stream

    torch.set_num_threads(2)
    lm = load_model(default_model_dir)
    ids = tokenize_stream(lm.tokenizer, read_eval_text(shared_data / "wikitext-2-raw" / "wiki.test.raw"))
    ppl = {d: perplexity_with_kv_cache(lm, ids, seqlen=2048, max_windows=2, kv_cache_dtype=d).ppl
           for d in ("fp32", "int8", "int4")}
    assert ppl["fp32"] == pytest.approx(perplexity(lm.model, ids, 2048, 2).ppl, rel=1e-4)
    assert abs(ppl["int8"] / ppl["fp32"] - 1) < 0.01
    assert abs(ppl["int4"] / ppl["fp32"] - 1) < 0.05
    assert kv_spec_for(lm.model, "int4").bytes_per_block < kv_spec_for(lm.model, "int8").bytes_per_block
