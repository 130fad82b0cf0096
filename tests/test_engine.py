"""The engine against a dense reference: paged attention, batching, prefix caching, chunked prefill,
preemption, n > 1 copy-on-write, abort, stop conditions, quantized KV, LLM and AsyncEngine APIs.

Reference = full recompute with model(ids) at every step, no cache. Every test that runs requests
ends with the pool fully free (no block leaks).
"""
from __future__ import annotations

import asyncio

import pytest
import torch
import torch.nn.functional as F

from lowbit.engine.args import EngineArgs
from lowbit.engine.async_engine import AsyncEngine
from lowbit.engine.chat_template import apply_chat_template
from lowbit.engine.kv_cache import KVCachePool, KVCacheSpec
from lowbit.engine.llm import LLM
from lowbit.engine.llm_engine import LLMEngine
from lowbit.engine.outputs import RequestOutput
from lowbit.engine.paged_attention import SeqSlice, build_paged_context
from lowbit.engine.sampling_params import SamplingParams
from lowbit.engine.sequence import SequenceGroup
from lowbit.errors import LowbitError
from lowbit.layers.attention import causal_attention
from lowbit.layers.kv_quant import dequantize, quantize
from lowbit.layers.sampler import Sampler

from conftest import make_tiny_model

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and on a shared, busy machine two OpenMP
    threads per process make every small op wait for a core (20x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model("llama", d)
    return d


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory):
    """head_dim 128: a 1 MiB pool (the minimum) holds only 32 blocks of 8 tokens."""
    d = tmp_path_factory.mktemp("wide-qwen2")
    make_tiny_model("qwen2", d, hidden_size=256, num_attention_heads=2, num_key_value_heads=2)
    return d


def engine_for(path, **kw) -> LLMEngine:
    kw = {"kv_cache_memory": 2**20, "block_size": 8, **kw}
    engine = LLMEngine(EngineArgs(model=str(path), **kw))
    engine.runner.model._test_source = (str(path), bool(kw.get("quantize_lm_head")))  # same weights, same key
    return engine


def prompts_of(lengths, seed=0, vocab=256):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def run(engine: LLMEngine, prompts, params=GREEDY, prefix="r") -> dict[str, RequestOutput]:
    for i, p in enumerate(prompts):
        engine.add_request(f"{prefix}{i}", p, params)
    final = {}
    for _ in range(10_000):
        if not engine.has_unfinished():
            break
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    return final


_DENSE_CACHE: dict[tuple, list[int]] = {}


@torch.no_grad()
def dense_greedy(model, prompt, n) -> list[int]:
    """The reference: full recompute with model(ids) for every token, no KV cache. Memoized per
    checkpoint (engines loading the same directory hold identical weights)."""
    key = (getattr(model, "_test_source", id(model)), tuple(prompt), n)
    if key not in _DENSE_CACHE:
        ids, out = list(prompt), []
        for _ in range(n):
            t = int(model.compute_logits(model(torch.tensor([ids])))[0, -1].argmax())
            out.append(t)
            ids.append(t)
        _DENSE_CACHE[key] = out
    return _DENSE_CACHE[key]


@torch.no_grad()
def dense_logits(model, ids) -> torch.Tensor:
    return model.compute_logits(model(torch.tensor([list(ids)])))[0, -1]


def assert_pool_free(engine: LLMEngine) -> None:
    s = engine.stats()
    assert s.num_free_blocks == s.num_total_blocks
    assert s.num_running == 0 and s.num_waiting == 0


class RecordingSampler:
    """The real sampler, plus a copy of every (context, logits row) it is asked about."""

    def __init__(self, eos=()):
        self.inner = Sampler(list(eos))
        self.rows: list[tuple[list[int], torch.Tensor]] = []

    def __call__(self, logits, params, prompt_ids, output_ids, generators):
        for i in range(logits.shape[0]):
            self.rows.append((list(prompt_ids[i]) + list(output_ids[i]), logits[i].clone()))
        return self.inner(logits, params, prompt_ids, output_ids, generators)


