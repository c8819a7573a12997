"""Monitoring figures and token views: labelled axes, Okabe-Ito colours, PNG + vector PDF.

- :func:`plot_monitor`: projection vs trait score (one colour per condition, r with its 95% CI),
  and the per-condition means of both with their CIs.
- :func:`plot_token_projections`: a response's tokens coloured by their projection (matplotlib,
  for papers).
- :func:`write_tokens_html`: the same with circuitsvis's ``ColoredTokens``, in one HTML file
  that works offline: circuitsvis's own bundled JavaScript (``dist/cdn/iife.js`` inside the
  installed package) is embedded once, instead of the CDN import its ``str()`` form uses.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.colors import LinearSegmentedColormap, Normalize

from persona_lens.plots import MARKERS, OKABE_ITO, STYLE, plt, save

# Diverging map between two Okabe-Ito colours (blue = less trait, vermillion = more).
NEG_COLOR, POS_COLOR = OKABE_ITO[0], OKABE_ITO[3]
DIVERGING = LinearSegmentedColormap.from_list("okabe_ito_div", [NEG_COLOR, "#FFFFFF", POS_COLOR])


def _get(x, name, default=None):
    return x.get(name, default) if isinstance(x, dict) else getattr(x, name, default)


def _corr_text(c) -> str:
    if c is None:
        return "r undefined"
    r, lo, hi, p, n = (_get(c, k) for k in ("r", "ci_low", "ci_high", "p", "n"))
    return f"r = {r:.2f} [{lo:.2f}, {hi:.2f}], p = {p:.1e}, n = {n}"


def _err(mean, ci) -> tuple[float, float]:
    lo, hi = ci if ci is not None else (None, None)
    if mean is None or lo is None or hi is None:
        return 0.0, 0.0
    return mean - lo, hi - mean


def plot_monitor(
    rows: Sequence[dict], summary, out_prefix: str | Path, title: str | None = None
) -> list[Path]:
    """Three panels: last-prompt-token projection vs trait score (coloured by condition, with
    the least-squares line and r), then mean projection and mean trait score per condition."""
    conds = [_get(c, "label") for c in _get(summary, "conditions")]
    color = {c: OKABE_ITO[i % len(OKABE_ITO)] for i, c in enumerate(conds)}
    marker = {c: MARKERS[i % len(MARKERS)] for i, c in enumerate(conds)}
    scored = [r for r in rows if r.get("trait_score") is not None]
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(
            1,
            3,
            figsize=(11.5, 3.6),
            constrained_layout=True,
            gridspec_kw=dict(width_ratios=[1.4, 1, 1]),
        )
        ax = axes[0]
        for c in conds:
            pts = [r for r in scored if r["condition"] == c]
            xy = ([r["projection"] for r in pts], [r["trait_score"] for r in pts])
            ax.scatter(*xy, s=14, alpha=0.75, color=color[c], marker=marker[c], label=c,
                       linewidths=0)  # fmt: skip
        if len(scored) >= 2:
            x = np.array([r["projection"] for r in scored], dtype=float)
            y = np.array([r["trait_score"] for r in scored], dtype=float)
            if np.ptp(x) > 0:
                slope, icpt = np.polyfit(x, y, 1)
                xs = np.linspace(x.min(), x.max(), 2)
                ax.plot(xs, slope * xs + icpt, color="0.2", linewidth=1, linestyle="--")
        ax.set_title(_corr_text(_get(summary, "overall")), fontsize=8.5)
        ax.set_xlabel("last-prompt-token projection onto v̂ (before generation)")
        ax.set_ylabel("trait score of the response (0–100)")
        ax.set_ylim(-3, 103)
        # Below the axes: with 8 conditions a legend inside always covers points.
        ax.legend(frameon=False, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2),
                  ncol=min(4, len(conds)), handletextpad=0.2, columnspacing=0.8)  # fmt: skip

        xs = np.arange(len(conds))
        cs = _get(summary, "conditions")
        for ax, key, ci_key, label in (
            (axes[1], "mean_projection", "projection_ci", "mean projection (95% CI)"),
            (axes[2], "mean_trait", "trait_ci", "mean trait score (95% CI)"),
        ):
            for i, c in enumerate(cs):
                m = _get(c, key)
                if m is None:
                    continue
                lo, hi = _err(m, _get(c, ci_key))
                style = dict(color=color[conds[i]], marker=marker[conds[i]], markersize=5)
                ax.errorbar([i], [m], yerr=[[lo], [hi]], capsize=3, linewidth=1.2, **style)
            ms = [_get(c, key) for c in cs]
            ok = [i for i, m in enumerate(ms) if m is not None]
            ax.plot([xs[i] for i in ok], [ms[i] for i in ok], color="0.6", linewidth=0.8, zorder=0)
            ax.set_xticks(xs)
            ax.set_xticklabels(conds, rotation=40, ha="right")
            ax.set_xlabel("condition")
            ax.set_ylabel(label)
        axes[2].set_ylim(-3, 103)
        axes[1].set_title("Projection per condition")
        rs = [
            f"{what} = {_get(c, 'r'):.2f}"
            for what, c in (("r(condition means)", _get(summary, "between_means")),
                            ("r(prompt means)", _get(summary, "prompt_means")))
            if c is not None
        ]  # fmt: skip
        axes[2].set_title(
            "\n".join(["Trait score per condition", ", ".join(rs)]).strip(), fontsize=9
        )
        if title:
            fig.suptitle(title)
        return save(fig, out_prefix)


def _display(tok: str) -> str:
    # Visible whitespace; "$" would start matplotlib mathtext.
    return tok.replace("\n", "↵").replace("\t", "⇥").replace("$", r"\$")


def _center_and_range(values: Sequence[float], center: float | None) -> tuple[float, float]:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if len(v) == 0:
        return 0.0, 1.0
    c = float(np.median(v)) if center is None else float(center)
    m = float(np.abs(v - c).max())
    return c, m if m > 0 else 1.0


def plot_token_projections(
    tokens: Sequence[str],
    values: Sequence[float],
    out_prefix: str | Path,
    title: str | None = None,
    center: float | None = None,
    width_chars: int = 80,
) -> list[Path]:
    """Tokens laid out as text, each on a background coloured by its projection (white at
    ``center``, default the median), with a colour bar in raw projection units."""
    if len(tokens) != len(values):
        raise ValueError(f"{len(tokens)} tokens but {len(values)} values.")
    c, m = _center_and_range(values, center)
    norm = Normalize(c - m, c + m)
    # Lay tokens out in character cells of a monospace font, wrapping at width_chars.
    cells, col, line = [], 0, 0
    for tok, val in zip(tokens, values, strict=True):
        shown = _display(tok)
        w = max(1, len(tok.replace("\n", "↵")))
        if col + w > width_chars and col > 0:
            col, line = 0, line + 1
        cells.append((col, line, w, shown, val))
        col += w
        if "\n" in tok:
            col, line = 0, line + 1
    n_lines = line + 1
    fs = 9
    char_w, line_h = 0.6 * fs / 72, 1.55 * fs / 72  # inches
    text_h = n_lines * line_h
    top, bottom, bar_h = 0.4, 0.1, max(text_h, 0.9)  # inches: title, margin, colour bar
    w, h = width_chars * char_w + 1.3, max(text_h, bar_h) + top + bottom
    with plt.rc_context(STYLE):
        fig = plt.figure(figsize=(w, h))
        ax = fig.add_axes([0.1 / w, 1 - (top + text_h) / h, width_chars * char_w / w, text_h / h])
        cax = fig.add_axes([1 - 1.0 / w, 1 - (top + bar_h) / h, 0.12 / w, bar_h / h])
        ax.set_xlim(0, width_chars)
        ax.set_ylim(n_lines, 0)
        ax.axis("off")
        for x, y, w, shown, val in cells:
            ok = val is not None and math.isfinite(val)
            face = DIVERGING(norm(val)) if ok else (0.85, 0.85, 0.85, 1.0)
            ax.add_patch(plt.Rectangle((x, y + 0.08), w, 0.84, facecolor=face, linewidth=0))
            ax.text(x, y + 0.5, shown, fontsize=fs, family="monospace", va="center", ha="left")
        sm = plt.cm.ScalarMappable(norm=norm, cmap=DIVERGING)
        fig.colorbar(sm, cax=cax).set_label("projection onto v̂", fontsize=8)
        if title:
            ax.set_title(title, fontsize=8, loc="left")
        return save(fig, out_prefix)


# --------------------------------------------------------------------------------------
# HTML with circuitsvis, offline.


def circuitsvis_bundle() -> str | None:
    """circuitsvis's bundled JavaScript (defines the global ``CircuitsVis``), or None."""
    try:
        import circuitsvis
    except ImportError:
        return None
    path = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    return path.read_text(encoding="utf-8") if path.exists() else None


