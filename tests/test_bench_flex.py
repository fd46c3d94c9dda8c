"""bench --suite flex at the tiny preset: one row per case and implementation, a failing peer as a
row with its error, and the counted compiles (the GPU runs the full preset)."""

from __future__ import annotations

import json

import torch

from conftest import DEVICE


def test_bench_flex_runs_tiny(tmp_path):
    from attend import bench_flex

    out = tmp_path / "flex.json"
    dtype = torch.float32 if DEVICE == "cpu" else torch.bfloat16
    rows = bench_flex.main("tiny", ("attend", "no-such-impl"), str(out), DEVICE, dtype,
                           cases=("causal", "rel_bias_grad_causal"))
    saved = json.loads(out.read_text())
    assert saved["rows"] == rows and saved["meta"]["preset"] == "tiny"
    by = {(r["case"], r["impl"]): r for r in rows}
    for case in ("causal", "rel_bias_grad_causal"):
        assert by[(case, "attend")]["fwd_ms"] > 0 and by[(case, "attend")]["bwd_ms"] > 0, by[(case, "attend")]
        assert "no-such-impl" in by[(case, "no-such-impl")]["error"]
    # causal is a band mask: attend runs it on its dense kernels, and the flex kernel's row beside it
    assert by[("causal", "attend")]["path"] == "band" and by[("rel_bias_grad_causal", "attend")]["path"] == "fused"
    assert by[("causal", "attend-flex-kernel")]["path"] == "fused" and by[("causal", "attend-flex-kernel")]["fwd_ms"] > 0
    assert ("rel_bias_grad_causal", "attend-flex-kernel") not in by
    assert by[("first_call_new_mod", "attend")]["first_call_s"] > 0
    counted = by[("compiles_new_length_and_value", "attend")]
    # a captured value or a second ragged length of the first one's classes never compiles; the
    # first ragged length at most once per kernel that reads the ragged end through a variant of
    # its own (the tiles no longer divide the length): the tiny preset's forward and backward
    # (D=16, the core's kernels: 2 on an H100), the full preset's dQ programs alone (the Gluon
    # kernels take any length: 1). The tiny preset's new length (64 -> 32) changes the length's
    # bucket and so the tiles, a class of its own; the full preset's (8192 -> 7808) keeps every
    # class (0 on an H100)
    assert counted["compiles_new_value"] == counted["compiles_new_ragged_length"] == 0, counted
    assert counted["compiles_first_ragged_length"] <= 2 and counted["compiles_new_length"] <= 1, counted
    assert by[("create_block_mask_256", "attend")]["ms"] > 0
