"""The benchmark scripts' small decisions, without running any engine: which peer configurations run
(vLLM's dtype, llama.cpp's builds), how rows and failures show, which prompt ids every engine gets,
which quantization configs quant_ppl runs, the verdict lines, and the child-process measurement."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.peers import configs as C  # noqa: E402
from benchmarks.peers.prompts import prompt_vocab_size  # noqa: E402

# ------------------------------------------------------------------ vLLM dtype and configurations

CPUINFO = "processor\t: 0\nmodel name\t: X\nflags\t\t: fpu sse avx2 {extra}\n\nprocessor\t: 1\nflags\t\t: nothing\n"


@pytest.mark.parametrize("extra,dtype", [
    ("", "float32"),
    ("avx512f avx512_vnni", "float32"),  # AVX-512 without bf16 arithmetic: bf16 is emulated, fp32 wins
    ("avx512f avx512_bf16", "bfloat16"),
    ("amx_bf16 amx_tile", "bfloat16"),
])
def test_vllm_fastest_dtype(extra, dtype):
    flags = C.cpu_flags(CPUINFO.format(extra=extra))
    assert "avx2" in flags and "nothing" not in flags  # the first flags line only
    assert C.vllm_fastest_dtype(flags) == dtype


def test_vllm_configs_with_bf16():
    cfgs = C.vllm_configs({"avx512_bf16"}, "/fp", "/awq")
    assert [(c.label, c.args) for c in cfgs] == [
        ("vLLM-CPU bf16", ("--hf-dir", "/fp", "--dtype", "bfloat16")),
        ("vLLM-CPU fp32", ("--hf-dir", "/fp", "--dtype", "float32")),
        ("vLLM-CPU bf16 on lowbit AWQ", ("--hf-dir", "/awq", "--dtype", "bfloat16")),
    ]
    assert {c.peer for c in cfgs} == {"vLLM-CPU"} and not any(c.missing for c in cfgs)


def test_vllm_configs_without_bf16_or_awq():
    cfgs = C.vllm_configs({"avx2"}, "/fp", None, "/w4 is not an AutoAWQ-format checkpoint")
    assert [c.label for c in cfgs] == ["vLLM-CPU fp32", "vLLM-CPU bf16 on lowbit AWQ"]
    assert cfgs[1].missing == "/w4 is not an AutoAWQ-format checkpoint"  # a row with the reason, not dropped
    w8 = C.vllm_configs({"avx2"}, "/fp", "/awq", w8a8_dir="/w8")
    assert (w8[-1].label, w8[-1].args) == ("vLLM-CPU bf16 on lowbit W8A8", ("--hf-dir", "/w8", "--dtype", "bfloat16"))


# ------------------------------------------------------------------ llama.cpp builds


def _venv(root: Path, name: str) -> None:
    (root / name / "bin").mkdir(parents=True)
    (root / name / "bin" / "python").write_text("")


def test_llamacpp_native_row_always_portable_when_installed(tmp_path):
    cfgs = C.llamacpp_configs(tmp_path, "/m.gguf", "Q4_K_M")
    assert [(c.label, c.missing) for c in cfgs] == [
        ("llama.cpp Q4_K_M (native build)", "not installed: benchmarks/peers/setup_peers.sh llamacpp")]
    _venv(tmp_path, "llamacpp")
    _venv(tmp_path, "llamacpp-portable")
    cfgs = C.llamacpp_configs(tmp_path, "/m.gguf", "Q4_K_M")
    assert [(c.label, c.venv, c.missing) for c in cfgs] == [
        ("llama.cpp Q4_K_M (native build)", "llamacpp", ""),
        ("llama.cpp Q4_K_M (portable AVX2 build)", "llamacpp-portable", ""),
    ]
    assert all(c.args == ("--gguf", "/m.gguf") for c in cfgs)
    assert all(c.missing.startswith("no GGUF") for c in C.llamacpp_configs(tmp_path, None, "GGUF"))
    (tmp_path / "llamacpp" / "bin" / "llama-bench").write_text("")  # the build's own binary: one more row
    cfgs = C.llamacpp_configs(tmp_path, "/m.gguf", "Q4_K_M")
    assert [(c.label, c.args) for c in cfgs][1] == (
        "llama.cpp Q4_K_M (native build, llama-bench)", ("--gguf", "/m.gguf", "--engine", "bench"))


@pytest.mark.parametrize("name,label", [
    ("Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf", "Q4_K_M"),
    ("SmolLM2-135M-Instruct.Q4_1.gguf", "Q4_1"),
    ("model-q8_0.gguf", "Q8_0"),
    ("x.F16.gguf", "F16"),
    ("plain.gguf", "GGUF"),
    (None, "GGUF"),
])
def test_gguf_quant_label(name, label):
    assert C.gguf_quant_label(name and f"/a/b/{name}") == label


def test_setup_peers_builds_native_by_default():
    text = (ROOT / "benchmarks" / "peers" / "setup_peers.sh").read_text()
    assert "-DGGML_NATIVE=ON" in text and "--portable" in text and "llamacpp-portable" in text
    assert ".peer-build" in text  # what llamacpp_bench.py reports as the build that ran


# ------------------------------------------------------------------ rows


def test_rows_mark_the_best_per_peer_and_keep_failures():
    rows = C.mark_best([
        C.Row("lowbit fp32", "lowbit", 10.0), C.Row("lowbit W4A16", "lowbit", 30.0),
        C.Row("vLLM-CPU bf16", "vLLM-CPU", 20.0), C.Row("vLLM-CPU fp32", "vLLM-CPU", 12.0),
        C.Row("vLLM-CPU bf16 on lowbit AWQ", "vLLM-CPU", None, "RuntimeError: bad dtype"),
        C.Row("llama.cpp Q4_K_M (native build)", "llama.cpp", 15.0),
    ])
    assert [r.label for r in rows if r.best] == ["vLLM-CPU bf16"]  # ours unmarked; one llama.cpp row: no 'best'
    assert C.best_of(rows, "vLLM-CPU").label == "vLLM-CPU bf16"
    assert C.best_of(rows, "transformers") is None
    lines = [C.format_row(r) for r in rows]
    assert lines[2].rstrip().endswith("20.0  (best)")
    assert "FAILED: RuntimeError: bad dtype" in lines[4]
    assert C.format_row(C.Row("x", "p")).rstrip().endswith("n/a")
    assert "[build: native (avx2)]" in C.format_row(C.Row("l", "llama.cpp", 1.0, notes=["build: native (avx2)"]))


def test_error_line_picks_the_reason():
    err = "INFO loading\nTraceback (most recent call last):\n  File x\nValueError: torch.float32 is not supported\nINFO bye\n"
    assert C.error_line(err) == "ValueError: torch.float32 is not supported"
    assert C.error_line("just a line\n") == "just a line"
    assert C.error_line("", 3) == "exit status 3"
    assert C.error_line("[bench] warm-up\n", -11) == "killed by SIGSEGV after: [bench] warm-up"


def test_compare_engine_peer_rows_show_errors(monkeypatch):
    from benchmarks import compare_engine as CE

    runs = [
        {"label": "vLLM-CPU fp32", "peer": "vLLM-CPU", "mode": "throughput", "result": {"total_tokens_per_s": 99.0}},
        {"label": "vLLM-CPU bf16 on lowbit AWQ", "peer": "vLLM-CPU", "mode": "throughput", "error": "boom"},
        {"label": "llama.cpp Q4_K_M (native build)", "peer": "llama.cpp", "mode": "decode",
         "result": {"decode_tokens_per_s": 5.0, "engine": {"build": "native (avx2)"}}},
        {"label": "transformers fp32", "peer": "transformers", "mode": "throughput", "result": {}},
    ]
    thr = CE.peer_rows(runs, "throughput", "total_tokens_per_s")
    assert [(r.label, r.value, r.error) for r in thr] == [
        ("vLLM-CPU fp32", 99.0, None), ("vLLM-CPU bf16 on lowbit AWQ", None, "boom"),
        ("transformers fp32", None, "no total_tokens_per_s in its result")]
    dec = CE.peer_rows(runs, "decode", "decode_tokens_per_s")
    assert dec[0].notes == ["build: native (avx2)"]
    missing = C.PeerConfig("vLLM-CPU", "x", "vllm", "vllm_bench.py", missing="no AWQ checkpoint")
    assert CE.peer(missing) == {"error": "no AWQ checkpoint"}
    absent = C.PeerConfig("vLLM-CPU", "x", "no-such-venv", "vllm_bench.py")
    assert "missing; run benchmarks/peers/setup_peers.sh" in CE.peer(absent)["error"]


# ------------------------------------------------------------------ prompt ids


def _model_dir(tmp_path: Path, vocab: int, added: list[int] | None) -> Path:
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": vocab}))
    if added is not None:
        (tmp_path / "tokenizer.json").write_text(json.dumps({"added_tokens": [{"id": i} for i in added]}))
    return tmp_path


@pytest.mark.parametrize("vocab,added,want", [
    (151936, [151643, 151644, 151645], 151643),  # Qwen2.5: specials above the ordinary ids, padding rows after
    (49152, list(range(17)), 49152),  # SmolLM2: specials at the bottom, below the first prompt id (32)
    (32000, None, 32000),  # no tokenizer.json: the embedding rows
    (1000, [5000], 1000),
])
def test_prompt_vocab_size(tmp_path, vocab, added, want):
    assert prompt_vocab_size(_model_dir(tmp_path, vocab, added)) == want


# ------------------------------------------------------------------ quantization benchmarks


def test_quant_ppl_configs():
    from benchmarks.quant_ppl import parse_configs

    qwen = parse_configs("w4,w3,w8ch", {896, 4864}, 128)
    assert [(c.name, c.bits, c.group_size, c.fmt, c.note) for c in qwen] == [
        ("w4g128", 4, 128, "awq", ""), ("w3g128", 3, 128, "compressed-tensors", ""),
        ("w8ch", 8, -1, "compressed-tensors", "")]
    smol = parse_configs("w4,w3g32", {576, 1536}, 64)  # SmolLM2: 128 does not divide 576
    assert [(c.name, c.group_size) for c in smol] == [("w4g64", 64), ("w3g32", 32)]
    assert smol[0].note == "auto g64: 128 does not divide in_features 576" and smol[1].note == ""
    with pytest.raises(SystemExit, match="cannot read 'w4x'"):
        parse_configs("w4x", {576}, 64)


def test_quant_ppl_verdicts():
    from benchmarks.quant_ppl import QuantConfig, Row, verdicts

    cfgs = [QuantConfig("w4g128", 4, 128, "awq"), QuantConfig("w8ch", 8, -1, "compressed-tensors")]
    rows = [Row("-", "fp", 10.0, None, None, 1), Row("w4g128", "rtn", 12.0, 5, 100, 1),
            Row("w4g128", "awq", 10.8, 9, 250, 1), Row("w8ch", "rtn", 10.01, 5, 100, 1),
            Row("w8ch", "awq", 10.2, 9, 100, 1)]
    lines = verdicts(rows, cfgs, 10.0, 900)
    assert lines[0] == "W4 w4g128: AWQ closes 60.0% of RTN's gap (goal >= 50%): PASS"
    assert lines[1].startswith("W8 w8ch RTN: +0.100%") and lines[1].endswith("PASS")
    assert lines[2].startswith("W8 w8ch AWQ: +2.000%") and lines[2].endswith("FAIL")
    assert lines[3].endswith("= 0.28 of the fp32 checkpoint (goal <= 1/3): PASS")
    assert verdicts(rows, cfgs, 10.0, 600)[3].endswith("FAIL")  # 250 > 600 / 3


def test_quant_peer_verdicts():
    from benchmarks.quant_peer import PEER, peer_label, peer_verdicts

    ppl = {"FP": 10.0, "lowbit RTN": 12.0, "lowbit AWQ": 10.9, PEER: 11.0}
    v = peer_verdicts(ppl, {"lowbit AWQ": 50.0, PEER: 100.0})
    assert "closes 55.0%" in v.lines[1] and "2.00x faster: PASS; ppl no worse: PASS" in v.lines[2]
    assert not v.ok and "closes 55.0% of RTN's gap (goal >= 60%): FAIL" in v.lines[3]  # AWQ alone is not past AWQ
    v = peer_verdicts({**ppl, PEER: 10.5}, {"lowbit AWQ": 50.0, PEER: 100.0})
    assert not v.ok and "ppl no worse: FAIL" in v.lines[2]
    v = peer_verdicts({k: p for k, p in ppl.items() if k != PEER}, {"lowbit AWQ": 50.0})
    assert not v.ok and any("did not run" in line for line in v.lines)

    gptq = peer_label("gptq")
    full = {**ppl, "lowbit GPTQ": 10.6, gptq: 10.7}
    times = {"lowbit AWQ": 50.0, PEER: 100.0, "lowbit GPTQ": 60.0, gptq: 120.0}
    v = peer_verdicts(full, times, [PEER, gptq])
    assert v.ok and "best lowbit method: GPTQ (10.6000), closes 70.0%" in v.lines[3] and v.lines[3].endswith("PASS")
    assert v.lines[4] == "GPTQ time: lowbit 60 s, llm-compressor GPTQ 120 s (2.00x)"
    v = peer_verdicts({**full, gptq: 10.55}, times, [PEER, gptq])  # the peer's GPTQ is better: not beaten
    assert not v.ok and v.lines[3].endswith("FAIL")
    v = peer_verdicts({k: p for k, p in full.items() if k != gptq}, times, [PEER, gptq])  # a peer that failed
    assert not v.ok and "llm-compressor GPTQ did not run" in v.lines[2]


def test_child_run_measures_its_own_peak_rss():
    from benchmarks.childproc import run_child

    grow = "b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); print('done')"
    big = run_child([sys.executable, "-c", grow])
    small = run_child([sys.executable, "-c", "print('small')"])
    assert big.returncode == 0 and big.output.strip() == "done"
    assert big.peak_rss_bytes > 300 * 2**20 > small.peak_rss_bytes  # per child, not the max over children
    bad = run_child([sys.executable, "-c", "import sys; print('partial'); sys.exit('Error: it broke')"])
    assert bad.returncode == 1 and bad.last_line() == "Error: it broke"
    assert run_child(["/no/such/program"]).returncode == 127


def test_child_peak_rss_is_not_the_parents():
    """Linux starts an exec'd program's ru_maxrss at its parent's size: a child started straight from a
    big benchmark process would report the benchmark's memory. The launcher must keep it out."""
    from benchmarks.childproc import run_child

    ballast = bytearray(600 * 2**20)
    ballast[::4096] = b"x" * len(ballast[::4096])  # resident in this process
    small = run_child([sys.executable, "-c", "print('small')"])
    assert small.returncode == 0 and small.peak_rss_bytes < 200 * 2**20, small.peak_rss_bytes
    del ballast