# ---- paged attention itself ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["fp32", "int8", "int4"])
@pytest.mark.parametrize("window", [None, 5])
def test_paged_attention_matches_causal_attention(dtype, window):
    """A mixed step (3 decodes, a fresh prefill, a chunk with a cached prefix) vs dense attention."""
    torch.manual_seed(0)
    Hq, Hkv, D, bs = 4, 2, 16, 4
    pool = KVCachePool(KVCacheSpec(1, Hkv, D, bs, dtype), num_blocks=64)
    perm = torch.randperm(64).tolist()  # scattered, non-contiguous block tables
    lengths = [(9, 1), (4, 1), (13, 1), (0, 7), (6, 5)]  # (cached tokens, new tokens)
    seqs, next_block = [], 0
    for cached, new in lengths:
        total = cached + new
        nb = -(-total // bs)
        table = perm[next_block : next_block + nb]
        next_block += nb
        k = torch.randn(total, Hkv, D)
        v = torch.randn(total, Hkv, D)
        q = torch.randn(total, Hq, D)
        if cached:  # what earlier steps would have written
            pos = torch.arange(cached)
            slots = torch.tensor(table)[pos // bs] * bs + pos % bs
            pool.write(0, slots, k[:cached], v[:cached])
        seqs.append((table, cached, new, q, k, v))
    ctx = build_paged_context(pool, [SeqSlice(t, c, n) for t, c, n, *_ in seqs], window)
    q_new = torch.cat([q[c:] for _, c, _, q, _, _ in seqs])
    k_new = torch.cat([k[c:] for _, c, _, _, k, _ in seqs])
    v_new = torch.cat([v[c:] for _, c, _, _, _, v in seqs])
    got = ctx.attend(0, q_new, k_new, v_new)
    want = torch.cat([causal_attention(q[None], k[None], v[None], window)[0, c:] for _, c, _, q, k, v in seqs])
    assert got.shape == want.shape
    tol = {"fp32": 1e-5, "int8": 0.03, "int4": 0.4}[dtype]
    assert (got - want).abs().max() < tol
    assert ctx.positions.tolist() == [9, 4, 13, *range(7), *range(6, 11)]


def test_kv_quantization_error_is_within_half_a_step():
    x = torch.randn(50, 3, 64) * torch.rand(50, 3, 1) * 10
    for dtype, qmax in (("int8", 255), ("int4", 15)):
        q, sz = quantize(x, dtype)
        assert q.dtype == torch.uint8 and q.shape[-1] == (64 if dtype == "int8" else 32)
        back = dequantize(q, sz, dtype)
        step = (x.amax(-1) - x.amin(-1)) / qmax
        assert ((back - x).abs() <= step[..., None] / 2 + 1e-5).all()


def test_pool_sizes_follow_the_budget(tiny_dir):
    per_token = {}
    for dtype in ("auto", "int8", "int4"):
        e = engine_for(tiny_dir, kv_cache_dtype=dtype)
        per_token[dtype] = e.runner.pool.num_tokens
        assert e.runner.pool.nbytes() <= 2**20
        assert e.max_model_len == min(512, (e.block_manager.num_total_blocks - 1) * 8)
    # head_dim 16: fp32 64 B per token-head; int8 16 + 8; int4 8 + 8
    assert per_token["int8"] == pytest.approx(per_token["auto"] * 64 / 24, rel=0.02)
    assert per_token["int4"] == pytest.approx(per_token["auto"] * 64 / 16, rel=0.02)


# ---- greedy equals the dense reference -----------------------------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [
        {},
        {"enable_prefix_caching": False},
        {"max_num_batched_tokens": 16},  # chunked prefill mixed with decodes
        {"max_num_batched_tokens": 16, "enable_prefix_caching": False, "block_size": 16},
        {"max_num_seqs": 2},
    ],
    ids=["default", "no-prefix-cache", "chunked", "chunked-bs16", "two-seqs"],
)
def test_greedy_matches_dense(tiny_dir, cfg):
    engine = engine_for(tiny_dir, **cfg)
    common = prompts_of([21], seed=5)[0]
    prompts = prompts_of([5, 17, 40, 1, 33, 8], seed=1)
    prompts += [common + p for p in prompts_of([3, 11], seed=2)]
    first = run(engine, prompts)
    # a second wave sharing prefixes with the first (prefix-cache hits when enabled)
    second_prompts = [prompts[2][:30] + [1, 2, 3], common + prompts[6][21:], prompts[4]]
    second = run(engine, second_prompts, prefix="s")
    model = engine.runner.model
    for i, p in enumerate(prompts):
        assert first[f"r{i}"].outputs[0].token_ids == dense_greedy(model, p, 12), f"prompt {i}"
        assert first[f"r{i}"].outputs[0].finish_reason == "length"
    for i, p in enumerate(second_prompts):
        assert second[f"s{i}"].outputs[0].token_ids == dense_greedy(model, p, 12), f"second wave {i}"
    stats = engine.stats()
    if cfg.get("enable_prefix_caching", True):
        assert stats.prefix_cache_hits > 0 and second["s2"].num_cached_tokens >= 32
    else:
        assert stats.prefix_cache_hits == 0 and second["s2"].num_cached_tokens == 0
    assert stats.generation_tokens_total == 12 * (len(prompts) + len(second_prompts))
    assert_pool_free(engine)


