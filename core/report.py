"""The report document model: sections of text, tables and images written as ``report.md`` and
``report.html``, plus the plain-text forms of the same cells for the terminal.

:func:`format_cell` is the one way a value becomes table text (Markdown, HTML and terminal alike)
and :func:`text_table` the one plain-text table.
"""

from __future__ import annotations

import base64
import html
import math
import numbers
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional
from urllib.parse import quote

import numpy as np

from gem.io import atomic_write_text

__all__ = ["Report", "format_cell", "text_table", "format_summary"]


def _is_number(v: Any) -> bool:
    return isinstance(v, (numbers.Real, np.number)) and not isinstance(v, (bool, np.bool_))


def format_cell(v: Any) -> str:
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
        return "[" + ", ".join(format_cell(x) for x in v) + "]"
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
                        out.append("| " + " | ".join("" if _is_blank(v) else _md_cell(format_cell(v))
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

    def to_html(self, run_dir: Path, embed_images: bool = True) -> str:
        """The report as one HTML page. With ``embed_images`` every figure is inside the page (a
        ``data:`` URI), so the file alone can be sent or archived; otherwise figures are linked,
        relative to ``run_dir``. Text, captions and table cells render their inline Markdown
        (`code`, **bold**, *italic*)."""
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
                    parts.append("<p>" + "<br>\n".join(_inline_html(line) for line in para) + "</p>")
            elif kind == "table":
                header, body = payload
                parts.append("<table>")
                if caption:
                    parts.append(f"<caption>{_inline_html(caption)}</caption>")
                if header:
                    parts.append("<thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header)
                                 + "</tr></thead>")
                parts.append("<tbody>")
                for row in body:
                    cells = []
                    for v in row:
                        text = "" if _is_blank(v) else format_cell(v)
                        cls = ' class="num"' if _is_numeric_cell(v) else ""
                        cells.append(f"<td{cls}>{_inline_html(text)}</td>")
                    parts.append("<tr>" + "".join(cells) + "</tr>")
                if not body:
                    parts.append(f'<tr><td colspan="{max(1, len(header))}"><em>(empty)</em></td></tr>')
                parts.append("</tbody></table>")
            else:
                rel = quote(self._relative(payload, run_dir))
                alt = caption or heading
                source = _data_uri(payload if payload.is_absolute() or payload.exists() else run_dir / payload) \
                    if embed_images else None
                parts.append("<figure>")
                if source is None:
                    parts.append(f'<a href="{esc(rel)}"><img src="{esc(rel)}" alt="{esc(alt)}"></a>')
                else:
                    parts.append(f'<img src="{source}" alt="{esc(alt)}">')
                if caption:
                    parts.append(f"<figcaption>{_inline_html(caption)}</figcaption>")
                parts.append("</figure>")
            parts.append("</section>")
        parts += ["</body>", "</html>"]
        return "\n".join(parts) + "\n"

    def write(self, run_dir: Path, embed_images: bool = True) -> tuple[Path, Path]:
        """Write ``report.md`` and ``report.html`` into ``run_dir`` (atomically); the HTML page holds
        its figures unless ``embed_images`` is False (see :meth:`to_html`).

        Returns
        -------
        tuple of Path
            (markdown path, html path).
        """
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        md = atomic_write_text(run_dir / "report.md", self.to_markdown(run_dir))
        page = atomic_write_text(run_dir / "report.html", self.to_html(run_dir, embed_images))
        return md, page


_IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml",
                ".gif": "image/gif", ".webp": "image/webp"}


def _data_uri(path: Path) -> Optional[str]:
    """The image as a ``data:`` URI, or None when it cannot be read (the page then links it)."""
    kind = _IMAGE_TYPES.get(path.suffix.lower())
    try:
        data = path.read_bytes() if kind else None
    except OSError:
        return None
    return None if data is None else f"data:{kind};base64,{base64.b64encode(data).decode('ascii')}"


_INLINE = re.compile(r"`([^`]+)`|\*\*(\S(?:[^*]*?\S)?)\*\*|(?<![\w*])\*(\S(?:[^*]*?\S)?)\*(?![\w*])")


def _inline_html(text: str) -> str:
    """Escape ``text`` for HTML and render its inline Markdown: `code`, **bold**, *italic*."""
    out, last = [], 0
    for match in _INLINE.finditer(text):
        out.append(html.escape(text[last:match.start()]))
        code, bold, italic = match.groups()
        if code is not None:
            out.append(f"<code>{html.escape(code)}</code>")
        elif bold is not None:
            out.append(f"<strong>{html.escape(bold)}</strong>")
        else:
            out.append(f"<em>{html.escape(italic)}</em>")
        last = match.end()
    out.append(html.escape(text[last:]))
    return "".join(out)


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
    "code{background:#f4f4f4;padding:0 .25em;border-radius:3px;font-size:.92em}"
)


def text_table(rows: Sequence[Sequence[Any]], header: Optional[Sequence[str]] = None) -> str:
    """An aligned plain-text table for the terminal: cells through :func:`format_cell`, numeric
    columns right-aligned, a dashed rule under the header when there is one. Empty for no rows."""
    body = [[c if isinstance(c, str) else format_cell(c) for c in row] for row in rows]
    if not body and header is None:
        return ""
    lines = [list(header)] if header is not None else []
    lines += body
    ncols = max(len(line) for line in lines)
    lines = [line + [""] * (ncols - len(line)) for line in lines]
    widths = [max(len(line[i]) for line in lines) for i in range(ncols)]
    numeric = [bool(rows) and all(_is_number(row[i]) or row[i] is None for row in rows if i < len(row))
               for i in range(ncols)]

    def render(line: list[str]) -> str:
        return "  ".join(cell.rjust(w) if num else cell.ljust(w)
                         for cell, w, num in zip(line, widths, numeric)).rstrip()

    out = []
    if header is not None:
        out += [render(lines[0]), "  ".join("-" * w for w in widths)]
        lines = lines[1:]
    out += [render(line) for line in lines]
    return "\n".join(out)


def format_summary(rows: Mapping[str, Any]) -> str:
    """Name / value lines for the terminal (:func:`text_table` without a header); empty for no rows."""
    return text_table([[str(k), v] for k, v in rows.items()])
