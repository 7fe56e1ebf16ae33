"""Figures and the human-readable run report (Markdown + standalone HTML).

All plots are drawn on :class:`matplotlib.figure.Figure` objects with the Agg canvas,
never through pyplot, so they neither depend on nor change the user's backend and
leave no open figures behind. Every file is written atomically (see :mod:`gem.io`).
"""

from __future__ import annotations

import html
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from gem.io import atomic_save_figure, atomic_write_text

__all__ = [
    "plot_impact_heatmap",
    "plot_relation_comparison",
    "plot_traversals",
    "plot_loss_curves",
    "plot_score_histogram",
    "Report",
    "format_summary",
]

DPI = 120
CMAP = "RdBu_r"
ANNOTATE_MAX_N = 12


# --------------------------------------------------------------------------- helpers


def _new_figure(width: float, height: float, layout: str | None = "constrained"):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout=layout)


def _grid_figure(nrows: int, ncols: int, panel_w: float, panel_h: float, sharex: bool = False):
    """Small-multiples figure with fixed margins in inches (much faster than a layout
    engine with dozens of axes)."""
    left, right, top, bottom, wgap, hgap = 0.55, 0.15, 0.6, 0.45, 0.5, 0.5
    width = left + right + ncols * panel_w + (ncols - 1) * wgap
    height = top + bottom + nrows * panel_h + (nrows - 1) * hgap
    fig = _new_figure(width, height, layout=None)
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
    fig = _new_figure(side + 2.2, side + 1.6)
    ax = fig.add_subplot()
    im = _draw_matrix(ax, m, attributes, annotate=annotate, value_fontsize=9.5 if n <= 8 else 8.0,
                      ci_low=lo, ci_high=hi)
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
    fig = _new_figure(k * (panel + 0.5) + 1.9, panel + 1.6)
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
    fig = _new_figure(mw / DPI, mh / DPI, layout=None)
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
            ax.set_title(key, fontsize=10)
            ax.tick_params(labelsize=8)
            ax.grid(alpha=0.3, lw=0.5)
        for ax in axes[k:]:
            ax.set_axis_off()
        for ax in axes[max(0, k - ncols):k]:
            ax.set_xlabel("step", fontsize=8)
    fig.suptitle(title, fontsize=12, y=1 - 0.15 / fig.get_figheight(), va="top")
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
        ax.tick_params(labelsize=7)
        ax.grid(axis="y", alpha=0.3, lw=0.5)
    for ax in axes[n:]:
        ax.set_axis_off()
    total_missing = int(s.size - finite.size)
    fig.suptitle(f"{title}  (N={s.shape[0]}, missing: {total_missing})", fontsize=12,
                 y=1 - 0.12 / fig.get_figheight(), va="top")
    return atomic_save_figure(fig, path, dpi=DPI)


# --------------------------------------------------------------------------- report


def _format_cell(v: Any) -> str:
    """Plain-text form of a table value: floats to 4 significant digits, NaN -> n/a."""
    if v is None:
        return "n/a"
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (numbers.Integral, np.integer)):
        return str(int(v))
    if isinstance(v, (numbers.Real, np.floating)):
        f = float(v)
        if math.isnan(f):
            return "n/a"
        if math.isinf(f):
            return "inf" if f > 0 else "-inf"
        return f"{f:.4g}"
    if isinstance(v, np.ndarray):
        if v.size > 12:
            return f"array{v.shape}"
        v = v.tolist()
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_format_cell(x) for x in v) + "]"
    if isinstance(v, Path):
        return v.as_posix()
    return str(v)


def _is_numeric_cell(v: Any) -> bool:
    return _is_number(v) or v is None


def _is_blank(v: Any) -> bool:
    return isinstance(v, str) and v == ""


def _numeric_column(body: list[list[Any]], i: int) -> bool:
    values = [row[i] for row in body if not _is_blank(row[i])]
    return bool(values) and all(_is_numeric_cell(v) for v in values)


def _md_cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


