"""OpenAI-compatible server, driven by the real `openai` client over HTTP.

Fast tests run the real AsyncEngine on a tiny random-weight model with a byte-level tokenizer and
chat template made here (protocol shapes, every error case, sessions bookkeeping, disconnects).
Slow tests run the real default model (meaningful text: stop strings, sessions vs full history).
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch

from conftest import make_tiny_model
from lowbit.engine.args import EngineArgs
from lowbit.serve.app import create_app, serve_in_background

TINY_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TINY_CONTEXT = 512
MAX_BODY = 64 * 1024


def save_tiny_tokenizer(out_dir: Path) -> Any:
    """Byte-level tokenizer (256 byte tokens + <|im_start|>=256, <|im_end|>=257) with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>")
    fast.chat_template = TINY_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


@dataclass
class Server:
    url: str
    engine: Any
    tokenizer: Any

    @property
    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120)

    def post(self, path: str, body: Any = None, **kw: Any) -> httpx.Response:
        if body is not None and not isinstance(body, (bytes, str)):
            kw["json"] = body
        elif body is not None:
            kw["content"] = body
        return httpx.post(self.url + path, timeout=120, **kw)

    def metrics(self) -> dict[str, float]:
        return parse_metrics(httpx.get(self.url + "/metrics", timeout=30).text)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {metric name (labels dropped): value}; histogram buckets are skipped."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$", line)
        if m and not m.group(1).endswith("_bucket"):
            out[m.group(1)] = float(m.group(3))
    return out


def wait_idle(server: Server, timeout: float = 30.0) -> dict[str, float]:
    """Metrics once nothing runs or waits (aborts land asynchronously in the engine thread)."""
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        idle = m["lowbit:num_requests_running"] == 0 and m["lowbit:num_requests_waiting"] == 0
        if (idle and m["lowbit:kv_cache_free_blocks"] == m["lowbit:kv_cache_total_blocks"]) or \
                time.monotonic() > deadline:
            return m
        time.sleep(0.05)


def assert_error(resp: httpx.Response, status: int, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    if param is not None:
        assert err["param"] == param, err
    return err


def sse_events(resp: httpx.Response) -> list[Any]:
    """Parsed `data:` payloads of a streamed response; the literal '[DONE]' stays a string."""
    events = []
    for line in resp.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
        else:
            assert line == "", line
    return events


def start_engine(model: str | None, **kw: Any) -> Any:
    from lowbit.engine.async_engine import AsyncEngine

    return AsyncEngine(EngineArgs(model=model, **kw))


def stop_engine(engine: Any) -> None:
    for name in ("shutdown", "close"):
        fn = getattr(engine, name, None)
        if callable(fn):
            fn()
            return


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tiny-chat-model")
    make_tiny_model("llama", d, vocab_size=258, bos_token_id=256, eos_token_id=257,
                    max_position_embeddings=TINY_CONTEXT)
    save_tiny_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def tiny_engine(tiny_dir: Path):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the process's setting (the engine leaves threads alone), restored after
    engine = start_engine(str(tiny_dir), kv_cache_memory=8 * 2**20)
    yield engine
    stop_engine(engine)
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tiny_engine: Any, tiny_dir: Path):
    app = create_app(tiny_engine, served_model_name="tiny", max_body_bytes=MAX_BODY)
    with serve_in_background(app) as url:
        yield Server(url, tiny_engine, tiny_engine.tokenizer)


# ---- utility routes -------------------------------------------------------------------------------