def _no_source_map(text: str) -> str:
    # Browsers fetch a source map (a relative iife.js.map that is not there) when devtools open.
    return re.sub(r"//# sourceMappingURL=\S*", "", text)


def _inline_js(js: str) -> str:
    """JavaScript safe inside one inline <script> element, as circuitsvis's render_local does."""
    return _no_source_map(js.replace("</script>", ""))


def _colored_tokens_html(tokens, values, lo, hi, bundle: str) -> str:
    """circuitsvis.tokens.colored_tokens's offline HTML, without its copy of the bundle."""
    from circuitsvis.tokens import colored_tokens

    # ColoredTokens puts each token into the page as HTML: escape it, so that model output
    # shows as text and can never add an element (an <img src=...> would be fetched).
    src = colored_tokens(
        [html.escape(t) for t in tokens], [float(v) for v in values], min_value=lo, max_value=hi,
        negative_color=NEG_COLOR, positive_color=POS_COLOR,
    ).local_src  # fmt: skip
    embedded = bundle.replace("</script>", "")  # exactly what render_local inlines
    if embedded not in src:
        return _no_source_map(src)  # another circuitsvis layout: keep its self-contained form
    src = src.replace(embedded, "")
    # `<div .../>` is not self-closing in HTML: later content would nest inside it.
    src = re.sub(r'<div id="(circuits-vis-[^"]+)"([^>]*)/>', r'<div id="\1"\2></div>', src)
    # Tokens are model output: "</script>" or "<!--" in one must not end the script early.
    # Inside the render call "<" only occurs in JSON strings, where \u003c means the same.
    open_tag = src.index("<script")
    open_end = src.index(">", open_tag) + 1
    close = src.rindex("</script>")
    # A classic script right after its div runs as the page is read, after the bundle (a
    # module script would also work in browsers, but not in tools such as jsdom).
    script = src[open_end:close].replace("<", "\\u003c")
    return src[:open_tag] + "<script>" + script + src[close:]


