"""Resolution of site strings to modules of one model, and the site listing.

:class:`ModelSites` binds an architecture adapter to a model instance. It checks every
index against the model before any hook is registered, and lists what the model offers
for ``labhooks sites``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

from labhooks.architectures import ArchitectureAdapter, TowerLayout, find_adapter, model_type_of, structural_adapter
from labhooks.errors import SiteError
from labhooks.sites import Site, SiteSpec, parse_site


@dataclass(frozen=True)
class ResolvedSite:
    """A concrete site bound to the module whose hook edits it.

    ``hook`` is "output" (a forward hook on the module output, or on its first element when
    the module returns a tuple) or "input" (a forward pre-hook on the first argument, used
    for heads). ``num_heads`` and ``head_dim`` are set for head sites.
    """

    site: Site
    module: nn.Module
    module_path: str
    hook: str
    width: int | None
    num_heads: int | None = None
    head_dim: int | None = None


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the transformers model inside a peft wrapper; other models are returned as is."""
    get_base_model = getattr(model, "get_base_model", None)
    if callable(get_base_model):
        base = get_base_model()
        if isinstance(base, nn.Module):
            return base
    return model


def _first_attribute(config: Any, names: Iterable[str]) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


class ModelSites:
    """The sites of one model, resolved through its architecture adapter."""

    def __init__(self, model: nn.Module, adapters: tuple[ArchitectureAdapter, ...] | None = None) -> None:
        if adapters is None:
            from labhooks.plugins import get_registry

            adapters = get_registry().adapters
        self.model = unwrap_model(model)
        adapter = find_adapter(self.model, adapters) or structural_adapter(self.model)
        if adapter is None:
            raise SiteError(
                f"cannot find the blocks of {type(self.model).__name__} (model_type "
                f"{model_type_of(self.model)!r}): no architecture adapter matches and no block list "
                "was found. Add an adapter through a plugin (see CONTRIBUTING.md, 'Add an architecture')."
            )
        self.adapter = adapter
        self._layers: dict[str, tuple[str, nn.ModuleList]] = {}
        for tower, layout in adapter.towers.items():
            found = self._find_path(layout.layers)
            if found is not None:
                self._layers[tower] = (found, self.model.get_submodule(found))  # type: ignore[assignment]
        if not self._layers:
            tried = ", ".join(path for layout in adapter.towers.values() for path in layout.layers)
            raise SiteError(f"adapter {adapter.name!r} found no block list in {type(self.model).__name__} (tried {tried})")

    # Model facts -----------------------------------------------------------------------

    @property
    def towers(self) -> list[str]:
        return list(self._layers)

    def _tower(self, name: str | None) -> tuple[str, TowerLayout]:
        tower = name or self.adapter.default_tower
        if tower not in self._layers:
            tower = name or next(iter(self._layers))
        if tower not in self._layers:
            raise SiteError(f"unknown tower {name!r}: this model has towers {', '.join(self._layers)}")
        return tower, self.adapter.towers[tower]

    def _config(self, layout: TowerLayout) -> Any:
        config = getattr(self.model, "config", None)
        if layout.config_attribute and config is not None:
            config = getattr(config, layout.config_attribute, config)
        return config

    def num_layers(self, tower: str | None = None) -> int:
        tower, _ = self._tower(tower)
        return len(self._layers[tower][1])

    def hidden_size(self, tower: str | None = None) -> int | None:
        tower, layout = self._tower(tower)
        size = _first_attribute(self._config(layout), ("hidden_size", "n_embd", "d_model", "width"))
        if size is None:
            block = self._layers[tower][1][0]
            attention = getattr(block, "attn", None)
            size = getattr(attention, "embed_dim", None)
        return int(size) if size is not None else None

    def head_shape(self, tower: str | None = None) -> tuple[int, int] | None:
        """Return (heads, head_dim) at the attention output projection, or None if unaddressable."""
        tower, layout = self._tower(tower)
        if layout.attention_output_projection is None:
            return None
        config = self._config(layout)
        heads = _first_attribute(config, ("num_attention_heads", "n_head", "num_heads"))
        hidden = self.hidden_size(tower)
        if heads is None or hidden is None:
            return None
        head_dim = getattr(config, "head_dim", None) or hidden // int(heads)
        return int(heads), int(head_dim)

    def is_parallel(self) -> bool:
        return self.adapter.is_parallel(getattr(self.model, "config", None))

    # Resolution ------------------------------------------------------------------------

    def _find_path(self, candidates: Iterable[str]) -> str | None:
        for path in candidates:
            try:
                self.model.get_submodule(path)
            except AttributeError:
                continue
            return path
        return None

    def valid_sites_text(self, tower: str | None = None) -> str:
        tower_name, layout = self._tower(tower)
        count = self.num_layers(tower_name)
        names = []
        if self._find_path(layout.embeddings):
            names.append("embeddings")
        if layout.attention:
            names.append("pre_mlp[l]")
            if self.head_shape(tower_name):
                names.append("pre_mlp[l].heads[h]")
        if layout.mlp:
            names.append("post_mlp[l]")
        names.append("post_block[l]")
        if self._find_path(layout.logits):
            names.append("logits")
        text = f"valid sites are {', '.join(names)}; the model has {count} layers (0 to {count - 1})"
        if len(self._layers) > 1:
            text += f" in tower {tower_name!r}; towers: {', '.join(self._layers)} (prefix a site with 'vision.')"
        return text

    def resolve(self, spec: str | SiteSpec | Site) -> list[ResolvedSite]:
        """Resolve a site string to the modules to hook. Raises before anything is registered."""
        parsed = parse_site(spec)
        tower, layout = self._tower(parsed.tower)
        layers_path, layers = self._layers[tower]
        head_shape = self.head_shape(tower)
        try:
            sites = parsed.expand(len(layers), head_shape[0] if head_shape else None)
        except SiteError as error:
            raise SiteError(f"{error}. For {type(self.model).__name__}: {self.valid_sites_text(tower)}") from None

        width = self.hidden_size(tower)
        resolved = []
        for site in sites:
            if site.kind in ("embeddings", "logits"):
                candidates = layout.embeddings if site.kind == "embeddings" else layout.logits
                path = self._find_path(candidates)
                if path is None:
                    raise SiteError(f"site {site} does not exist on {type(self.model).__name__}: {self.valid_sites_text(tower)}")
                module = self.model.get_submodule(path)
                site_width = width
                if site.kind == "logits":
                    site_width = getattr(module, "out_features", None)
                elif isinstance(module, nn.Embedding):
                    site_width = module.embedding_dim
                elif isinstance(module, nn.Linear):
                    site_width = module.out_features
                elif isinstance(getattr(module, "output_dim", None), int):
                    site_width = int(module.output_dim)  # type: ignore[arg-type]
                resolved.append(ResolvedSite(site, module, path, "output", site_width))
                continue

            layer = int(site.layer)  # type: ignore[arg-type]
            block_path = f"{layers_path}.{layer}"
            if site.kind == "post_block":
                resolved.append(ResolvedSite(site, layers[layer], block_path, "output", width))
                continue
            if site.heads is not None:
                assert head_shape is not None and layout.attention_output_projection is not None
                path = f"{block_path}.{layout.attention_output_projection}"
                module = self.model.get_submodule(path)
                resolved.append(ResolvedSite(site, module, path, "input", head_shape[1], head_shape[0], head_shape[1]))
                continue
            relative = layout.attention if site.kind == "pre_mlp" else layout.mlp
            if relative is None:
                raise SiteError(f"site {site} does not exist on {type(self.model).__name__}: {self.valid_sites_text(tower)}")
            path = f"{block_path}.{relative}"
            resolved.append(ResolvedSite(site, self.model.get_submodule(path), path, "output", width))
        return resolved

    def table(self) -> list[dict[str, Any]]:
        """List every site family of the model: tower, site, module path, width and count."""
        rows = []
        for tower in self._layers:
            prefix = f"{tower}." if len(self._layers) > 1 else ""
            count = self.num_layers(tower)
            specs = ["embeddings", "pre_mlp[*]", "pre_mlp[*].heads[*]", "post_mlp[*]", "post_block[*]", "logits"]
            for spec in specs:
                try:
                    resolved = self.resolve(prefix + spec)
                except SiteError:
                    continue
                first = resolved[0]
                path = first.module_path
                if first.site.layer is not None:
                    path = path.replace(f".{first.site.layer}.", ".{l}.", 1).replace(f".{first.site.layer}", ".{l}")
                shape = f"{first.num_heads} x {first.head_dim}" if first.num_heads else str(first.width)
                rows.append(
                    {
                        "tower": tower if len(self._layers) > 1 else "",
                        "site": prefix + spec.replace("[*]", "[l]", 1).replace("heads[*]", "heads[h]"),
                        "module": path,
                        "hook": first.hook,
                        "width": shape,
                        "layers": count if first.site.layer is not None else "",
                    }
                )
        return rows


def sites(model: nn.Module) -> ModelSites:
    """Return the resolved sites of a model; ``sites(model).table()`` lists them."""
    return ModelSites(model)