def test_models_health_metrics_tokenize(tiny: Server):
    models = tiny.client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    raw = httpx.get(tiny.url + "/v1/models").json()
    assert raw["object"] == "list" and raw["data"][0]["max_model_len"] == TINY_CONTEXT
    assert httpx.get(tiny.url + "/health").status_code == 200
    m = tiny.metrics()
    for name in ("lowbit:num_requests_running", "lowbit:num_requests_waiting", "lowbit:kv_cache_usage_perc",
                 "lowbit:prefix_cache_hit_rate", "lowbit:prompt_tokens_total", "lowbit:generation_tokens_total",
                 "lowbit:time_to_first_token_seconds_count", "lowbit:e2e_request_latency_seconds_count",
                 "lowbit:inter_token_latency_seconds_count"):
        assert name in m, name
    r = tiny.post("/tokenize", {"prompt": "hello"}).json()
    assert r["tokens"] == tiny.tokenizer.encode("hello") and r["count"] == 5 and r["max_model_len"] == TINY_CONTEXT
    r = tiny.post("/tokenize", {"messages": [{"role": "user", "content": "hi"}]}).json()
    assert r["tokens"][0] == 256 and r["count"] == len(r["tokens"])
    assert tiny.post("/detokenize", {"tokens": tiny.tokenizer.encode("hello")}).json() == {"prompt": "hello"}
    assert_error(tiny.post("/detokenize", {"tokens": [5, 100000]}), 400)


# ---- completions ----------------------------------------------------------------------------------


def test_completion_usage_and_prompt_forms(tiny: Server):
    c = tiny.client
    r = c.completions.create(model="tiny", prompt="hello world", max_tokens=5, temperature=0)
    assert r.object == "text_completion" and r.model == "tiny" and len(r.choices) == 1
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens == len("hello world")
    assert r.usage.completion_tokens == 5 if r.choices[0].finish_reason == "length" else r.usage.completion_tokens <= 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details is not None

    ids = tiny.tokenizer.encode("hello world")
    by_ids = c.completions.create(model="tiny", prompt=ids, max_tokens=5, temperature=0)
    assert by_ids.choices[0].text == r.choices[0].text  # greedy, same prompt tokens

    multi = c.completions.create(model="tiny", prompt=["hello world", "abc"], max_tokens=5, temperature=0, n=2)
    assert sorted(ch.index for ch in multi.choices) == [0, 1, 2, 3]
    first = {ch.index: ch.text for ch in multi.choices}
    assert first[0] == first[1] == r.choices[0].text  # greedy n=2: identical samples, same as alone
    assert multi.usage.prompt_tokens == len("hello world") + len("abc")  # once per prompt, not per sample

    lists = c.completions.create(model="tiny", prompt=[ids, tiny.tokenizer.encode("abc")], max_tokens=5,
                                 temperature=0)
    assert [ch.text for ch in sorted(lists.choices, key=lambda x: x.index)] == [first[0], first[2]]


def test_completion_echo_and_logprobs(tiny: Server):
    r = tiny.client.completions.create(model="tiny", prompt="abc", max_tokens=4, temperature=0, echo=True,
                                       logprobs=3)
    ch = r.choices[0]
    assert ch.text.startswith("abc")
    lp = ch.logprobs
    n_gen = r.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 3 + n_gen
    assert lp.tokens[:3] == ["a", "b", "c"] and lp.token_logprobs[:3] == [None, None, None]
    assert lp.text_offset[:4] == [0, 1, 2, 3]
    for i in range(3, 3 + n_gen):
        assert lp.token_logprobs[i] <= 0.0
        assert 1 <= len(lp.top_logprobs[i]) <= 4  # top-3 plus the sampled token if outside them
        # greedy: the sampled token is the most likely one
        assert lp.token_logprobs[i] == pytest.approx(max(lp.top_logprobs[i].values()), abs=1e-4)
        assert lp.text_offset[i] == lp.text_offset[i - 1] + len(lp.tokens[i - 1])


def test_completion_stream_matches_non_streamed(tiny: Server):
    full = tiny.client.completions.create(model="tiny", prompt="stream me", max_tokens=8, temperature=0)
    with httpx.stream("POST", tiny.url + "/v1/completions", timeout=60,
                      json={"prompt": "stream me", "max_tokens": 8, "temperature": 0, "stream": True,
                            "stream_options": {"include_usage": True}}) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = sse_events(resp)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(e["object"] == "text_completion" and e["id"] == chunks[0]["id"] for e in chunks)
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == full.usage.completion_tokens
    text = "".join(ch["text"] for e in chunks[:-1] for ch in e["choices"])
    assert text == full.choices[0].text
    reasons = [ch["finish_reason"] for e in chunks[:-1] for ch in e["choices"]]
    assert reasons[-1] == full.choices[0].finish_reason and all(r is None for r in reasons[:-1])


