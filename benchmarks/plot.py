"""Draw the README's performance figure from the raw JSON in benchmarks/results/.

Left: the masks suite (``python -m attend bench --suite masks``), attend's speed-up over the peer
timed in the same process, forward and backward. Right: the core table
(``python -m attend bench``), attend's TFLOP/s against the sequence length.

    python benchmarks/plot.py                                   # the committed H200 files
    python benchmarks/plot.py --masks M.json --core C.json --out fig.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent / "results"
MASKS = HERE / "2026-12-05-h200-masks.json"
CORE = HERE / "2026-12-05-h200-core.json"
OUT = HERE / "h200-summary.png"

# case -> (attend's entry, the peer's entry, label)
PAIRS = [
    ("bias", "attend", "torch-efficient", "float bias, grad\nvs PyTorch efficient"),
    ("padding", "attend", "torch-cudnn", "bool key padding\nvs cuDNN"),
    ("varlen", "attend", "torch-varlen", "varlen, 11 seqs\nvs PyTorch varlen"),
    ("window", "attend-window", "flex-compiled-window", "window 4096 of 16k\nvs compiled flex"),
]


def speedups(masks: dict) -> list[tuple[str, float, float]]:
    """(label, forward, backward) speed-ups of attend over the peer, from the peers' times."""
    out = []
    for case, ours, peer, label in PAIRS:
        a, p = masks["results"][case][ours], masks["results"][case][peer]
        out.append((label, p["fwd_ms"] / a["fwd_ms"], p["bwd_ms"] / a["bwd_ms"]))
    return out


def core_series(core: dict) -> dict[tuple[int, bool], list[tuple[int, float, float]]]:
    """(D, causal) -> [(S, fwd, bwd)] of attend's prefill rows without grouped heads."""
    series: dict = {}
    for row in core["rows"]:
        if row["kind"] != "prefill" or row["gqa"] != 1 or "fwd" not in row["results"].get("attend", {}):
            continue
        r = row["results"]["attend"]
        series.setdefault((row["D"], row["causal"]), []).append((row["S"], r["fwd"], r.get("bwd", 0.0)))
    return {k: sorted(v) for k, v in sorted(series.items())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--masks", default=str(MASKS))
    ap.add_argument("--core", default=str(CORE))
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    masks, core = json.loads(Path(a.masks).read_text()), json.loads(Path(a.core).read_text())
    card = masks["meta"].get("device", "GPU")
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [1.2, 1]})
    rows = speedups(masks)
    xs = range(len(rows))
    left.bar([x - 0.2 for x in xs], [r[1] for r in rows], 0.4, label="forward")
    left.bar([x + 0.2 for x in xs], [r[2] for r in rows], 0.4, label="backward")
    left.axhline(1.0, color="black", linewidth=0.8)
    left.set_xticks(list(xs), [r[0] for r in rows], fontsize=7)
    left.set_ylabel("attend's speed-up (peer time / attend time)", fontsize=8)
    left.set_title(f"Masks and packed sequences, {card}, bf16", fontsize=9)
    left.legend(fontsize=7)
    for (d, causal), pts in core_series(core).items():
        s = [p[0] for p in pts]
        line, = right.plot(s, [p[1] for p in pts], marker="o", label=f"D={d} {'causal' if causal else 'full'} fwd")
        right.plot(s, [p[2] for p in pts], marker="x", linestyle="--", color=line.get_color(),
                   label=f"D={d} {'causal' if causal else 'full'} bwd")
    right.set_xscale("log", base=2)
    right.set_xlabel("sequence length (16k tokens per batch)", fontsize=8)
    right.set_ylabel("attend TFLOP/s", fontsize=8)
    right.set_title(f"Dense attention, hidden 2048, {card}", fontsize=9)
    right.legend(fontsize=6, ncol=2)
    for ax in (left, right):
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(a.out, dpi=80)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
