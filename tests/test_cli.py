"""The command line: info and explain print readable tables."""

import subprocess
import sys
import time

import pytest
import torch


def _run(*args):
    res = subprocess.run([sys.executable, "-m", "attend", *args], capture_output=True, text=True, check=True)
    return res.stdout


def test_info_lists_versions_backends_and_impls():
    out = _run("info")
    for needle in ("torch", "triton", "backends on cpu", "FLASH_ATTENTION", "CUDNN runs on cuda tensors only",
                   "flash implementations"):
        assert needle in out


def test_explain_reports_decision():
    out = _run("explain", "--q-len", "128", "--mask", "padding", "--backends", "flash_attention,efficient_attention")
    assert "attend would run: EFFICIENT_ATTENTION" in out
    assert "FLASH takes no attn_mask" in out
    out = _run("explain", "--q-len", "64", "--heads", "8", "--kv-heads", "2", "--causal", "--dtype", "float16")
    assert "attend would run: FLASH_ATTENTION" in out


def test_bench_table_ratios():
    """The CUDA bench's table: attend over the best peer, and over compiled flex when it was
    measured; a peer's error is shown as n/a and left out of the ratios."""
    from attend.bench import Row, format_table

    impls = ["attend", "torch-flash", "torch-cudnn", "flex-compiled"]
    pre = Row("prefill", 128, 1024, True, 1, 16, 16, 1024, "views", {
        "attend": {"fwd": 330.0, "bwd": 250.0}, "torch-flash": {"fwd": 244.0, "bwd": 162.0},
        "torch-cudnn": {"fwd": 440.0, "bwd": 200.0}, "flex-compiled": {"fwd": 300.0, "bwd": 500.0}})
    dec = Row("decode", 128, 4096, False, 1, 32, 16, 1, results={
        "attend": {"fwd": 3000.0}, "torch-flash": {"fwd": 2500.0}, "torch-cudnn": {"error": "refused"},
        "flex-compiled": {"fwd": 2000.0}})
    head, rule, row, drow = format_table([pre, dec], impls).splitlines()
    assert head.endswith("| attend / best peer | attend / flex |") and rule.count("|") == 13
    assert row.startswith("| prefill | views | 128 |") and drow.startswith("| decode | contiguous |")
    assert row.endswith("| 0.75 / 0.50 | 1.10 / 0.50 |")  # best peer: cuDNN fwd 440, flex bwd 500
    assert "| n/a |" in drow and drow.endswith("| 1.20 | 1.50 |")
    assert "attend / flex" not in format_table([pre], impls[:2])


def test_help_is_plain_text():
    out = _run("--help")
    assert "usage: python -m attend" in out and "info" in out and "explain" in out and "bench" in out
    assert "``" not in out  # no raw reStructuredText


def test_cpu_bench_times_only_after_warmup():
    """--warmup N: N untimed calls first, then --reps timed ones; the slow first calls stay out of
    the median."""
    from attend.bench_cpu import _median_ms

    calls = []

    def fn():
        calls.append(None)
        if len(calls) <= 2:
            time.sleep(0.2)

    ms = _median_ms(fn, reps=3, warmup=2)
    assert len(calls) == 5
    assert ms < 100


def test_bench_warmup_option():
    from attend.cli import build_parser, main

    assert build_parser().parse_args(["bench"]).warmup == 1
    assert build_parser().parse_args(["bench", "--warmup", "4", "--reps", "5"]).warmup == 4
    with pytest.raises(SystemExit, match="--warmup >= 0; got --reps 5 --warmup -1"):
        main(["bench", "--warmup", "-1", "--reps", "5"])


def test_models_phases_option(monkeypatch):
    """--models-phases passes its phases to the models bench (train-compiled among them), and an
    unknown one is refused by name before anything runs."""
    from attend import bench_models
    from attend.cli import main

    seen = []
    monkeypatch.setattr(bench_models, "main", lambda *a, **kw: seen.append(kw["phases"]))
    main(["bench", "--suite", "models", "--device", "cpu", "--models-phases", "train,train-compiled"])
    main(["bench", "--suite", "models", "--device", "cpu"])
    assert seen == [("train", "train-compiled"), bench_models.PHASES]
    with pytest.raises(SystemExit, match="--models-phases 'train,bogus': unknown bogus; expected"):
        main(["bench", "--suite", "models", "--device", "cpu", "--models-phases", "train,bogus"])


@pytest.mark.parametrize("argv, dtype", [
    ([], torch.float32), (["--device", "cuda"], torch.bfloat16), (["--device", "cuda", "--dtype", "float32"], torch.float32),
    (["--device", "cuda", "--dtype", "float16"], torch.float16), (["--dtype", "float16"], torch.float16)])