def test_seeded_sampling_is_reproducible(tiny: Server):
    def sample(seed: int) -> list[str]:
        r = tiny.client.completions.create(model="tiny", prompt="seed", max_tokens=16, temperature=1.0, seed=seed,
                                           n=2)
        return [ch.text for ch in sorted(r.choices, key=lambda x: x.index)]

    a, b, c = sample(1234), sample(1234), sample(99)
    assert a == b
    assert a != c
    assert a[0] != a[1]  # n samples are distinct draws


def test_stop_token_ids_and_stop_strings(tiny: Server):
    c = tiny.client
    kw = dict(model="tiny", prompt="xyz", max_tokens=12, temperature=0, logprobs=0)
    base = c.completions.create(**kw, extra_body={"ignore_eos": True}).choices[0]
    toks = base.logprobs.tokens  # one byte per token: printable ASCII ones map back to a single id
    k = next((i for i, t in enumerate(toks) if i >= 1 and len(t) == 1 and t.isprintable() and t.isascii()), None)
    assert k is not None, toks
    (stop_id,) = tiny.tokenizer.encode(toks[k])
    first = toks.index(toks[k])
    r = c.completions.create(**kw, extra_body={"ignore_eos": True, "stop_token_ids": [stop_id]})
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == first + 1  # the stop token is generated, not shown
    # a stop string: two consecutive printable ASCII characters of the greedy text, when there are some
    m = re.search(r"[ -~]{2}", base.text[1:])
    if m:
        s = m.group(0)
        cut = base.text.find(s)
        r = c.completions.create(**kw, stop=[s], extra_body={"ignore_eos": True})
        assert r.choices[0].text == base.text[:cut]
        assert r.choices[0].finish_reason == "stop"


# ---- chat -----------------------------------------------------------------------------------------


def test_chat_non_streamed_n_and_logprobs(tiny: Server):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    r = tiny.client.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0.8, n=3,
                                            seed=7, logprobs=True, top_logprobs=2)
    assert r.object == "chat.completion" and len(r.choices) == 3
    prompt_len = len(tiny.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                                        return_dict=False))
    assert r.usage.prompt_tokens == prompt_len
    assert r.usage.completion_tokens == sum(len(ch.logprobs.content) for ch in r.choices)
    for ch in r.choices:
        assert ch.message.role == "assistant" and isinstance(ch.message.content, str)
        for tok in ch.logprobs.content:
            assert tok.logprob <= 0 and len(tok.top_logprobs) == 2
            assert tok.top_logprobs[0].logprob >= tok.top_logprobs[1].logprob
            assert tok.bytes == list(tok.token.encode("utf-8"))


def test_chat_stream_shape(tiny: Server):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5,
            "temperature": 0, "n": 2, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", tiny.url + "/v1/chat/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200
        events = sse_events(resp)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(e["object"] == "chat.completion.chunk" for e in chunks)
    assert [ch["delta"]["role"] for ch in chunks[0]["choices"]] == ["assistant", "assistant"]
    texts = {0: "", 1: ""}
    finish = {}
    for e in chunks[1:-1]:
        for ch in e["choices"]:
            assert ch["index"] not in finish  # nothing after a choice's finish_reason
            texts[ch["index"]] += ch["delta"].get("content") or ""
            if ch["finish_reason"]:
                finish[ch["index"]] = ch["finish_reason"]
    assert set(finish) == {0, 1}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 2
    full = tiny.client.chat.completions.create(model="tiny", messages=body["messages"], max_tokens=5, temperature=0)
    assert texts[0] == texts[1] == full.choices[0].message.content

    # the openai client parses the same stream
    got = ""
    for chunk in tiny.client.chat.completions.create(model="tiny", messages=body["messages"], max_tokens=5,
                                                     temperature=0, stream=True):
        if chunk.choices:
            got += chunk.choices[0].delta.content or ""
    assert got == full.choices[0].message.content


