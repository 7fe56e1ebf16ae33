"""The plugin manager and the registries the registration hooks fill."""

from __future__ import annotations

import importlib
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
    """All registrations of one plugin manager, by stage and name."""

    def __init__(self, pm: pluggy.PluginManager):
        self.pm = pm
        self._by_stage: dict[str, dict[str, Registration]] = {}
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
            table = self._by_stage[stage]
            if name in table:
                raise PluginError(
                    f"{stage} {name!r} is registered twice: by plugin {table[name].plugin!r} "
                    f"and by plugin {plugin_name!r}; uninstall or rename one of them")
            doc = description or (factory.__doc__ or "").strip().splitlines()[0:1]
            table[name] = Registration(stage, name, factory, options,
                                       doc if isinstance(doc, str) else "".join(doc), plugin_name)
        return register

    def names(self, stage: str) -> list[str]:
        return sorted(self._by_stage[stage])

    def get(self, stage: str, name: str) -> Registration:
        table = self._by_stage[stage]
        if name not in table:
            installed = ", ".join(sorted(table)) or "none"
            raise PluginError(f"unknown {stage} plugin {name!r}; installed: {installed}")
        return table[name]

    def all(self) -> list[Registration]:
        return [reg for stage in STAGES for reg in self._by_stage[stage].values()]


def make_plugin_manager(extra_plugins: tuple[Any, ...] = ()) -> pluggy.PluginManager:
    """Build a fresh manager: built-ins, then entry points of the ``gem`` group, then extras."""
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(specs)
    pm.load_setuptools_entrypoints(PROJECT)
    # Running from a source tree without an install has no entry points: register the
    # built-ins directly, under the same names the entry points use.
    for module_name in BUILTIN_PLUGINS:
        module = importlib.import_module(module_name)
        if not pm.is_registered(module):
            pm.register(module, name=module_name.rsplit(".", 1)[1])
    for plugin in extra_plugins:
        pm.register(plugin)
    pm.check_pending()
    return pm


def describe_plugins(pm: pluggy.PluginManager) -> list[dict[str, Any]]:
    """One record per registered plugin: its package, version and what it registers."""
    dists = {id(plugin): dist for plugin, dist in pm.list_plugin_distinfo()}
    registry = Registry(pm)
    records = []
    for name, plugin in sorted(pm.list_name_plugin(), key=lambda item: item[0]):
        dist = dists.get(id(plugin))
        package = dist.metadata["name"] if dist is not None else getattr(plugin, "__module__", None) or getattr(plugin, "__name__", "?")
        version = dist.version if dist is not None else None
        records.append({
            "plugin": name,
            "package": package,
            "version": version,
            "registers": {stage: [r.name for r in registry.all() if r.stage == stage and r.plugin == name]
                          for stage in STAGES
                          if any(r.stage == stage and r.plugin == name for r in registry.all())},
        })
    return records
