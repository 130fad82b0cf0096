"""Process-wide state belongs to whoever owns the process: the library leaves torch's RNG, torch's
thread count and glibc's allocator settings as it found them; the command line sets the last two."""
from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_model
from test_server import save_tiny_tokenizer
from lowbit.engine.args import EngineArgs
from lowbit.engine.llm_engine import LLMEngine
from lowbit.engine.sampling_params import SamplingParams
from lowbit.quant import heap


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-side-effects")
    make_tiny_model("llama", d, vocab_size=258, bos_token_id=256, eos_token_id=257)
    save_tiny_tokenizer(d)
    return d


@pytest.fixture(autouse=True)
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def sampled_tokens(engine: LLMEngine, seed: int | None = None) -> list[list[int]]:
    params = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True, seed=seed)
    for i, p in enumerate(([1, 2, 3], [4, 5, 6, 7])):
        engine.add_request(f"s{i}", p, params)
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return [done["s0"], done["s1"]]


def engine_for(path, **kw) -> LLMEngine:
    return LLMEngine(EngineArgs(model=str(path), kv_cache_memory=2**20, block_size=8, **kw))


def test_engine_leaves_torch_global_rng_alone(tiny_dir):
    torch.manual_seed(1234)
    state, seed = torch.get_rng_state(), torch.initial_seed()
    engine = engine_for(tiny_dir, seed=7)
    assert torch.initial_seed() == seed and torch.equal(torch.get_rng_state(), state)
    sampled_tokens(engine)  # unseeded requests draw from the engine's own generator
    assert torch.initial_seed() == seed and torch.equal(torch.get_rng_state(), state)


def test_engine_seed_alone_decides_unseeded_draws(tiny_dir):
    """The same engine seed gives the same draws whatever the global RNG holds; another seed others."""
    torch.manual_seed(1)
    a = sampled_tokens(engine_for(tiny_dir, seed=7))
    torch.manual_seed(2)
    torch.rand(1000)
    b = sampled_tokens(engine_for(tiny_dir, seed=7))
    c = sampled_tokens(engine_for(tiny_dir, seed=8))
    assert a == b and a != c


def test_engine_leaves_thread_count_alone(tiny_dir):
    torch.set_num_threads(1)
    engine_for(tiny_dir)
    assert torch.get_num_threads() == 1
    assert "num_threads" not in EngineArgs.__dataclass_fields__  # the engine has no such knob to apply


def test_command_line_sets_threads(tiny_dir, capsys):
    """--threads is applied by the entry point that owns the process (cli.main)."""
    from lowbit.cli import main

    torch.set_num_threads(1)
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "x", "--max-tokens", "2", "--threads", "2",
                 "--kv-cache-memory", "1MiB", "--block-size", "8"]) == 0
    assert torch.get_num_threads() == 2
    capsys.readouterr()


class FakeLibc:
    """Records what the quantizer asks of glibc instead of changing the test process's allocator."""

    def __init__(self) -> None:
        self.mallopt_calls: list[tuple[int, int]] = []
        self.trims = 0

    def mallopt(self, param: int, value: int) -> int:
        self.mallopt_calls.append((param, value))
        return 1

    def malloc_trim(self, pad: int) -> int:
        self.trims += 1
        return 1


def test_quantize_library_call_leaves_the_allocator_alone_and_the_command_pins_it(tmp_path, monkeypatch):
    from lowbit.cli import main
    from lowbit.quant.pipeline import quantize

    libc = FakeLibc()
    monkeypatch.setattr(heap, "_libc", lambda: libc)
    make_tiny_model("llama", tmp_path / "m")
    quantize(str(tmp_path / "m"), "rtn", out_dir=tmp_path / "lib", progress=False)
    assert libc.mallopt_calls == [] and libc.trims > 0  # freed memory handed back, no setting changed
    assert main(["quantize", "--model", str(tmp_path / "m"), "--method", "rtn", "--out", str(tmp_path / "cli"),
                 "--quiet"]) == 0
    assert libc.mallopt_calls == [(heap.M_MMAP_THRESHOLD, heap.MMAP_THRESHOLD_BYTES)]
