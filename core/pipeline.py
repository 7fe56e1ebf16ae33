"""One run of a recipe: data -> oracle scores -> impact ranking -> training -> evaluation -> report."""

from __future__ import annotations

import io
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import yaml
from accelerate.utils import set_seed

from gem import evaluation, figures
from gem.binding import bind_latents
from gem.context import RunContext, Split, timestamped_folder
from gem.errors import ConfigurationError
from gem.evaluation import END_OF_RUN, QUICK_METRICS, EvalSettings
from gem.interfaces import ImageDataset, Ranking
from gem.io import atomic_write_bytes, atomic_write_text, write_json
from gem.labels import auxiliary_variable
from gem.plugins import Registry
from gem.recipe import Recipe, RecipeError, apply_overrides, load_recipe_file, validate_recipe
from gem.relations import RelationModel
from gem.run_folder import TrainedRun, impact_record, read_scores, write_impact, write_scores
from gem.run_report import run_summary, write_run_report
from gem.scoring import check_missing, score_summary, score_with_cache
from gem.training import CheckpointError, Interrupted, Trainer, encode_images, load_checkpoint
from gem.progress import logger
from gem.somers_d import most_asymmetric_pair
from gem.tracking import Tracking, check_tracker_packages

#: Recipe keys a resumed run may change: they do not change what the run computes.
RESUME_MAY_CHANGE = ("training.steps", "training.checkpoint_every", "training.num_workers", "training.threads",
                     "training.log_with")


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, Any]
    summary: dict[str, Any] = field(default_factory=dict)


#: Everything a run writes into its folder (gem-run, then gem eval); ``--overwrite`` removes these.
RUN_OUTPUTS = ("recipe.yaml", "scores.csv", "impact.json", "impact.csv", "metrics.json", "history.json", "model.pt",
               "checkpoint", "figures", "report.html", "report.md")
#: Files that mark a folder as holding a run, finished or not.
RUN_MARKERS = ("recipe.yaml", "model.pt", "metrics.json", "scores.csv", "checkpoint")
#: What a run writes before it asks the oracle or trains: nothing worth keeping.
_BEFORE_SCORING = ("recipe.yaml", "figures")


def existing_run(folder: Path) -> list[str]:
    """The :data:`RUN_MARKERS` ``folder`` holds (empty when it holds no run or does not exist)."""
    folder = Path(folder)
    return [name for name in RUN_MARKERS if (folder / name).exists()] if folder.is_dir() else []


def check_out_folder(out: Optional[Path], overwrite: bool = False) -> None:
    """Refuse ``--out`` when it is a file, or a folder that already holds a run (unless ``overwrite``):
    two runs' files must never mix."""
    if out is None:
        return
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigurationError(f"--out {str(out)!r} is a file, not a folder")
    found = existing_run(out)
    if found and not overwrite:
        raise ConfigurationError(f"--out {str(out)!r} already holds a run ({', '.join(found)}); choose another "
                                 f"folder, add --overwrite to replace that run, or continue it with --resume {out}")


def make_run_dir(recipe: Recipe, out: Optional[Path] = None, overwrite: bool = False) -> Path:
    """``out`` when given, else ``<recipe.out>/<name>-<timestamp>`` (never an existing folder).

    An ``out`` that already holds a run is refused (:func:`check_out_folder`) unless ``overwrite``,
    which first removes the old run's files (:data:`RUN_OUTPUTS`; other files stay and are named).
    """
    if out is None:
        out = timestamped_folder(Path(recipe.out), recipe.name)
    out = Path(out)
    check_out_folder(out, overwrite)
    if overwrite and existing_run(out):
        for name in RUN_OUTPUTS:
            path = out / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
        others = sorted(p.name for p in out.iterdir())
        kept = f"; kept what gem did not write: {', '.join(others[:5])}{' ...' if len(others) > 5 else ''}" \
            if others else ""
        logger.warning(f"gem: --overwrite: removed the earlier run's files from {out}{kept}")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigurationError(f"cannot create the run folder {str(out)!r}: {exc.strerror or exc}") from None
    return out


