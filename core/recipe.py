"""Recipes: YAML files that say which plugins a run uses and with which options.

A recipe is validated against dataclasses: the run's own sections below, and for each
stage the options dataclass its plugin registered. Every error names the key and what it
accepts.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence, Union

import yaml

from gem.errors import ConfigurationError
from gem.plugins import STAGES, PluginError, Registry


class RecipeError(ConfigurationError):
    """The recipe is malformed; the message names the key and the allowed values."""


Bound = Union[float, tuple[float, float]]


def check_ranges(options: Any, positive: Sequence[str] = (), non_negative: Sequence[str] = (), *,
                 bounds: Optional[Mapping[str, Bound]] = None, where: str = "") -> None:
    """The range checks of an options dataclass's ``__post_init__``, for the run's sections and for
    plugins: raise ``ValueError`` naming the first option that is not > 0 (``positive``), not >= 0
    (``non_negative``), or outside its entry of ``bounds`` (a number: at least that; a pair
    ``(low, high)``: in that closed interval, written ``low..high`` when both are integers), checked
    in that order.

    ``where`` (e.g. the plugin's name) starts the message. Values that are not numbers (None: not
    set) are left alone; when the option's default is None, the message says null is allowed too.
    """
    fields = dataclasses.fields(options) if dataclasses.is_dataclass(options) else ()
    optional = {f.name for f in fields if f.default is None}
    rules = [(name, "> 0", lambda v: v > 0) for name in positive]
    rules += [(name, ">= 0", lambda v: v >= 0) for name in non_negative]
    for name, bound in (bounds or {}).items():
        if isinstance(bound, tuple):
            low, high = bound
            span = f"{low}..{high}" if isinstance(low, int) and isinstance(high, int) else f"[{low}, {high}]"
            rules.append((name, f"in {span}", lambda v, low=low, high=high: low <= v <= high))
        else:
            rules.append((name, f">= {bound}", lambda v, low=bound: v >= low))
    prefix = f"{where}: " if where else ""
    for name, allowed, ok in rules:
        value = getattr(options, name)
        if isinstance(value, (int, float)) and not ok(value):
            null = " or null" if name in optional else ""
            raise ValueError(f"{prefix}{name} must be {allowed}{null}, got {value!r}")


@dataclass
class TrainingOptions:
    """How the extractor and graph learner are trained (accelerate runs the loop)."""

    steps: int = 4000
    batch_size: int = 32
    warmup_steps: int = 800
    """Steps with the identity graph before latents are bound to attributes."""
    graph_lr: float = 1e-3
    log_every: int = 25
    checkpoint_every: int = 0
    """0 saves only at the end."""
    num_workers: int = 0
    cpu: bool = False
    """Force the CPU even when a GPU is visible."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """Passed to accelerate (bf16 needs a recent CPU or an Ampere+ GPU; fp16 a GPU)."""
    gradient_accumulation_steps: int = 1
    """Update the models every k batches (effective batch k x batch_size); ``steps`` counts batches."""
    threads: int = 0
    """torch intra-op threads on the CPU; 0 chooses them from the free cores (:func:`gem.context.auto_threads`)."""
    log_with: list[str] = field(default_factory=list)
    """accelerate trackers that log losses, the graph and the evaluation live: tensorboard, wandb, mlflow,
    comet_ml, aim, clearml, dvclive."""

    def __post_init__(self) -> None:
        from gem.tracking import TRACKER_PACKAGES

        unknown = [name for name in self.log_with if name not in TRACKER_PACKAGES]
        if unknown:
            raise ValueError(f"log_with: unknown tracker {unknown[0]!r}; allowed: {', '.join(TRACKER_PACKAGES)}")
        check_ranges(self, positive=("steps", "batch_size", "log_every", "graph_lr", "gradient_accumulation_steps"),
                     non_negative=("warmup_steps", "checkpoint_every", "num_workers", "threads"))


@dataclass
class ScoringOptions:
    """Which images the relation oracle scores (the paper uses the first 1,500)."""

    n_images: int = 1500
    batch_size: int = 32
    cache: bool = True
    """Reuse scores from ``<cache_dir>/oracle_scores.sqlite``; a re-run makes no new requests."""
    max_missing: float = 0.1
    """Largest fraction of missing scores a run trains with; more stops it before training (the
    scores that did arrive stay cached, so a re-run asks only for the rest)."""

    def __post_init__(self) -> None:
        check_ranges(self, positive=("n_images", "batch_size"), bounds={"max_missing": (0.0, 1.0)})


@dataclass
class EvaluationOptions:
    """What the run evaluates and draws at the end."""

    n_images: int = 2000
    """Held-out images (the last ones of the data set) for reconstruction metrics."""
    full_metrics: bool = True
    """Run ``gem eval``'s metrics (MIG, DCI, SAP, ... , efficiency) at the end of the run."""
    traversal_range: float = 2.5
    traversal_steps: int = 9
    traversal_image: int = 0
    report_figures: Literal["embed", "link"] = "embed"
    """``embed``: report.html holds its figures and can be sent alone; ``link``: it links figures/."""

    def __post_init__(self) -> None:
        check_ranges(self, positive=("n_images", "traversal_range", "traversal_steps"),
                     non_negative=("traversal_image",))


