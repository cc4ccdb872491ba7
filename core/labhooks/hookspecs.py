"""Hook specifications: the contract between labhooks and its plugins.

A plugin is a module registered under the ``labhooks`` entry-point group that implements
any of these hooks with ``@labhooks.hookimpl``. Each hook returns a list; labhooks
collects the lists of every plugin and builds one registry from them.
"""

from __future__ import annotations

from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("labhooks")
hookimpl = pluggy.HookimplMarker("labhooks")


@hookspec
def labhooks_methods() -> list[Any]:  # type: ignore[empty-body]
    """Return the plugin's :class:`labhooks.Method` objects (named recipes with a typed config).

    The first method is the plugin's default, used by ``labhooks apply plugin=NAME`` when no
    ``method=`` is given.
    """


@hookspec
def labhooks_interventions() -> list[Any]:  # type: ignore[empty-body]
    """Return the plugin's :class:`labhooks.Intervention` subclasses.

    Each class's ``name`` must be unique across plugins: bundles store it and
    :func:`labhooks.load_bundle` rebuilds the intervention from it.
    """


@hookspec
def labhooks_trainers() -> list[Any]:  # type: ignore[empty-body]
    """Return the plugin's trainable methods (objects with ``name``, ``config_class`` and ``train``)."""


@hookspec
def labhooks_aggregators() -> list[Any]:  # type: ignore[empty-body]
    """Return the plugin's :class:`labhooks.aggregators.Aggregator` subclasses (label models)."""


@hookspec
def labhooks_architectures() -> list[Any]:  # type: ignore[empty-body]
    """Return :class:`labhooks.ArchitectureAdapter` objects for model families the core lacks."""