def _static_tokens_html(tokens, values, c, m) -> str:
    """Plain coloured spans: the fallback without circuitsvis (no JavaScript at all)."""
    norm = Normalize(c - m, c + m)
    spans = []
    for tok, v in zip(tokens, values, strict=True):
        r, g, b, _ = DIVERGING(norm(v)) if v is not None and math.isfinite(v) else (0.85,) * 4
        color = f"rgb({int(255 * r)},{int(255 * g)},{int(255 * b)})"
        tip = f"{v:.3f}" if v is not None and math.isfinite(v) else "none"
        spans.append(
            f'<span title="{tip}" style="background:{color};white-space:pre-wrap">'
            f"{html.escape(tok)}</span>"
        )
    return '<div class="tokens">' + "".join(spans) + "</div>"


def write_tokens_html(
    examples: Sequence, path: str | Path, title: str = "", center: float | None = None
) -> Path:
    """One offline HTML page with each example's tokens coloured by projection.

    ``examples``: objects with ``title``, ``tokens`` and ``values``. Colours (and the values
    shown on hover) are the projection minus ``center`` (default: the median over every shown
    token), on one scale for all examples, so examples compare with each other."""
    path = Path(path)
    all_vals = [v for e in examples for v in e.values]
    c, m = _center_and_range(all_vals, center)
    bundle = circuitsvis_bundle()
    head = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8">',
        f"<title>{html.escape(title or 'token projections')}</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto;}"
        "h3{font-size:0.95em;margin-top:2em;}</style>",
    ]
    body = [
        f"<h2>{html.escape(title)}</h2>" if title else "",
        "<p>Each generated token is coloured by its projection onto the unit persona vector, "
        "recorded during generation. Colour and hover value: projection minus "
        f"{c:.3f} (the median over all tokens shown); scale &plusmn;{m:.3f}; "
        "vermillion = more trait, blue = less.</p>",
    ]
    if bundle is not None:
        head.append(f"<script>{_inline_js(bundle)}</script>")  # once, before every render
        for e in examples:
            centred = [v - c for v in e.values]
            body.append(f"<h3>{html.escape(e.title)}</h3>")
            body.append(_colored_tokens_html(e.tokens, centred, -m, m, bundle))
    else:
        for e in examples:
            body.append(f"<h3>{html.escape(e.title)}</h3>")
            body.append(_static_tokens_html(e.tokens, e.values, c, m))
    if not examples:
        body.append("<p>No responses to show.</p>")
    page = "\n".join([*head, "</head><body>", *body, "</body></html>"]) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def fetchable_urls(page: str) -> list[str]:
    """URLs a browser would fetch on opening ``page``: src/href attributes, ES module imports,
    CSS url()/@import and source maps. (URL strings inside JavaScript are not fetched.)"""
    pats = [
        r"""\b(?:src|href|srcset|poster|data)\s*=\s*["']?\s*((?:[a-z]+:)?//[^"'\s>]+)""",
        r"""\bimport\s*(?:[^;'"]*?\bfrom\s*)?\(?\s*["']((?:[a-z]+:)?//[^"']+)""",
        r"""url\(\s*["']?((?:[a-z]+:)?//[^"')]+)""",
        r"""@import\s+["']?((?:[a-z]+:)?//[^"';]+)""",
        r"""sourceMappingURL=(\S+)""",
    ]
    found = []
    for p in pats:
        found += re.findall(p, page, flags=re.IGNORECASE)
    return found