def test_equal_length_fresh_prompts_share_one_attention_call(tiny_dir, monkeypatch):
    """Consecutive fresh prompts of one length are attended in one batched causal call (a different
    length or a chunk that reads the cache breaks the run); the tokens stay the dense reference's."""
    import lowbit.engine.paged_attention as pa

    sizes: list[int] = []
    batched = pa._causal_batch
    monkeypatch.setattr(pa, "_causal_batch", lambda q, k, v, b, dt=None: sizes.append(b) or batched(q, k, v, b, dt))
    engine = engine_for(tiny_dir)
    prompts = prompts_of([12, 12, 12, 7, 12, 12], seed=9)
    final = run(engine, prompts)
    layers = engine.runner.config.num_layers
    assert sorted(set(sizes)) == [2, 3] and len(sizes) == 2 * layers
    for i, p in enumerate(prompts):
        assert final[f"r{i}"].outputs[0].token_ids == dense_greedy(engine.runner.model, p, 12), f"prompt {i}"
    assert_pool_free(engine)


@pytest.mark.parametrize("caching", [True, False])
def test_preemption_under_a_tiny_pool_gives_the_same_tokens(wide_dir, caching):
    engine = engine_for(wide_dir, enable_prefix_caching=caching, max_num_batched_tokens=64)
    assert engine.block_manager.num_total_blocks == 32
    prompts = prompts_of([30, 45, 20, 60, 38, 25], seed=3)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    final = run(engine, prompts, params)
    assert engine.stats().num_preemptions > 0
    for i, p in enumerate(prompts):
        assert final[f"r{i}"].outputs[0].token_ids == dense_greedy(engine.runner.model, p, 40), f"prompt {i}"
    assert_pool_free(engine)


# ---- n > 1, seeds, copy-on-write ---------------------------------------------------------------


