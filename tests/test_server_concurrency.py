"""64 concurrent streaming clients on the real default model; 16 of them hang up mid-stream.

Every remaining client must get a complete, well-formed stream with exact usage; afterwards the
metrics must show nothing running and the whole KV pool free, and the server must keep answering.
"""
from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from lowbit.engine.args import EngineArgs
from lowbit.serve.app import create_app, serve_in_background

pytestmark = pytest.mark.slow

N_CLIENTS = 64
DISCONNECT_EVERY = 4  # clients 0, 4, 8, ... (16 of them) hang up after a few chunks
LONG = 200  # what the hang-up clients ask for: far more than they will read


@dataclass
class ClientResult:
    index: int
    endpoint: str
    max_tokens: int
    prompt_tokens: int
    events: list[Any] = field(default_factory=list)
    hung_up: bool = False


def metrics(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$", line)
        if m and not m.group(1).endswith("_bucket"):
            out[m.group(1)] = float(m.group(3))
    return out


def request_body(i: int, tokenizer: Any) -> tuple[str, dict[str, Any], int]:
    hang_up = i % DISCONNECT_EVERY == 0
    max_tokens = LONG if hang_up else 6 + i % 7
    common = {"max_tokens": max_tokens, "temperature": 0.7, "seed": i, "ignore_eos": True, "stream": True,
              "stream_options": {"include_usage": True}}
    text = f"Write one sentence about the number {i}."
    if i % 2:
        return "completions", {**common, "prompt": text}, len(tokenizer.encode(text))
    msgs = [{"role": "user", "content": text}]
    n_prompt = len(tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False))
    return "chat/completions", {**common, "messages": msgs}, n_prompt


async def one_client(client: httpx.AsyncClient, url: str, i: int, tokenizer: Any) -> ClientResult:
    endpoint, body, n_prompt = request_body(i, tokenizer)
    res = ClientResult(i, endpoint, body["max_tokens"], n_prompt)
    async with client.stream("POST", f"{url}/v1/{endpoint}", json=body) as resp:
        assert resp.status_code == 200, await resp.aread()
        async for line in resp.aiter_lines():
            if not line:
                continue
            assert line.startswith("data: "), line
            data = line[len("data: "):]
            res.events.append(data if data == "[DONE]" else json.loads(data))
            if i % DISCONNECT_EVERY == 0 and len(res.events) >= 4:
                res.hung_up = True
                break  # leaving the `async with` drops the connection mid-stream
    return res


async def run_clients(url: str, tokenizer: Any) -> list[ClientResult]:
    limits = httpx.Limits(max_connections=N_CLIENTS, max_keepalive_connections=N_CLIENTS)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=30), limits=limits) as client:
        return await asyncio.gather(*(one_client(client, url, i, tokenizer) for i in range(N_CLIENTS)))


def check_complete_stream(r: ClientResult) -> int:
    """Assert one finished stream is well formed; returns its number of generated tokens."""
    ev = r.events
    assert ev[-1] == "[DONE]" and "[DONE]" not in ev[:-1]
    chunks = ev[:-1]
    assert len({c["id"] for c in chunks}) == 1
    is_chat = r.endpoint.startswith("chat")
    assert all(c["object"] == ("chat.completion.chunk" if is_chat else "text_completion") for c in chunks)
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    usage = usage_chunk["usage"]
    assert usage["completion_tokens"] == r.max_tokens  # ignore_eos: exactly what was asked
    assert usage["prompt_tokens"] == r.prompt_tokens
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    body = chunks[:-1]
    assert all(c.get("usage") is None for c in body)
    if is_chat:
        assert body[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join((ch["delta"].get("content") or "") if is_chat else ch["text"] for c in body for ch in c["choices"])
    assert text.strip()
    reasons = [ch["finish_reason"] for c in body for ch in c["choices"]]
    assert reasons[-1] == "length" and all(x is None for x in reasons[:-1])
    return usage["completion_tokens"]


def test_64_streaming_clients_16_hang_up():
    from lowbit.engine.async_engine import AsyncEngine

    engine = AsyncEngine(EngineArgs(kv_cache_memory=256 * 2**20, max_model_len=1024, max_num_seqs=64))
    try:
        app = create_app(engine, served_model_name="smollm2-135m")
        with serve_in_background(app) as url:
            before = metrics(url)
            results = asyncio.run(run_clients(url, engine.tokenizer))

            hung = [r for r in results if r.hung_up]
            done = [r for r in results if not r.hung_up]
            assert len(hung) == N_CLIENTS // DISCONNECT_EVERY and len(done) == N_CLIENTS - len(hung)
            generated = sum(check_complete_stream(r) for r in done)

            deadline = time.monotonic() + 60  # aborts land in the engine thread asynchronously
            while True:
                m = metrics(url)
                idle = m["lowbit:num_requests_running"] == 0 and m["lowbit:num_requests_waiting"] == 0
                if (idle and m["lowbit:kv_cache_free_blocks"] == m["lowbit:kv_cache_total_blocks"]) \
                        or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert m["lowbit:num_requests_running"] == 0
            assert m["lowbit:num_requests_waiting"] == 0
            assert m["lowbit:kv_cache_usage_perc"] == 0
            assert m["lowbit:kv_cache_free_blocks"] == m["lowbit:kv_cache_total_blocks"] > 0
            # the hung-up requests were aborted, not run to their 200 tokens each
            total = m["lowbit:generation_tokens_total"] - before["lowbit:generation_tokens_total"]
            assert generated <= total < generated + len(hung) * LONG // 2
            assert m["lowbit:e2e_request_latency_seconds_count"] - before["lowbit:e2e_request_latency_seconds_count"] \
                == N_CLIENTS

            after = httpx.post(url + "/v1/completions", timeout=120,
                               json={"prompt": "The sky is", "max_tokens": 4, "temperature": 0}).json()
            assert after["choices"][0]["text"] and after["usage"]["completion_tokens"] >= 1
    finally:
        engine.shutdown()