def test_sigterm_stops_the_servers_a_benchmark_started(tmp_path):
    """`timeout` sends SIGTERM: the benchmark's finally blocks must still stop the server group it
    started (by default Python dies at once and the server lives on)."""
    import subprocess
    import time
    script = tmp_path / "bench.py"
    pidfile = tmp_path / "server.pid"
    script.write_text(f"""
import subprocess, sys, time
sys.path.insert(0, {str(ROOT / 'benchmarks' / 'peers')!r})
from _common import exit_on_sigterm, stop_process_group
exit_on_sigterm()
proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
open({str(pidfile)!r}, "w").write(str(proc.pid))
try:
    time.sleep(120)
finally:
    stop_process_group(proc, timeout=10)
""")
    bench = subprocess.Popen([sys.executable, str(script)])
    for _ in range(100):
        if pidfile.exists() and pidfile.read_text():
            break
        time.sleep(0.1)
    server = int(pidfile.read_text())
    bench.terminate()
    assert bench.wait(timeout=30) == 143
    with pytest.raises(ProcessLookupError):
        import os
        os.kill(server, 0)


def test_compare_engine_says_when_llamacpp_beats_the_read_ceiling(tmp_path):
    from benchmarks import compare_engine as CE

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"\0" * 1000)
    runs = [{"label": "llama.cpp fast", "peer": "llama.cpp", "mode": "decode", "result": {"decode_tokens_per_s": 20.0}},
            {"label": "llama.cpp slow", "peer": "llama.cpp", "mode": "decode", "result": {"decode_tokens_per_s": 5.0}},
            {"label": "vLLM-CPU bf16", "peer": "vLLM-CPU", "mode": "decode", "result": {"decode_tokens_per_s": 99.0}}]
    lines = CE.ceiling_beaten(runs, str(gguf), bw=10_000.0)  # 1000 B x 20/s = 20 kB/s > 10 kB/s
    assert len(lines) == 1 and "llama.cpp fast" in lines[0] and "above the" in lines[0]
    assert CE.ceiling_beaten(runs, str(tmp_path / "missing.gguf"), bw=10_000.0) == []


