"""Exceptions raised by labhooks.

Every error a user can cause derives from :class:`LabhooksError`, so a caller (the CLI
among them) can catch one type and show the message without a traceback.
"""

from __future__ import annotations


class LabhooksError(Exception):
    """Base class for every error labhooks raises on bad input or a broken file."""


class SiteError(LabhooksError, ValueError):
    """A site string is invalid or does not exist on the model."""


class PositionError(LabhooksError, ValueError):
    """A position selector is invalid."""


class BundleError(LabhooksError):
    """A bundle cannot be written, read, or matched to a model."""


class PluginError(LabhooksError):
    """A plugin, method, intervention class or aggregator is missing or broken."""


class ModelLoadError(LabhooksError):
    """A model cannot be found or loaded."""


class ConfigError(LabhooksError, ValueError):
    """A method or trainer configuration value is invalid."""