# ---- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("body,param", [
    (b"{not json", None),
    (b"[1, 2]", None),
    ({"prompt": "x", "max_tokens": "many"}, "max_tokens"),
    ({"prompt": 3.5}, "prompt"),
    ({"prompt": "x", "n": "two"}, "n"),
    ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 10**9}, "max_tokens"),
    ({"prompt": "x", "temperature": -0.5}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "top_p": 1.5}, "top_p"),
    ({"prompt": "x", "n": 17}, "n"),
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"prompt": "x", "stop": ["s"] * 17}, "stop"),
    ({"prompt": ""}, None),
    ({"prompt": []}, None),
    ({"prompt": ["x"] * 65}, None),
    ({"prompt": ["x"] * 17, "n": 16}, None),
    ({"prompt": [1, 2, 300]}, "prompt"),
    ({"prompt": list(range(100)) * 6}, "prompt"),  # 600 tokens > 512 context
    ({"prompt": list(range(100)) * 5, "max_tokens": 100}, "max_tokens"),  # fits, but not with 100 more
    ({"prompt": "x", "min_p": 2}, "min_p"),
    ({"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
])
def test_completion_bad_requests(tiny: Server, body: Any, param: str | None):
    headers = {"content-type": "application/json"}
    err = assert_error(tiny.post("/v1/completions", body, headers=headers), 400, param)
    assert err["type"] == "invalid_request_error"
    if isinstance(body, dict) and body.get("max_tokens") == 10**9:
        assert err["code"] == "context_length_exceeded"


@pytest.mark.parametrize("body,param", [
    ({"messages": []}, None),
    ({"messages": "hi"}, "messages"),
    ({}, "messages"),
    ({"messages": [{"role": "user"}]}, None),
    ({"messages": [{"role": "wizard", "content": "x"}]}, None),
    ({"messages": [{"role": "user", "content": 5}]}, None),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": -1}, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}, None),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 10**9}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "x" * 600}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "session_id": "s-n", "n": 2}, None),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, None),
])
def test_chat_bad_requests(tiny: Server, body: Any, param: str | None):
    assert_error(tiny.post("/v1/chat/completions", body), 400, param)


def test_openai_client_raises_typed_errors(tiny: Server):
    with pytest.raises(openai.BadRequestError) as e:
        tiny.client.chat.completions.create(model="tiny", messages=[], max_tokens=3)
    assert "messages" in str(e.value)
    with pytest.raises(openai.NotFoundError):
        tiny.client.completions.create(model="gpt-4", prompt="x", max_tokens=3)
    with pytest.raises(openai.BadRequestError):
        tiny.client.completions.create(model="tiny", prompt="x", max_tokens=3, temperature=-1)


