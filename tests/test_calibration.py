"""Calibration sources, tokenization and block cutting (no model needed)."""
from __future__ import annotations

import hashlib
import json
from importlib import resources

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.quant import calibration as cal


class CharTokenizer:
    """One token per character (ord % 250); EOS is 255, so separators are easy to spot."""

    eos_token_id = 255

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) % 250 for c in text]}


def test_txt_documents_are_separated_by_blank_lines(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("first doc\nstill first\n\n  \nsecond doc\n\n\nthird\n")
    assert cal.read_txt(p) == ["first doc\nstill first", "second doc", "third"]


def test_txt_without_blank_lines_is_one_document_per_line(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("alpha\nbeta\ngamma\n")
    assert cal.read_txt(p) == ["alpha", "beta", "gamma"]


def test_jsonl_reads_text_field_and_skips_empty(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"text": "a b"}) + "\n\n" + json.dumps({"text": "  "}) + "\n" + json.dumps({"text": "c"}) + "\n")
    assert cal.read_jsonl(p) == ["a b", "c"]


@pytest.mark.parametrize("line", ["{not json", json.dumps({"body": "x"}), json.dumps(["text"])])
def test_jsonl_bad_record_names_the_line(tmp_path, line):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"text": "ok"}) + "\n" + line + "\n")
    with pytest.raises(cal.CalibrationError, match=r"c\.jsonl:2"):
        cal.read_jsonl(p)


def test_default_sample_ships_in_the_package_and_matches_its_attribution():
    texts, desc = cal.load_texts(None)
    assert len(texts) == 256 and "C4" in desc
    assert texts[0].startswith("Beginners BBQ Class Taking Place in Missoula!")
    data = resources.files("lowbit").joinpath("data", "calib_c4_sample.jsonl").read_bytes()
    doc = resources.files("lowbit").joinpath("data", "CALIBRATION_DATA.md").read_text()
    assert hashlib.sha256(data).hexdigest() in doc
    assert "ODC-BY" in doc and "Common Crawl" in doc


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(LowbitError, match="no such calibration file"):
        cal.load_texts(tmp_path / "nope.jsonl")
    with pytest.raises(LowbitError, match="directory"):
        cal.load_texts(tmp_path)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(LowbitError, match="unknown calibration file type"):
        cal.load_texts(tmp_path / "x.csv")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(LowbitError, match="contains no text"):
        cal.load_texts(tmp_path / "empty.txt")


def test_hf_dataset_name_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(cal.CalibrationError, match="(datasets|offline)"):
        cal.load_texts("some-org/some-dataset")


def test_blocks_from_ids_cuts_equal_blocks_and_drops_the_rest():
    b = cal.blocks_from_ids(list(range(25)), n_samples=3, seqlen=8)
    assert b.dtype == torch.int64 and b.shape == (3, 8)
    assert b[2].tolist() == list(range(16, 24))


def test_blocks_from_ids_warns_when_short_and_fails_when_empty():
    with pytest.warns(UserWarning, match="only 2 blocks"):
        b = cal.blocks_from_ids(list(range(20)), n_samples=5, seqlen=8)
    assert b.shape == (2, 8)
    with pytest.raises(cal.CalibrationError, match="fewer than one block"):
        cal.blocks_from_ids(list(range(7)), n_samples=1, seqlen=8)


@pytest.mark.parametrize("n,t", [(0, 8), (2, 1), (-1, 8)])
def test_bad_shapes_are_refused(n, t):
    with pytest.raises(cal.CalibrationError):
        cal.blocks_from_ids(list(range(100)), n_samples=n, seqlen=t)


def test_build_calibration_concatenates_documents_with_eos(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["aaaa", "bbbb", "cccc", "dddd"]))
    data = cal.build_calibration(p, CharTokenizer(), n_samples=2, seqlen=7, seed=0)
    assert data.input_ids.shape == (2, 7) and data.n_tokens == 14
    flat = data.input_ids.reshape(-1).tolist()
    # documents appear whole, separated by one EOS each
    assert flat[4] == 255 and flat[9] == 255
    pieces = {flat[0:4][0], flat[5:9][0]}
    assert pieces <= {ord(c) % 250 for c in "abcd"} and len(pieces) == 2
    again = cal.build_calibration(p, CharTokenizer(), n_samples=2, seqlen=7, seed=0)
    assert torch.equal(again.input_ids, data.input_ids)  # deterministic for a seed


def test_build_calibration_needs_a_tokenizer():
    with pytest.raises(cal.CalibrationError, match="tokenizer"):
        cal.build_calibration(None, None, 2, 8)


def test_calibration_from_ids_accepts_blocks_or_a_stream():
    blocks = torch.arange(40).reshape(4, 10)
    assert torch.equal(cal.calibration_from_ids(blocks, 2, 10).input_ids, blocks[:2])
    assert cal.calibration_from_ids(torch.arange(40), 3, 10).input_ids.shape == (3, 10)
