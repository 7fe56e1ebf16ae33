"""Command line: ``gem-run RECIPE`` runs a recipe; ``gem plugins`` lists what is installed."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from gem import __version__
from gem.cli_errors import guard
from gem.plugins import STAGES, Registry, describe_plugins, make_plugin_manager
from gem.recipe import DEFAULT_RECIPE, RecipeError, apply_overrides, load_recipe_file, validate_recipe


def _run_parser(prog: str = "gem-run") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Run a gem recipe (the built-in synthetic default when none is given).")
    parser.add_argument("recipe", nargs="?", help="path to a YAML recipe")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override a recipe key, e.g. --set training.steps=500 (repeatable)")
    parser.add_argument("--out", type=Path, help="run folder (default: <recipe out>/<name>-<timestamp>)")
    parser.add_argument("--print-recipe", action="store_true", help="print the resolved recipe and exit")
    parser.add_argument("--resume", type=Path, metavar="RUN_DIR",
                        help="continue the run in RUN_DIR from its last checkpoint (RECIPE defaults to its recipe.yaml)")
    parser.add_argument("--num-processes", type=int, default=1, metavar="N",
                        help="train data-parallel on N processes (GPUs, or CPU processes) through accelerate's "
                             "launcher; same as `accelerate launch --multi_gpu --num_processes N -m gem.cli run ...`")
    parser.add_argument("--main-process-port", type=int, help="port the processes meet on (default: a free one)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def _world_size() -> int:
    """Processes of the distributed job this one belongs to (1 when not launched by accelerate/torchrun)."""
    import os

    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def _launch(args: argparse.Namespace, run_dir: Path) -> int:
    """Re-run this command on ``args.num_processes`` processes with accelerate's launcher."""
    import socket
    import subprocess

    import torch

    port = args.main_process_port
    if port is None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
    child = [*([args.recipe] if args.recipe else []), *(f"--set={o}" for o in args.overrides)]
    if not torch.cuda.is_available():  # CPU processes talk over gloo (see README, "Several processes")
        child.append("--set=training.cpu=true")
    child += ["--resume", str(run_dir)] if args.resume is not None else ["--out", str(run_dir)]
    if args.debug:
        child.append("--debug")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
               "--num_processes", str(args.num_processes), "--num_machines", "1", "--dynamo_backend", "no",
               "--main_process_port", str(port), "-m", "gem.cli", "run", *child]
    print(f"gem: launching {args.num_processes} processes: {' '.join(command[2:])}", file=sys.stderr)
    return subprocess.run(command).returncode


def run_main(argv: Optional[Sequence[str]] = None, prog: str = "gem-run") -> int:
    args = _run_parser(prog).parse_args(argv)
    return guard(lambda: _run(args), args.debug, prog)


def _run(args: argparse.Namespace) -> int:
    import yaml

    from gem.pipeline import make_run_dir, run_recipe
    from gem.report import format_summary

    if args.num_processes < 1:
        raise RecipeError(f"--num-processes must be >= 1, got {args.num_processes}")
    registry = Registry(make_plugin_manager())
    if args.resume is not None:
        from gem.pipeline import resume_recipe

        recipe = resume_recipe(args.resume, load_recipe_file(args.recipe) if args.recipe else None,
                               args.overrides, registry)
    else:
        data = load_recipe_file(args.recipe) if args.recipe else DEFAULT_RECIPE
        recipe = validate_recipe(apply_overrides(data, args.overrides), registry)
    if args.print_recipe:
        print(yaml.safe_dump(recipe.to_dict(), sort_keys=False), end="")
        return 0
    accelerator = None
    if _world_size() > 1:  # launched by accelerate/torchrun: agree on one run folder
        from accelerate.utils import broadcast_object_list

        from gem.context import make_accelerator

        accelerator = make_accelerator(recipe.training)
        folder = [str(args.resume or make_run_dir(recipe, args.out)) if accelerator.is_main_process else None]
        run_dir = Path(broadcast_object_list(folder)[0])
    else:
        run_dir = args.resume if args.resume is not None else make_run_dir(recipe, args.out)
        if args.num_processes > 1:
            return _launch(args, run_dir)
    main = accelerator is None or accelerator.is_main_process
    verb = "resuming" if args.resume is not None else "running"
    if main:
        print(f"gem {__version__}: {verb} recipe {recipe.name!r} into {run_dir}", file=sys.stderr)
    result = run_recipe(recipe, registry, run_dir, accelerator=accelerator, resume=args.resume is not None)
    if main:
        print(format_summary(result.summary))
        print(f"report: {run_dir / 'report.html'}")
    if accelerator is not None:
        from gem.context import leave_process_group

        leave_process_group(accelerator)
    return 0


def _plugins(args: argparse.Namespace) -> int:
    pm = make_plugin_manager()
    records = describe_plugins(pm)
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    registry = Registry(pm)
    packages = {r["plugin"]: f"{r['package']} {r['version'] or ''}".strip() for r in records}
    for stage in STAGES:
        print(f"{stage}:")
        for name in registry.names(stage):
            reg = registry.get(stage, name)
            print(f"  {name:<12} {reg.description}  [plugin {reg.plugin}, {packages.get(reg.plugin, '?')}]")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="gem", description="gem: relation-aware disentanglement with plugins")
    parser.add_argument("--version", action="version", version=f"gem {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p_plugins = sub.add_parser("plugins", help="list installed plugins and what they register")
    p_plugins.add_argument("--json", action="store_true", help="machine-readable output")
    p_plugins.add_argument("--debug", action="store_true")
    sub.add_parser("run", help="run a recipe (same as gem-run)", add_help=False)
    sub.add_parser("eval", help="evaluate a finished run folder (metrics, figures, report)", add_help=False)
    sub.add_parser("oracle-eval", help="score images with the recipe's oracle and compare with the data set's labels",
                   add_help=False)
    sub.add_parser("compare", help="train several methods on the same data and seeds and tabulate them",
                   add_help=False)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run"]:
        return run_main(argv[1:], prog="gem run")
    if argv[:1] == ["eval"]:
        from gem.eval_command import eval_main

        return eval_main(argv[1:])
    if argv[:1] == ["compare"]:
        from gem.compare import compare_main

        return compare_main(argv[1:])
    if argv[:1] == ["oracle-eval"]:
        from gem.oracle_eval import oracle_main

        return oracle_main(argv[1:])
    args = parser.parse_args(argv)
    return guard(lambda: _plugins(args), args.debug, "gem")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