def test_unknown_model_and_session_404(tiny: Server):
    err = assert_error(tiny.post("/v1/completions", {"model": "nope", "prompt": "x"}), 404, "model")
    assert err["code"] == "model_not_found"
    assert_error(tiny.post("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}),
                 404, "model")
    assert_error(httpx.delete(tiny.url + "/v1/sessions/never-made"), 404, "session_id")
    assert_error(httpx.get(tiny.url + "/v1/no-such-route"), 404)


def test_oversized_bodies_413(tiny: Server):
    big = {"prompt": "x" * (MAX_BODY + 10)}
    err = assert_error(tiny.post("/v1/completions", big), 413)
    assert err["code"] == "request_too_large"

    def chunked():  # no Content-Length: the server must count the bytes it receives
        for _ in range(MAX_BODY // 1000 + 2):
            yield b"x" * 1000

    assert_error(httpx.post(tiny.url + "/v1/completions", content=chunked(), timeout=30), 413)
    assert tiny.client.completions.create(model="tiny", prompt="still fine", max_tokens=2).choices


def test_api_key(tiny_engine: Any):
    app = create_app(tiny_engine, served_model_name="tiny", api_key="s3cret")
    with serve_in_background(app) as url:
        body = {"prompt": "x", "max_tokens": 2}
        assert_error(httpx.post(url + "/v1/completions", json=body), 401)
        assert_error(httpx.post(url + "/v1/completions", json=body, headers={"Authorization": "Bearer wrong"}), 401)
        assert_error(httpx.get(url + "/v1/models", headers={"Authorization": "s3cret"}), 401)
        assert httpx.get(url + "/health").status_code == 200  # probes need no key
        ok = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert ok.completions.create(model="tiny", prompt="x", max_tokens=2).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
        # browser chat UIs: the CORS preflight needs no key, and answers carry the CORS header
        pre = httpx.options(url + "/v1/chat/completions", headers={
            "Origin": "http://ui.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "*"
        r = httpx.get(url + "/v1/models", headers={"Origin": "http://ui.example", "Authorization": "Bearer s3cret"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"


# ---- sessions and disconnects -----------------------------------------------------------------------


def test_session_bookkeeping(tiny: Server):
    c = tiny.client
    msgs = [{"role": "user", "content": "first"}]
    r1 = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=4, temperature=0,
                                   extra_body={"session_id": "book"})
    r2 = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "second"}], max_tokens=4,
                                   temperature=0, extra_body={"session_id": "book"})
    # the server kept turn 1: turn 2's prompt is the whole conversation
    assert r2.usage.prompt_tokens > r1.usage.prompt_tokens + r1.usage.completion_tokens
    assert r2.usage.prompt_tokens_details.cached_tokens >= r1.usage.prompt_tokens
    assert httpx.delete(tiny.url + "/v1/sessions/book").status_code == 200
    assert_error(httpx.delete(tiny.url + "/v1/sessions/book"), 404)
    r3 = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "second"}], max_tokens=4,
                                   temperature=0, extra_body={"session_id": "book"})
    assert r3.usage.prompt_tokens < r2.usage.prompt_tokens  # a fresh conversation after DELETE
    httpx.delete(tiny.url + "/v1/sessions/book")
    m = wait_idle(tiny)
    assert m["lowbit:kv_cache_free_blocks"] == m["lowbit:kv_cache_total_blocks"]


