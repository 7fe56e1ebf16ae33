"""Tests for gem.figures, gem.report (Markdown/HTML report, text tables) and gem.io (atomic writes, JSON)."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gem.io import atomic_save_figure, atomic_write_bytes, atomic_write_text, write_json
from gem.figures import plot_impact_heatmap, plot_loss_curves, plot_relation_comparison, plot_score_histogram, plot_traversals
from gem.report import Report, format_summary, text_table

ATTRS6 = ["floor_hue", "wall_hue", "object_hue", "scale", "shape", "orientation"]


def _png(path: Path, min_w: int = 200, min_h: int = 150) -> Image.Image:
    """Assert ``path`` is a valid, non-trivial PNG and return it (loaded)."""
    assert path.is_file() and path.stat().st_size > 1000
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.verify()
    im = Image.open(path)
    im.load()
    assert im.width >= min_w and im.height >= min_h, im.size
    # not a blank canvas
    arr = np.asarray(im.convert("RGB"))
    assert arr.std() > 5
    return im


def _no_temp_files(directory: Path) -> None:
    leftovers = [p.name for p in directory.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def _signed(n: int, seed: int = 0) -> np.ndarray:
    m = np.random.default_rng(seed).uniform(-1, 1, (n, n))
    np.fill_diagonal(m, 1.0)
    return m


# --------------------------------------------------------------------------- plots


@pytest.mark.parametrize("n", [6, 40])
def test_impact_heatmap_writes_png(tmp_path, n):
    attrs = ATTRS6 if n == 6 else [f"attribute_{i}" for i in range(n)]
    m = _signed(n)
    m[0, 1] = np.nan
    out = plot_impact_heatmap(m, attrs, tmp_path / "S.png", "impact S",
                              ci_low=m - 0.1, ci_high=m + 0.1)
    assert out == tmp_path / "S.png"
    im = _png(out, 400, 400)
    if n == 40:  # more cells -> bigger figure
        small = _png(plot_impact_heatmap(_signed(6), ATTRS6, tmp_path / "s6.png", "x"))
        assert im.width > small.width
    _no_temp_files(tmp_path)


def test_impact_heatmap_colours_are_fixed_and_signed(tmp_path):
    # a matrix of all +0.5 and one of all -0.5: dominant colours must be red-ish / blue-ish
    # and independent of the data range (scale fixed to [-1, 1]).
    def centre_rgb(value):
        p = plot_impact_heatmap(np.full((6, 6), value), ATTRS6, tmp_path / f"{value}.png", "")
        arr = np.asarray(Image.open(p).convert("RGB")).astype(int)
        h, w, _ = arr.shape
        return arr[h // 2 - 40 : h // 2 + 40, w // 2 - 80 : w // 2].reshape(-1, 3)

    pos, neg = centre_rgb(0.5), centre_rgb(-0.5)
    assert np.median(pos[:, 0] - pos[:, 2]) > 40  # red
    assert np.median(neg[:, 2] - neg[:, 0]) > 40  # blue


def test_impact_heatmap_rejects_bad_shapes(tmp_path):
    with pytest.raises(ValueError):
        plot_impact_heatmap(np.zeros((5, 5)), ATTRS6, tmp_path / "x.png", "bad")
    with pytest.raises(ValueError):
        plot_impact_heatmap(np.zeros((6, 6)), ATTRS6, tmp_path / "x.png", "bad",
                            ci_low=np.zeros((6, 6)))
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("n", [6, 40])
def test_relation_comparison(tmp_path, n):
    attrs = ATTRS6 if n == 6 else [f"a{i}" for i in range(n)]
    t = _signed(n, 1)
    mats = {"true": t, "oracle S": 0.8 * t, "learned A": _signed(n, 2)}
    im = _png(plot_relation_comparison(mats, attrs, tmp_path / "cmp.png", "relations"), 600, 200)
    assert im.width > im.height  # side by side
    with pytest.raises(ValueError):
        plot_relation_comparison({}, attrs, tmp_path / "e.png", "empty")


def _traversal_grid(rows=6, cols=7, size=64, dtype=np.float32):
    yy, xx = np.mgrid[:size, :size]
    imgs = np.zeros((rows, cols, size, size, 3), np.float32)
    for r in range(rows):
        for c in range(cols):
            imgs[r, c, ..., 0] = r / max(rows - 1, 1)
            imgs[r, c, ..., 1] = c / max(cols - 1, 1)
            imgs[r, c][(yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (4 + 3 * c) ** 2] = 1.0
    if dtype == np.uint8:
        return (imgs * 255).round().astype(np.uint8)
    return imgs


@pytest.mark.parametrize("dtype", [np.float32, np.uint8])
def test_traversals_grid(tmp_path, dtype):
    imgs = _traversal_grid(dtype=dtype)
    values = np.linspace(-2, 2, 7)
    out = plot_traversals(imgs, ATTRS6, values, tmp_path / "trav.png", "traversals")
    im = _png(out, 7 * 64 + 1, 6 * 64 + 1)
    assert im.width > 7 * 64 and im.height > 6 * 64
    # tiles are shown unblended: the pure tile colours of the input appear as such
    arr = np.asarray(im.convert("RGB")).reshape(-1, 3)
    colours = {tuple(int(v) for v in c) for c in np.unique(arr, axis=0)}
    assert {(0, 0, 0), (255, 255, 255), (0, 255, 0), (255, 0, 0)} <= colours


def test_traversals_validates_labels(tmp_path):
    imgs = _traversal_grid(2, 3, 16)
    with pytest.raises(ValueError):
        plot_traversals(imgs, ["a"], [0, 1, 2], tmp_path / "t.png", "t")
    with pytest.raises(ValueError):
        plot_traversals(imgs, ["a", "b"], [0, 1], tmp_path / "t.png", "t")
    with pytest.raises(ValueError):
        plot_traversals(np.zeros((2, 3, 16)), ["a", "b"], [0, 1, 2], tmp_path / "t.png", "t")


def test_loss_curves(tmp_path):
    rng = np.random.default_rng(0)
    history = []
    for step in range(0, 3000, 10):
        rec = {"step": step, "loss": 3 * math.exp(-step / 500) + 0.01 * rng.random(),
               "recon": 1.0 / (step + 1), "kl": 0.05 + 0.01 * rng.normal(),
               "adv_d": 0.69 + 0.02 * rng.normal(), "note": "text is ignored"}
        if step % 100 == 0:
            rec["eval_mig"] = np.float32(step / 3000)  # sparser series, numpy scalar
        history.append(rec)
    history.append({"step": 3000, "loss": float("nan")})  # non-finite values are skipped
    _png(plot_loss_curves(history, tmp_path / "loss.png"), 600, 200)
    _png(plot_loss_curves(history[:1], tmp_path / "one.png", title="one record"), 100, 100)
    # an empty history still gives an image
    p = plot_loss_curves([], tmp_path / "empty.png")
    with Image.open(p) as im:
        assert im.format == "PNG"


@pytest.mark.parametrize("n", [6, 40])
def test_score_histogram(tmp_path, n):
    attrs = ATTRS6 if n == 6 else [f"a{i}" for i in range(n)]
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, (300, n)).astype(float)
    scores[rng.random(scores.shape) < 0.1] = np.nan
    _png(plot_score_histogram(scores, attrs, tmp_path / "h.png", "scores"), 400, 150)
    # fractional scores work too
    _png(plot_score_histogram(rng.uniform(0, 5, (50, n)), attrs, tmp_path / "f.png", "f"), 400, 150)
    with pytest.raises(ValueError):
        plot_score_histogram(scores[:, :3], attrs, tmp_path / "bad.png", "bad")


def test_plots_do_not_leave_pyplot_figures(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    before = len(plt.get_fignums())
    plot_impact_heatmap(_signed(6), ATTRS6, tmp_path / "a.png", "a")
    plot_traversals(_traversal_grid(2, 3, 16), ["a", "b"], [0, 1, 2], tmp_path / "b.png", "b")
    assert len(plt.get_fignums()) == before


# --------------------------------------------------------------------------- report


def test_report_writes_markdown_and_html(tmp_path):
    run = tmp_path / "run"
    figs = run / "figures"
    heat = plot_impact_heatmap(_signed(6), ATTRS6, figs / "impact S.png", "S")
    trav = plot_traversals(_traversal_grid(), ATTRS6, np.linspace(-2, 2, 7), figs / "trav.png", "t")

    rep = Report("GEM run <7>")
    rep.add_text("Setup", "dataset: shapes3d\nuse <b>bold</b> & more\n\nsecond paragraph")
    rep.add_table("Metrics", {"MIG": 0.123456789, "SAP": float("nan"), "steps": 5000,
                              "ok": True, "missing": None}, caption="disentanglement")
    rep.add_table("Per attribute", [
        {"attribute": "scale", "mse": np.float64(1234567.0), "rho": np.float32(0.5)},
        {"attribute": "shape", "mse": 2e-7, "extra": "a|b"},
    ])
    rep.add_image("Impact", heat, caption="oracle impact")
    rep.add_image("Traversals", trav)
    md_path, html_path = rep.write(run, embed_images=False)  # linked: the paths are checked below

    assert (md_path, html_path) == (run / "report.md", run / "report.html")
    md = md_path.read_text(encoding="utf-8")
    page = html_path.read_text(encoding="utf-8")

    # headings, in insertion order
    for text in (md, page):
        positions = [text.index(h) for h in ("Setup", "Metrics", "Per attribute", "Impact",
                                             "Traversals")]
        assert positions == sorted(positions)
    assert md.startswith("# GEM run <7>\n")
    assert "## Metrics" in md
    assert "<h1>GEM run &lt;7&gt;</h1>" in page
    assert "<h2>Per attribute</h2>" in page

    # escaped text
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; more" in page
    assert "<b>bold</b>" not in page
    assert page.count("<p>") == 2

    # formatted table values: 4 significant digits, NaN/None -> n/a
    for text in (md, page):
        assert "0.1235" in text and "0.123456789" not in text
        assert "1.235e+06" in text
        assert "2e-07" in text
        assert "5000" in text
        assert "n/a" in text
    assert "<td class=\"num\">n/a</td>" in page
    assert "<caption>disentanglement</caption>" in page
    assert "a\\|b" in md  # pipes escaped inside Markdown tables

    # image paths: relative to the run dir, and they exist there
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert srcs == ["figures/impact%20S.png", "figures/trav.png"]
    md_srcs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert md_srcs == srcs
    from urllib.parse import unquote

    for src in srcs:
        assert not os.path.isabs(unquote(src))
        assert (run / unquote(src)).is_file()

    # standalone HTML with minimal styling
    assert page.startswith("<!DOCTYPE html>")
    assert "<style>" in page and "max-width:100%" in page and "border-collapse" in page
    _no_temp_files(run)


def test_report_image_paths_relative_in_both_forms(tmp_path, monkeypatch):
    run = tmp_path / "run"
    (run / "figs").mkdir(parents=True)
    (run / "figs" / "a.png").write_bytes(b"x")
    rep = Report("r")
    rep.add_image("given relative to the run dir", Path("figs/a.png"))
    monkeypatch.chdir(tmp_path)
    rep.add_image("given relative to the cwd", "run/figs/a.png")
    _, html_path = rep.write(run, embed_images=False)
    assert re.findall(r'<img src="([^"]+)"', html_path.read_text()) == ["figs/a.png"] * 2


def test_report_overwrite_and_empty_table(tmp_path):
    rep = Report("r")
    rep.add_table("nothing", [])
    md, page = rep.write(tmp_path)
    assert "(empty" in page.read_text() and "(empty" in md.read_text()
    md2, _ = Report("second").write(tmp_path)
    assert md2 == md and md.read_text().startswith("# second")
    _no_temp_files(tmp_path)


def test_format_summary():
    text = format_summary({"MIG": 0.31234567, "attribute_mse": float("nan"), "steps": 10,
                           "run_dir": Path("/tmp/run")})
    lines = text.splitlines()
    assert len(lines) == 4
    assert lines[0].split() == ["MIG", "0.3123"]
    assert lines[1].split() == ["attribute_mse", "n/a"]
    # values aligned in one column
    starts = {len(line) - len(line.split()[-1]) for line in lines}
    assert len(starts) == 1
    assert format_summary({}) == ""


def test_text_table_aligns_and_formats_cells_once():
    text = text_table([["mig", 0.123456, "ok"], ["dci", None, "long text"], ["sap", 12, ""]],
                      header=["metric", "value", "note"])
    assert text.splitlines() == [
        "metric   value  note",
        "------  ------  ---------",
        "mig     0.1235  ok",
        "dci        n/a  long text",
        "sap         12",
    ]
    assert text_table([]) == ""


# --------------------------------------------------------------------------- io


def test_write_json_round_trip(tmp_path):
    obj = {
        "array": np.arange(6, dtype=np.int64).reshape(2, 3),
        "farray": np.array([0.5, np.nan, np.inf]),
        "int": np.int32(7),
        "float": np.float32(0.25),
        "nan": float("nan"),
        "bool": np.bool_(True),
        "path": Path("/a/b"),
        "tuple": (1, 2.5),
        np.int64(3): "numpy key",
    }
    p = write_json(tmp_path / "sub" / "x.json", obj)
    text = p.read_text()
    assert "NaN" not in text and "Infinity" not in text
    back = json.loads(text)  # strict JSON
    assert back["array"] == [[0, 1, 2], [3, 4, 5]]
    assert back["farray"] == [0.5, None, None]
    assert back["int"] == 7 and isinstance(back["int"], int)
    assert back["float"] == 0.25
    assert back["nan"] is None
    assert back["bool"] is True
    assert back["path"] == "/a/b"
    assert back["tuple"] == [1, 2.5]
    assert back["3"] == "numpy key"
    assert text.startswith('{\n  "array"')  # indent 2
    np.testing.assert_array_equal(np.array(back["array"]), obj["array"])
    _no_temp_files(tmp_path)


def test_write_json_rejects_unknown_objects_without_leaving_files(tmp_path):
    with pytest.raises(TypeError):
        write_json(tmp_path / "bad.json", {"x": object()})
    assert list(tmp_path.iterdir()) == []


def test_atomic_writes_replace_and_leave_no_temp_files(tmp_path):
    target = tmp_path / "deep" / "file.txt"
    atomic_write_text(target, "first\n")
    atomic_write_text(target, "second ünïcode\n")
    assert target.read_text(encoding="utf-8") == "second ünïcode\n"
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    # mode of new files follows the umask, not mkstemp's 0600
    assert target.stat().st_mode & 0o044
    _no_temp_files(tmp_path)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["b.bin", "deep", "file.txt"]


def test_atomic_write_failure_keeps_old_content(tmp_path):
    target = tmp_path / "f.txt"
    atomic_write_text(target, "old")

    with pytest.raises(TypeError):
        atomic_write_bytes(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_text() == "old"
    _no_temp_files(tmp_path)


def test_atomic_save_figure_formats(tmp_path):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 2))
    fig.add_subplot().plot([0, 1], [1, 0])
    png = atomic_save_figure(fig, tmp_path / "f.png", dpi=50)
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (100, 100)
    svg = atomic_save_figure(fig, tmp_path / "f.svg")
    assert svg.read_text().lstrip().startswith("<?xml")
    with pytest.raises(ValueError):
        atomic_save_figure(fig, tmp_path / "f.notaformat")
    _no_temp_files(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.png", "f.svg"]


def test_report_html_holds_its_figures_unless_asked_to_link(tmp_path, monkeypatch):
    import base64

    figure = tmp_path / "figures" / "f.png"
    figure.parent.mkdir()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(figure)
    doc = Report("r")
    doc.add_image("A figure", figure, "caption")
    _, page = doc.write(tmp_path)
    text = page.read_text()
    # A run folder given relative to the working directory, as gem-run's default runs/<name>-<time>.
    monkeypatch.chdir(tmp_path.parent)
    relative = Path(tmp_path.name)
    relative_doc = Report("r")
    relative_doc.add_image("A figure", relative / "figures" / "f.png")
    assert "data:image/png;base64," in relative_doc.to_html(relative)
    source = re.search(r'<img src="data:image/png;base64,([^"]+)"', text)
    assert source and base64.b64decode(source.group(1)) == figure.read_bytes()
    assert 'src="figures/f.png"' not in text
    moved = tmp_path / "elsewhere.html"  # the page alone still shows the figure
    os.replace(page, moved)
    assert "data:image/png;base64," in moved.read_text()
    _, page = doc.write(tmp_path, embed_images=False)
    assert '<img src="figures/f.png"' in page.read_text()


def test_report_html_renders_inline_markdown_and_escapes_the_rest(tmp_path):
    doc = Report("r")
    doc.add_text("Recipe", "Data set `synthetic` is **offline**; *relation-aware* runs; 5 * 3 < 16 & `a<b`.")
    doc.add_table("T", [{"name": "`gem_vae`", "value": 1.5}], "see `recipe.yaml`")
    html_text = doc.to_html(tmp_path)
    assert "<code>synthetic</code>" in html_text and "<strong>offline</strong>" in html_text
    assert "<em>relation-aware</em>" in html_text
    assert "5 * 3 &lt; 16 &amp; <code>a&lt;b</code>" in html_text
    assert "<td><code>gem_vae</code></td>" in html_text and "<caption>see <code>recipe.yaml</code></caption>" in html_text
    assert "`" not in html_text.split("<body>")[1]


def test_loss_curves_mark_the_end_of_the_warm_up(tmp_path):
    history = [{"step": s, "loss": 10.0 - s / 100} for s in range(25, 1001, 25)]
    path = plot_loss_curves(history, tmp_path / "l.png", "training losses", marks={"latents bound": 300})
    assert Image.open(path).size[0] > 100
