"""The benchmark suite runs end to end in --quick mode and writes every row with finite figures.

Not a timed test: the targets are not checked here (numbers on a shared test machine mean
nothing); `python benchmarks/run.py` on a quiet machine is where they are measured.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "benchmarks" / "run.py"


def test_quick_suite_writes_every_row(tmp_path):
    names = subprocess.run([sys.executable, str(RUN), "--list"], capture_output=True, text=True, check=True,
                           cwd=tmp_path).stdout.split()
    assert {"somersd", "training_step", "data_cache", "data_loader_step", "oracle", "llava", "memory_run",
            "memory_celeba"} <= set(names)
    out = tmp_path / "results.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(RUN), "--quick", "--out", str(out)], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["quick"] is True
    rows = {row["name"]: row for row in result["rows"]}
    assert list(rows) == names
    for name, row in rows.items():
        assert "error" not in row, (name, row.get("error"))
        numbers = [row["ours"]["value"], row["ratio"], *row["figures"].values()]
        if row["reference"] is not None:
            numbers.append(row["reference"]["value"])
        assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in numbers), (name, numbers)
        assert row["ours"]["value"] > 0 and row["ratio"] > 0, name
        assert isinstance(row["met"], bool) or row["met"] is None
        conditions = row["conditions"]
        assert conditions["OMP_NUM_THREADS"] == "1" and conditions["torch_threads"] >= 1
        assert len(conditions["loadavg"]) == 3
    # The table names every row.
    for name in names:
        assert name in proc.stdout


def test_only_runs_one_comparison(tmp_path):
    out = tmp_path / "one.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    subprocess.run([sys.executable, str(RUN), "--quick", "--only", "somersd", "--out", str(out)], check=True,
                   capture_output=True, env=env, cwd=tmp_path, timeout=300)
    rows = json.loads(out.read_text())["rows"]
    assert [r["name"] for r in rows] == ["somersd"]
    assert rows[0]["figures"]["max_abs_diff_on_timed_pairs"] <= 1e-12
    bad = subprocess.run([sys.executable, str(RUN), "--only", "nope"], capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 2 and "unknown benchmark" in bad.stderr
