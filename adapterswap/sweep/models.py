"""The one model factory of ``generate`` and ``sweep``: backbones, adapters, references and
their encodings, each loaded or computed once.

- a backbone by name, with the preset (``tiny``: tiny random components built on the CPU and
  moved to ``device``; ``random``: random weights at the published size; none: real weights
  from ``sources``, a config file, the HF cache or the Hub), ``device``, ``dtype`` and the
  backbone's own options;
- the adapter of a name: ONE object per name, shared by every backbone (attaching moves it:
  the training-free swap);
- reference images (``synthetic:N`` is the adapter's synthetic reference N), cached and, with a
  ``reference_folder``, saved there once;
- an adapter's encoding of a reference, cached per loaded backbone and reference (it does not
  depend on scale, window, prompt, seed or steps);
- the :class:`~adapterswap.fastpath.Accelerator` of each loaded backbone: ONE per backbone
  object, since compiled and float8 modules cannot be changed back, so enabling it again
  (another sweep part, ``generate`` after a sweep) sees what was already done.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


class ModelFactory:
    """Loads and caches the models of one command.

    :param preset: ``None`` (real weights), ``"tiny"`` or ``"random"``.
    :param sources: backbone name -> weights (Hub id or local directory).
    :param backbone_options: backbone name -> constructor options (``cpu_offload=True``...).
    :param adapter_kwargs: the adapter's constructor settings (``scale``, ``start``, ``end``
        and its own options).
    :param reference_folder: where reference images are saved (named by a hash of the
        reference), or ``None``.
    """

    def __init__(self, *, preset: str | None = None, device: str | None = None,
                 dtype: Any = None, sources: Mapping[str, str | None] | None = None,
                 backbone_options: Mapping[str, Mapping[str, Any]] | None = None,
                 adapter_source: str | None = None,
                 adapter_kwargs: Mapping[str, Any] | None = None,
                 reference_folder: str | Path | None = None) -> None:
        self.preset = preset
        self.device = device
        self.dtype = dtype
        self.sources = dict(sources or {})
        self.backbone_options = {k: dict(v) for k, v in (backbone_options or {}).items()}
        self.adapter_source = adapter_source
        self.adapter_kwargs = dict(adapter_kwargs or {})
        self.reference_folder = Path(reference_folder) if reference_folder else None
        #: the adapters built so far, by name
        self.adapters: dict[str, Any] = {}
        self._references: dict[str, Any] = {}
        self._conditionings: dict[tuple[Any, ...], Any] = {}
        self._accelerators: dict[int, Any] = {}

    @classmethod
    def from_spec(cls, spec: Any, *, reference_folder: str | Path | None = None
                  ) -> ModelFactory:
        """The factory of a :class:`~adapterswap.sweep.spec.SweepSpec`."""
        return cls(preset=spec.preset, device=spec.device, dtype=spec.dtype,
                   sources=spec.sources,
                   backbone_options={name: spec.options_for(name) for name in spec.backbones},
                   adapter_source=spec.adapter_source,
                   adapter_kwargs={"scale": spec.scale, "start": spec.start, "end": spec.end,
                                   **spec.adapter_options},
                   reference_folder=reference_folder)

    # ------------------------------------------------------------------ backbones
    def backbone(self, name: str) -> Any:
        """A loaded backbone (a new one per call: the caller unloads it when done)."""
        from adapterswap.plugins import get_backbone

        cls = get_backbone(name)
        options = self.backbone_options.get(name) or {}  # none given: none passed
        if self.preset == "tiny":  # built on the CPU; moved where the command asks
            backbone = cls.tiny(seed=0, **options)
            return backbone.to(self.device) if self.device else backbone
        if self.preset == "random":
            return cls.random(device=self.device, dtype=self.dtype, seed=0, **options)
        return cls(self.sources.get(name), device=self.device, dtype=self.dtype,
                   **options).load()

    def accelerator(self, backbone: Any) -> Any:
        """The :class:`~adapterswap.fastpath.Accelerator` of ``backbone`` (made on first use,
        then the same one until :meth:`forget`): the engine and ``generate`` enable the fast
        path through it and hand it to the denoising loop."""
        from adapterswap.fastpath import Accelerator

        accelerator = self._accelerators.get(id(backbone))
        if accelerator is None or accelerator.backbone is not backbone:
            accelerator = self._accelerators[id(backbone)] = Accelerator(backbone)
        return accelerator

    def check_weights(self, names: Sequence[str]) -> None:
        """Fail now, before anything is written or loaded, when a backbone's weights cannot be
        found without the network: a missing or incomplete local folder, or ``HF_HUB_OFFLINE``
        with the files absent from the HF cache (the check :meth:`Backbone.load` makes first:
        :class:`~adapterswap.errors.WeightsNotFoundError`). Presets need no weights; a Hub id
        that is not cached is left to the download."""
        if self.preset:
            return
        from adapterswap.config import configured_source
        from adapterswap.hub import resolve_source
        from adapterswap.plugins import get_backbone

        for name in names:
            cls = get_backbone(name)
            source = self.sources.get(name) or configured_source(name) or cls.default_source
            resolve_source(str(source), what=f"backbone {name!r}", required=cls.required_files,
                           how_to_get=cls.how_to_get)

    # ------------------------------------------------------------------ adapters
    def adapter(self, name: str, backbone: Any = None) -> Any:
        """The one adapter object of ``name`` (built on first use). The tiny and random
        presets build weights that fit ``backbone``; real weights need no backbone, so a
        command can check the adapter before loading anything heavy."""
        from adapterswap.plugins import get_adapter

        if name not in self.adapters:
            cls = get_adapter(name)
            if self.preset == "tiny":
                adapter = cls.tiny(backbone, seed=0, **self.adapter_kwargs)
            elif self.preset == "random":
                adapter = cls.random(backbone, seed=0, **self.adapter_kwargs)
            else:
                adapter = cls(self.adapter_source, **self.adapter_kwargs)
            self.adapters[name] = adapter
        return self.adapters[name]

    def detach_all(self, backbone: Any) -> None:
        """Detach every adapter attached to ``backbone`` (it is then exactly the plain
        backbone again)."""
        for adapter in self.adapters.values():
            if adapter.attached_to is backbone:
                adapter.detach()

    # ------------------------------------------------------------------ references
    def reference_image(self, ref: str, adapter_name: str) -> Any:
        """The image of a reference: a file, or ``synthetic:N`` of the adapter's kind;
        ``None`` for an embedding file (:mod:`adapterswap.references`), which has no image."""
        from adapterswap.adapter import load_image
        from adapterswap.plugins import get_adapter
        from adapterswap.references import is_embedding

        if is_embedding(ref):
            return None
        cache_key = f"{adapter_name}|{ref}"
        if cache_key not in self._references:
            if ref.startswith("synthetic:"):
                image = get_adapter(adapter_name).tiny_reference(seed=int(ref.split(":")[1]))
            else:
                image = load_image(ref, argument="references")
            self._references[cache_key] = image
            self._save_reference(ref, image)
        return self._references[cache_key]

    def _save_reference(self, ref: str, image: Any) -> None:
        if self.reference_folder is None:
            return
        self.reference_folder.mkdir(parents=True, exist_ok=True)
        path = self.reference_folder / (hashlib.sha256(ref.encode()).hexdigest()[:16] + ".png")
        if not path.exists():
            image.save(path)

    def conditioning(self, adapter: Any, backbone: Any, ref: str) -> Any:
        """The adapter's encoding of reference ``ref`` for ``backbone``, computed once per
        loaded backbone and reference (``None`` without an adapter). The adapter is given the
        file path of a real reference, so that its errors name the file."""
        if adapter is None:
            return None
        key = (id(backbone), adapter.name, ref)
        if key not in self._conditionings:
            image = self.reference_image(ref, adapter.name)
            source = image if ref.startswith("synthetic:") else ref
            self._conditionings[key] = adapter.encode_reference(source, backbone)
        return self._conditionings[key]

    def forget(self, backbone: Any) -> None:
        """Drop the encodings and the accelerator made for ``backbone`` (before it is
        unloaded)."""
        self._conditionings = {k: v for k, v in self._conditionings.items()
                               if k[0] != id(backbone)}
        accelerator = self._accelerators.get(id(backbone))
        if accelerator is not None and accelerator.backbone is backbone:
            del self._accelerators[id(backbone)]
