"""Figures for papers: labelled axes, the Okabe-Ito colour-blind-safe palette, PNG + vector PDF."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a window
import matplotlib.pyplot as plt  # noqa: E402

# Okabe & Ito (2008): distinguishable under the common forms of colour blindness.
OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
STYLE = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "pdf.fonttype": 42,  # TrueType in the PDF: editable text, accepted by journals
    "ps.fonttype": 42,
    "savefig.dpi": 200,
    "savefig.bbox": "tight",
}


def save(fig, prefix: str | Path) -> list[Path]:
    """Write ``prefix.png`` and ``prefix.pdf``; returns both paths."""
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    paths = [prefix.with_suffix(".png"), prefix.with_suffix(".pdf")]
    for p in paths:
        fig.savefig(p)
    plt.close(fig)
    return paths


def _band(ax, xs, rows, key, color):
    lo = [r.get(f"{key}_lo") for r in rows]
    hi = [r.get(f"{key}_hi") for r in rows]
    ok = [i for i, (a, b) in enumerate(zip(lo, hi, strict=True)) if _finite(a) and _finite(b)]
    if ok:
        ax.fill_between([xs[i] for i in ok], [lo[i] for i in ok], [hi[i] for i in ok],
                        color=color, alpha=0.15, linewidth=0)  # fmt: skip


def _finite(x) -> bool:
    return x is not None and x == x and abs(x) != float("inf")


def plot_sweep(
    rows: Sequence[dict],
    out_prefix: str | Path,
    baseline: dict | None = None,
    best: dict | None = None,
    title: str | None = None,
    min_coherence: float | None = None,
) -> list[Path]:
    """Three panels: trait vs layer and coherence vs layer (one line per coefficient, 95% CI
    bands, the unsteered model dashed), and the dose-response at the chosen layer."""
    rows = [r for r in rows if isinstance(r.get("layer"), int) and r.get("coef") is not None]
    if not rows:
        raise ValueError("no (layer, coef) rows to plot.")
    coefs = sorted({r["coef"] for r in rows})
    layers = sorted({r["layer"] for r in rows})
    min_coherence = (
        min_coherence if min_coherence is not None else (best or {}).get("min_coherence")
    )
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 3, figsize=(10.5, 3.2), constrained_layout=True)
        for ax, key, label in ((axes[0], "trait", "trait score"),
                               (axes[1], "coherence", "coherence")):  # fmt: skip
            for i, c in enumerate(coefs):
                sel = sorted((r for r in rows if r["coef"] == c), key=lambda r: r["layer"])
                xs = [r["layer"] for r in sel]
                ys = [r.get(key) if r.get(key) is not None else float("nan") for r in sel]
                color = OKABE_ITO[i % len(OKABE_ITO)]
                ax.plot(xs, ys, marker=MARKERS[i % len(MARKERS)], markersize=3.5, color=color,
                        linewidth=1.3, label=f"α = {c:g}")  # fmt: skip
                _band(ax, xs, sel, key, color)
            if baseline is not None and baseline.get(key) is not None:
                ax.axhline(baseline[key], color="0.35", linestyle="--", linewidth=1,
                           label="unsteered")  # fmt: skip
            if key == "coherence" and min_coherence is not None:
                ax.axhline(min_coherence, color="0.6", linestyle=":", linewidth=1)
                ax.annotate(f"min. coherence {min_coherence:g}", (1.0, min_coherence),
                            xycoords=("axes fraction", "data"), xytext=(-2, 2),
                            textcoords="offset points", ha="right", va="bottom",
                            fontsize=7, color="0.4")  # fmt: skip
            if best and best.get("layer") is not None and best.get(key) is not None:
                ax.plot([best["layer"]], [best[key]], marker="*", markersize=11, color="black",
                        linestyle="none", label="chosen")  # fmt: skip
            ax.set_xlabel("layer (output of block L, HF hidden_states[L])")
            ax.set_ylabel(f"mean {label} (0–100)")
            ax.set_ylim(-3, 103)
            if len(layers) <= 12:
                ax.set_xticks(layers)
        axes[0].set_title("Trait expression vs. steering layer")
        axes[1].set_title("Coherence vs. steering layer")
        axes[0].legend(frameon=False, loc="best")
        # Dose-response at the chosen layer (or the layer with the most coefficients).
        layer = (best or {}).get("layer")
        if layer not in layers:
            layer = max(layers, key=lambda L: sum(r["layer"] == L for r in rows))
        sel = sorted((r for r in rows if r["layer"] == layer), key=lambda r: r["coef"])
        if baseline is not None and 0.0 not in [r["coef"] for r in sel]:
            sel = sorted([*sel, dict(baseline, coef=0.0)], key=lambda r: r["coef"])
        ax = axes[2]
        for key, color, marker in (("trait", OKABE_ITO[3], "o"),
                                   ("coherence", OKABE_ITO[0], "s")):  # fmt: skip
            xs = [r["coef"] for r in sel]
            ys = [r.get(key) if r.get(key) is not None else float("nan") for r in sel]
            ax.plot(xs, ys, marker=marker, markersize=3.5, color=color, linewidth=1.3, label=key)
            _band(ax, xs, sel, key, color)
        ax.axvline(0, color="0.6", linewidth=0.8)
        ax.set_xlabel("steering coefficient α (raw vector units)")
        ax.set_ylabel("mean score (0–100)")
        ax.set_ylim(-3, 103)
        ax.set_title(f"Dose-response at layer {layer}")
        ax.legend(frameon=False, loc="best")
        if title:
            fig.suptitle(title)
        return save(fig, out_prefix)


def plot_prescreen(screen: Sequence[dict], out_prefix: str | Path, title: str | None = None):
    """AUROC of held-out pos vs neg prompt projections, per layer."""
    screen = sorted(screen, key=lambda r: r["layer"])
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(4.2, 3.0), constrained_layout=True)
        ax.plot([r["layer"] for r in screen], [r["auroc"] for r in screen], marker="o",
                markersize=3.5, color=OKABE_ITO[0])  # fmt: skip
        ax.axhline(0.5, color="0.6", linestyle=":", linewidth=1, label="chance")
        ax.set_xlabel("layer")
        ax.set_ylabel("AUROC (pos vs neg, held-out prompts)")
        ax.set_ylim(0.0, 1.02)
        ax.legend(frameon=False)
        if title:
            ax.set_title(title)
        return save(fig, out_prefix)
