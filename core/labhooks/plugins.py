"""The plugin manager and the registry built from every plugin.

Plugins are found through the ``labhooks`` entry-point group; the built-in ones are
registered there the same way as a third-party package. A plugin whose optional
dependency is missing stays listed as unavailable, with the extra to install.
"""

from __future__ import annotations

import importlib
import logging
import threading
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import pluggy

from labhooks import hookspecs
from labhooks.architectures import BUILTIN_ADAPTERS, ArchitectureAdapter
from labhooks.errors import PluginError
from labhooks.intervention import Intervention
from labhooks.methods import Method

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "labhooks"


@dataclass
class PluginInfo:
    """One plugin as ``labhooks plugins`` lists it."""

    name: str
    version: str | None
    module: str
    available: bool = True
    error: str | None = None
    methods: list[str] = field(default_factory=list)
    interventions: list[str] = field(default_factory=list)
    aggregators: list[str] = field(default_factory=list)
    trainers: list[str] = field(default_factory=list)
    architectures: list[str] = field(default_factory=list)


class Registry:
    """Everything the plugins contribute, by name."""

    def __init__(self) -> None:
        self.plugins: dict[str, PluginInfo] = {}
        self.methods: dict[tuple[str, str], Method] = {}
        self.interventions: dict[str, type[Intervention]] = {}
        self.aggregators: dict[str, type] = {}
        self.trainers: dict[tuple[str, str], Any] = {}
        self.plugin_adapters: list[ArchitectureAdapter] = []

    @property
    def adapters(self) -> tuple[ArchitectureAdapter, ...]:
        # Plugin adapters come first so a plugin can refine a built-in family.
        return (*self.plugin_adapters, *BUILTIN_ADAPTERS)

    def _plugin(self, name: str) -> PluginInfo:
        info = self.plugins.get(name)
        if info is None:
            known = ", ".join(sorted(self.plugins)) or "none"
            raise PluginError(f"unknown plugin {name!r}; installed plugins: {known}. Run `labhooks plugins` to see them")
        if not info.available:
            raise PluginError(f"plugin {name!r} is installed but unavailable: {info.error}")
        return info

    def method(self, plugin: str, name: str | None = None) -> Method:
        """Return a plugin's method; without a name, its default (first) method."""
        info = self._plugin(plugin)
        if not info.methods:
            raise PluginError(f"plugin {plugin!r} contributes no methods to apply")
        chosen = name or info.methods[0]
        method = self.methods.get((plugin, chosen))
        if method is None:
            raise PluginError(f"plugin {plugin!r} has no method {chosen!r}; its methods are {', '.join(info.methods)}")
        return method

    def trainer(self, plugin: str, name: str | None = None) -> Any:
        info = self._plugin(plugin)
        if not info.trainers:
            raise PluginError(f"plugin {plugin!r} contributes no trainable methods")
        chosen = name or info.trainers[0]
        trainer = self.trainers.get((plugin, chosen))
        if trainer is None:
            raise PluginError(f"plugin {plugin!r} has no trainable method {chosen!r}; its trainable methods are {', '.join(info.trainers)}")
        return trainer

    def intervention_class(self, name: str) -> type[Intervention]:
        found = self.interventions.get(name)
        if found is None:
            unavailable = [info.name for info in self.plugins.values() if not info.available]
            hint = f" (unavailable plugins: {', '.join(unavailable)})" if unavailable else ""
            raise PluginError(
                f"no installed plugin provides the intervention class {name!r}{hint}; known classes: {', '.join(sorted(self.interventions))}"
            )
        return found

    def aggregator(self, name: str) -> type:
        found = self.aggregators.get(name)
        if found is None:
            raise PluginError(f"unknown aggregator {name!r}; available: {', '.join(sorted(self.aggregators)) or 'none'}")
        return found


