"""`lowbit bench serve` against stub OpenAI-compatible servers (fast) and our server on the real model (slow)."""
from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from lowbit.bench.serving import add_serve_bench_args, random_requests, run_serve_bench, sharegpt_requests
from lowbit.errors import LowbitError
from lowbit.serve.app import serve_in_background


def stub_server(*, with_usage: bool = True, fail_every: int = 0) -> tuple[FastAPI, list[dict]]:
    """An OpenAI-compatible stub streaming one chunk per token ('tok'), like vLLM or llama.cpp."""
    app = FastAPI()
    seen: list[dict] = []

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": "stub-model", "object": "model"}]}

    async def stream(body: dict, chat: bool):
        n = body["max_tokens"]
        for i in range(n):
            await asyncio.sleep(0.002)
            choice = ({"index": 0, "delta": {"content": "tok "}, "finish_reason": None} if chat
                      else {"index": 0, "text": "tok ", "finish_reason": None})
            if i == n - 1:
                choice["finish_reason"] = "length"
            yield f"data: {json.dumps({'id': 'x', 'choices': [choice]})}\n\n"
        if with_usage and (body.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": 7, "completion_tokens": n, "total_tokens": 7 + n}
            yield f"data: {json.dumps({'id': 'x', 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"

    async def handle(request: Request, chat: bool):
        body = await request.json()
        seen.append(body)
        if fail_every and len(seen) % fail_every == 0:
            return JSONResponse({"error": {"message": "overloaded", "type": "server_error"}}, status_code=503)
        return StreamingResponse(stream(body, chat), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await handle(request, chat=True)

    return app, seen


def bench_args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_serve_bench_args(p)
    return p.parse_args(["--no-progress", *argv])


def test_bench_against_stub_with_usage(tmp_path: Path, capsys: pytest.CaptureFixture):
    app, seen = stub_server()
    out = tmp_path / "bench.json"
    with serve_in_background(app) as url:
        rc = run_serve_bench(bench_args("--base-url", url, "--num-requests", "12", "--concurrency", "3",
                                        "--input-len", "20", "--output-len", "5", "--ignore-eos", "--out", str(out)))
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["model"] == "stub-model"  # discovered from /v1/models
    assert r["completed"] == 12 and r["failed"] == 0
    assert r["total_output_tokens"] == 60 and r["output_lens"] == [5] * 12
    assert r["total_input_tokens"] == 12 * 7  # from the streamed usage
    for name in ("ttft", "tpot", "itl", "e2e"):
        v = r["latency_ms"][name]
        assert 0 < v["p50"] <= v["p90"] <= v["p99"], name
    assert r["latency_ms"]["ttft"]["p50"] <= r["latency_ms"]["e2e"]["p50"]
    assert r["request_throughput"] > 0 and r["output_throughput"] == pytest.approx(60 / r["duration_s"])
    assert all(b["ignore_eos"] is True and b["stream"] is True and b["max_tokens"] == 5 for b in seen)
    assert all(len(b["prompt"].split()) == 20 for b in seen)  # random words without a tokenizer
    text = capsys.readouterr().out
    assert "time to first token" in text and "output token throughput" in text


def test_bench_chat_without_usage_poisson_and_failures(tmp_path: Path):
    app, seen = stub_server(with_usage=False, fail_every=4)
    out = tmp_path / "b.json"
    with serve_in_background(app) as url:
        rc = run_serve_bench(bench_args("--base-url", url + "/v1", "--model", "m", "--endpoint", "chat",
                                        "--num-requests", "8", "--request-rate", "500", "--output-len", "3",
                                        "--out", str(out)))
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["completed"] == 6 and r["failed"] == 2
    assert any("503" in e for e in r["errors"])
    assert r["total_output_tokens"] == 18  # no usage: one token per streamed chunk
    assert all(b["messages"][0]["role"] == "user" and b["model"] == "m" and "ignore_eos" not in b for b in seen)


def test_bench_refuses_to_overwrite_and_reports_unreachable(tmp_path: Path):
    out = tmp_path / "exists.json"
    out.write_text("{}")
    with pytest.raises(LowbitError, match="already exists"):
        run_serve_bench(bench_args("--base-url", "http://127.0.0.1:9", "--out", str(out)))
    assert out.read_text() == "{}"
    with pytest.raises(LowbitError, match="cannot reach"):
        run_serve_bench(bench_args("--base-url", "http://127.0.0.1:9", "--num-requests", "1"))
    with pytest.raises(LowbitError):
        run_serve_bench(bench_args("--num-requests", "0"))


def test_all_requests_failing_returns_1():
    app, _ = stub_server(fail_every=1)
    with serve_in_background(app) as url:
        assert run_serve_bench(bench_args("--base-url", url, "--num-requests", "3", "--output-len", "2")) == 1


def test_sharegpt_and_random_prompts(tmp_path: Path):
    import random

    data = [
        {"conversations": [{"from": "human", "value": "What is a cat?"}, {"from": "gpt", "value": "A small animal " * 5}]},
        {"conversations": [{"from": "human", "value": "only one turn"}]},
        {"id": "no conversations"},
        {"conversations": [{"from": "human", "value": "Name a color."}, {"from": "gpt", "value": "Blue."}]},
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    reqs = sharegpt_requests(str(path), 4, None, None, random.Random(0))
    assert len(reqs) == 4 and {r.prompt for r in reqs} == {"What is a cat?", "Name a color."}
    assert {r.output_len for r in reqs if r.prompt == "What is a cat?"} == {int(15 * 1.3)}
    assert all(r.output_len == 9 for r in sharegpt_requests(str(path), 2, 9, None, random.Random(0)))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(LowbitError):
        sharegpt_requests(str(tmp_path / "bad.json"), 2, None, None, random.Random(0))
    a = random_requests(3, 16, 4, None, random.Random(1))
    b = random_requests(3, 16, 4, None, random.Random(1))
    assert [r.prompt for r in a] == [r.prompt for r in b] and len({r.prompt for r in a}) == 3


@pytest.mark.slow
def test_bench_against_lowbit_server_on_default_model(tmp_path: Path):
    from lowbit.engine.args import EngineArgs
    from lowbit.engine.async_engine import AsyncEngine
    from lowbit.serve.app import create_app

    engine = AsyncEngine(EngineArgs(kv_cache_memory=64 * 2**20, max_model_len=1024))
    try:
        with serve_in_background(create_app(engine, served_model_name="smollm2-135m")) as url:
            out = tmp_path / "real.json"
            rc = run_serve_bench(bench_args("--base-url", url, "--endpoint", "chat", "--num-requests", "8",
                                            "--concurrency", "4", "--input-len", "32", "--output-len", "8",
                                            "--ignore-eos", "--tokenizer", "smollm2-135m", "--out", str(out)))
            assert rc == 0
        r = json.loads(out.read_text())
        assert r["completed"] == 8 and r["failed"] == 0
        assert r["total_output_tokens"] == 64 and r["output_lens"] == [8] * 8
        assert r["total_input_tokens"] > 8 * 32  # random-token prompts wrapped in the chat template
        assert r["latency_ms"]["ttft"]["p50"] > 0 and r["latency_ms"]["tpot"]["p50"] > 0
    finally:
        engine.shutdown()