def test_stream_disconnect_frees_blocks(tiny: Server):
    body = {"prompt": "long", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", tiny.url + "/v1/completions", json=body, timeout=60) as resp:
        seen = 0
        for line in resp.iter_lines():
            seen += line.startswith("data: ")
            if seen == 3:
                break  # leaving the block closes the connection mid-stream
    m = wait_idle(tiny)
    assert m["lowbit:num_requests_running"] == 0
    assert m["lowbit:kv_cache_free_blocks"] == m["lowbit:kv_cache_total_blocks"]


def test_non_streamed_disconnect_aborts(tiny: Server):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(tiny.url + "/v1/completions", json={"prompt": "long", "max_tokens": 450, "ignore_eos": True},
                   timeout=httpx.Timeout(60, read=0.1))
    m = wait_idle(tiny)
    assert m["lowbit:num_requests_running"] == 0
    assert m["lowbit:kv_cache_free_blocks"] == m["lowbit:kv_cache_total_blocks"]
    assert tiny.client.completions.create(model="tiny", prompt="after", max_tokens=2).choices


# ---- the real default model -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real():
    engine = start_engine(None, kv_cache_memory=128 * 2**20, max_model_len=2048)
    app = create_app(engine, served_model_name="smollm2-135m")
    with serve_in_background(app) as url:
        yield Server(url, engine, engine.tokenizer)
    stop_engine(engine)


@pytest.mark.slow
def test_real_chat_stop_strings_and_seed(real: Server):
    c = real.client
    msgs = [{"role": "user", "content": "List three colors, separated by commas."}]
    base = c.chat.completions.create(model="smollm2-135m", messages=msgs, max_tokens=24, temperature=0)
    text = base.choices[0].message.content
    words = re.findall(r"[A-Za-z]{3,}", text)
    assert len(words) >= 3, text
    stop = words[2]
    cut = text.find(stop)
    r = c.chat.completions.create(model="smollm2-135m", messages=msgs, max_tokens=24, temperature=0, stop=[stop])
    assert r.choices[0].message.content == text[:cut]
    assert r.choices[0].finish_reason == "stop"
    seeded = [c.chat.completions.create(model="smollm2-135m", messages=msgs, max_tokens=16, temperature=1.0,
                                        seed=42).choices[0].message.content for _ in range(2)]
    assert seeded[0] == seeded[1]


@pytest.mark.slow
def test_real_session_prefills_only_new_tokens(real: Server):
    c = real.client
    turn1 = [{"role": "user", "content": "What is the capital of France?"}]
    r1 = c.chat.completions.create(model="smollm2-135m", messages=turn1, max_tokens=20, temperature=0,
                                   extra_body={"session_id": "paris"})
    reply1 = r1.choices[0].message.content
    assert reply1
    turn2 = [{"role": "user", "content": "And of Italy?"}]
    r2 = c.chat.completions.create(model="smollm2-135m", messages=turn2, max_tokens=20, temperature=0,
                                   extra_body={"session_id": "paris"})
    # the same conversation sent whole, without a session
    history = turn1 + [{"role": "assistant", "content": reply1}] + turn2
    fresh = c.chat.completions.create(model="smollm2-135m", messages=history, max_tokens=20, temperature=0)
    assert r2.choices[0].message.content == fresh.choices[0].message.content
    assert r2.usage.prompt_tokens == fresh.usage.prompt_tokens
    # only the new tokens were prefilled: everything up to the end of turn 1 came from the session
    new_tokens = r2.usage.prompt_tokens - r2.usage.prompt_tokens_details.cached_tokens
    turn1_tokens = r1.usage.prompt_tokens + r1.usage.completion_tokens
    assert r2.usage.prompt_tokens_details.cached_tokens >= turn1_tokens - 1
    assert new_tokens <= r2.usage.prompt_tokens - turn1_tokens + 1
    assert httpx.delete(real.url + "/v1/sessions/paris").status_code == 200


@pytest.mark.slow
def test_real_greedy_logprobs_and_streaming(real: Server):
    c = real.client
    msgs = [{"role": "user", "content": "Say hello."}]
    r = c.chat.completions.create(model="smollm2-135m", messages=msgs, max_tokens=12, temperature=0, logprobs=True,
                                  top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content).startswith(r.choices[0].message.content[:5])
    for t in content:
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob, abs=1e-4)  # greedy picks the top token
    streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model="smollm2-135m", messages=msgs, max_tokens=12, temperature=0, stream=True) if ch.choices)
    assert streamed == r.choices[0].message.content


# ---- the `lowbit serve` command ---------------------------------------------------------------------


def test_serve_command_fails_fast_on_a_busy_port():
    import socket
    import subprocess
    import sys

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "lowbit.cli", "serve", "--port", str(port)],
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"cannot listen on 127.0.0.1:{port}" in lines[0], proc.stderr


@pytest.mark.slow
def test_serve_command_end_to_end():
    import os
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "LOWBIT_API_KEY": "from-env"}
    proc = subprocess.Popen([sys.executable, "-m", "lowbit.cli", "serve", "--port", str(port),
                             "--kv-cache-memory", "64MiB", "--max-model-len", "1024"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        assert_error(httpx.get(url + "/v1/models"), 401)
        client = openai.OpenAI(base_url=url + "/v1", api_key="from-env", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["smollm2-135m"]
        r = client.completions.create(model="smollm2-135m", prompt="The capital of France is", max_tokens=3,
                                      temperature=0)
        assert r.usage.completion_tokens >= 1
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert rc == 0