def _unavailable_reason(entry_point: EntryPoint, error: ImportError) -> str:
    missing = getattr(error, "name", None) or str(error)
    package = entry_point.value.split(":")[0].split(".")[0]
    extra = None
    try:
        extra = getattr(importlib.import_module(package), "LABHOOKS_EXTRA", None)
    except ImportError:
        pass
    if extra:
        return f"missing module {missing!r}; install it with `pip install 'labhooks[{extra}]'`"
    return f"missing module {missing!r}; install it with pip"


def _collect(manager: pluggy.PluginManager, registry: Registry) -> None:
    for hook_name, kind in (
        ("labhooks_methods", "methods"),
        ("labhooks_interventions", "interventions"),
        ("labhooks_aggregators", "aggregators"),
        ("labhooks_trainers", "trainers"),
        ("labhooks_architectures", "architectures"),
    ):
        for implementation in getattr(manager.hook, hook_name).get_hookimpls():
            plugin_name = implementation.plugin_name
            info = registry.plugins[plugin_name]
            for item in implementation.function() or []:
                _add(registry, info, kind, item)


def _add(registry: Registry, info: PluginInfo, kind: str, item: Any) -> None:
    if kind == "methods":
        registry.methods[(info.name, item.name)] = item
        info.methods.append(item.name)
    elif kind == "trainers":
        registry.trainers[(info.name, item.name)] = item
        info.trainers.append(item.name)
    elif kind == "interventions":
        if not item.name:
            logger.warning("plugin %s: intervention class %s has no name and is skipped", info.name, item.__name__)
            return
        if item.name in registry.interventions and registry.interventions[item.name] is not item:
            logger.warning("plugin %s: intervention class name %r is taken; keeping the first", info.name, item.name)
            return
        registry.interventions[item.name] = item
        info.interventions.append(item.name)
    elif kind == "aggregators":
        if item.name in registry.aggregators and registry.aggregators[item.name] is not item:
            logger.warning("plugin %s: aggregator name %r is taken; keeping the first", info.name, item.name)
            return
        registry.aggregators[item.name] = item
        info.aggregators.append(item.name)
    elif kind == "architectures":
        registry.plugin_adapters.append(item)
        info.architectures.append(item.name)


def build_registry(extra_plugins: dict[str, Any] | None = None) -> Registry:
    """Load every ``labhooks`` entry point (plus ``extra_plugins``, name to module) into a registry."""
    manager = pluggy.PluginManager("labhooks")
    manager.add_hookspecs(hookspecs)
    registry = Registry()

    points = sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda point: (point.name != "core", point.name))
    seen = set()
    for point in points:
        if point.name in seen:
            continue
        seen.add(point.name)
        version = point.dist.version if point.dist is not None else None
        try:
            module = point.load()
        except ImportError as error:
            registry.plugins[point.name] = PluginInfo(point.name, version, point.value, False, _unavailable_reason(point, error))
            continue
        except Exception as error:  # noqa: BLE001 - one broken plugin must not break the others
            logger.warning("plugin %s failed to load: %s", point.name, error)
            registry.plugins[point.name] = PluginInfo(point.name, version, point.value, False, f"failed to load: {error}")
            continue
        manager.register(module, name=point.name)
        registry.plugins[point.name] = PluginInfo(point.name, version, point.value)

    for name, module in (extra_plugins or {}).items():
        manager.register(module, name=name)
        registry.plugins[name] = PluginInfo(name, None, getattr(module, "__name__", repr(module)))

    _collect(manager, registry)
    return registry


_registry: Registry | None = None
_lock = threading.Lock()


def get_registry() -> Registry:
    """Return the registry of installed plugins, built on first use."""
    global _registry
    with _lock:
        if _registry is None:
            _registry = build_registry()
        return _registry


def reload_registry() -> Registry:
    """Rebuild the registry, for example after installing a plugin package in this process."""
    global _registry
    with _lock:
        _registry = build_registry()
        return _registry
