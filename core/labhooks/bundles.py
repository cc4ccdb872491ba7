"""Bundles: one ``.safetensors`` file per fitted or trained result.

The tensors hold the parameters. The safetensors metadata contains one JSON manifest under
the key ``labhooks.manifest``: the format name and schema version, the plugin and method
with their versions and config, each intervention's class, site, positions and config,
named extra tensors (for results that are not interventions, such as a label model's
parameters), the model the bundle was made for and the labhooks version. No pickle is
used anywhere, and writes are atomic.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from labhooks._version import __version__
from labhooks.errors import BundleError, PluginError, SiteError
from labhooks.intervention import Intervention

FORMAT_NAME = "labhooks.bundle"
SCHEMA_VERSION = 1
MANIFEST_KEY = "labhooks.manifest"


@dataclass
class Bundle:
    """A loaded bundle: rebuilt interventions, extra tensors and the manifest."""

    interventions: list[Intervention]
    tensors: dict[str, torch.Tensor]
    manifest: dict[str, Any]
    path: Path | None = None

    @property
    def plugin(self) -> str | None:
        return self.manifest.get("plugin", {}).get("name")

    @property
    def method(self) -> str | None:
        return self.manifest.get("method", {}).get("name")

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.manifest.get("method", {}).get("config", {}))

    @property
    def model_info(self) -> dict[str, Any]:
        return dict(self.manifest.get("model") or {})


@dataclass
class ModelInfo:
    """The facts a bundle records about the model it was made for."""

    name_or_path: str | None = None
    model_type: str | None = None
    hidden_size: int | None = None
    num_layers: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_model(cls, model: nn.Module) -> ModelInfo:
        from labhooks.resolve import ModelSites, unwrap_model

        root = unwrap_model(model)
        config = getattr(root, "config", None)
        name = getattr(config, "_name_or_path", None) or getattr(root, "labhooks_name", None)
        try:
            model_sites = ModelSites(root)
            hidden, layers = model_sites.hidden_size(), model_sites.num_layers()
        except Exception:  # noqa: BLE001 - a model without sites still gets its name recorded
            hidden, layers = None, None
        return cls(str(name) if name else None, getattr(config, "model_type", None), hidden, layers)

    def as_dict(self) -> dict[str, Any]:
        data = {
            "name_or_path": self.name_or_path,
            "model_type": self.model_type,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
        }
        data.update(self.extra)
        return data


def _plugin_version(plugin: str | None) -> str | None:
    if plugin is None:
        return None
    from labhooks.plugins import get_registry

    info = get_registry().plugins.get(plugin)
    return info.version if info is not None else None


def save_bundle(
    path: str | os.PathLike[str],
    interventions: Iterable[Intervention] = (),
    *,
    plugin: str | None = None,
    method: str | None = None,
    config: Mapping[str, Any] | None = None,
    model: nn.Module | ModelInfo | Mapping[str, Any] | None = None,
    tensors: Mapping[str, torch.Tensor] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write interventions and extra tensors to one bundle file, atomically.

    The file appears under its final name only once it is complete: it is written to a
    temporary file in the same folder and renamed, so a crash or Ctrl-C leaves no partial
    bundle. Raises :class:`BundleError` when an intervention cannot be saved.
    """
    target = Path(path)
    if target.suffix != ".safetensors":
        raise BundleError(f"bundle path {str(target)!r} must end in .safetensors")
    if target.is_dir():
        raise BundleError(f"bundle path {str(target)!r} is a folder; give a file name ending in .safetensors")

    entries = []
    payload: dict[str, torch.Tensor] = {}
    for index, intervention in enumerate(interventions):
        if not intervention.name:
            raise BundleError(f"{type(intervention).__name__} has no registry name (class attribute 'name'), so it cannot be saved")
        intervention_config = intervention.config()
        tensor_entries = {}
        for key, tensor in intervention.state_dict().items():
            if tensor.device.type == "meta":
                raise BundleError(f"parameter {key!r} of {intervention.name} at {intervention.site} is on the meta device")
            stored = f"interventions.{index}.{key}"
            payload[stored] = tensor.detach().to("cpu").contiguous()
            tensor_entries[key] = {"key": stored, "shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}
        entries.append(
            {
                "class": intervention.name,
                "site": str(intervention.site),
                "positions": str(intervention.positions),
                "config": intervention_config,
                "tensors": tensor_entries,
            }
        )

    extra_entries = {}
    for name, tensor in (tensors or {}).items():
        stored = f"tensors.{name}"
        payload[stored] = tensor.detach().to("cpu").contiguous()
        extra_entries[name] = {"key": stored, "shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}

    if isinstance(model, nn.Module):
        model_data: dict[str, Any] | None = ModelInfo.from_model(model).as_dict()
    elif isinstance(model, ModelInfo):
        model_data = model.as_dict()
    else:
        model_data = dict(model) if model is not None else None

    manifest = {
        "format": FORMAT_NAME,
        "schema_version": SCHEMA_VERSION,
        "labhooks_version": __version__,
        "plugin": {"name": plugin, "version": _plugin_version(plugin)},
        "method": {"name": method, "config": dict(config or {})},
        "model": model_data,
        "interventions": entries,
        "tensors": extra_entries,
        "metadata": dict(metadata or {}),
    }
    try:
        manifest_text = json.dumps(manifest, sort_keys=True)
    except TypeError as error:
        raise BundleError(f"the bundle manifest must be JSON-serialisable: {error}") from None

    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(descriptor)
    try:
        save_file(payload, temporary, metadata={MANIFEST_KEY: manifest_text})
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        # mkstemp creates the file readable by its owner only; give it the usual permissions.
        os.chmod(temporary, 0o666 & ~_current_umask())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return target


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _migrate(manifest: dict[str, Any], path: Path) -> dict[str, Any]:
    """Bring a manifest of an older schema version to the current one."""
    version = manifest.get("schema_version")
    if not isinstance(version, int):
        raise BundleError(f"{path}: the manifest has no integer schema_version")
    if version > SCHEMA_VERSION:
        raise BundleError(
            f"{path} was written with bundle schema version {version}, newer than this labhooks "
            f"({__version__}) reads (up to {SCHEMA_VERSION}); upgrade labhooks"
        )
    # Version 1 is the first schema. A later version adds one step here per older version.
    return manifest


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a bundle's manifest without loading its tensors."""
    source = Path(path)
    if not source.is_file():
        raise BundleError(f"bundle {str(source)!r} not found")
    try:
        with safe_open(str(source), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise BundleError(f"{source} is not a readable safetensors file ({error}); it may be truncated or corrupted") from None
    text = metadata.get(MANIFEST_KEY)
    if text is None:
        raise BundleError(f"{source} is a safetensors file but not a labhooks bundle (no {MANIFEST_KEY!r} metadata)")
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as error:
        raise BundleError(f"{source}: the bundle manifest is not valid JSON ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise BundleError(
            f"{source}: the manifest format is {manifest.get('format') if isinstance(manifest, dict) else None!r}, expected {FORMAT_NAME!r}"
        )
    return _migrate(manifest, source)


def _load_tensor(handle: Any, entry: Mapping[str, Any], where: str, path: Path) -> torch.Tensor:
    key = entry.get("key")
    if key not in handle.keys():
        raise BundleError(f"{path}: tensor {key!r} for {where} is listed in the manifest but missing from the file")
    try:
        tensor = handle.get_tensor(key)
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise BundleError(f"{path}: tensor {key!r} for {where} cannot be read ({error}); the file may be corrupted") from None
    expected_shape = list(entry.get("shape", []))
    if list(tensor.shape) != expected_shape:
        raise BundleError(f"{path}: {where} has shape {list(tensor.shape)} in the file but {expected_shape} in the manifest")
    expected_dtype = entry.get("dtype")
    if expected_dtype and str(tensor.dtype).removeprefix("torch.") != expected_dtype:
        raise BundleError(f"{path}: {where} has dtype {tensor.dtype} in the file but {expected_dtype} in the manifest")
    return tensor


def check_model(manifest: Mapping[str, Any], model: nn.Module, path: str | Path = "bundle") -> None:
    """Raise :class:`BundleError` when a model's hidden size or layer count differs from the bundle's."""
    recorded = manifest.get("model") or {}
    actual = ModelInfo.from_model(model)
    for key in ("hidden_size", "num_layers"):
        expected = recorded.get(key)
        found = getattr(actual, key)
        if expected is not None and found is not None and expected != found:
            raise BundleError(
                f"{path} was made for a model with {key}={expected} ({recorded.get('name_or_path')}), "
                f"but the model given has {key}={found} ({actual.name_or_path}); load it with the model it was made for"
            )


def load_bundle(path: str | os.PathLike[str], model: nn.Module | None = None) -> Bundle:
    """Load a bundle and rebuild its interventions through the plugin registry.

    Every tensor is checked against the manifest. With ``model``, the bundle's model facts
    and every intervention's width are checked against it too, and errors name the site and
    parameter. Raises :class:`BundleError` on any mismatch or damaged file.
    """
    from labhooks.plugins import get_registry

    source = Path(path)
    manifest = read_manifest(source)
    if model is not None:
        check_model(manifest, model, source)

    registry = get_registry()
    interventions: list[Intervention] = []
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(source), framework="pt") as handle:
            for index, entry in enumerate(manifest.get("interventions", [])):
                class_name = entry.get("class")
                where = f"intervention {index} ({class_name} at {entry.get('site')})"
                try:
                    intervention_class = registry.intervention_class(class_name)
                except PluginError as error:
                    raise BundleError(f"{source}: {error}") from None
                try:
                    intervention = intervention_class.from_config(entry["site"], entry["positions"], entry.get("config", {}))
                except (TypeError, ValueError, KeyError) as error:
                    raise BundleError(f"{source}: cannot rebuild {where} from its config: {error}") from None
                state = {}
                for name, tensor_entry in entry.get("tensors", {}).items():
                    state[name] = _load_tensor(handle, tensor_entry, f"parameter {name!r} of {where}", source)
                own = intervention.state_dict()
                for name, tensor in state.items():
                    if name not in own:
                        raise BundleError(f"{source}: {where} has no parameter {name!r} in this version of {class_name}")
                    if own[name].shape != tensor.shape:
                        raise BundleError(
                            f"{source}: parameter {name!r} of {where} has shape {list(tensor.shape)}, but its config "
                            f"builds {list(own[name].shape)}"
                        )
                missing = sorted(set(own) - set(state))
                if missing:
                    raise BundleError(f"{source}: {where} is missing parameters {missing}")
                intervention.load_state_dict(state)
                interventions.append(intervention)
            for name, tensor_entry in manifest.get("tensors", {}).items():
                tensors[name] = _load_tensor(handle, tensor_entry, f"tensor {name!r}", source)
    except (SafetensorError, OSError) as error:
        raise BundleError(f"{source} cannot be read ({error}); it may be truncated or corrupted") from None

    if model is not None:
        from labhooks.resolve import ModelSites

        model_sites = ModelSites(model)
        for intervention in interventions:
            for resolved in model_sites.resolve(intervention.site):
                try:
                    intervention.check_width(resolved.width, resolved.site)
                except SiteError as error:
                    raise BundleError(f"{source}: {error}") from None
    return Bundle(interventions, tensors, manifest, source)
