"""Every figure gem draws: relation matrices, traversals, training curves, score histograms,
metric charts and comparison bars.

Figures are drawn on :class:`matplotlib.figure.Figure` objects made by :func:`new_figure`
(the Agg canvas, never pyplot), so they neither depend on nor change the user's backend and leave
no open figures behind. Every file is written atomically (see :mod:`gem.io`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gem.io import atomic_save_figure

__all__ = ["new_figure", "plot_impact_heatmap", "plot_relation_comparison", "plot_traversals", "plot_loss_curves",
           "plot_score_histogram", "plot_disentanglement", "plot_relation_error", "plot_oracle_quality",
           "plot_comparison", "plot_sweep"]

DPI = 120
CMAP = "RdBu_r"
ANNOTATE_MAX_N = 12


# --------------------------------------------------------------------------- helpers


def new_figure(width: float, height: float, layout: str | None = "constrained"):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout=layout)


def _grid_figure(nrows: int, ncols: int, panel_w: float, panel_h: float, sharex: bool = False):
    """Small-multiples figure with fixed margins in inches (much faster than a layout
    engine with dozens of axes)."""
    left, right, top, bottom, wgap, hgap = 0.7, 0.15, 0.6, 0.5, 0.6, 0.65
    width = left + right + ncols * panel_w + (ncols - 1) * wgap
    height = top + bottom + nrows * panel_h + (nrows - 1) * hgap
    fig = new_figure(width, height, layout=None)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=sharex, gridspec_kw=dict(
        left=left / width, right=1 - right / width, top=1 - top / height,
        bottom=bottom / height, wspace=wgap / panel_w, hspace=hgap / panel_h))
    return fig, axes.ravel()


def _cmap():
    import matplotlib

    return matplotlib.colormaps[CMAP].with_extremes(bad="#bdbdbd")  # NaN cells grey


def _check_square(matrix: np.ndarray, attributes: Sequence[str], what: str) -> np.ndarray:
    m = np.asarray(matrix, dtype=float)
    n = len(attributes)
    if m.shape != (n, n):
        raise ValueError(f"{what} has shape {m.shape}, expected ({n}, {n}) for {n} attributes")
    return m


def _tick_fontsize(n: int) -> float:
    return 10.0 if n <= 12 else max(5.0, 10.0 - (n - 12) / 6.0)


def _draw_matrix(
    ax,
    m: np.ndarray,
    attributes: Sequence[str],
    *,
    annotate: bool,
    value_fontsize: float,
    ci_low: np.ndarray | None = None,
    ci_high: np.ndarray | None = None,
    show_ylabels: bool = True,
    axis_labels: bool = True,
):
    """Draw one signed matrix on ``ax``; returns the image for a colour bar."""
    n = m.shape[0]
    im = ax.imshow(
        np.ma.masked_invalid(m), cmap=_cmap(), vmin=-1.0, vmax=1.0,
        interpolation="nearest", aspect="equal",
    )
    fs = _tick_fontsize(n)
    ticks = np.arange(n)
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    ax.set_xticklabels(
        list(attributes), rotation=45, ha="right", rotation_mode="anchor", fontsize=fs
    )
    if show_ylabels:
        ax.set_yticklabels(list(attributes), fontsize=fs)
    else:
        ax.set_yticklabels([])
    # thin white lines between cells
    ax.set_xticks(np.arange(-0.5, n, 1.0), minor=True)
    ax.set_yticks(np.arange(-0.5, n, 1.0), minor=True)
    ax.grid(which="minor", color="white", linewidth=0.8 if n <= 12 else 0.3)
    ax.tick_params(which="minor", length=0)
    ax.tick_params(which="major", length=2)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if axis_labels:
        ax.set_xlabel("on \u2192 (target attribute)", fontsize=max(fs, 8))
        if show_ylabels:
            ax.set_ylabel("impact of \u2193 (source attribute)", fontsize=max(fs, 8))
    if annotate:
        has_ci = ci_low is not None and ci_high is not None
        for i in range(n):
            for j in range(n):
                v = m[i, j]
                if not np.isfinite(v):
                    ax.text(j, i, "n/a", ha="center", va="center",
                            fontsize=value_fontsize * 0.8, color="#444444")
                    continue
                color = "white" if abs(v) > 0.6 else "black"
                if has_ci:
                    ax.text(j, i - 0.12, f"{v:.2f}", ha="center", va="center",
                            fontsize=value_fontsize, color=color)
                    lo, hi = ci_low[i, j], ci_high[i, j]
                    if np.isfinite(lo) and np.isfinite(hi):
                        ax.text(j, i + 0.22, f"[{lo:.2f}, {hi:.2f}]", ha="center",
                                va="center", fontsize=value_fontsize * 0.68, color=color)
                else:
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center",
                            fontsize=value_fontsize, color=color)
    return im


def _fmt_value(v: float) -> str:
    """Short traversal-value label: one decimal unless more are needed."""
    v = float(v)
    if abs(v * 10 - round(v * 10)) < 1e-6:
        return f"{v:.1f}"
    return f"{v:.2f}"


# --------------------------------------------------------------------------- plots


def plot_impact_heatmap(
    matrix: np.ndarray,
    attributes: Sequence[str],
    path: Path,
    title: str,
    ci_low: np.ndarray | None = None,
    ci_high: np.ndarray | None = None,
    outline: tuple[int, int] | None = None,
) -> Path:
    """Plot an asymmetric signed impact matrix as an annotated heatmap.

    Parameters
    ----------
    matrix : np.ndarray
        (n, n) matrix; row i is the impact of attribute i on attribute j (column).
        The colour scale is fixed to [-1, 1]; NaN cells are grey.
    attributes : sequence of str
        The n attribute names (tick labels).
    path : Path
        Output image (PNG unless the suffix says otherwise).
    title : str
        Figure title.
    ci_low, ci_high : np.ndarray, optional
        (n, n) confidence bounds, printed under each value when n <= 12.
    outline : (i, j), optional
        A pair whose two cells, (i, j) and (j, i), are outlined (e.g. the most asymmetric pair).

    Returns
    -------
    Path
        ``path``.
    """
    m = _check_square(matrix, attributes, "matrix")
    n = m.shape[0]
    lo = hi = None
    if (ci_low is None) != (ci_high is None):
        raise ValueError("give both ci_low and ci_high, or neither")
    if ci_low is not None:
        lo = _check_square(ci_low, attributes, "ci_low")
        hi = _check_square(ci_high, attributes, "ci_high")
    annotate = 0 < n <= ANNOTATE_MAX_N
    cell = (0.95 if lo is not None else 0.8) if annotate else max(0.22, min(0.5, 12.0 / max(n, 1)))
    side = max(3.0, n * cell)
    fig = new_figure(side + 2.2, side + 1.6)
    ax = fig.add_subplot()
    im = _draw_matrix(ax, m, attributes, annotate=annotate, value_fontsize=9.5 if n <= 8 else 8.0,
                      ci_low=lo, ci_high=hi)
    if outline is not None:
        from matplotlib.patches import Rectangle

        i, j = outline
        for row, col, style in ((i, j, "-"), (j, i, "--")):
            ax.add_patch(Rectangle((col - 0.46, row - 0.46), 0.92, 0.92, fill=False, edgecolor="black",
                                   linewidth=2.0, linestyle=style))
        ax.set_xlabel(ax.get_xlabel() + f"\noutlined: {attributes[i]} → {attributes[j]} (solid) and back (dashed), "
                      "the most asymmetric pair", fontsize=max(_tick_fontsize(n), 8))
    cbar = fig.colorbar(im, ax=ax, shrink=0.8, pad=0.02, aspect=30)
    cbar.set_label("impact", fontsize=9)
    cbar.ax.tick_params(labelsize=8)
    ax.set_title(title, fontsize=12)
    return atomic_save_figure(fig, path, dpi=DPI, bbox_inches="tight", pad_inches=0.1)


def plot_relation_comparison(
    matrices: Mapping[str, np.ndarray],
    attributes: Sequence[str],
    path: Path,
    title: str,
) -> Path:
    """Plot several (n, n) relation matrices side by side on one colour scale [-1, 1].

    Parameters
    ----------
    matrices : mapping of str to np.ndarray
        Panel title -> matrix, e.g. ``{"true": T, "oracle S": S, "learned A": A}``.
    attributes : sequence of str
        The n attribute names.
    path : Path
        Output image.
    title : str
        Figure title.

    Returns
    -------
    Path
        ``path``.
    """
    if not matrices:
        raise ValueError("no matrices to compare")
    mats = {name: _check_square(m, attributes, f"matrix {name!r}") for name, m in matrices.items()}
    n = len(attributes)
    k = len(mats)
    annotate = 0 < n <= 10
    panel = max(3.0, min(0.55 * n, 7.0))
    fig = new_figure(k * (panel + 0.5) + 1.9, panel + 1.6)
    axes = fig.subplots(1, k, squeeze=False)[0]
    im = None
    for idx, (ax, (name, m)) in enumerate(zip(axes, mats.items())):
        im = _draw_matrix(ax, m, attributes, annotate=annotate, value_fontsize=8.0,
                          show_ylabels=idx == 0, axis_labels=True)
        ax.set_title(name, fontsize=11)
    cbar = fig.colorbar(im, ax=list(axes), shrink=0.8, pad=0.01, aspect=30)
    cbar.ax.tick_params(labelsize=8)
    fig.suptitle(title, fontsize=13)
    return atomic_save_figure(fig, path, dpi=DPI, bbox_inches="tight", pad_inches=0.1)


def _as_rgb_float(images: np.ndarray) -> np.ndarray:
    """(rows, cols, H, W[, C]) -> float (rows, cols, H, W, 3) in [0, 1]."""
    arr = np.asarray(images)
    if arr.ndim == 4:
        arr = arr[..., None]
    if arr.ndim != 5 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"images must have shape (rows, cols, H, W, 3), got {np.shape(images)}")
    if arr.dtype == np.uint8:
        out = arr.astype(np.float32) / 255.0
    else:
        out = np.clip(np.nan_to_num(arr.astype(np.float32), nan=0.0), 0.0, 1.0)
    if out.shape[-1] == 1:
        out = np.repeat(out, 3, axis=-1)
    elif out.shape[-1] == 4:
        out = out[..., :3]
    return out


def plot_traversals(
    images: np.ndarray,
    row_labels: Sequence[str],
    values: Sequence[float],
    path: Path,
    title: str,
) -> Path:
    """Plot a latent-traversal grid: one row per attribute, one column per value.

    Parameters
    ----------
    images : np.ndarray
        (rows, cols, H, W, 3) floats in [0, 1] or uint8 (grey (…, H, W) also works).
    row_labels : sequence of str
        One label per row, drawn on the left.
    values : sequence of float
        One traversal value per column, drawn on top.
    path : Path
        Output image.
    title : str
        Figure title.

    Returns
    -------
    Path
        ``path``.

    Notes
    -----
    The tiles are packed into one mosaic separated by thin white gaps and drawn with
    nearest-neighbour interpolation at an integer magnification, so 64x64 tiles stay
    crisp.
    """
    imgs = _as_rgb_float(images)
    rows, cols, h, w, _ = imgs.shape
    if len(row_labels) != rows:
        raise ValueError(f"{len(row_labels)} row labels for {rows} rows")
    if len(values) != cols:
        raise ValueError(f"{len(values)} values for {cols} columns")
    if rows == 0 or cols == 0:
        raise ValueError("empty traversal grid")
    gap = max(1, min(h, w) // 32)
    mosaic = np.ones((rows * h + (rows - 1) * gap, cols * w + (cols - 1) * gap, 3), np.float32)
    for r in range(rows):
        for c in range(cols):
            y, x = r * (h + gap), c * (w + gap)
            mosaic[y:y + h, x:x + w] = imgs[r, c]
    # integer magnification: ~128 px per 64 px tile, but keep the figure < ~4000 px.
    scale = max(1, round(128 / max(h, w)))
    while scale > 1 and max(mosaic.shape[:2]) * scale > 4000:
        scale -= 1
    mh, mw = mosaic.shape[0] * scale, mosaic.shape[1] * scale
    fig = new_figure(mw / DPI, mh / DPI, layout=None)
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
    ax.imshow(mosaic, interpolation="nearest", aspect="equal",
              extent=(-0.5, mosaic.shape[1] - 0.5, mosaic.shape[0] - 0.5, -0.5))
    label_fs = 11 if h * scale >= 96 else 8
    ax.set_xticks([c * (w + gap) + (w - 1) / 2 for c in range(cols)])
    ax.set_xticklabels([_fmt_value(v) for v in values], fontsize=label_fs - 1)
    ax.set_yticks([r * (h + gap) + (h - 1) / 2 for r in range(rows)])
    ax.set_yticklabels(list(row_labels), fontsize=label_fs)
    ax.xaxis.tick_top()
    ax.tick_params(length=0, pad=3)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(title, fontsize=label_fs + 2, pad=label_fs + 8)
    return atomic_save_figure(fig, path, dpi=DPI, bbox_inches="tight", pad_inches=0.08,
                              facecolor="white")


def _ema(values: np.ndarray, alpha: float) -> np.ndarray:
    """Bias-corrected exponential moving average (as TensorBoard draws it)."""
    out = np.empty_like(values, dtype=float)
    acc, weight = 0.0, 0.0
    for i, v in enumerate(values):
        acc = (1 - alpha) * acc + alpha * v
        weight = (1 - alpha) * weight + alpha
        out[i] = acc / weight
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, (numbers.Real, np.number)) and not isinstance(v, (bool, np.bool_))


def plot_loss_curves(
    history: Sequence[Mapping[str, float]],
    path: Path,
    title: str = "training",
    marks: Mapping[str, float] | None = None,
) -> Path:
    """Plot every numeric series of a training history, one small subplot each.

    Parameters
    ----------
    history : sequence of mapping
        Records such as ``{"step": 100, "loss": 0.3, "kl": 0.05}``; every numeric key
        except ``"step"`` is a curve (records may lack some keys). Without ``"step"``
        the record index is the x value.
    path : Path
        Output image.
    title : str
        Figure title.
    marks : mapping, optional
        ``{label: step}``: a dashed vertical line on every subplot at each step (e.g. the end of
        the warm-up, when the latents are bound), named under the title.

    Returns
    -------
    Path
        ``path``.

    Notes
    -----
    The raw series is drawn faintly with a light EMA on top; the y axis is logarithmic
    when all values are positive and span more than two decades.
    """
    series: dict[str, tuple[list[float], list[float]]] = {}
    for idx, rec in enumerate(history):
        step = rec.get("step", idx)
        x = float(step) if _is_number(step) else float(idx)
        for key, v in rec.items():
            if key == "step" or not _is_number(v) or not math.isfinite(float(v)):
                continue
            xs, ys = series.setdefault(str(key), ([], []))
            xs.append(x)
            ys.append(float(v))
    k = len(series)
    ncols = min(4, max(k, 1))
    nrows = max(1, math.ceil(k / ncols))
    fig, axes = _grid_figure(nrows, ncols, 2.9, 1.9)
    if not series:
        ax = axes[0]
        ax.text(0.5, 0.5, "no numeric data", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    else:
        for ax, (key, (xs, ys)) in zip(axes, series.items()):
            x = np.asarray(xs)
            y = np.asarray(ys)
            order = np.argsort(x, kind="stable")
            x, y = x[order], y[order]
            if len(y) == 1:
                ax.plot(x, y, "o", color="C0", ms=4)
            else:
                span = min(25.0, max(1.0, len(y) / 40.0))
                ax.plot(x, y, color="C0", alpha=0.3, lw=0.8)
                if span > 1.0:
                    ax.plot(x, _ema(y, 2.0 / (span + 1.0)), color="C0", lw=1.5)
            if np.all(y > 0) and y.max() / y.min() > 100.0:
                ax.set_yscale("log")
            for step in (marks or {}).values():
                ax.axvline(float(step), color="#b2182b", ls="--", lw=1.0)
            ax.set_title(key, fontsize=10)
            ax.set_ylabel(key, fontsize=8)
            ax.tick_params(labelsize=8)
            ax.grid(alpha=0.3, lw=0.5)
        for ax in axes[k:]:
            ax.set_axis_off()
        for ax in axes[:k]:
            ax.set_xlabel("training step", fontsize=8)
    if marks:
        title += "   (dashed: " + ", ".join(f"{label} at step {step:g}" for label, step in marks.items()) + ")"
    fig.suptitle(title, fontsize=11 if marks else 12, y=1 - 0.15 / fig.get_figheight(), va="top")
    return atomic_save_figure(fig, path, dpi=DPI)


def plot_score_histogram(
    scores: np.ndarray,
    attributes: Sequence[str],
    path: Path,
    title: str,
) -> Path:
    """Plot the distribution of 0–5 oracle scores of each attribute (small multiples).

    Parameters
    ----------
    scores : np.ndarray
        (N, n) scores; NaN marks a missing answer and is counted in each panel title.
    attributes : sequence of str
        The n attribute names.
    path : Path
        Output image.
    title : str
        Figure title (the total of missing scores is appended).

    Returns
    -------
    Path
        ``path``.
    """
    s = np.asarray(scores, dtype=float)
    if s.ndim == 1 and len(attributes) == 1:
        s = s[:, None]
    n = len(attributes)
    if s.ndim != 2 or s.shape[1] != n:
        raise ValueError(f"scores have shape {s.shape}, expected (N, {n})")
    finite = s[np.isfinite(s)]
    integer = finite.size == 0 or bool(np.all(finite == np.round(finite)))
    lo = min(0.0, math.floor(finite.min())) if finite.size else 0.0
    hi = max(5.0, math.ceil(finite.max())) if finite.size else 5.0
    ncols = min(n, 6) if n <= 12 else min(n, 8)
    nrows = max(1, math.ceil(n / ncols))
    fig, axes = _grid_figure(nrows, ncols, 2.0, 1.45)
    for j, (ax, name) in enumerate(zip(axes, attributes)):
        col = s[:, j]
        ok = col[np.isfinite(col)]
        missing = int(col.size - ok.size)
        if integer:
            levels = np.arange(int(lo), int(hi) + 1)
            counts = np.array([(ok == v).sum() for v in levels])
            ax.bar(levels, counts, width=0.8, color="C0")
            ax.set_xticks(levels)
        else:
            ax.hist(ok, bins=np.linspace(lo, hi, 21), color="C0")
        label = str(name) if missing == 0 else f"{name} (n/a: {missing})"
        ax.set_title(label, fontsize=9, color="black" if missing == 0 else "#b2182b")
        ax.set_xlabel("score", fontsize=7)
        if j % ncols == 0:
            ax.set_ylabel("images", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.grid(axis="y", alpha=0.3, lw=0.5)
    for ax in axes[n:]:
        ax.set_axis_off()
    total_missing = int(s.size - finite.size)
    fig.suptitle(f"{title}  (N={s.shape[0]}, missing: {total_missing})", fontsize=12,
                 y=1 - 0.12 / fig.get_figheight(), va="top")
    return atomic_save_figure(fig, path, dpi=DPI)


# --------------------------------------------------------------------------- metric charts

#: Keys of the disentanglement bar chart that are not scores in [0, 1].
_NOT_SCORES = {"factorvae_active_dims"}


def plot_disentanglement(codes: Mapping[str, Mapping[str, Any]], path: Path, factor_set: str = "training") -> Path:
    """Grouped bars of the disentanglement scores (values in [0, 1]) of each code.

    ``codes`` maps a code's name (``exogenous`` μ, ``attribute`` z_rel = Aᵀμ) to its metrics;
    ``factor_set`` says whether the factors of the evaluation images were independent.
    """
    labels = {"exogenous": "exogenous code μ", "attribute": "attribute code z_rel = Aᵀμ"}
    names = [k for code in codes.values() for k, v in code.items()
             if k not in _NOT_SCORES and _is_number(v)]
    names = list(dict.fromkeys(names))
    fig = new_figure(7.5, 0.45 * max(len(names), 3) + 1.4)
    ax = fig.add_subplot()
    ypos = np.arange(len(names))
    height = 0.8 / max(len(codes), 1)
    colours = ["#4c72b0", "#dd8452", "#55a868"]
    for c, (code, values) in enumerate(codes.items()):
        raw = [float(values.get(k, math.nan)) for k in names]
        shown = [0.0 if math.isnan(v) else v for v in raw]
        y = ypos - 0.4 + height * (c + 0.5)
        ax.barh(y, shown, height=height * 0.95, color=colours[c % len(colours)], label=labels.get(code, code))
        for yy, v in zip(y, raw):
            ax.text(max(0.0 if math.isnan(v) else v, 0) + 0.01, yy, "n/a" if math.isnan(v) else f"{v:.3f}",
                    va="center", fontsize=7)
    ax.set_yticks(ypos, [k.replace("_", " ") for k in names], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(min(0.0, *(float(v) for code in codes.values() for k, v in code.items()
                           if k in names and _is_number(v) and not math.isnan(float(v)))), 1.15)
    ax.set_xlabel("score (1 = perfect)")
    ax.set_title(f"Disentanglement metrics ({factor_set} factors)")
    ax.legend(fontsize=8, loc="lower right")
    return atomic_save_figure(fig, path, dpi=DPI)


def plot_relation_error(edges: dict[str, Any], path: Path) -> Path:
    """Per-edge |S - true| with its bootstrap interval, and |A - true| of the learned graph."""
    attrs = list(edges["attributes"])
    n = len(attrs)
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    err = np.array([edges["oracle_error"][i][j] for i, j in pairs], dtype=float)
    low = np.array([edges["oracle_error_ci_low"][i][j] for i, j in pairs], dtype=float)
    high = np.array([edges["oracle_error_ci_high"][i][j] for i, j in pairs], dtype=float)
    learned = np.array([edges["learned_error"][i][j] for i, j in pairs], dtype=float)
    fig = new_figure(max(6.0, 0.32 * len(pairs) + 1.5), 4.2)
    ax = fig.add_subplot()
    x = np.arange(len(pairs))
    yerr = np.vstack([np.clip(err - low, 0, None), np.clip(high - err, 0, None)])
    ax.bar(x, err, color="#9ecae1", label=f"oracle S (bias-corrected bootstrap {100 * (1 - edges['alpha']):.0f}% CI)")
    ax.errorbar(x, err, yerr=yerr, fmt="none", ecolor="#08519c", capsize=2, linewidth=1)
    ax.plot(x, learned, "o", color="#d62728", markersize=4, label="learned A")
    ax.set_xticks(x, [f"{attrs[i]}→{attrs[j]}" for i, j in pairs], rotation=70, ha="right", fontsize=7)
    ax.set_xlim(-0.6, len(pairs) - 0.4)
    ax.set_ylabel("|impact − true| (Somers' D)")
    ax.set_title(f"Relation error per edge (row → column), {edges['scored_images']} scored images")
    ax.legend(fontsize=8)
    return atomic_save_figure(fig, path, dpi=DPI)


def _nan_to_zero(values: Sequence[float]) -> np.ndarray:
    return np.nan_to_num(np.asarray(values, dtype=float), nan=0.0)


def _percent(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.0f}%"


def plot_oracle_quality(quality: dict[str, Any], path: Path, title: str) -> Path:
    """Bar chart of an :func:`gem.metrics.oracle_quality` result.

    Left: accuracy and missing rate of each attribute (two-level attributes, absent or present, are marked ``(2 levels)``);
    a dashed mark shows the accuracy of a uniformly random answer (1/6, or 1/2 for 0/1 labels).
    Right: the overall rates -- mean accuracy, missing answers, images whose every answer is 0
    (the paper's "meaningless" answers) and images without any answer. An attribute without
    a single answer has no accuracy; its bar is empty and labelled n/a.

    Parameters
    ----------
    quality : the dict :func:`gem.metrics.oracle_quality` returns.
    path : output image (PNG).
    title : figure title (the number of images is appended).

    Returns
    -------
    Path
        ``path``.
    """
    names = list(quality["accuracy"])
    binary = quality.get("binary", {})
    labels = [f"{a}\n(2 levels)" if binary.get(a) else a for a in names]
    accuracy = [quality["accuracy"][a] for a in names]
    missing = [quality["missing_rate"][a] for a in names]
    overall_names = ["mean\naccuracy", "missing\nanswers", "all-zero\nimages", "no-answer\nimages"]
    overall = [quality["accuracy_mean"], quality["missing_rate_overall"], quality["all_zero_rate"],
               quality["all_missing_rate"]]

    n = len(names)
    fig = new_figure(max(5.0, 1.2 + 0.85 * n) + 3.2, 4.2)
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [max(n, 2), 2.6]})
    x = np.arange(n)
    width = 0.4
    bars_acc = left.bar(x - width / 2, _nan_to_zero(accuracy), width, color="C0", label="accuracy")
    bars_mis = left.bar(x + width / 2, _nan_to_zero(missing), width, color="#9e9e9e", label="missing rate")
    for bars, values in ((bars_acc, accuracy), (bars_mis, missing)):
        left.bar_label(bars, labels=[_percent(v) for v in values], fontsize=7, padding=1)
    # A uniformly random answer is right 1/6 of the time on the 0-5 scale, 1/2 for a binary label.
    chance = [0.5 if binary.get(a) else 1 / 6 for a in names]
    left.hlines(chance, x - width, x, colors="black", linestyles="dashed", lw=1, label="random answer")
    left.set_xticks(x)
    left.set_xticklabels(labels, rotation=30 if n > 6 else 0, ha="right" if n > 6 else "center", fontsize=8)
    left.set_ylim(0, 1.12)
    left.set_ylabel("fraction of images")
    left.set_title("per attribute", fontsize=10)
    left.legend(loc="upper right", fontsize=8, ncols=3, frameon=False)
    left.grid(axis="y", alpha=0.3, lw=0.5)

    colours = ["C0", "#9e9e9e", "#d95f02", "#7570b3"]
    bars = right.bar(np.arange(4), _nan_to_zero(overall), 0.6, color=colours)
    right.bar_label(bars, labels=[_percent(v) for v in overall], fontsize=8, padding=1)
    right.set_xticks(np.arange(4))
    right.set_xticklabels(overall_names, fontsize=8)
    right.set_ylim(0, 1.12)
    right.set_title("overall", fontsize=10)
    right.grid(axis="y", alpha=0.3, lw=0.5)
    fig.suptitle(f"{title}  (N={quality.get('n_images', '?')})", fontsize=11)
    return atomic_save_figure(fig, path, dpi=DPI)


def plot_comparison(rows: Sequence[dict[str, Any]], columns: Sequence[tuple], path: Path) -> Path:
    """Bar charts with ±std error bars, one panel per column, one bar per method.

    ``rows`` are ``gem compare``'s summary rows (``row[label]`` holds ``mean`` and ``std``);
    ``columns`` its ``(label, metric path, +1 higher is better / -1 lower is better, format)``.
    """
    labels = [label for label, *_ in columns]
    ncols = 4
    nrows = math.ceil(len(labels) / ncols)
    fig = new_figure(4 * ncols, (0.6 + 0.17 * len(rows)) * nrows + 0.4)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    methods = [r["method"] for r in rows]
    y = np.arange(len(methods))
    for ax, (label, _, better, _) in zip(axes, columns):
        means = [r[label]["mean"] if r[label]["mean"] is not None else np.nan for r in rows]
        stds = [r[label]["std"] or 0.0 for r in rows]
        colours = ["tab:orange" if m.startswith("gem") else "tab:blue" for m in methods]
        ax.barh(y, np.nan_to_num(means), xerr=stds, color=colours, alpha=0.85)
        ax.set_yticks(y, methods if ax in axes[::ncols] else [""] * len(methods), fontsize=7)
        ax.invert_yaxis()
        ax.set_title(f"{label} ({'higher' if better > 0 else 'lower'} is better)", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
    for ax in axes[len(labels):]:
        ax.set_visible(False)
    fig.suptitle("gem compare: mean ± std over seeds (orange: GEM and its ablations)", fontsize=9)
    return atomic_save_figure(fig, path)


def plot_sweep(key: str, values: Sequence[str], rows: Mapping[str, Sequence[Mapping[str, Any]]],
               columns: Sequence[tuple], path: Path) -> Path:
    """One panel per column of ``gem compare --sweep``: the metric against the swept value, one line
    per method with ± std error bars over seeds. ``rows[value]`` are that value's summary rows."""
    labels = [label for label, *_ in columns]
    ncols = min(4, len(labels))
    nrows = math.ceil(len(labels) / ncols)
    fig = new_figure(3.6 * ncols, 2.9 * nrows + 0.5)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    methods = [r["method"] for r in rows[values[0]]]
    try:
        x = np.array([float(v) for v in values])
    except ValueError:  # values that are not numbers are spaced evenly
        x = np.arange(len(values), dtype=float)
    for ax, (label, _, better, _) in zip(axes, columns):
        for m, method in enumerate(methods):
            found = [next(r for r in rows[v] if r["method"] == method)[label] for v in values]
            means = np.array([np.nan if f["mean"] is None else f["mean"] for f in found], dtype=float)
            stds = np.array([f["std"] or 0.0 for f in found], dtype=float)
            ax.errorbar(x, means, yerr=stds, marker="o", markersize=3, capsize=2, linewidth=1.2,
                        color=f"C{m % 10}", label=method)
        ax.set_xticks(x, list(values), fontsize=7)
        ax.set_xlabel(key, fontsize=8)
        ax.set_title(f"{label} ({'higher' if better > 0 else 'lower'} is better)", fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(alpha=0.3, linewidth=0.5)
    for ax in axes[len(labels):]:
        ax.set_visible(False)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"gem compare --sweep {key}: mean ± std over seeds", fontsize=9)
    return atomic_save_figure(fig, path, dpi=DPI)
