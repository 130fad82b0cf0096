"""Perplexity protocol: windows, the hand-computable cases, WikiText rows, quantized models."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import make_tiny_model
from lowbit.errors import LowbitError
from lowbit.eval import perplexity as P
from lowbit.eval.compare import CompareRow, format_table, plot_bars
from lowbit.quant.loader import load_model
from lowbit.quant.rtn import QuantSpec, fake_quantize_model_


class NextTokenModel(nn.Module):
    """Predicts token (t + 1) % V with probability p, the rest spread evenly: known by hand."""

    def __init__(self, vocab: int, p: float) -> None:
        super().__init__()
        self.vocab, self.p = vocab, p

    def forward(self, ids):
        return ids.unsqueeze(-1).float()  # "hidden state" = the token id

    def compute_logits(self, h):
        ids = h[..., 0].long()
        other = (1 - self.p) / (self.vocab - 1)
        logits = torch.full((*ids.shape, self.vocab), math.log(other))
        logits.scatter_(-1, ((ids + 1) % self.vocab).unsqueeze(-1), math.log(self.p))
        return logits


def test_uniform_model_has_perplexity_vocab_size():
    model = NextTokenModel(vocab=7, p=1 / 7)
    r = P.perplexity(model, torch.randint(0, 7, (50,)), seqlen=10)
    assert r.n_windows == 5 and r.n_tokens == 5 * 9
    assert r.ppl == pytest.approx(7.0, rel=1e-6)


def test_known_case_by_hand():
    # V=5, p=0.5. Window 1 follows the pattern (3 hits), window 2 breaks it once:
    # nll = 5 * log 2 + log(1 / 0.125)  over 6 predictions  (0.125 = 0.5 / 4)
    model = NextTokenModel(vocab=5, p=0.5)
    ids = torch.tensor([0, 1, 2, 3, 4, 0, 3, 4, 9])  # the trailing 9 is a partial window: dropped
    r = P.perplexity(model, ids, seqlen=4)
    expected = math.exp((5 * math.log(2) + math.log(8)) / 6)
    assert r.n_windows == 2 and r.n_tokens == 6
    assert r.ppl == pytest.approx(expected, rel=1e-6)
    assert r.nll == pytest.approx(math.log(expected), rel=1e-6)


def test_windows_do_not_overlap_and_max_windows_cuts():
    model = NextTokenModel(vocab=5, p=0.5)
    good = torch.tensor([0, 1, 2, 3])
    bad = torch.tensor([0, 0, 0, 0])
    r1 = P.perplexity(model, torch.cat([good, bad]), seqlen=4, max_windows=1)
    assert r1.n_windows == 1 and r1.ppl == pytest.approx(2.0)
    # the boundary between windows is not a prediction: [good][good] is a perfect pattern score
    r2 = P.perplexity(model, torch.cat([good, good]), seqlen=4)
    assert r2.n_tokens == 6 and r2.ppl == pytest.approx(2.0)


def test_logits_are_chunked_without_changing_the_result(monkeypatch):
    model = NextTokenModel(vocab=5, p=0.3)
    ids = torch.randint(0, 5, (64,))
    full = P.perplexity(model, ids, seqlen=32)
    monkeypatch.setattr(P, "LOGIT_ROWS", 7)
    assert P.perplexity(model, ids, seqlen=32).ppl == pytest.approx(full.ppl, rel=1e-6)


@pytest.mark.parametrize("kw", [dict(seqlen=1), dict(seqlen=4, max_windows=0), dict(seqlen=100)])
def test_bad_settings_are_clear_errors(kw):
    with pytest.raises(LowbitError):
        P.perplexity(NextTokenModel(5, 0.5), torch.arange(20) % 5, **kw)


def test_wikitext_rows_match_the_hf_join(tmp_path):
    raw = " \n = Title = \n \n Some text here . \n \n"
    rows = P.hf_rows(raw)
    assert rows == ["", " = Title = \n", "", " Some text here . \n", ""]
    f = tmp_path / "wiki.test.raw"
    f.write_text(raw)
    assert P.read_eval_text(f) == "\n\n = Title = \n\n\n\n\n Some text here . \n\n\n"


def test_jsonl_eval_text_and_errors(tmp_path):
    f = tmp_path / "e.jsonl"
    f.write_text('{"text": "a"}\n{"text": "b"}\n')
    assert P.read_eval_text(f) == "a\n\nb"
    f.write_text('{"body": "a"}\n')
    with pytest.raises(LowbitError, match="e.jsonl:1"):
        P.read_eval_text(f)
    with pytest.raises(LowbitError, match="no such"):
        P.read_eval_text(tmp_path / "missing.txt")


def test_real_wikitext_file_starts_like_the_hf_rows(shared_data):
    text = P.read_eval_text(shared_data / "wikitext-2-raw" / "wiki.test.raw")
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is")


def test_fake_quantized_tiny_model_scores_worse_but_finite(tmp_path):
    make_tiny_model("llama", tmp_path / "m")
    ids = torch.randint(0, 256, (3 * 32,), generator=torch.Generator().manual_seed(0))
    fp = load_model(tmp_path / "m", with_tokenizer=False).model
    r_fp = P.perplexity(fp, ids, seqlen=32)
    q = load_model(tmp_path / "m", with_tokenizer=False).model
    assert fake_quantize_model_(q, QuantSpec(bits=2, group_size=16)) == 14
    r_q = P.perplexity(q, ids, seqlen=32)
    assert math.isfinite(r_q.ppl) and r_q.ppl != pytest.approx(r_fp.ppl, rel=1e-6)
    # random-weight model: both close to uniform over 256 tokens
    assert 100 < r_fp.ppl < 700


def test_compare_table_and_plot(tmp_path):
    mk = lambda ppl: P.PerplexityResult(ppl=ppl, nll=math.log(ppl), n_tokens=10, n_windows=1, seqlen=8, seconds=0.1, dataset="d.txt")
    rows = [CompareRow("FP", mk(10.0), "fp"), CompareRow("AWQ", mk(10.5), "awq W4 g64")]
    table = format_table(rows)
    assert "+0.5000" in table and "awq W4 g64" in table and table.count("\n") == 3
    out = plot_bars(rows, tmp_path / "p.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