def test_bench_dtype_is_the_one_asked_for(argv, dtype):
    """--dtype float32 on CUDA times fp32: it once read as "unset" there and ran bf16."""
    from attend.cli import _bench_dtype, build_parser

    assert _bench_dtype(build_parser().parse_args(["bench", *argv])) is dtype


def test_attend_rows_build_with_the_toolchain_the_bench_started_with(monkeypatch):
    """Inductor's first compile points TRITON_PTXAS_PATH at torch's own ptxas where it is unset; a
    benchmark's attend rows (in the core, flex and models suites), and its fresh-process children,
    still get the toolchain that was in force when it started, with Triton's memo of the ptxas
    version dropped at each switch; a peer's row, and what follows the attend row, keep what the
    peer set."""
    import os

    import torch

    from attend import _child, bench, bench_flex, bench_models

    monkeypatch.setattr(_child, "_AT_START", {"TRITON_PTXAS_PATH": None, "TRITON_LIBDEVICE_PATH": "/start/libdevice"})
    monkeypatch.setenv("TRITON_PTXAS_PATH", "/torch/bin/ptxas")  # what compiled flex set in the bench's process
    monkeypatch.delenv("TRITON_LIBDEVICE_PATH", raising=False)
    forgot = []
    monkeypatch.setattr(_child, "_forget_ptxas_version", lambda: forgot.append(1))
    toolchain = lambda: (os.environ.get("TRITON_PTXAS_PATH"), os.environ.get("TRITON_LIBDEVICE_PATH"))  # noqa: E731
    started, peer = (None, "/start/libdevice"), ("/torch/bin/ptxas", None)

    with _child.row_toolchain("attend-own"):
        assert toolchain() == started
    assert toolchain() == peer and len(forgot) == 2  # on the way in and out: another ptxas, another key
    with _child.row_toolchain("flex-compiled"):
        assert toolchain() == peer
    assert len(forgot) == 2

    # the suites' rows: the flex suite's, the core suite's measure, the models suite's _run_one
    assert bench_flex._row("c", "attend", lambda: dict(tc=toolchain()))["tc"] == started
    assert bench_flex._row("c", "flex-compiled", lambda: dict(tc=toolchain()))["tc"] == peer
    seen = []
    monkeypatch.setattr(bench, "_tensor", lambda *a: torch.zeros(1))
    monkeypatch.setattr(bench, "_measure_into", lambda *a: seen.append(toolchain()))
    row = bench.Row("prefill", 128, 64, True, 1, 1, 2, 64)
    bench.measure("attend", row, torch.float32, False)
    bench.measure("torch-flash", row, torch.float32, False)
    monkeypatch.setattr(bench_models, "_timed", lambda *a: (seen.append(toolchain()), (1.0, 1.0))[1])

    class Model:
        def set_attn_implementation(self, name):
            pass

        def train(self):
            pass

    p = dict(bench_models.PRESETS["tiny"])
    bench_models._run_one(Model(), "attend-own", "train", p, "cpu", 1)
    bench_models._run_one(Model(), "sdpa", "train", p, "cpu", 1)
    assert seen == [started, peer, started, peer]
    assert toolchain() == peer

    # a fresh child: the started toolchain, the parent's own environment untouched
    env = _child.started_child_env(EXTRA="1")
    assert (env.get("TRITON_PTXAS_PATH"), env["TRITON_LIBDEVICE_PATH"]) == started and env["EXTRA"] == "1"
    assert env["PYTHONPATH"].split(os.pathsep)[0].endswith("src") and toolchain() == peer
    got = {}

    def run(cmd, **kw):
        got.update(kw["env"])
        return subprocess.CompletedProcess(cmd, 0, stdout='{"first_ms": 1.0}\n', stderr="")

    monkeypatch.setattr(bench_models.subprocess, "run", run)
    assert bench_models.fresh_first_step("llama", "attend-own", "tiny", "cpu", torch.float32) == dict(first_fresh_ms=1.0)
    assert (got.get("TRITON_PTXAS_PATH"), got["TRITON_LIBDEVICE_PATH"]) == started


def test_forgetting_the_ptxas_version_clears_tritons_memo():
    """``_forget_ptxas_version`` reaches the memo Triton keys its compiles by (a private function of
    its NVIDIA backend: if Triton renames it, this says so)."""
    from triton.backends.nvidia import compiler

    from attend import _child

    compiler.get_ptxas_version.cache_clear()
    compiler.get_ptxas_version()
    assert compiler.get_ptxas_version.cache_info().currsize == 1
    _child._forget_ptxas_version()
    assert compiler.get_ptxas_version.cache_info().currsize == 0
