"""Draw the README's performance figure from the raw JSON in benchmarks/results/.

Left: the masks suite (``python -m attend bench --suite masks``), attend's speed-up over the peer
timed in the same process, forward and backward. Right: the core table's longest D=128 rows
(``python -m attend bench``), TFLOP/s of attend and of every peer in that process.

    python benchmarks/plot.py                                   # the committed H200 files
    python benchmarks/plot.py --masks M.json --core C.json --out fig.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent / "results"
MASKS = HERE / "2026-12-06-h200-masks.json"
CORE = HERE / "2026-12-06-h200-core.json"
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


# the core table's implementations, as the right panel names them (a peer absent from the run is skipped)
IMPLS = [("attend", "attend"), ("attend-fa4", "FA4"), ("torch-cudnn", "cuDNN"), ("torch-flash", "PyTorch flash"),
         ("flex-compiled", "compiled flex")]


def core_bars(core: dict, head_dim: int = 128) -> tuple[list[str], dict[str, list[float]]]:
    """The longest prefill rows of ``head_dim`` without grouped heads, non-causal then causal:
    (group labels "full fwd", "full bwd", "causal fwd", "causal bwd", {impl label: TFLOP/s per
    group}), 0 where an implementation has no figure."""
    rows = [r for r in core["rows"] if r["kind"] == "prefill" and r["gqa"] == 1 and r["D"] == head_dim
            and r.get("layout", "contiguous") == "contiguous"]
    longest = max(r["S"] for r in rows)
    groups, bars = [], {label: [] for key, label in IMPLS if any(key in r["results"] for r in rows)}
    for causal in (False, True):
        row = next(r for r in rows if r["S"] == longest and r["causal"] == causal)
        for kind in ("fwd", "bwd"):
            groups.append(f"{'causal' if causal else 'full'} {kind}")
            for key, label in IMPLS:
                if label in bars:
                    val = row["results"].get(key, {}).get(kind)
                    bars[label].append(val if isinstance(val, (int, float)) else 0.0)
    return groups, bars, longest


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
    groups, bars, S = core_bars(core)
    width = 0.8 / len(bars)
    for i, (label, vals) in enumerate(bars.items()):
        right.bar([g - 0.4 + (i + 0.5) * width for g in range(len(groups))], vals, width, label=label)
    right.set_xticks(list(range(len(groups))), groups, fontsize=7)
    right.set_ylabel("TFLOP/s", fontsize=8)
    right.set_title(f"Dense attention, D=128, S={S}, {card}", fontsize=9)
    right.set_ylim(0, 1.2 * max(max(v) for v in bars.values()))  # room for the legend above the bars
    right.legend(fontsize=6, ncol=len(bars), loc="upper center")
    for ax in (left, right):
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(a.out, dpi=80)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