def test_n_samples_fork_with_copy_on_write(tiny_dir):
    rec = RecordingSampler()
    engine = LLMEngine(EngineArgs(model=str(tiny_dir), kv_cache_memory=2**20, block_size=8), sampler=rec)
    copies = []
    pool_copy = engine.runner.pool.copy_blocks
    engine.runner.pool.copy_blocks = lambda s, d: (copies.append((s, d)), pool_copy(s, d))[1]
    prompt = prompts_of([13], seed=4)[0]  # 13 tokens: the last block is shared and partly filled
    params = SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=10, ignore_eos=True)
    out = run(engine, [prompt], params)["r0"]
    samples = [c.token_ids for c in out.outputs]
    assert [c.index for c in out.outputs] == [0, 1, 2] and all(len(s) == 10 for s in samples)
    assert len({tuple(s) for s in samples}) > 1  # different draws
    assert copies, "forked samples writing into the shared block must copy it"
    # every logits row the sampler saw equals the dense model's for that sample's own history
    assert len(rec.rows) == 3 + 3 * 9  # the fork step draws 3 times from one row, then 9 steps x 3
    for ctx, logits in rec.rows:
        assert (logits - dense_logits(engine.runner.model, ctx)).abs().max() < 1e-4
    assert_pool_free(engine)
    # a seeded request draws the same tokens alone or batched with others
    engine2 = engine_for(tiny_dir)
    for i, p in enumerate(prompts_of([7, 30], seed=9)):
        engine2.add_request(f"other{i}", p, SamplingParams(temperature=0.8, max_tokens=15, ignore_eos=True))
    again = run(engine2, [prompt], params)["r0"]
    assert [c.token_ids for c in again.outputs] == samples
    assert_pool_free(engine2)


# ---- abort ---------------------------------------------------------------------------------------


def test_abort_frees_blocks_at_once(tiny_dir):
    engine = engine_for(tiny_dir, max_num_batched_tokens=16)
    for i, p in enumerate(prompts_of([40, 12, 9], seed=6)):
        engine.add_request(f"a{i}", p, SamplingParams(max_tokens=50, ignore_eos=True))
    for _ in range(4):
        engine.step()
    free_before = engine.stats().num_free_blocks
    outs = engine.abort_request("a1")
    assert len(outs) == 1 and outs[0].finished and outs[0].outputs[0].finish_reason == "abort"
    assert engine.stats().num_free_blocks > free_before
    assert engine.abort_request(["nope", "a1"]) == []  # unknown / already aborted: ignored
    engine.abort_request(["a0", "a2"])
    assert not engine.has_unfinished() and engine.step() == []
    assert_pool_free(engine)


# ---- stop conditions -----------------------------------------------------------------------------


def test_stop_token_eos_length_and_context_limit(tiny_dir):
    engine = engine_for(tiny_dir, max_model_len=40)
    prompt = prompts_of([10], seed=8)[0]
    ref = dense_greedy(engine.runner.model, prompt, 12)
    stop_tok = ref[4]
    first = ref.index(stop_tok)
    out = run(engine, [prompt], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_tok]))["r0"]
    c = out.outputs[0]
    assert c.token_ids == ref[: first + 1] and c.finish_reason == "stop" and c.stop_reason == stop_tok
    # min_tokens keeps going past the stop token
    out = run(engine, [prompt], SamplingParams(temperature=0, max_tokens=12, min_tokens=first + 3,
                                               stop_token_ids=[stop_tok]), prefix="m")["m0"]
    assert len(out.outputs[0].token_ids) >= first + 3
    # eos stops unless ignore_eos
    engine.eos_token_ids = frozenset({stop_tok})
    out = run(engine, [prompt], SamplingParams(temperature=0, max_tokens=12), prefix="e")["e0"]
    assert out.outputs[0].token_ids == ref[: first + 1] and out.outputs[0].stop_reason is None
    out = run(engine, [prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), prefix="i")["i0"]
    assert out.outputs[0].token_ids == ref and out.outputs[0].finish_reason == "length"
    engine.eos_token_ids = frozenset()
    # the context limit: prompt + output <= max_model_len
    out = run(engine, [prompt], SamplingParams(temperature=0, max_tokens=None), prefix="c")["c0"]
    assert len(out.outputs[0].token_ids) == 40 - 10 and out.outputs[0].finish_reason == "length"
    assert out.outputs[0].token_ids == dense_greedy(engine.runner.model, prompt, 30)
    assert_pool_free(engine)


