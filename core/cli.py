"""Command line: ``gem-run RECIPE`` runs a recipe; ``gem plugins`` lists what is installed, ``gem recipes``
the recipes gem ships."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

# Before torch loads OpenMP: threads that wait sleep instead of spinning, so a run that shares its
# cores with other processes slows down in proportion instead of collapsing (benchmarks: threads).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from pathlib import Path
from typing import Optional, Sequence

from gem import __version__
from gem.cli_errors import guard
from gem.errors import ConfigurationError
from gem.progress import add_verbosity_options, logger, setup_from_args
from gem.plugins import STAGES, Registry, broken_entry_points, describe_plugins, make_plugin_manager
from gem.recipe import (DEFAULT_RECIPE, load_recipe_file, override_recipe, recipe_summary, shipped_recipes,
                        validate_recipe)


def _run_parser(prog: str = "gem-run") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Run a gem recipe (the built-in synthetic default when none is given).")
    parser.add_argument("recipe", nargs="?",
                        help="a YAML recipe file, or the name of a shipped recipe such as celeba (gem recipes lists them)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override a recipe key, e.g. --set training.steps=500 (repeatable)")
    parser.add_argument("--out", type=Path, help="run folder (default: <recipe out>/<name>-<timestamp>); "
                                                 "one that holds a run is refused unless --overwrite")
    parser.add_argument("--overwrite", action="store_true",
                        help="with --out: remove the run already in that folder first")
    parser.add_argument("--print-recipe", action="store_true", help="print the resolved recipe and exit")
    parser.add_argument("--dry-run", action="store_true",
                        help="load the data and say what scoring would ask (cached scores, requests, tokens, and "
                             "the cost with oracle.price_per_million_tokens), then exit: nothing is sent or trained")
    parser.add_argument("--resume", type=Path, metavar="RUN_DIR",
                        help="continue the run in RUN_DIR from its last checkpoint (RECIPE defaults to its recipe.yaml)")
    parser.add_argument("--num-processes", type=int, default=1, metavar="N",
                        help="train data-parallel on N processes (GPUs, or CPU processes) through accelerate's "
                             "launcher; same as `accelerate launch --multi_gpu --num_processes N -m gem.cli run ...`")
    parser.add_argument("--main-process-port", type=int, help="port the processes meet on (default: a free one)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    add_verbosity_options(parser)
    return parser


def _world_size() -> int:
    """Processes of the distributed job this one belongs to (1 when not launched by accelerate/torchrun)."""
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
    logger.info(f"gem: launching {args.num_processes} processes: {' '.join(command[2:])}")
    # Python >= 3.11: the children's ``-m gem.cli`` does not put the working directory on sys.path,
    # where a folder named gem would shadow the installed package.
    return subprocess.run(command, env={**os.environ, "PYTHONSAFEPATH": "1"}).returncode


def run_main(argv: Optional[Sequence[str]] = None, prog: str = "gem-run") -> int:
    args = _run_parser(prog).parse_args(argv)
    setup_from_args(args)
    return guard(lambda: _run(args), args.debug, prog)


def _run(args: argparse.Namespace) -> int:
    import yaml

    if args.num_processes < 1:
        raise ConfigurationError(f"--num-processes must be >= 1, got {args.num_processes}")
    if args.overwrite and (args.out is None or args.resume is not None):
        raise ConfigurationError("--overwrite replaces the run in the folder --out names: give --out DIR "
                                 "(and not --resume)")
    registry = Registry(make_plugin_manager())
    if args.resume is not None:
        from gem.pipeline import resume_recipe

        recipe = resume_recipe(args.resume, load_recipe_file(args.recipe) if args.recipe else None,
                               args.overrides, registry)
    else:
        data = load_recipe_file(args.recipe) if args.recipe else DEFAULT_RECIPE
        data, notes = override_recipe(data, args.overrides, registry)
        for note in notes:
            logger.warning(f"gem: {note}")
        recipe = validate_recipe(data, registry)
    if args.print_recipe:
        print(yaml.safe_dump(recipe.to_dict(), sort_keys=False), end="")
        return 0
    if args.dry_run:
        from gem.context import RunContext
        from gem.scoring import scoring_plan

        context = RunContext.open(recipe, registry, Path(recipe.out))
        dataset = context.load_dataset()
        print(scoring_plan(recipe, registry, dataset, context.split(dataset).scored))
        print("dry run: nothing was sent or trained, and no run folder was made")
        return 0
    # Imported after validation: a typo in a recipe is reported before torch's training stack loads.
    from gem.pipeline import check_out_folder, make_run_dir, run_recipe
    from gem.report import format_summary
    from gem.training import Interrupted

    accelerator = None
    fresh = args.resume is None
    # The folders this command makes: a run that fails before it has scores removes what it wrote,
    # and the folders too when it made them (see _discard).
    new_folder = _first_missing(args.out if args.out is not None else Path(recipe.out)) if fresh else None
    created = fresh and (args.out is None or new_folder is not None)
    if _world_size() > 1:  # launched by accelerate/torchrun: agree on one run folder
        from accelerate.utils import broadcast_object_list

        from gem.context import make_accelerator

        accelerator = make_accelerator(recipe.training)
        if fresh:
            check_out_folder(args.out, args.overwrite)  # every process, so that all stop together
        folder = [str(args.resume or make_run_dir(recipe, args.out, args.overwrite))
                  if accelerator.is_main_process else None]
        run_dir = Path(broadcast_object_list(folder)[0])
    else:
        run_dir = args.resume if not fresh else make_run_dir(recipe, args.out, args.overwrite)
        if args.num_processes > 1:
            status = _launch(args, run_dir)
            if status not in (0, 130) and fresh:  # 130: stopped by Ctrl-C, which says how to resume
                _discard(run_dir, created, new_folder)
            return status
    main = accelerator is None or accelerator.is_main_process
    verb = "resuming" if args.resume is not None else "running"
    if main:
        logger.info(f"gem {__version__}: {verb} recipe {recipe.name!r} into {run_dir}")
    try:
        result = run_recipe(recipe, registry, run_dir, accelerator=accelerator, resume=not fresh)
    except (Exception, KeyboardInterrupt) as exc:
        # Interrupted says how to resume in this folder: keep it.
        if fresh and main and not isinstance(exc, Interrupted):
            _discard(run_dir, created, new_folder)
        raise
    if main:
        print(format_summary(result.summary))
        print(f"report: {run_dir / 'report.html'}")
        print(f"explore: gem explore {shlex.quote(str(run_dir))}")
    if accelerator is not None:
        from gem.context import leave_process_group

        leave_process_group(accelerator)
    return 0


def _first_missing(path: Path) -> Optional[Path]:
    """The outermost of ``path`` and its parents that does not exist yet (None when ``path`` exists)."""
    missing = None
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing = folder
    return missing


def _discard(run_dir: Path, created: bool, new_folder: Optional[Path]) -> None:
    """Remove what a failed run wrote before it had scores (:func:`gem.pipeline.discard_unstarted_run`),
    and the empty folders above the run folder that this command made (up to ``new_folder``)."""
    from gem.pipeline import discard_unstarted_run

    if not discard_unstarted_run(run_dir, created):
        return
    if not run_dir.exists() and new_folder is not None:
        for folder in run_dir.parents:
            if not (folder == new_folder or new_folder in folder.parents) or any(folder.iterdir()):
                break
            try:
                folder.rmdir()
            except OSError:  # another run has just written into it
                break
    what = f"its recipe.yaml from {run_dir}" if run_dir.exists() else f"its folder {run_dir}"
    logger.warning(f"gem: the run stopped before it had scores or a trained model; removed {what}")


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
            clashing = registry.conflicts.get((stage, name))
            for reg in clashing or [registry.get(stage, name)]:
                mark = "  CONFLICT: registered by more than one plugin" if clashing else ""
                print(f"  {name:<12} {reg.description}  [plugin {reg.plugin}, {packages.get(reg.plugin, '?')}]{mark}")
    for key in registry.conflicts:
        print(f"\nconflict: {registry.conflict_message(*key)}")
    for entry in broken_entry_points(pm):
        print(f"\nnot loaded: entry point {entry['entry_point']!r} of {entry['package']}: {entry['error']}")
    return 0


def _recipes(args: argparse.Namespace) -> int:
    recipes = shipped_recipes()
    width = max((len(name) for name in recipes), default=0)
    for name, path in recipes.items():
        print(f"{name:<{width}}  {recipe_summary(path)}".rstrip())
    return 0


#: Distributions whose versions ``gem env`` reports.
ENV_PACKAGES = ["torch", "torch-geometric", "accelerate", "transformers", "pluggy", "numpy", "scipy", "scikit-learn",
                "PyYAML", "tensorboard"]


def environment() -> dict:
    """What a bug report needs: versions, devices, threads, plugins, recipes and cache folders."""
    import importlib.metadata
    import platform

    import torch

    from gem.context import auto_threads
    from gem.recipe import Recipe, shipped_recipe_folder

    packages = {}
    for dist in ENV_PACKAGES:
        try:
            packages[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            packages[dist] = None
    cuda = torch.cuda.is_available()
    threads, why = auto_threads()
    registry = Registry(make_plugin_manager())
    return {
        "gem": __version__, "python": sys.version.split()[0], "platform": platform.platform(),
        "packages": packages,
        "devices": {"cuda": cuda, "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                    if cuda else [], "mps": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())},
        "threads": {"torch": torch.get_num_threads(), "gem default": f"{threads} ({why})",
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                    "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")},
        "plugins": {stage: registry.names(stage) for stage in STAGES},
        "recipes": str(shipped_recipe_folder()),
        "cache_dir": str(Path(Recipe().cache_dir).resolve()),
    }


def _env(args: argparse.Namespace) -> int:
    info = environment()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for name, item in value.items():
                shown = ", ".join(map(str, item)) if isinstance(item, list) else ("-" if item is None else item)
                print(f"  {name:<16} {shown}")
        else:
            print(f"{key:<18} {value}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="gem", description="gem: relation-aware disentanglement with plugins")
    parser.add_argument("--version", action="version", version=f"gem {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p_plugins = sub.add_parser("plugins", help="list installed plugins and what they register")
    p_plugins.add_argument("--json", action="store_true", help="machine-readable output")
    p_plugins.add_argument("--debug", action="store_true")
    p_recipes = sub.add_parser("recipes", help="list the recipes gem ships (run one by name: gem-run NAME)")
    p_recipes.add_argument("--debug", action="store_true")
    p_env = sub.add_parser("env", help="versions, devices, threads, plugins and folders, for bug reports")
    p_env.add_argument("--json", action="store_true", help="machine-readable output")
    p_env.add_argument("--debug", action="store_true")
    sub.add_parser("run", help="run a recipe (same as gem-run)", add_help=False)
    sub.add_parser("eval", help="evaluate a finished run folder (metrics, figures, report)", add_help=False)
    sub.add_parser("oracle-eval", help="score images with the recipe's oracle and compare with the data set's labels",
                   add_help=False)
    sub.add_parser("data", help="download, verify and list the data sets of the recipes", add_help=False)
    sub.add_parser("compare", help="train several methods on the same data and seeds and tabulate them",
                   add_help=False)
    sub.add_parser("explore", help="a local web page to move a run's attributes and watch its relation graph",
                   add_help=False)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run"]:
        return run_main(argv[1:], prog="gem run")
    if argv[:1] == ["eval"]:
        from gem.eval_command import eval_main

        return eval_main(argv[1:])
    if argv[:1] == ["data"]:
        from gem.data_download import data_main

        return data_main(argv[1:])
    if argv[:1] == ["compare"]:
        from gem.compare import compare_main

        return compare_main(argv[1:])
    if argv[:1] == ["explore"]:
        from gem.explore import explore_main

        return explore_main(argv[1:])
    if argv[:1] == ["oracle-eval"]:
        from gem.oracle_eval import oracle_main

        return oracle_main(argv[1:])
    args = parser.parse_args(argv)
    action = {"recipes": _recipes, "plugins": _plugins, "env": _env}[args.command]
    return guard(lambda: action(args), args.debug, "gem")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
