"""The offline API as vLLM users write it: `from lowbit import LLM, SamplingParams`, and
LLM.generate on vLLM's prompt shapes (str, token ids, TextPrompt / TokensPrompt dicts, mixed lists)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_model
from test_server import save_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def test_top_level_names_resolve_lazily_to_the_engine_classes():
    """In a fresh interpreter: `import lowbit` loads neither torch nor the engine; the names then
    resolve to the engine's own classes (no copies), and unknown names fail as they should."""
    code = "\n".join([
        "import sys, lowbit",
        "assert 'torch' not in sys.modules and 'lowbit.engine' not in sys.modules, sorted(sys.modules)",
        "from lowbit import LLM, SamplingParams, RequestOutput, CompletionOutput, EngineArgs",
        "from lowbit.engine import args, llm, outputs, sampling_params",
        "assert LLM is llm.LLM and SamplingParams is sampling_params.SamplingParams",
        "assert RequestOutput is outputs.RequestOutput and CompletionOutput is outputs.CompletionOutput",
        "assert EngineArgs is args.EngineArgs",
        "assert {'LLM', 'SamplingParams', 'RequestOutput', 'EngineArgs'} <= set(dir(lowbit))",
        "try:",
        "    from lowbit import NoSuchThing",
        "except ImportError:",
        "    pass",
        "else:",
        "    raise AssertionError('unknown name imported')",
        "print('ok')",
    ])
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from lowbit import LLM

    d = tmp_path_factory.mktemp("tiny-api")
    make_tiny_model("llama", d, vocab_size=258, bos_token_id=256, eos_token_id=257)
    save_tiny_tokenizer(d)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: a second thread only waits for a core
    yield LLM(str(d), kv_cache_memory=2**20, block_size=8)
    torch.set_num_threads(before)


def greedy(n: int = 6):
    from lowbit import SamplingParams

    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def test_generate_accepts_every_vllm_prompt_shape(llm):
    from lowbit import RequestOutput

    text = "hello there"
    ids = list(llm.tokenizer.encode(text))
    want = llm.generate(text, greedy())[0].outputs[0].token_ids
    assert len(want) == 6
    for form in (text, ids, {"prompt": text}, {"prompt_token_ids": ids}, [text], [ids], [{"prompt_token_ids": ids}]):
        outs = llm.generate(form, greedy())
        assert len(outs) == 1 and isinstance(outs[0], RequestOutput)
        assert outs[0].prompt_token_ids == ids and outs[0].outputs[0].token_ids == want, form
    other = [5, 6, 7, 8]
    mixed = llm.generate([text, {"prompt_token_ids": ids}, other, {"prompt": text}, tuple(ids),
                          {"prompt_token_ids": tuple(other)}], greedy())
    assert [o.outputs[0].token_ids for o in mixed[:2]] == [want, want]
    assert mixed[3].outputs[0].token_ids == want and mixed[4].outputs[0].token_ids == want
    assert mixed[2].prompt_token_ids == other and mixed[5].prompt_token_ids == other
    assert mixed[5].outputs[0].token_ids == mixed[2].outputs[0].token_ids
    # text prompts report their text, token prompts none (as vLLM does)
    assert [o.prompt for o in mixed] == [text, None, None, text, None, None]


@pytest.mark.parametrize("bad,match", [
    (42, "prompts must be a string, a list of token ids, a dict"),
    ([], "no prompts given"),
    (["fine", 3.5], "prompt 1: each prompt must be a string, a list of token ids, or a dict"),
    ({"prompt": 7}, "'prompt' must be a string, got int"),
    ([{"prompt_token_ids": "1 2 3"}], "prompt 0: 'prompt_token_ids' must be a list of token ids, got str"),
    ([{"prompt": "a", "prompt_token_ids": [1]}], "exactly one of 'prompt'"),
    ([{}], "exactly one of 'prompt'"),
    ([{"prompt": "a", "multi_modal_data": {}}], r"unsupported prompt field\(s\) \['multi_modal_data'\]"),
    (["fine", {"prompt_token_ids": [1, "x"]}], "prompt token ids must be integers"),
    ([{"prompt_token_ids": [1, 10**6]}], "outside the vocabulary"),
])
def test_generate_refuses_other_shapes_clearly_and_queues_nothing(llm, bad, match):
    from lowbit.errors import LowbitError

    with pytest.raises(LowbitError, match=match):
        llm.generate(bad, greedy())
    assert not llm.engine.has_unfinished()  # nothing half-queued stays behind
