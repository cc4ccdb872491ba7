"""labhooks: edit what a transformer computes with forward hooks at named sites.

The public surface is listed in ``__all__``::

    import labhooks
    loaded = labhooks.load_model()                      # the embedded default model
    vector = labhooks.SteeringVector("post_block[12]", direction, scale=4.0, positions="generated")
    with labhooks.attach(loaded.model, vector):
        loaded.model.generate(...)
"""

from labhooks._version import __version__
from labhooks.aggregators import Aggregator, LabelMatrixError
from labhooks.architectures import ArchitectureAdapter, TowerLayout
from labhooks.attach import ActivationRecord, AttachHandle, attach, record
from labhooks.bundles import Bundle, ModelInfo, load_bundle, read_manifest, save_bundle
from labhooks.config import build_config, fields_of, option
from labhooks.errors import (
    BundleError,
    ConfigError,
    LabhooksError,
    ModelLoadError,
    PluginError,
    PositionError,
    SiteError,
)
from labhooks.hookspecs import hookimpl
from labhooks.intervention import FunctionIntervention, Intervention, InterventionContext, SteeringVector
from labhooks.methods import Method, MethodInputs, MethodResult, ReportTable
from labhooks.models import LoadedModel, load_model
from labhooks.plugins import get_registry, reload_registry
from labhooks.positions import ForwardContext, Positions
from labhooks.resolve import ModelSites, ResolvedSite, sites
from labhooks.sites import Site, SiteSpec, parse_site

__all__ = [
    "ActivationRecord",
    "Aggregator",
    "ArchitectureAdapter",
    "AttachHandle",
    "Bundle",
    "BundleError",
    "ConfigError",
    "ForwardContext",
    "FunctionIntervention",
    "Intervention",
    "InterventionContext",
    "LabelMatrixError",
    "LabhooksError",
    "LoadedModel",
    "Method",
    "MethodInputs",
    "MethodResult",
    "ModelInfo",
    "ModelLoadError",
    "ModelSites",
    "PluginError",
    "PositionError",
    "Positions",
    "ReportTable",
    "ResolvedSite",
    "Site",
    "SiteError",
    "SiteSpec",
    "SteeringVector",
    "TowerLayout",
    "__version__",
    "attach",
    "build_config",
    "fields_of",
    "get_registry",
    "hookimpl",
    "load_bundle",
    "load_model",
    "option",
    "parse_site",
    "read_manifest",
    "record",
    "reload_registry",
    "save_bundle",
    "sites",
]