def discard_unstarted_run(run_dir: Path, created: bool) -> bool:
    """Undo what a run that failed before it had scores wrote into ``run_dir``: its recipe.yaml and
    empty figures/ folder, then the folder itself when the run ``created`` it and it is empty.
    A folder with any other run output (scores.csv, which ``--resume`` reuses, a checkpoint, ...)
    is left as it is; files gem did not write always stay. Returns whether anything was removed."""
    run_dir = Path(run_dir)
    figures = run_dir / "figures"
    if not run_dir.is_dir() or any((run_dir / name).exists() for name in RUN_OUTPUTS if name not in _BEFORE_SCORING):
        return False
    if figures.exists() and (not figures.is_dir() or figures.is_symlink() or any(figures.iterdir())):
        return False
    if figures.exists():
        figures.rmdir()
    (run_dir / "recipe.yaml").unlink(missing_ok=True)
    if created and not any(run_dir.iterdir()):
        run_dir.rmdir()
    return True


def resume_recipe(run_dir: Path, data: Optional[dict], overrides: Sequence[str], registry: Registry) -> Recipe:
    """The recipe to resume ``run_dir`` with: ``data`` (a recipe file's content) or the folder's own
    ``recipe.yaml``, with ``overrides`` applied. It must resolve to the recipe the run started
    with, except for :data:`RESUME_MAY_CHANGE`; otherwise the error names the keys that differ."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RecipeError(f"--resume {str(run_dir)!r}: no such run folder")
    stored_path = run_dir / "recipe.yaml"
    if not stored_path.is_file():
        raise RecipeError(f"--resume {str(run_dir)!r}: not a gem run folder (recipe.yaml is missing)")
    stored = validate_recipe(load_recipe_file(stored_path), registry)
    recipe = validate_recipe(apply_overrides(stored.to_dict() if data is None else data, overrides), registry)
    old, new = _flatten(stored.to_dict()), _flatten(recipe.to_dict())
    differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in RESUME_MAY_CHANGE)
    if differ:
        shown = ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in differ[:5])
        raise RecipeError(f"--resume {str(run_dir)!r}: the recipe differs from the run's recipe.yaml in {shown}; "
                          f"a resumed run may change only {', '.join(RESUME_MAY_CHANGE)}")
    return recipe


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def run_recipe(recipe: Recipe, registry: Registry, run_dir: Path, accelerator: Any = None, resume: bool = False,
               eval_metrics: Optional[Sequence[str]] = None, eval_settings: EvalSettings = END_OF_RUN) -> RunResult:
    """Run every stage of a validated recipe and write the run folder.

    With ``resume`` the run continues in ``run_dir`` from its last checkpoint (models, optimisers,
    graph, binding, RNG states, step) and reuses its scores (from the checkpoint, scores.csv or the
    score cache), so no oracle request is repeated; on one process the result is the same as an
    uninterrupted run's. Ctrl-C saves a checkpoint and raises :class:`gem.training.Interrupted`.
    The trained models are evaluated once, in memory (:func:`gem.evaluation.evaluate`), on the
    groups ``eval_metrics`` names (default: every group, or :data:`gem.evaluation.QUICK_METRICS`
    when ``evaluation.full_metrics`` is off) at the sizes of ``eval_settings``.
    """
    started = time.perf_counter()
    check_tracker_packages(recipe.training.log_with)  # before anything is scored or trained
    ctx = RunContext.open(recipe, registry, run_dir, accelerator)
    pm, topts, acc = registry.pm, recipe.training, ctx.accelerator
    set_seed(recipe.seed)
    main = acc.is_main_process
    if main:
        (run_dir / "figures").mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "recipe.yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False))

    # 1. Data.
    logger.info(f"data: loading {recipe.plugin_name('dataset')!r}")
    dataset = ctx.load_dataset()
    n = len(dataset.attributes)
    split = ctx.split(dataset)
    logger.info(f"data: {len(dataset.images):,} images, {n} attributes ({', '.join(dataset.attributes)}); "
                f"{len(split.train):,} train, {len(split.held_out):,} held out")
    pm.hook.gem_on_stage_end(stage="data", outputs={"dataset": dataset})

    checkpoint_dir = run_dir / "checkpoint"
    if resume and main:
        for stale in checkpoint_dir.glob(".*.tmp"):  # a write cut short by a kill; the last good file stays
            stale.unlink()
    state = load_checkpoint(checkpoint_dir) if resume else None
    if state is not None and int(state["step"]) > topts.steps:
        raise CheckpointError(f"the checkpoint in {checkpoint_dir} is at step {state['step']}, past "
                              f"training.steps={topts.steps}; resume with at least that many steps")

    # 2. Oracle scores for the first N_rel images (a resumed run reuses what it has). Extractor,
    #    graph and oracle are built first, so an impossible latent size or a missing API key stops
    #    the run before anything is paid for or trained.
    saved = _saved_scores(state, run_dir, split.scored, list(dataset.attributes)) if resume else None
    set_seed(recipe.seed)
    extractor = ctx.build("extractor")
    auxiliary = auxiliary_variable(extractor, dataset, recipe.plugin_name("extractor"))  # fails before scoring
    graph = ctx.build("graph")
    if saved is None:
        oracle = ctx.build("oracle")
        logger.info(f"scores: oracle {recipe.plugin_name('oracle')!r} scores {n} attributes on "
                    f"{len(split.scored):,} images (cached answers are reused)")
        try:
            scores, oracle_counters = score_with_cache(oracle, dataset, split.scored, recipe, show_progress=main,
                                                       accelerator=acc)
        except KeyboardInterrupt as exc:
            if isinstance(exc, Interrupted):
                raise
            kept = (f"every score that arrived is kept in {Path(recipe.cache_dir) / 'oracle_scores.sqlite'}"
                    if recipe.scoring.cache else "scoring.cache is off, so the scores are lost")
            raise Interrupted(f"stopped while scoring; {kept}; continue with: gem-run --resume {run_dir}") from None
        check_missing(scores, list(dataset.attributes), recipe.scoring.max_missing,
                      Path(recipe.cache_dir) / "oracle_scores.sqlite" if recipe.scoring.cache else None)
    else:
        scores, oracle_counters = saved
        logger.info(f"scores: reusing the run's saved scores of {len(split.scored):,} images")
    if main:
        write_scores(run_dir / "scores.csv", split.scored, dataset.attributes, scores)
    pm.hook.gem_on_stage_end(stage="scores", outputs={"scores": scores, "indices": split.scored})

    # 3. Impact ranking.
    logger.info(f"ranking: {recipe.plugin_name('ranker')!r} impact matrix S of the {n} x {n} attribute pairs")
    ranking: Ranking = ctx.build("ranker").rank(scores)
    pm.hook.gem_on_stage_end(stage="rank", outputs={"ranking": ranking})

    # 4. Training: warm up with independent latents, bind latents to attributes, then train
    #    the extractor and the relation graph together. Reseeded here so that training does not
    #    depend on whether the scores came from the oracle or from a checkpoint.
    graph.set_anchor(torch.as_tensor(ranking.impact, dtype=torch.float32))
    relation = RelationModel(graph, n)
    # With several processes each draws its own noise (device_specific); weights start equal.
    set_seed(recipe.seed + 1, device_specific=acc.num_processes > 1)
    trainer = Trainer(extractor, relation, dataset.images, split.train, topts, recipe.seed, acc,
                      checkpoint_dir=checkpoint_dir, sample_weights=dataset.sample_weights,
                      auxiliary=auxiliary)
    if state is not None:
        trainer.load(state)
        if main:
            logger.info(f"gem: resuming from the checkpoint at step {trainer.step} of {topts.steps}")
    elif resume and main:
        logger.warning(f"gem: no checkpoint in {checkpoint_dir}; training from step 0 with the saved scores")
    tracking = Tracking(acc, topts.log_with, run_dir, recipe.name, recipe.to_dict())
    if tracking.active:
        def on_log(record: dict[str, float]) -> None:
            tracking.log_losses(record)
            tracking.log_graph(trainer.relation.adjacency().detach().float().cpu().numpy(), dataset.attributes,
                               int(record["step"]))

        trainer.on_log = on_log
    trainer.extra = {"scores": torch.from_numpy(np.asarray(scores, dtype=np.float64)),
                     "scored_idx": torch.from_numpy(np.asarray(split.scored, dtype=np.int64)),
                     "oracle_counters": {k: v for k, v in oracle_counters.items() if isinstance(v, (int, float))}}
    try:  # the trackers are flushed and closed however the run ends
        train_started = time.perf_counter()
        logger.info(f"training: {recipe.plugin_name('extractor')!r} for {topts.steps:,} steps, the first "
                    f"{min(topts.warmup_steps, topts.steps):,} with independent latents, then with the "
                    f"{recipe.plugin_name('graph')!r} relation graph")
        with trainer.ctrl_c_stops_cleanly():  # also while binding, between the two fits
            if not trainer.relation.is_bound:
                trainer.fit(min(topts.warmup_steps, topts.steps), desc="warm-up")
                means = encode_images(trainer.extractor, dataset.images, split.scored, acc.device)
                binding = bind_latents(means, scores)
                if acc.num_processes > 1:  # every process binds as the main one did
                    from accelerate.utils import broadcast_object_list

                    binding.latent_of, binding.sign = broadcast_object_list([binding.latent_of, binding.sign])
                trainer.relation.bind(binding.latent_of, binding.sign)
                logger.info("training: latents bound to attributes: " + ", ".join(
                    f"{name} <- z{binding.latent_of[i]}{'' if binding.sign[i] > 0 else ' (sign flipped)'}"
                    for i, name in enumerate(dataset.attributes)))
                if topts.checkpoint_every:
                    trainer.save(checkpoint_dir)  # the binding is part of every later checkpoint
                if trainer.stop_requested():
                    trainer.interrupt()
            trainer.fit(topts.steps, desc="train")
        train_seconds = time.perf_counter() - train_started
        trainer.save(checkpoint_dir)
        facts = _run_facts(ctx, dataset, split, scores, oracle_counters, trainer, train_seconds)
        try:
            result = _finish(ctx, dataset, split, scores, ranking, trainer, facts, started, eval_metrics, eval_settings)
            tracking.log_metrics(result.metrics, trainer.step, sections=(
                "disentanglement", "reconstruction", "relations", "oracle_quality", "fidelity"))
        except KeyboardInterrupt as exc:
            raise Interrupted(f"stopped after training (the final checkpoint is saved); "
                              f"continue with: gem-run --resume {run_dir}") from exc
    finally:
        tracking.close()
    if accelerator is None and acc.num_processes > 1:
        acc.end_training()  # without it one process may abort on exit
    return result


def _saved_scores(state: Optional[dict], run_dir: Path, scored_idx: np.ndarray,
                  attributes: list[str]) -> Optional[tuple[np.ndarray, dict[str, Any]]]:
    """Scores a resumed run already has: the checkpoint's, else the run folder's scores.csv."""
    extra = state.get("extra", {}) if state is not None else {}
    if "scores" in extra and np.array_equal(extra["scored_idx"].numpy(), scored_idx):
        return extra["scores"].numpy().astype(float), dict(extra.get("oracle_counters", {}))
    path = run_dir / "scores.csv"
    if path.is_file():
        indices, scores = read_scores(path, attributes)
        if np.array_equal(indices, scored_idx):
            return scores, {}
    return None


def _run_facts(ctx: RunContext, dataset: ImageDataset, split: Split, scores: np.ndarray,
               oracle_counters: dict[str, Any], trainer: Trainer, train_seconds: float) -> dict[str, Any]:
    """What metrics.json records of the run itself: binding, oracle, training and data."""
    attributes, topts = list(dataset.attributes), ctx.recipe.training
    latent_of = trainer.relation.latent_of.cpu().numpy()
    sign = trainer.relation.sign.cpu().numpy()
    return {
        "binding": {"latent_of": {a: int(k) for a, k in zip(attributes, latent_of)},
                    "sign": {a: int(s) for a, s in zip(attributes, sign)}},
        "oracle": {**score_summary(scores), **oracle_counters},
        "training": {"steps": topts.steps, "seconds": train_seconds,
                     "steps_per_second": topts.steps / max(train_seconds, 1e-9),
                     "parameters": sum(p.numel() for p in trainer.extractor.parameters()),
                     "device": str(ctx.device), "processes": ctx.accelerator.num_processes},
        "data": {"images": len(dataset), "held_out": len(split.held_out), "scored": len(split.scored),
                 **dataset.info},
    }


def _finish(ctx: RunContext, dataset: ImageDataset, split: Split, scores: np.ndarray, ranking: Ranking,
            trainer: Trainer, facts: dict[str, Any], started: float, eval_metrics: Optional[Sequence[str]],
            eval_settings: EvalSettings) -> RunResult:
    """Write model.pt and the run's files, evaluate the trained models once and write the report."""
    pm, acc, run_dir, recipe = ctx.registry.pm, ctx.accelerator, ctx.run_dir, ctx.recipe
    extractor, relation = trainer.extractor, trainer.relation
    learned = relation.adjacency().detach().float().cpu().numpy()
    if acc.is_main_process:
        buffer = io.BytesIO()
        torch.save({"extractor": extractor.state_dict(), "relation": relation.state_dict(),
                    "attributes": list(dataset.attributes)}, buffer)
        atomic_write_bytes(run_dir / "model.pt", buffer.getvalue())
    pm.hook.gem_on_stage_end(stage="train", outputs={"history": trainer.history, "adjacency": learned})

    # 5. Evaluation and report, on the main process (the others wait for it at the end).
    if not acc.is_main_process:
        acc.wait_for_everyone()
        return RunResult(run_dir, {}, {})
    impact = impact_record(dataset.attributes, ranking, learned, dataset.true_impact)
    write_impact(run_dir, impact)
    write_json(run_dir / "history.json", trainer.history)
    run = TrainedRun(context=ctx, dataset=dataset, extractor=extractor, relation=relation, split=split,
                     score_indices=split.scored, scores=scores, impact=impact)
    logger.info("figures: traversals, relation heatmaps, loss curves, score histograms")
    _draw_run_figures(run, ranking, trainer.history)
    write_json(run_dir / "metrics.json", facts)  # kept if the evaluation fails; gem eval merges into it
    if eval_metrics is None and not recipe.evaluation.full_metrics:
        eval_metrics = QUICK_METRICS
    result = evaluation.evaluate(run, eval_metrics, eval_settings)
    metrics = evaluation.record(run_dir, result, write_report=False,
                                extra={"run_seconds": time.perf_counter() - started})
    write_run_report(run_dir)
    summary = {**run_summary(metrics), "run folder": str(run_dir)}
    pm.hook.gem_on_stage_end(stage="report", outputs={"metrics": metrics, "run_dir": run_dir})
    acc.wait_for_everyone()
    return RunResult(run_dir, metrics, summary)


