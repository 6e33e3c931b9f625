"""A sweep's cells: one :class:`Cell` per image, and the expansion of a spec into them."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from adapterswap.sweep.spec import SweepSpec


def preset_size(preset: str | None, backbone_cls: Any) -> tuple[int, int]:
    """``(height, width)`` a backbone's images have by default under ``preset``: its declared
    :attr:`tiny_size <adapterswap.backbone.Backbone.tiny_size>` for ``tiny`` (where it
    declares one), else its ``default_height`` x ``default_width``. ``sweep``, ``generate``,
    ``--dry-run`` and the contract tests all read this one rule."""
    tiny = getattr(backbone_cls, "tiny_size", None)
    if preset == "tiny" and tiny:
        return int(tiny[0]), int(tiny[1])
    return int(backbone_cls.default_height), int(backbone_cls.default_width)


@dataclass(frozen=True)
class Cell:
    """One image of the sweep. Its key hashes every field and the software versions."""

    backbone: str
    adapter: str
    scale: float | None
    start: float
    end: float
    reference: str
    prompt: str
    seed: int
    steps: int
    height: int
    width: int
    guidance_scale: float | None
    source: str
    adapter_source: str
    dtype: str
    adapter_options: str = "{}"
    trajectory: bool = False
    probes: bool = False
    backbone_options: str = "{}"
    #: the enhancer acting on the steps (:mod:`adapterswap.enhancer`), canonical
    #: ``NAME[:k=v,...]``, or ``"none"``
    enhancer: str = "none"

    def config(self) -> dict[str, Any]:
        return asdict(self)

    def key(self, versions: Mapping[str, str],
            identity: Mapping[str, Any] | None = None) -> str:
        """sha256 of the cell's fields, the software versions and ``identity``: what else
        changes its pixels or scores (code hash, weights identity, reference content, device
        kind, dtype, metric options: :meth:`Provenance.cell_identity
        <adapterswap.sweep.provenance.Provenance.cell_identity>`)."""
        cell = self.config()
        if cell["enhancer"] == "none":  # keys of cells made before enhancers existed
            del cell["enhancer"]
        payload = {"cell": cell, "versions": dict(versions)}
        if identity is not None:
            # the weights' identity replaces where they were read from: the same weights
            # moved to another folder resume, other weights at the same path do not
            del cell["source"], cell["adapter_source"]
            payload["identity"] = dict(identity)
        text = json.dumps(payload, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    def group(self) -> tuple[Any, ...]:
        """Cells that share a loaded backbone, adapter setting, reference and prompt."""
        return (self.backbone, self.adapter, self.scale, self.start, self.end, self.reference,
                self.prompt, self.height, self.width, self.guidance_scale, self.enhancer)

    def setting(self) -> tuple[str, float | None, float, float, str]:
        """The adapter setting: name, scale, start, end, and the enhancer acting with it."""
        return (self.adapter, self.scale, self.start, self.end, self.enhancer)


def expand(spec: SweepSpec) -> list[Cell]:
    """Every cell of a validated spec, in a stable order: backbones x references x adapter
    settings (each with every enhancer; adapter-off cells with none) x prompts x seeds x step
    counts."""
    from adapterswap.plugins import get_backbone

    out = []
    for backbone in spec.backbones:
        cls = get_backbone(backbone)
        spec._resolved_sources[backbone] = _source_of(spec, backbone, cls)
        adapter = spec.adapter_for(cls)
        refs = spec.references if adapter else [""]
        for ref in refs:
            for adapter_name, scale, start, end in adapter_settings(spec, adapter):
                acts = adapter_name != "none" and (spec.enhancer_backbones is None
                                                   or backbone in spec.enhancer_backbones)
                enhancers = spec.enhancers if acts else ["none"]
                for enhancer in enhancers or ["none"]:
                    for prompt in spec.prompts:
                        for seed in spec.seeds:
                            for steps in spec.step_grid(cls):
                                out.append(_cell(
                                    spec, cls, backbone, adapter_name, scale, start, end, ref,
                                    prompt, seed, steps, enhancer))
    return out


def adapter_settings(spec: SweepSpec, adapter: str | None) -> list[tuple[str, float | None,
                                                                       float, float]]:
    """(adapter, scale, start, end) variants: the scale x window grid, plus 'none'."""
    if adapter is None:
        return [("none", None, 0.0, 1.0)]
    scales = spec.scales or [spec.scale]
    windows = spec.windows or [[spec.start, spec.end]]
    settings = [(adapter, s, w[0], w[1]) for s in scales for w in windows]
    if spec.adapter_off:
        settings.append(("none", None, 0.0, 1.0))
    return settings


def _source_of(spec: SweepSpec, name: str, cls: Any) -> str:
    """The source a model loads from: the preset, the spec's, config.toml's, or the
    plugin's default (never ``""``: cells of different sources must not share keys)."""
    from adapterswap.config import configured_source

    if spec.preset:
        return spec.preset
    return spec.sources.get(name) or configured_source(name) or cls.default_source


def _cell(spec: SweepSpec, cls: Any, backbone: str, adapter: str, scale: float | None,
          start: float, end: float, ref: str, prompt: str, seed: int, steps: int,
          enhancer: str = "none") -> Cell:
    on = adapter != "none"
    tiny = spec.preset or ""
    height, width = spec.size(cls)
    if on and adapter not in spec._resolved_sources:
        from adapterswap.plugins import get_adapter

        spec._resolved_sources[adapter] = spec.adapter_source or _source_of(
            spec, adapter, get_adapter(adapter))
    return Cell(
        backbone=backbone, adapter=adapter, scale=scale, start=start, end=end,
        reference=ref, prompt=prompt, seed=seed, steps=steps,
        height=height, width=width,
        guidance_scale=spec.guidance_scale,
        source=spec._resolved_sources.get(backbone) or spec.sources.get(backbone, tiny),
        adapter_source=spec._resolved_sources.get(adapter, spec.adapter_source or tiny)
        if on else "",
        dtype=spec.dtype or "",
        adapter_options=json.dumps(spec.adapter_options, sort_keys=True) if on else "{}",
        trajectory=spec.trajectory,
        probes=spec.probes,
        backbone_options=json.dumps(spec.options_for(backbone), sort_keys=True),
        enhancer=enhancer,
    )
