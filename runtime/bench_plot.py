"""`dtk bench --compare --plot out.png`: the comparison as bars, per-call latency and, with --steps, a whole
sample; each bar labelled with its speed-up over PyTorch eager."""

from __future__ import annotations

from pathlib import Path

from dtk.runtime.errors import DtkError
from dtk.runtime.files import atomic_path


def plot_comparison(comparison: dict, path) -> Path:
    """Draw `{"results": [records], "skipped": [...]}` (what `dtk bench --compare` measures) as a PNG."""
    from dtk.runtime.bench import speedups

    try:
        import matplotlib
    except ImportError:
        raise DtkError("--plot needs matplotlib: pip install 'dtk[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = comparison["results"]
    if not records:
        raise DtkError("--plot: no backend was measured, so there is nothing to draw")
    labels = [f"{r['backend']}\nbatch {r['batch']}, {r['precision']}" for r in records]
    ups = speedups(records)
    e2e = [r.get("end_to_end") for r in records]
    panels = 2 if any(e2e) else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 0.6 * len(records) + 2.2), squeeze=False)
    per_call = axes[0][0]
    p50 = [r["latency_ms"]["p50"] for r in records]
    p99 = [r["latency_ms"]["p99"] for r in records]
    bars = per_call.barh(labels, p50, xerr=[[0] * len(p50), [b - a for a, b in zip(p50, p99, strict=True)]])
    for i, bar in enumerate(bars):
        speed = f"  {ups[i]:.2f}x" if ups[i] is not None else ""
        per_call.text(p99[i], bar.get_y() + bar.get_height() / 2, speed, va="center")  # past the whisker
    per_call.invert_yaxis()
    per_call.set_xlabel("ms per denoiser call (p50, whisker to p99)")
    per_call.set_title("per call")
    if panels == 2:
        sample = axes[0][1]
        totals = [x["split_ms"]["total_ms"] if x else 0.0 for x in e2e]
        sample.barh(labels, totals, color="C1")
        for i, x in enumerate(e2e):
            text = f"  {x['images_per_s']:.2f} images/s" if x else "  not measured"
            sample.text(totals[i], i, text, va="center")
        sample.invert_yaxis()
        sample.set_yticklabels([])
        steps = next(x for x in e2e if x)
        sample.set_xlabel(f"ms per sample ({steps['steps']} {steps['sampler']} steps)")
        sample.set_title("end to end")
    skipped = comparison.get("skipped") or []
    if skipped:
        fig.text(0.01, 0.01, "skipped: " + "; ".join(s["backend"] for s in skipped), fontsize=8)
    for row in axes:
        for ax in row:
            ax.grid(axis="x", alpha=0.3)
            ax.margins(x=0.35)
    fig.tight_layout(rect=(0, 0.04 if skipped else 0, 1, 1))
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path
