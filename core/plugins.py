"""The plugin manager and the registries the registration hooks fill."""

from __future__ import annotations

import importlib
import importlib.metadata
from dataclasses import dataclass, is_dataclass
from typing import Any, Callable, Optional

import pluggy

from gem.errors import GemError
from gem.hooks import PROJECT, specs

#: Stage name -> registration hook name, in pipeline order.
STAGES: dict[str, str] = {
    "dataset": "gem_register_datasets",
    "extractor": "gem_register_extractors",
    "oracle": "gem_register_oracles",
    "ranker": "gem_register_rankers",
    "graph": "gem_register_graph_learners",
}

#: Modules of the built-in plugins; also declared as entry points in setup.cfg.
BUILTIN_PLUGINS = (
    "gem_plugins.synthetic",
    "gem_plugins.gem_vae",
    "gem_plugins.baselines",
    "gem_plugins.joint_vae",
    "gem_plugins.rf_vae",
    "gem_plugins.ivae",
    "gem_plugins.dear",
    "gem_plugins.infogan",
    "gem_plugins.disdiff",
    "gem_plugins.labels_oracle",
    "gem_plugins.somersd",
    "gem_plugins.graph_learners",
    "gem_plugins.openai_oracle",
    "gem_plugins.llava_oracle",
    "gem_plugins.celeba",
    "gem_plugins.lsun",
    "gem_plugins.shapes3d",
    "gem_plugins.dsprites",
    "gem_plugins.image_folder",
)


class PluginError(GemError, ValueError):
    """A plugin could not be found, registered or built."""


@dataclass(frozen=True)
class Registration:
    """One named factory a plugin registered for a stage."""

    stage: str
    name: str
    factory: Callable[..., Any]
    options: Optional[type]
    description: str
    plugin: str

    def build(self, options: Any, context: Any) -> Any:
        return self.factory(options, context)


class Registry:
    """All registrations of one plugin manager, by stage and name.

    Two plugins registering one name is not an error until that name is used: ``gem plugins``
    still lists both (``conflicts``), and :meth:`get` names the packages to choose between.
    """

    def __init__(self, pm: pluggy.PluginManager):
        self.pm = pm
        self._by_stage: dict[str, dict[str, Registration]] = {}
        self.conflicts: dict[tuple[str, str], list[Registration]] = {}
        for stage, hook_name in STAGES.items():
            self._by_stage[stage] = {}
            hook = getattr(pm.hook, hook_name)
            for impl in hook.get_hookimpls():
                plugin_name = pm.get_name(impl.plugin) or repr(impl.plugin)
                impl.function(register=self._registrar(stage, plugin_name))

    def _registrar(self, stage: str, plugin_name: str) -> Callable[..., None]:
        def register(name: str, factory: Callable[..., Any], *, options: Optional[type] = None,
                     description: str = "") -> None:
            if options is not None and not is_dataclass(options):
                raise PluginError(f"plugin {plugin_name!r}: options for {stage} {name!r} must be a dataclass type")
            doc = description or (factory.__doc__ or "").strip().splitlines()[0:1]
            registration = Registration(stage, name, factory, options,
                                        doc if isinstance(doc, str) else "".join(doc), plugin_name)
            table = self._by_stage[stage]
            if name in table:
                self.conflicts.setdefault((stage, name), [table[name]]).append(registration)
            else:
                table[name] = registration
        return register

    def names(self, stage: str) -> list[str]:
        return sorted(self._by_stage[stage])

    def get(self, stage: str, name: str) -> Registration:
        table = self._by_stage[stage]
        if name not in table:
            installed = ", ".join(sorted(table)) or "none"
            raise PluginError(f"unknown {stage} plugin {name!r}; installed: {installed}")
        if (stage, name) in self.conflicts:
            raise PluginError(self.conflict_message(stage, name))
        return table[name]

    def conflict_message(self, stage: str, name: str) -> str:
        clashing = self.conflicts[stage, name]
        sources = plugin_sources(self.pm)
        described = " and ".join(f"plugin {r.plugin!r} of {sources.get(r.plugin, 'no installed package')}"
                                 for r in clashing)
        others = [sources[r.plugin].split()[0] for r in clashing
                  if r.plugin in sources and not sources[r.plugin].startswith(OWN_DISTRIBUTION)]
        fix = f"pip uninstall {others[-1]}" if others else "remove one of the plugins"
        return (f"{stage} {name!r} is registered by {len(clashing)} plugins: {described}; gem cannot tell which "
                f"you mean: {fix}, or ask its author to register another name")

    def all(self) -> list[Registration]:
        return [reg for stage in STAGES for reg in self._by_stage[stage].values()]