def test_compare_engine_judges_bf16_rows_against_the_bf16_matmul(capsys):
    from benchmarks import compare_engine as CE

    o = {"model": "m", "machine": {"cpu_model": "x"}, "load_before": [0.0], "load_after": [0.0], "peers": [],
         "ceilings": {"matmul_flops": 1e9, "read_bytes_per_s": 1e9, "bf16_matmul_flops": 4e9},
         "lowbit_rows": [["lowbit-fp32", "lowbit fp32"], ["lowbit-bf16", "lowbit bf16"]],
         "lowbit-fp32": {"dtype": "float32", "summary": {"model_bytes": 4e6}, "throughput": {"total_tokens_per_s": 100.0}},
         "lowbit-bf16": {"dtype": "bfloat16", "throughput": {"total_tokens_per_s": 100.0}}}
    CE.report(o)
    out = capsys.readouterr().out
    # 2 x 1M params x 100 tok/s = 2e8 FLOP/s: 20% of the fp32 ceiling, 5% of the bf16 one
    assert "lowbit fp32 compute use: 20% of the fp32 matmul ceiling" in out
    assert "lowbit bf16 compute use: 5% of the bf16 matmul ceiling" in out
    assert "(bf16 4.0)" in out


def test_compare_engine_lowbit_configs():
    from benchmarks import compare_engine as CE

    avx512 = CE.lowbit_configs(True, ["avx512", "avx2"], w8a8=True)
    keys = [c.key for c in avx512]
    assert keys == ["lowbit-fp32", "lowbit-bf16", "lowbit-w4a16", "lowbit-w4a16-bf16", "lowbit-w4a16-kv8",
                    "lowbit-w4a8", "lowbit-w8a8", "lowbit-w4a16-avx2"]
    assert [c.checkpoint for c in avx512] == ["fp", "fp", "w4", "w4", "w4", "w4", "w8a8", "w4"]
    assert {c.key: c.dtype for c in avx512}["lowbit-w4a8"] == "bfloat16"
    assert [c for c in avx512 if c.isa] == [avx512[-1]] and avx512[-1].isa == "avx2"
    # the prefill row: fp32- and bf16-activation W4A16 against the int8-activation configurations
    assert [c.key for c in avx512 if c.prefill] == ["lowbit-w4a16", "lowbit-w4a16-bf16", "lowbit-w4a8", "lowbit-w8a8"]
    assert {c.key: c.kv_cache_dtype for c in avx512}["lowbit-w4a16-kv8"] == "int8"
    avx2 = CE.lowbit_configs(False, ["avx2"])
    assert [c.key for c in avx2] == ["lowbit-fp32", "lowbit-w4a16", "lowbit-w4a16-kv8", "lowbit-w4a8"]
    assert all(c.dtype == "float32" for c in avx2) and sum(c.session for c in avx2) == 1