def _draw_run_figures(run: TrainedRun, ranking: Ranking, history: list[dict[str, float]]) -> None:
    """Traversals, relation matrices, loss curves and the score histogram of a trained run."""
    attrs, folder, ev = run.attributes, run.run_dir / "figures", run.recipe.evaluation
    extractor, relation, device = run.extractor, run.relation, run.device
    values = np.linspace(-ev.traversal_range, ev.traversal_range, ev.traversal_steps)
    image = run.dataset.images[run.split.held_out[min(ev.traversal_image, len(run.split.held_out) - 1)]]
    related, independent = evaluation.traversals(extractor, relation, image, values, device)
    for name, decode in extractor.extra_decoders().items():
        grid, _ = evaluation.traversals(extractor, relation, image, values, device, decode=decode, independent=False)
        figures.plot_traversals(grid, attrs, values, folder / f"traversal_relation_aware_{name}.png",
                                f"Relation-aware traversals decoded by the {name} decoder")
    figures.plot_impact_heatmap(ranking.impact, attrs, folder / "impact_heatmap.png",
                                "Impact scores S (Somers' D, row → column)", ranking.ci_low, ranking.ci_high,
                                outline=most_asymmetric_pair(ranking.impact))
    matrices = {"oracle S": ranking.impact, "learned A": run.learned_adjacency}
    if run.dataset.true_impact is not None:
        matrices = {"true": run.dataset.true_impact, **matrices}
    figures.plot_relation_comparison(matrices, attrs, folder / "relations.png", "Relation matrices")
    figures.plot_traversals(related, attrs, values, folder / "traversal_relation_aware.png",
                            "Relation-aware traversals (z_rel = Aᵀz)")
    figures.plot_traversals(independent, attrs, values, folder / "traversal_independent.png",
                            "Independent traversals (one decoder input at a time)")
    warmup = min(run.recipe.training.warmup_steps, run.recipe.training.steps)
    marks = {"end of warm-up, latents bound": warmup} if run.relation.is_bound and 0 < warmup < run.recipe.training.steps else None
    figures.plot_loss_curves(history, folder / "loss_curves.png", "training losses", marks=marks)
    figures.plot_score_histogram(run.scores, attrs, folder / "oracle_scores.png", "oracle scores")