#: The distribution gem itself is installed as.
OWN_DISTRIBUTION = "gem-disentangle"


def _distribution_label(dist: Any) -> str:
    if dist is None:
        return "no installed package"
    return f"{dist.metadata['name']} {dist.version}".strip()


def make_plugin_manager(extra_plugins: tuple[Any, ...] = ()) -> pluggy.PluginManager:
    """Build a fresh manager: built-ins, then entry points of the ``gem`` group, then extras.

    An entry point whose name is taken (by a built-in or another package) is registered as
    ``<package>:<name>`` rather than dropped; one that fails to import is left out and listed in
    :func:`broken_entry_points` (so one broken package does not stop every command).
    """
    import gem

    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(specs)
    sources: dict[str, str] = {}
    broken: list[dict[str, str]] = []
    for module_name in BUILTIN_PLUGINS:
        name = module_name.rsplit(".", 1)[1]
        pm.register(importlib.import_module(module_name), name=name)
        sources[name] = f"{OWN_DISTRIBUTION} {gem.__version__}"
    for entry_point in importlib.metadata.entry_points(group=PROJECT):
        dist = getattr(entry_point, "dist", None)
        label = _distribution_label(dist)
        try:
            plugin = entry_point.load()
        except Exception as exc:  # a broken third-party package must not break gem
            broken.append({"entry_point": entry_point.name, "package": label, "error": f"{type(exc).__name__}: {exc}"})
            continue
        if pm.is_registered(plugin):  # gem's own entry points name the built-in modules
            continue
        name = entry_point.name
        if pm.get_plugin(name) is not None:
            name = f"{dist.metadata['name'] if dist is not None else '?'}:{entry_point.name}"
        pm.register(plugin, name=name)
        sources[name] = label
    for plugin in extra_plugins:
        pm.register(plugin)
    pm.check_pending()
    pm.gem_sources = sources  # type: ignore[attr-defined]
    pm.gem_broken = broken  # type: ignore[attr-defined]
    return pm


def plugin_sources(pm: pluggy.PluginManager) -> dict[str, str]:
    """Plugin name -> ``"<distribution> <version>"`` it was installed with (entry points and built-ins)."""
    return dict(getattr(pm, "gem_sources", {}))


def broken_entry_points(pm: pluggy.PluginManager) -> list[dict[str, str]]:
    """Entry points of the ``gem`` group that failed to import: name, package and the error."""
    return list(getattr(pm, "gem_broken", []))


def describe_plugins(pm: pluggy.PluginManager) -> list[dict[str, Any]]:
    """One record per registered plugin: its package, version, what it registers and which of
    those names another plugin registers too (``conflicts``)."""
    sources = plugin_sources(pm)
    registry = Registry(pm)
    records = []
    for name, plugin in sorted(pm.list_name_plugin(), key=lambda item: item[0]):
        source = sources.get(name)
        package, _, version = source.partition(" ") if source else (
            getattr(plugin, "__module__", None) or getattr(plugin, "__name__", "?"), "", "")
        mine = [r for r in registry.all() if r.plugin == name]
        mine += [r for regs in registry.conflicts.values() for r in regs[1:] if r.plugin == name]
        records.append({
            "plugin": name,
            "package": package,
            "version": version or None,
            "registers": {stage: [r.name for r in mine if r.stage == stage]
                          for stage in STAGES if any(r.stage == stage for r in mine)},
            "conflicts": [f"{r.stage} {r.name}" for r in mine if (r.stage, r.name) in registry.conflicts],
        })
    return records