@dataclass
class Recipe:
    """A validated recipe: run settings plus one plugin section per stage."""

    name: str = "synthetic"
    seed: int = 0
    out: str = "runs"
    cache_dir: str = ".cache/gem"
    dataset: dict = field(default_factory=lambda: {"plugin": "synthetic"})
    extractor: dict = field(default_factory=lambda: {"plugin": "gem_vae"})
    oracle: dict = field(default_factory=lambda: {"plugin": "labels"})
    ranker: dict = field(default_factory=lambda: {"plugin": "somersd"})
    graph: dict = field(default_factory=lambda: {"plugin": "gcn"})
    training: TrainingOptions = field(default_factory=TrainingOptions)
    scoring: ScoringOptions = field(default_factory=ScoringOptions)
    evaluation: EvaluationOptions = field(default_factory=EvaluationOptions)
    # Filled by validation: the options dataclass instance of each stage's plugin.
    plugin_options: dict = field(default_factory=dict, repr=False)

    def plugin_name(self, stage: str) -> str:
        return getattr(self, stage)["plugin"]

    def to_dict(self) -> dict[str, Any]:
        """The fully resolved recipe (every default filled in), as plain YAML-able data."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "plugin_options":
                continue
            value = getattr(self, f.name)
            if f.name in STAGES:
                opts = self.plugin_options.get(f.name)
                value = {"plugin": value["plugin"], **(dataclasses.asdict(opts) if opts is not None else {})}
            elif dataclasses.is_dataclass(value):
                value = dataclasses.asdict(value)
            out[f.name] = value
        return out


#: The built-in default recipe, run by ``gem-run`` without a recipe; ``recipes/synthetic.yaml``
#: spells out the same settings (a test keeps them equal). It differs from the plugins' paper
#: defaults only where a CPU budget of a few minutes needs it: a larger learning rate and fewer
#: steps than a GPU run would use.
DEFAULT_RECIPE: dict[str, Any] = {
    "name": "synthetic",
    "extractor": {"plugin": "gem_vae", "lr": 5e-4, "disc_lr": 5e-4},
    "training": {"steps": 5000, "warmup_steps": 1500},
}


def shipped_recipe_folder() -> Optional[Path]:
    """The folder of the recipes gem ships: ``gem/recipes`` in an installed package (setup.cfg
    maps the top-level ``recipes/`` folder there), else ``recipes/`` next to ``core/`` in a source
    checkout (an editable install). None when there is neither."""
    here = Path(__file__).resolve().parent
    for folder in (here / "recipes", here.parent / "recipes" if here.name == "core" else None):
        if folder is not None and folder.is_dir():
            return folder
    return None


def shipped_recipes() -> dict[str, Path]:
    """Name (the file name without ``.yaml``) -> path of every shipped recipe, sorted by name."""
    folder = shipped_recipe_folder()
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))} if folder is not None else {}


def recipe_summary(path: Union[str, Path]) -> str:
    """One line about a recipe file (what ``gem recipes`` prints): the first line of its leading
    comment, cut back to its first sentence, or to the last clause that the line completes when
    the sentence runs on (``""`` when the file does not start with a comment)."""
    lines = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if not text.startswith("#") or (lines and not text.lstrip("#").strip()):
            break
        if text.lstrip("#").strip():
            lines.append(text.lstrip("#").strip())
    if not lines:
        return ""
    first, runs_on = lines[0], len(lines) > 1
    depth, ends = 0, []  # positions of the punctuation that ends a top-level clause
    for i, char in enumerate(first):
        depth += (char in "([") - (char in ")]")
        if depth == 0 and char in ".,;:" and (i + 1 == len(first) or first[i + 1] == " "):
            if char == "." and i + 1 < len(first):
                return first[:i]  # a whole sentence
            ends.append(i)
    if depth == 0 and ends and ends[-1] == len(first) - 1:
        return first[:-1].rstrip()  # the line ends a clause
    if depth == 0 and not runs_on:
        return first
    inner = [i for i in ends if i < len(first) - 1]
    return first[:inner[-1]].rstrip() if inner else first.rstrip(",;:")


def find_recipe(spec: Union[str, Path]) -> Path:
    """The recipe file ``spec`` names: an existing file, else a shipped recipe named by its bare
    name (``celeba``) or as ``recipes/celeba.yaml`` (the path in a source checkout, which also
    works after ``pip install``, from any folder). Raises :class:`RecipeError` listing the shipped
    names otherwise."""
    path = Path(spec)
    if path.is_file():
        return path
    text = str(spec)
    bare = bool(text) and "/" not in text and os.sep not in text and path.suffix not in (".yaml", ".yml")
    in_recipes = not path.is_absolute() and len(path.parts) == 2 and path.parts[0] == "recipes" \
        and path.suffix == ".yaml"
    shipped = shipped_recipes()
    name = text if bare else path.stem if in_recipes else None
    if name in shipped:
        return shipped[name]
    known = ", ".join(shipped) or "none found"
    if bare:
        raise RecipeError(f"unknown recipe {text!r}: no such file, and gem ships no recipe of that name; "
                          f"shipped recipes: {known} (`gem recipes` describes them)")
    raise RecipeError(f"recipe file {text!r} does not exist (shipped recipes, usable by name: {known})")


def load_recipe_file(path: Union[str, Path]) -> dict:
    """Read a recipe with ``yaml.safe_load``; syntax errors name the line. ``path`` may also name a
    shipped recipe (:func:`find_recipe`)."""
    path = find_recipe(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(f"{path}: malformed YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of keys, got {type(data).__name__}")
    return data


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Apply ``key.path=value`` overrides; values are parsed as YAML (``3``, ``true``, ``[a, b]``)."""
    data = _deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"--set {item!r}: expected key.path=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise RecipeError(f"--set {item!r}: empty key in {key!r}")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node = data
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise RecipeError(f"--set {item!r}: {'.'.join(parts[:depth + 1])!r} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def override_recipe(data: dict, overrides: Sequence[str], registry: Registry) -> tuple[dict, list[str]]:
    """:func:`apply_overrides`, where ``--set stage.plugin=NAME`` switches a stage's plugin: the
    section then keeps only the keys it inherits from ``data`` that the new plugin accepts.

    Returns the recipe data and one note per switched stage that lost keys, for the user to read.
    A key an override sets explicitly is kept, so one the new plugin lacks is still an error.
    """
    result = apply_overrides(data, overrides)
    explicit = {item.split("=", 1)[0].strip() for item in overrides if "=" in item}
    notes: list[str] = []
    for stage in STAGES:
        old, new = data.get(stage), result.get(stage)
        if not isinstance(old, dict) or not isinstance(new, dict) or f"{stage}.plugin" not in explicit:
            continue
        if new.get("plugin") == old.get("plugin"):
            continue
        try:
            options = registry.get(stage, str(new.get("plugin"))).options
        except PluginError:
            continue  # validation names the unknown plugin and lists the installed ones
        accepted = {f.name for f in dataclasses.fields(options)} if options is not None else set()
        dropped = [k for k in new if k in old and k != "plugin" and k not in accepted
                   and f"{stage}.{k}" not in explicit]
        for key in dropped:
            del new[key]
        if dropped:
            notes.append(f"{stage}.plugin={new['plugin']}: dropped the inherited "
                         f"{', '.join(f'{stage}.{k}' for k in dropped)}, which {new['plugin']} does not take")
    return result, notes


def validate_recipe(data: Mapping[str, Any], registry: Registry) -> Recipe:
    """Check every key and type, fill defaults, and resolve each stage's plugin options."""
    data = dict(data)
    stage_sections = {}
    for stage in STAGES:
        section = data.pop(stage, None)
        if section is None:
            section = getattr(Recipe(), stage)
        if isinstance(section, str):
            section = {"plugin": section}
        if not isinstance(section, dict):
            raise RecipeError(f"recipe key {stage!r}: expected a mapping with a 'plugin' key, got {_show(section)}")
        stage_sections[stage] = section
    recipe = _build(Recipe, data, "")
    for stage, section in stage_sections.items():
        section = dict(section)
        name = section.pop("plugin", None) or getattr(Recipe(), stage)["plugin"]
        try:
            reg = registry.get(stage, name)
        except PluginError as exc:
            raise RecipeError(f"recipe key '{stage}.plugin': {exc}") from None
        opts = _build(reg.options, section, stage) if reg.options is not None else None
        if reg.options is None and section:
            raise RecipeError(f"recipe key {stage!r}: plugin {name!r} takes no options, got {sorted(section)}")
        setattr(recipe, stage, {"plugin": name})
        recipe.plugin_options[stage] = opts
    return recipe


def _build(cls: type, data: Any, where: str) -> Any:
    """Make a dataclass instance from a mapping, checking keys and types."""
    if not isinstance(data, Mapping):
        raise RecipeError(f"recipe key {where or '<top>'!r}: expected a mapping, got {_show(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and f.name != "plugin_options"}
    unknown = [k for k in data if k not in fields]
    if unknown:
        allowed = ", ".join(sorted(fields) + (["plugin"] if where in STAGES else []))
        key = _join(where, str(unknown[0]))
        raise RecipeError(f"unknown recipe key {key!r}; allowed keys here: {allowed}")
    kwargs = {name: _coerce(data[name], hints[name], _join(where, name)) for name in fields if name in data}
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise RecipeError(f"recipe key {where or '<top>'!r}: {exc}") from None


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except RecipeError as exc:
                errors.append(str(exc))
        raise RecipeError(errors[0] if len(errors) == 1 else f"recipe key {key!r}: {_show(value)} matches none of {hint}")
    if origin is Literal:
        if value not in args:
            raise RecipeError(f"recipe key {key!r}: {_show(value)} is not allowed; allowed values: {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple, Sequence) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"recipe key {key!r}: expected a list, got {_show(value)}")
        item = args[0] if args else Any
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"recipe key {key!r}: expected a mapping, got {_show(value)}")
        return dict(value)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    if hint is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"recipe key {key!r}: expected true or false, got {_show(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"recipe key {key!r}: expected an integer, got {_show(value)}")
        return value
    if hint is float:
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads 1e-4 as a string
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"recipe key {key!r}: expected a number, got {_show(value)}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise RecipeError(f"recipe key {key!r}: expected a string, got {_show(value)}")
        return value
    return value


def _show(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _deepcopy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deepcopy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deepcopy(v) for v in data]
    return data
