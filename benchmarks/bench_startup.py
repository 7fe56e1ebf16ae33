"""Start-up: how long `gem plugins` and rejecting a recipe typo take, against importing torch alone.

Each command runs in a fresh interpreter (the cost a user pays at every command); the best of a
few runs is kept. `import torch` is the floor: every plugin module imports it.
"""

from __future__ import annotations

import subprocess
import sys
import time

from common import Figure, Row, ratio

COMMANDS = {
    "gem plugins": "from gem.cli import main; main(['plugins'])",
    "gem-run with a recipe typo": "from gem.cli import run_main; run_main(['--set', 'extractor.betta=1'])",
    "gem --help": "from gem.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass",
}
FLOOR = "import torch"


def _seconds(code: str, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        best = min(best, time.perf_counter() - start)
    return best


def bench_startup(quick: bool) -> Row:
    repeat = 2 if quick else 5
    floor = _seconds(FLOOR, repeat)
    times = {name: _seconds(code, repeat) for name, code in COMMANDS.items()}
    slowest = max(times, key=times.get)
    return Row(
        name="startup", title="start-up of a command, fresh interpreter (best of %d)" % repeat,
        ours=Figure(slowest, times[slowest], "s"),
        reference=Figure("python -c 'import torch'", floor, "s"),
        ratio=ratio(times[slowest], floor), ratio_meaning="slowest command / import torch",
        target="every command < 3 s (2-core machine)", met=max(times.values()) < 3.0,
        figures={**{f"{name} s": t for name, t in times.items()}, "import torch s": floor},
        notes=[", ".join(f"{name} {t:.2f} s" for name, t in times.items()) + f"; import torch {floor:.2f} s"])
