"""Threads when two runs share the cores: torch's default (every core, spinning OpenMP threads)
against gem's default (``training.threads: 0``: free cores from the load average, sleeping
OpenMP threads), two training processes side by side in each setting.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from common import Figure, Row, ratio

#: One child: build full GEM as bench_training does, choose threads the given way, time steps.
CHILD = r"""
import os, sys, time
sys.path.insert(0, {bench!r})
import torch
if sys.argv[1] == "gem":
    from gem.context import auto_threads
    torch.set_num_threads(auto_threads()[0])
from bench_training import build_model
from gem.training import run_step
m = build_model(True)
x = torch.rand(32, 3, 64, 64)
for i in range(3):
    run_step(m.extractor, m.relation, m.optimizers, m.graph_optimizer, m.accelerator, x, 10000 + i)
start = time.perf_counter()
for i in range(int(sys.argv[2])):
    run_step(m.extractor, m.relation, m.optimizers, m.graph_optimizer, m.accelerator, x, 20000 + i)
print(torch.get_num_threads(), (time.perf_counter() - start) / int(sys.argv[2]))
"""


def _side_by_side(setting: str, steps: int) -> tuple[float, list[int]]:
    """Mean seconds per step of two processes started together, and their thread counts."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")}
    if setting == "gem":
        env["OMP_WAIT_POLICY"] = "PASSIVE"  # what gem's commands set before torch loads
    code = CHILD.format(bench=str(Path(__file__).resolve().parent))
    procs = [subprocess.Popen([sys.executable, "-c", code, setting, str(steps)], stdout=subprocess.PIPE, text=True,
                              env=env) for _ in range(2)]
    outputs = [p.communicate()[0].split() for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"a {setting} child failed")
    return sum(float(o[1]) for o in outputs) / 2, [int(o[0]) for o in outputs]


def bench_threads(quick: bool) -> Row:
    steps = 10 if quick else 40
    torch_default, torch_threads = _side_by_side("torch", steps)
    gem_default, gem_threads = _side_by_side("gem", steps)
    speedup = ratio(torch_default, gem_default)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return Row(
        name="threads", title=f"two GEM training runs side by side on {cores} core(s), {steps} steps each",
        ours=Figure(f"gem default (threads {gem_threads}, passive wait)", gem_default * 1000, "ms/step"),
        reference=Figure(f"torch default (threads {torch_threads}, active wait)", torch_default * 1000, "ms/step"),
        ratio=speedup, ratio_meaning="torch default / gem default (x faster)",
        target=">= 1 (no collapse when runs share the cores)", met=speedup >= 1.0,
        figures={"gem_ms_per_step": gem_default * 1000, "torch_ms_per_step": torch_default * 1000,
                 "gem_threads_max": max(gem_threads), "torch_threads_max": max(torch_threads)},
        notes=["each figure is the mean of the two processes; the load average the gem default reads lags "
               "by a minute, so a run started into a busy machine sees the load of the minute before"])