class CharTokenizer:
    """id i <-> one character; enough to exercise detokenization and stop strings."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i % 26) for i in ids)

    def encode(self, text):
        return [ord(ch) - 97 for ch in text]


def _feed(params: SamplingParams, tokens: list[int]):
    g = SequenceGroup("x", None, [0, 1, 2], params, 1)
    seq = g.seqs[0]
    texts = []
    for t in tokens:
        seq.append_token(t, -0.5, None, CharTokenizer(), frozenset(), 10_000)
        texts.append(seq.visible_text())
        if seq.is_finished():
            break
    return seq, texts


def test_stop_strings_on_text_and_no_take_backs():
    tok = CharTokenizer().encode
    seq, texts = _feed(SamplingParams(stop=["cat"], max_tokens=50), tok("abcacatdog"))
    assert seq.output_text == "abca" and seq.finish_reason == "stop" and seq.stop_reason == "cat"
    assert seq.output_token_ids == tok("abcacat")  # tokens up to the one completing the stop string
    for a, b in zip(texts, texts[1:]):  # streamed text only ever grows
        assert b.startswith(a)
    assert texts[2] == "ab"  # "c" held back while "ca..." might become "cat"
    seq, _ = _feed(SamplingParams(stop=["cat"], include_stop_str_in_output=True), tok("xxcatyy"))
    assert seq.output_text == "xxcat"
    seq, _ = _feed(SamplingParams(max_tokens=4), tok("hello"))
    assert seq.output_text == "hell" and seq.finish_reason == "length"
    assert seq.cumulative_logprob is None  # not requested: not tracked (as in vLLM)
    seq, _ = _feed(SamplingParams(max_tokens=4, logprobs=0), tok("hello"))
    assert seq.cumulative_logprob == pytest.approx(-2.0)


def test_bad_requests_are_refused_and_change_nothing(tiny_dir):
    engine = engine_for(tiny_dir, max_model_len=64)
    engine.add_request("ok", [1, 2, 3], GREEDY)
    bad = [
        ("e1", [], GREEDY, "empty"),
        ("e2", [1, 256], GREEDY, "outside the vocabulary"),
        ("e3", [1, 2.5], GREEDY, "integers"),
        ("e4", "text", GREEDY, "no tokenizer"),
        ("e5", list(range(64)), GREEDY, "max_model_len"),
        ("ok", [1], GREEDY, "already in use"),
        ("e6", [1], SamplingParams(prompt_logprobs=1), "prompt_logprobs"),
        ("", [1], GREEDY, "request_id"),
    ]
    for rid, prompt, params, msg in bad:
        with pytest.raises(LowbitError, match=msg):
            engine.add_request(rid, prompt, params)
    with pytest.raises(LowbitError, match="max_model_len"):
        engine_for(tiny_dir, max_model_len=100_000)
    assert list(engine.groups) == ["ok"]
    final = run(engine, [])
    assert final["ok"].outputs[0].token_ids == dense_greedy(engine.runner.model, [1, 2, 3], 12)
    assert_pool_free(engine)


# ---- quantized KV cache --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,tol", [("auto", 1e-5), ("int8", 0.01), ("int4", 0.1)])
def test_quantized_kv_logits_close_to_dense(tiny_dir, dtype, tol):
    rec = RecordingSampler()
    args = EngineArgs(model=str(tiny_dir), kv_cache_memory=2**20, block_size=8, kv_cache_dtype=dtype,
                      max_num_batched_tokens=16)  # chunked prefill: later chunks read the cache too
    engine = LLMEngine(args, sampler=rec)
    prompts = prompts_of([40, 9], seed=12)
    run(engine, prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    assert len(rec.rows) == 32
    worst = 0.0
    for ctx, logits in rec.rows:
        ref = dense_logits(engine.runner.model, ctx)
        worst = max(worst, float((logits - ref).abs().max() / ref.abs().max()))
    assert worst < tol
    assert engine.stats().kv_cache_dtype == {"auto": "fp32"}.get(dtype, dtype)
    assert_pool_free(engine)


def test_quantize_lm_head_option(tiny_dir):
    engine = engine_for(tiny_dir, quantize_lm_head=True)
    model = engine.runner.model
    assert type(model.lm_head).__name__ == "QuantLinear"
    assert type(model.model.embed_tokens).__name__ == "QuantEmbedding"
    ids = prompts_of([20], seed=15)[0]
    ref = dense_logits(engine_for(tiny_dir).runner.model, ids)
    assert float((dense_logits(model, ids) - ref).abs().max() / ref.abs().max()) < 0.02
    assert run(engine, [ids])["r0"].outputs[0].token_ids == dense_greedy(model, ids, 12)
    assert_pool_free(engine)


# ---- LLM and AsyncEngine -------------------------------------------------------------------------


def test_llm_generate_keeps_order_and_validates(tiny_dir):
    llm = LLM.from_engine(engine_for(tiny_dir))
    prompts = prompts_of([4, 30, 11], seed=13)
    outs = llm.generate(prompts, GREEDY)
    assert [o.prompt_token_ids for o in outs] == prompts
    for o, p in zip(outs, prompts):
        assert o.outputs[0].token_ids == dense_greedy(llm.engine.runner.model, p, 12)
    single = llm.generate(prompts[0], [GREEDY])
    assert single[0].outputs[0].token_ids == outs[0].outputs[0].token_ids
    with pytest.raises(LowbitError, match="no tokenizer"):
        llm.generate(["hello"], GREEDY)
    with pytest.raises(LowbitError, match="sampling params"):
        llm.generate(prompts, [GREEDY])
    assert_pool_free(llm.engine)
    with pytest.raises(LowbitError, match="tokenizer"):
        llm.chat([{"role": "user", "content": "hi"}])


def test_chat_template_errors():
    class NoTemplate:
        chat_template = None

    class Templated:
        chat_template = "{{ messages }}"

        def apply_chat_template(self, messages, add_generation_prompt, tokenize, return_dict):
            assert add_generation_prompt and tokenize and not return_dict
            return [len(m["content"]) for m in messages]

    ok = [{"role": "user", "content": "hello"}]
    assert apply_chat_template(Templated(), ok) == [5]
    with pytest.raises(LowbitError, match="no chat template"):
        apply_chat_template(NoTemplate(), ok)
    with pytest.raises(LowbitError, match="no tokenizer"):
        apply_chat_template(None, ok)
    for bad in ([], "hello", [{"content": "x"}], [{"role": "user"}], [{"role": "user", "content": 3}], ["x"]):
        with pytest.raises(LowbitError):
            apply_chat_template(Templated(), bad)


def test_async_engine_streams_cancels_and_aborts(tiny_dir):
    engine = AsyncEngine(engine=engine_for(tiny_dir))
    prompt = prompts_of([9], seed=14)[0]
    want = dense_greedy(engine.engine.runner.model, prompt, 30)

    async def main():
        # a full stream: cumulative outputs whose token lists only grow, ending finished
        seen = []
        async for out in engine.generate(prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), "a"):
            seen.append(list(out.outputs[0].token_ids))
        assert seen[-1] == want and all(want[: len(s)] == s for s in seen)
        # the consumer goes away mid-stream: the request is aborted and its blocks freed
        agen = engine.generate(prompt, SamplingParams(max_tokens=10_000, ignore_eos=True), "b")
        async for out in agen:
            if len(out.outputs[0].token_ids) >= 3:
                break
        await agen.aclose()
        # an explicit abort ends the stream with finish_reason abort
        outs = []

        async def consume():
            async for out in engine.generate(prompt, SamplingParams(max_tokens=10_000, ignore_eos=True), "c"):
                outs.append(out)
                if len(outs) == 2:
                    await engine.abort("c")

        await asyncio.wait_for(consume(), 30)
        assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
        with pytest.raises(LowbitError, match="empty"):
            async for _ in engine.generate([], None, "d"):
                pass
        for _ in range(200):  # the abort is applied by the engine thread
            s = engine.stats()
            if s.num_running == 0 and s.num_waiting == 0:
                break
            await asyncio.sleep(0.02)

    try:
        asyncio.run(main())
        s = engine.stats()
        assert s.num_free_blocks == s.num_total_blocks and s.num_running == 0 and s.num_waiting == 0
        assert not engine.engine.has_unfinished()
    finally:
        engine.shutdown()
    assert not engine._thread.is_alive()


# ---- the real default model ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_llm():
    return LLM(kv_cache_memory=64 * 2**20)


@pytest.mark.slow
def test_real_model_generate_matches_dense(real_llm):
    llm = real_llm
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    prompts = ["The capital of France is", "def fibonacci(n):"]
    outs = llm.generate(prompts, params)
    for o in outs:
        c = o.outputs[0]
        assert c.token_ids == dense_greedy(llm.engine.runner.model, o.prompt_token_ids, 20)
        assert c.text == llm.tokenizer.decode(c.token_ids, skip_special_tokens=True)
    assert "Paris" in outs[0].outputs[0].text
    chat = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                    SamplingParams(temperature=0, max_tokens=30))
    assert "Paris" in chat[0].outputs[0].text
    assert_pool_free(llm.engine)


@pytest.mark.slow
@pytest.mark.parametrize("dtype,tol", [("int8", 0.03), ("int4", 0.3)])
def test_real_model_quantized_kv(real_llm, dtype, tol):
    rec = RecordingSampler(real_llm.engine.runner.eos_token_ids)
    loaded = real_llm.engine.runner.loaded
    engine = LLMEngine(EngineArgs(kv_cache_memory=64 * 2**20, kv_cache_dtype=dtype, max_num_batched_tokens=32),
                       loaded=loaded, sampler=rec)
    ids = real_llm.tokenizer.encode("The history of the Roman Empire spans many centuries, and")
    out = run(engine, [ids], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))["r0"]
    for ctx, logits in rec.rows:
        ref = dense_logits(loaded.model, ctx)
        assert float((logits - ref).abs().max() / ref.abs().max()) < tol
    if dtype == "int8":
        assert out.outputs[0].token_ids[:4] == dense_greedy(loaded.model, ids, 4)
    assert_pool_free(engine)


def test_a_failed_step_leaves_the_engine_consistent(tiny_dir):
    engine = engine_for(tiny_dir)
    prompts = prompts_of([13, 6], seed=16)
    params = SamplingParams(n=2, temperature=0.0, max_tokens=8, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    engine.step()  # prefill + fork: the next step must copy the shared, partly filled blocks
    pool = engine.runner.pool
    pool.copy_blocks = lambda src, dst: (_ for _ in ()).throw(RuntimeError("boom"))  # fails before copying
    with pytest.raises(RuntimeError, match="boom"):
        engine.step()
    del pool.copy_blocks  # back to the class method
    final = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    for i, p in enumerate(prompts):
        for c in final[f"r{i}"].outputs:
            assert c.token_ids == dense_greedy(engine.runner.model, p, 8)
    assert_pool_free(engine)


def test_async_engine_builds_on_its_thread_and_reraises_load_errors(tmp_path):
    import threading
    import time

    from lowbit.errors import LowbitError

    before = {t.ident for t in threading.enumerate()}
    with pytest.raises(LowbitError):
        AsyncEngine(EngineArgs(model=str(tmp_path / "no-such-model")))
    deadline = time.time() + 5  # the failed engine thread exits: nothing keeps running after a load error
    while time.time() < deadline and any(t.ident not in before for t in threading.enumerate()):
        time.sleep(0.01)
    assert not [t.name for t in threading.enumerate() if t.ident not in before]


def test_throughput_runs_get_no_prefix_cache_hits(tiny_dir):
    """Repeated benchmark runs must not be sped up by the KV cached from the run before."""
    from lowbit.bench.offline import run_throughput

    engine = engine_for(tiny_dir)
    same = prompts_of([32] * 4)
    res = run_throughput(engine, output_len=4, repeats=2, prompts=same)
    assert res.num_requests == 4 and res.input_len == 32 and len(res.runs) == 2
    assert engine.stats().prefix_cache_hits == 0  # the cache was emptied before the repeated run
    run_throughput(engine, num_requests=4, input_len=32, output_len=4, repeats=2)  # fresh random sets
    assert engine.stats().prefix_cache_hits == 0
    assert_pool_free(engine)
