"""6. Memory: peak RSS of a default synthetic run and of a CelebA-size preprocessing, each in a
subprocess that reports its own peak RSS (VmHWM) at exit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from common import MIB, Figure, Row

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
IMAGE_BYTES = 64 * 64 * 3  # one cached 64x64 RGB image


#: Prepended to every child's code: print the child's own peak RSS (VmHWM) at exit. ``ru_maxrss``
#: of a child is no good here: Linux carries the parent's high-water mark across fork and exec.
_PEAK_AT_EXIT = ("import atexit as _atexit\n"
                 "_atexit.register(lambda: print('GEM_BENCH_VMHWM_KB', [l.split()[1] for l in open('/proc/self/status') "
                 "if l.startswith('VmHWM:')][0], flush=True))\n")


def run_measured(code: str, args: list[str], cwd: Path) -> dict[str, Any]:
    """Run ``python -c code *args`` to completion: its own peak RSS (bytes), wall time, last stdout line."""
    start = time.perf_counter()
    child = subprocess.run([sys.executable, "-c", _PEAK_AT_EXIT + code, *args], cwd=cwd, capture_output=True,
                           text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    seconds = time.perf_counter() - start
    if child.returncode != 0:
        raise RuntimeError(f"child {code[:60]!r} failed with status {child.returncode}:\n{child.stderr[-2000:]}")
    lines = [line for line in child.stdout.splitlines() if line.strip()]
    peak = [int(line.split()[1]) * 1024 for line in lines if line.startswith("GEM_BENCH_VMHWM_KB")]
    rest = [line for line in lines if not line.startswith("GEM_BENCH_VMHWM_KB")]
    return {"peak_rss": peak[-1], "seconds": seconds, "last_line": rest[-1] if rest else ""}


def bench_memory_run(quick: bool) -> Row:
    """``gem-run`` with the default recipe, fewer steps (and everything smaller with --quick)."""
    if quick:
        n_images = 600
        overrides = [f"dataset.n_images={n_images}", "training.steps=10", "training.warmup_steps=5",
                     "scoring.n_images=200", "ranker.bootstrap=10", "evaluation.n_images=100",
                     "evaluation.full_metrics=false"]
    else:
        n_images = 20000  # the default recipe's
        overrides = ["training.steps=200", "training.warmup_steps=100"]
    with tempfile.TemporaryDirectory(prefix="gem-bench-run-") as tmp:
        sets = [a for o in overrides + [f"cache_dir={tmp}/cache"] for a in ("--set", o)]
        code = "import sys; from gem.cli import run_main; sys.exit(run_main(sys.argv[1:]))"
        result = run_measured(code, [*sets, "--out", f"{tmp}/run"], cwd=ROOT)
        baseline = run_measured("import gem.pipeline, gem_plugins.synthetic, gem_plugins.gem_vae", [], cwd=ROOT)
    data_bytes = n_images * IMAGE_BYTES
    growth = result["peak_rss"] - baseline["peak_rss"]
    return Row(
        name="memory_run", title="peak RSS of gem-run with the default recipe (synthetic data), "
                                 + ("quick sizes" if quick else "200 steps (100 warm-up) instead of 5,000"),
        ours=Figure("peak RSS of the run", result["peak_rss"] / MIB, "MiB"),
        reference=Figure("data set bytes (uint8 64x64x3 images)", data_bytes / MIB, "MiB"),
        ratio=growth / data_bytes, ratio_meaning="(peak RSS - RSS of the imports) / data set bytes",
        target="report (no limit set)", met=None,
        figures={"peak_rss_mib": result["peak_rss"] / MIB, "imports_rss_mib": baseline["peak_rss"] / MIB,
                 "data_set_mib": data_bytes / MIB, "run_seconds": result["seconds"], "images": n_images},
        notes=[f"overrides: {' '.join(overrides)} (cache_dir in a fresh temporary folder, so the data set is "
               f"rendered as on a first run)",
               f"python importing gem, torch and the plugins alone peaks at {baseline['peak_rss'] / MIB:.0f} MiB"])


def write_celeba_standin(root: Path, n: int, distinct: int = 64, seed: int = 0) -> None:
    """The official CelebA layout with n 178x218 JPEGs: ``distinct`` different pictures, the
    rest hard links to them (same bytes on disk once; the cache still decodes every file)."""
    rng = np.random.default_rng(seed)
    images = root / "img_align_celeba"
    images.mkdir(parents=True, exist_ok=True)
    names = [f"{i + 1:06d}.jpg" for i in range(n)]
    for i, name in enumerate(names):
        if i < distinct:
            pixels = rng.integers(0, 256, size=(218 // 8, 178 // 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).resize((178, 218), Image.BILINEAR).save(images / name, quality=90)
        else:
            os.link(images / names[i % distinct], images / name)
    from gem_plugins import celeba

    labels = rng.choice(np.array(["-1", " 1"]), size=(n, len(celeba.ATTRIBUTES)))
    with open(root / celeba.ATTR_FILE, "w") as fh:
        fh.write(f"{n}\n{' '.join(celeba.ATTRIBUTES)}\n")
        fh.writelines(f"{name} {' '.join(row)}\n" for name, row in zip(names, labels))
    landmark = "    69   109   106   113    77   142    73   152   108   154\n"
    with open(root / celeba.LANDMARK_FILE, "w") as fh:
        fh.write(f"{n}\nlefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y "
                 "rightmouth_x rightmouth_y\n")
        fh.writelines(f"{name}{landmark}" for name in names)
    with open(root / celeba.PARTITION_FILE, "w") as fh:
        fh.writelines(f"{name} 0\n" for name in names)


def preprocess_celeba(root: str, cache_dir: str) -> None:
    """Child side: build the celeba data set (its cache) through the registry, print a summary."""
    from gem.interfaces import BuildContext
    from gem.plugins import Registry, make_plugin_manager

    reg = Registry(make_plugin_manager()).get("dataset", "celeba")
    dataset = reg.build(reg.options(root=root), BuildContext(seed=0, run_dir=Path(cache_dir),
                                                              cache_dir=Path(cache_dir)))
    print(json.dumps({"images": len(dataset), "bytes": int(dataset.images.nbytes)}))


def bench_memory_celeba(quick: bool) -> Row:
    n = 2000 if quick else 200_000
    with tempfile.TemporaryDirectory(prefix="gem-bench-celeba-") as tmp:
        root = Path(tmp) / "celeba"
        start = time.perf_counter()
        write_celeba_standin(root, n)
        write_s = time.perf_counter() - start
        code = f"import sys; sys.path.insert(0, {str(HERE)!r}); from bench_memory import preprocess_celeba; " \
               f"preprocess_celeba({str(root)!r}, {str(Path(tmp) / 'cache')!r})"
        result = run_measured(code, [], cwd=ROOT)
        imports = run_measured(f"import sys; sys.path.insert(0, {str(HERE)!r}); import bench_memory, gem.plugins, "
                               "gem_plugins.celeba", [], cwd=ROOT)
    summary = json.loads(result["last_line"])
    data_bytes = summary["bytes"]
    growth = result["peak_rss"] - imports["peak_rss"]
    return Row(
        name="memory_celeba", title=f"peak RSS of preprocessing a CelebA-size stand-in ({n:,} JPEGs 178x218 -> 64x64 cache)",
        ours=Figure("peak RSS of the preprocessing process", result["peak_rss"] / MIB, "MiB"),
        reference=Figure("cached data set bytes", data_bytes / MIB, "MiB"),
        ratio=growth / data_bytes, ratio_meaning="(peak RSS - RSS of the imports) / data set bytes",
        target="< 0.5 (the cache does not hold the data set in RAM)", met=growth < 0.5 * data_bytes,
        figures={"peak_rss_mib": result["peak_rss"] / MIB, "imports_rss_mib": imports["peak_rss"] / MIB,
                 "data_set_mib": data_bytes / MIB, "preprocess_seconds": result["seconds"],
                 "images_per_s": n / result["seconds"], "write_standin_seconds": write_s, "images": n},
        notes=[f"{n:,} files ({64} distinct pictures, the rest hard links), official layout with attribute, landmark "
               f"and partition files; celeba plugin defaults (landmark crop, 4 decoding threads)",
               f"preprocessing took {result['seconds']:.0f} s ({n / result['seconds']:.0f} img/s) in the child; "
               "the cache is written with plain file writes, so its pages sit in the OS page cache, not in this RSS"])