class Report:
    """A run report built from sections, written as ``report.md`` and ``report.html``.

    Parameters
    ----------
    title : str
        Report title (top-level heading).

    Examples
    --------
    ::

        r = Report("run 7")
        r.add_text("Setup", "dSprites, 6 attributes")
        r.add_table("Metrics", {"MIG": 0.31, "SAP": float("nan")})
        r.add_image("Relations", run_dir / "figures" / "S.png", "oracle impact S")
        md_path, html_path = r.write(run_dir)
    """

    def __init__(self, title: str) -> None:
        self.title = str(title)
        self._sections: list[tuple[str, str, Any, str]] = []

    def add_text(self, heading: str, text: str) -> None:
        """Add a section of text (blank lines separate paragraphs)."""
        self._sections.append(("text", str(heading), str(text), ""))

    def add_table(
        self,
        heading: str,
        rows: Sequence[Mapping[str, Any]] | Mapping[str, Any],
        caption: str = "",
    ) -> None:
        """Add a table: a list of records (columns = union of keys), or one mapping
        rendered as a two-column key/value table."""
        if isinstance(rows, Mapping):
            header = ["key", "value"]
            body = [[str(k), v] for k, v in rows.items()]
        else:
            records = list(rows)
            header = []
            for rec in records:
                for key in rec:
                    if str(key) not in header:
                        header.append(str(key))
            body = [[{str(k): v for k, v in rec.items()}.get(h, "") for h in header]
                    for rec in records]
        self._sections.append(("table", str(heading), (header, body), str(caption)))

    def add_image(self, heading: str, path: str | Path, caption: str = "") -> None:
        """Add an image; its path is made relative to the run directory at write time."""
        self._sections.append(("image", str(heading), Path(path), str(caption)))

    # ------------------------------------------------------------------ rendering

    @staticmethod
    def _relative(path: Path, run_dir: Path) -> str:
        if not path.is_absolute():
            if (run_dir / path).exists() or not path.exists():
                return path.as_posix()
            path = path.resolve()
        try:
            rel = os.path.relpath(path.resolve(), run_dir.resolve())
        except ValueError:  # another drive on Windows
            return path.resolve().as_uri()
        return Path(rel).as_posix()

    def to_markdown(self, run_dir: Path) -> str:
        """The report as Markdown, image paths relative to ``run_dir``."""
        out = [f"# {self.title}", ""]
        for kind, heading, payload, caption in self._sections:
            out += [f"## {heading}", ""]
            if kind == "text":
                out += [payload.rstrip(), ""]
            elif kind == "table":
                header, body = payload
                if not header:
                    out += ["*(empty table)*", ""]
                else:
                    out.append("| " + " | ".join(_md_cell(h) for h in header) + " |")
                    out.append("| " + " | ".join(
                        "---:" if _numeric_column(body, i) else "---"
                        for i in range(len(header))) + " |")
                    for row in body:
                        out.append("| " + " | ".join("" if _is_blank(v) else _md_cell(_format_cell(v))
                                                     for v in row) + " |")
                    out.append("")
                if caption:
                    out += [f"*{caption}*", ""]
            else:
                rel = quote(self._relative(payload, run_dir))
                alt = (caption or heading).replace("[", "(").replace("]", ")")
                out += [f"![{alt}]({rel})", ""]
                if caption:
                    out += [f"*{caption}*", ""]
        return "\n".join(out).rstrip() + "\n"

    def to_html(self, run_dir: Path) -> str:
        """The report as a standalone HTML page, image paths relative to ``run_dir``."""
        esc = html.escape
        parts = [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{esc(self.title)}</title>",
            f"<style>{_CSS}</style>",
            "</head>",
            "<body>",
            f"<h1>{esc(self.title)}</h1>",
        ]
        for kind, heading, payload, caption in self._sections:
            parts.append("<section>")
            parts.append(f"<h2>{esc(heading)}</h2>")
            if kind == "text":
                for para in _paragraphs(payload):
                    parts.append("<p>" + "<br>\n".join(esc(line) for line in para) + "</p>")
            elif kind == "table":
                header, body = payload
                parts.append("<table>")
                if caption:
                    parts.append(f"<caption>{esc(caption)}</caption>")
                if header:
                    parts.append("<thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header)
                                 + "</tr></thead>")
                parts.append("<tbody>")
                for row in body:
                    cells = []
                    for v in row:
                        text = "" if _is_blank(v) else _format_cell(v)
                        cls = ' class="num"' if _is_numeric_cell(v) else ""
                        cells.append(f"<td{cls}>{esc(text)}</td>")
                    parts.append("<tr>" + "".join(cells) + "</tr>")
                if not body:
                    parts.append(f'<tr><td colspan="{max(1, len(header))}"><em>(empty)</em></td></tr>')
                parts.append("</tbody></table>")
            else:
                rel = quote(self._relative(payload, run_dir))
                alt = caption or heading
                parts.append("<figure>")
                parts.append(f'<a href="{esc(rel)}"><img src="{esc(rel)}" alt="{esc(alt)}"></a>')
                if caption:
                    parts.append(f"<figcaption>{esc(caption)}</figcaption>")
                parts.append("</figure>")
            parts.append("</section>")
        parts += ["</body>", "</html>"]
        return "\n".join(parts) + "\n"

    def write(self, run_dir: Path) -> tuple[Path, Path]:
        """Write ``report.md`` and ``report.html`` into ``run_dir`` (atomically).

        Returns
        -------
        tuple of Path
            (markdown path, html path).
        """
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        md = atomic_write_text(run_dir / "report.md", self.to_markdown(run_dir))
        page = atomic_write_text(run_dir / "report.html", self.to_html(run_dir))
        return md, page


def _paragraphs(text: str) -> list[list[str]]:
    paras: list[list[str]] = []
    current: list[str] = []
    for line in text.replace("\r\n", "\n").split("\n"):
        if line.strip():
            current.append(line)
        elif current:
            paras.append(current)
            current = []
    if current:
        paras.append(current)
    return paras


_CSS = (
    "body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;max-width:1100px;"
    "margin:2em auto;padding:0 1em;color:#222;line-height:1.45}"
    "h1{border-bottom:2px solid #ddd;padding-bottom:.3em}"
    "h2{margin-top:1.6em;border-bottom:1px solid #eee;padding-bottom:.2em}"
    "table{border-collapse:collapse;margin:.8em 0;font-size:.92em}"
    "caption{caption-side:bottom;color:#666;font-style:italic;padding-top:.4em;text-align:left}"
    "th,td{border:1px solid #d0d0d0;padding:.3em .7em;text-align:left}"
    "th{background:#f2f2f2}"
    "tbody tr:nth-child(even){background:#fafafa}"
    "td.num{text-align:right;font-variant-numeric:tabular-nums}"
    "figure{margin:1em 0}"
    "img{max-width:100%;height:auto;border:1px solid #eee}"
    "figcaption{color:#666;font-style:italic;font-size:.9em}"
)


def format_summary(rows: Mapping[str, Any]) -> str:
    """A short aligned two-column plain-text table for the terminal.

    Parameters
    ----------
    rows : mapping
        Name -> value; floats are shown with 4 significant digits, NaN as ``n/a``.

    Returns
    -------
    str
        One ``name  value`` line per entry (no trailing newline); empty for no rows.
    """
    if not rows:
        return ""
    keys = [str(k) for k in rows]
    width = max(len(k) for k in keys)
    return "\n".join(f"{k.ljust(width)}  {_format_cell(v)}" for k, v in zip(keys, rows.values()))
