"""Run gem's benchmark suite: each comparison in this process, a table, a JSON file.

    python benchmarks/run.py                      # every comparison, full sizes
    python benchmarks/run.py --quick              # small sizes (minutes; figures are not the targets')
    python benchmarks/run.py --only somersd --only oracle --out /tmp/bench.json

Each row is "ours vs the reference, same machine, same run": the two figures, their ratio, the
target and whether it is met. Every row records the thread settings and the load
average when it started, because numbers taken on a busy machine are contended.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Row, conditions  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _benchmarks() -> dict[str, Callable[[bool], Row]]:
    """Name -> benchmark function, in the table's order (imported lazily: torch is slow to import)."""
    from bench_data import bench_data, bench_loader_step
    from bench_explore import bench_explore
    from bench_llava import bench_llava
    from bench_memory import bench_memory_celeba, bench_memory_run
    from bench_oracle import bench_oracle, bench_oracle_concurrency, bench_oracle_tail
    from bench_somersd import bench_somersd
    from bench_startup import bench_startup
    from bench_threads import bench_threads
    from bench_training import bench_training

    table: dict[str, Callable[[bool], Row]] = {
        "somersd": bench_somersd,
        "training_step": bench_training,
        "data_cache": bench_data,
        "data_loader_step": bench_loader_step,
        "oracle": bench_oracle,
        "oracle_tail": bench_oracle_tail,
        "oracle_concurrency": bench_oracle_concurrency,
        "llava": bench_llava,
        "memory_run": bench_memory_run,
        "memory_celeba": bench_memory_celeba,
        "startup": bench_startup,
        "threads": bench_threads,
        "explore": bench_explore,
    }
    import torch

    if torch.cuda.is_available():  # GPU figures of 2 and 5 where a GPU is present
        table["training_step_cuda"] = lambda quick: bench_training(quick, device="cuda")
        table["llava_cuda"] = lambda quick: bench_llava(quick, device="cuda")
    return table


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isinf(value) or math.isnan(value):
            return str(value)
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table: one line per comparison, then the notes."""
    header = ["benchmark", "ours", "reference", "ratio", "target", "met"]
    lines = [header]
    for r in rows:
        if "error" in r:
            lines.append([r["name"], "ERROR", "-", "-", "-", "no"])
            continue
        ours = f"{_fmt(r['ours']['value'])} {r['ours']['unit']}"
        ref = f"{_fmt(r['reference']['value'])} {r['reference']['unit']}" if r["reference"] else "-"
        met = "-" if r["met"] is None else ("yes" if r["met"] else "NO")
        lines.append([r["name"], ours, ref, _fmt(r["ratio"]), r["target"], met])
    widths = [max(len(str(line[k])) for line in lines) for k in range(len(header))]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    out.append("")
    for r in rows:
        if "error" in r:
            out.append(f"{r['name']}: ERROR {r['error']}")
            continue
        load = r["conditions"]["loadavg"][0]
        out.append(f"{r['name']}: {r['title']} [{r['seconds']:.0f} s, load {load:.2f}, "
                   f"torch threads {r['conditions']['torch_threads']}]")
        out.append(f"    ours: {r['ours']['label']}")
        if r["reference"]:
            out.append(f"    reference: {r['reference']['label']}")
        out.append(f"    ratio: {r['ratio_meaning']}")
        for note in r["notes"]:
            out.append(f"    - {note}")
    return "\n".join(out)


def run(names: list[str], quick: bool) -> list[dict[str, Any]]:
    table = _benchmarks()
    rows = []
    for name in names:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        start_conditions = conditions(quick)
        start = time.perf_counter()
        try:
            row = table[name](quick)
        except Exception as exc:  # one failing comparison must not hide the others
            traceback.print_exc()
            rows.append({"name": name, "error": f"{type(exc).__name__}: {exc}", "conditions": start_conditions,
                         "seconds": time.perf_counter() - start})
            continue
        row.conditions = start_conditions
        row.seconds = time.perf_counter() - start
        rows.append(row.to_json())
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", metavar="NAME",
                        help="run only this comparison (repeatable); --list shows the names")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run, not the targets' sizes")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results.json", help="JSON file to write")
    parser.add_argument("--list", action="store_true", help="print the comparison names and exit")
    args = parser.parse_args(argv)
    names = list(_benchmarks())
    if args.list:
        print("\n".join(names))
        return 0
    unknown = [n for n in args.only or [] if n not in names]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(names)}")
    chosen = [n for n in names if n in (args.only or names)]
    rows = run(chosen, args.quick)
    import torch

    result = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "quick": args.quick,
              "machine": {"platform": platform.platform(), "python": platform.python_version(),
                          "torch": torch.__version__, "cpu_count": os.cpu_count(),
                          "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, allow_nan=True) + "\n")
    if args.quick:
        print("--quick: small sizes; the 'met' column is not the verdict on the targets\n")
    print(format_table(rows))
    print(f"\nwritten to {args.out}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
