"""The command line: info and explain print readable tables."""

import subprocess
import sys


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
