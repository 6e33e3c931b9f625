"""The base class of IP-Adapters run through diffusers' native IP-Adapter support.

:class:`DiffusersIPAdapter` loads an h94-layout IP-Adapter (weight file + CLIP image encoder),
installs it on a UNet backbone's pipeline and moves it between backbones without reloading
(:mod:`adapterswap.kit.ip_adapter_install`), encodes a reference once, and hands the backbone an
:class:`~adapterswap.kit.ip_adapter_inputs.IPAdapterInputs` at every step, with per-layer
scales (:meth:`DiffusersIPAdapter.layer_scales`, e.g. InstantStyle targets from
:mod:`adapterswap.kit.instantstyle`). A subclass names its files and, for the ``random``
preset, supplies :meth:`DiffusersIPAdapter.random_weights`. torch, transformers and diffusers
are imported lazily.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from adapterswap.adapter import Adapter, load_image
from adapterswap.backbone import Backbone
from adapterswap.errors import InvalidArgumentError, UsageError, WeightsNotFoundError
from adapterswap.hub import resolve_source
from adapterswap.kit.instantstyle import block_scales
from adapterswap.kit.ip_adapter_files import (
    check_ip_layers,
    listed,
    missing_image_proj_keys,
    read_ip_adapter_file,
)
from adapterswap.kit.ip_adapter_inputs import IPAdapterInputs
from adapterswap.kit.ip_adapter_install import (
    InstalledIPAdapter,
    IPAdapterModules,
    install_ip_adapter,
    uninstall_ip_adapter,
)
from adapterswap.kit.probe_hooks import ProbeHooks

if TYPE_CHECKING:
    import torch

    from adapterswap.denoise import StepContext, TensorBundle


class DiffusersIPAdapter(Adapter):
    """An h94 IP-Adapter run through diffusers' native IP-Adapter support.

    ``load`` reads the weight file (safetensors, or the legacy ``.bin`` with
    ``weights_only=True``) and the CLIP image encoder once. ``attach`` installs it on a
    backbone's UNet (diffusers builds the modules on the first attach; later attaches move the
    same modules) and registers the image encoder and feature extractor on the pipeline;
    ``detach`` restores the UNet exactly. A reference is encoded once (:meth:`encode_reference`)
    and its embeddings are passed to the backbone at every step with per-layer scales.

    Options: ``weight_name`` (file inside the source, default :attr:`default_weight_name`),
    ``image_encoder_folder`` (default :attr:`default_image_encoder_folder`).
    """

    default_source = "h94/IP-Adapter"
    default_weight_name: ClassVar[str]
    default_image_encoder_folder: ClassVar[str]
    #: True for IP-Adapter Plus (penultimate hidden states), False for the projected embedding.
    uses_hidden_states: ClassVar[bool] = False
    option_names: ClassVar[tuple[str, ...]] = ("weight_name", "image_encoder_folder")
    supports_probes = True
    probe_quantity = "ip/text"

    def __init__(self, source: str | None = None, *, scale: float | None = None,
                 start: float = 0.0, end: float = 1.0, device: str | None = None,
                 dtype: Any = None, **options: Any) -> None:
        for key, value in options.items():
            if key not in self.option_names:
                raise InvalidArgumentError(
                    key, value, f"adapter {self.name!r} takes the options "
                                f"{', '.join(self.option_names)}")
        self._probe_rows: tuple[list[int], int] = ([], 0)
        super().__init__(source, scale=scale, start=start, end=end, device=device,
                         dtype=dtype, **options)
        self.weight_name = str(options.get("weight_name") or self.default_weight_name)
        self.image_encoder_folder = str(options.get("image_encoder_folder")
                                        or self.default_image_encoder_folder)
        self.state_dict: dict[str, dict[str, Any]] | None = None
        self.weight_file: str | None = None
        self.image_encoder: Any = None
        self.feature_extractor: Any = None
        self._modules: IPAdapterModules | None = None
        self._installed: InstalledIPAdapter | None = None
        self._layer_scales: dict[str, float] | None = None

    # -- loading ---------------------------------------------------------------------------
    def load_weights(self) -> None:
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        from adapterswap.weights import load_model

        encoder_config = f"{self.image_encoder_folder}/config.json"
        resolved = resolve_source(self.source, what=f"adapter {self.name!r}",
                                  required=(self.weight_name, encoder_config),
                                  how_to_get=self.how_to_get)
        what = f"adapter {self.name!r}"
        if resolved.local:
            weight_file = str(Path(resolved.source) / self.weight_name)
        else:
            from huggingface_hub import hf_hub_download

            weight_file = hf_hub_download(resolved.source, self.weight_name,
                                          local_files_only=resolved.local_files_only)
        state_dict = read_ip_adapter_file(weight_file, what=what)
        missing = missing_image_proj_keys(state_dict["image_proj"],
                                          plus=self.uses_hidden_states)
        if missing:
            raise WeightsNotFoundError(
                f"{what}: {weight_file!r} is incomplete: the image projection lacks "
                f"{listed([f'image_proj.{k}' for k in missing])}")
        self.state_dict, self.weight_file = state_dict, weight_file
        self.image_encoder = load_model(
            CLIPVisionModelWithProjection, resolved.source, what=what,
            subfolder=self.image_encoder_folder, dtype=self.dtype,
            local_files_only=resolved.local_files_only).to(self.device).eval()
        # h94's encoder folders have no preprocessor config: diffusers then builds this one
        size = self.image_encoder.config.image_size
        self.feature_extractor = CLIPImageProcessor(size=size, crop_size=size)

    @classmethod
    def random(cls, backbone: Backbone, seed: int = 0, **kwargs: Any) -> DiffusersIPAdapter:
        """Random weights at the published size fitting ``backbone``'s UNet, with its image
        encoder (the ``random`` preset); the subclass supplies :meth:`random_weights`."""
        kwargs.setdefault("device", backbone.device)
        kwargs.setdefault("dtype", backbone.dtype)
        adapter = cls(**kwargs)
        adapter.state_dict, adapter.image_encoder, adapter.feature_extractor = \
            cls.random_weights(backbone.pipe.unet, adapter.device, adapter.dtype, seed + 1)
        adapter.loaded = True
        return adapter

    @staticmethod
    def random_weights(unet: Any, device: Any, dtype: Any, seed: int) -> tuple[Any, ...]:
        """(h94-style state dict, image encoder, image processor) with random weights at the
        published size for ``unet``."""
        raise UsageError("this IP-Adapter has no random (published-size) preset")

    # -- attach / detach -------------------------------------------------------------------
    def layer_scales(self, unet: Any) -> dict[str, float]:
        """Scale per IP processor at adapter scale 1 (all 1: a plain IP-Adapter)."""
        return block_scales(unet, 1.0)

    def _attach(self, backbone: Backbone) -> None:
        pipe = backbone.pipe
        layer_scales = self.layer_scales(pipe.unet)  # validate before touching the UNet
        what, where = f"adapter {self.name!r}", str(self.weight_file or self.source)
        if self._modules is None:
            check_ip_layers(self.state_dict["ip_adapter"], pipe.unet, what=what, where=where)
        self.image_encoder.to(device=backbone.device, dtype=backbone.dtype)
        try:
            self._modules, self._installed = install_ip_adapter(
                pipe, self.state_dict, image_encoder=self.image_encoder,
                feature_extractor=self.feature_extractor, modules=self._modules)
        except (KeyError, RuntimeError, ValueError) as exc:  # diffusers building the modules
            if isinstance(exc, UsageError):
                raise
            from adapterswap.weights import first_line

            raise WeightsNotFoundError(
                f"{what}: {where!r} does not fit backbone {backbone.name!r}'s UNet "
                f"({type(exc).__name__}: {first_line(exc)})") from None
        self._layer_scales = layer_scales
        self._install_probe_hooks(backbone)

    def _detach(self, backbone: Backbone) -> None:
        self._install_probe_hooks(None)
        if self._installed is not None:
            uninstall_ip_adapter(self._installed)
        self._installed = None
        self._layer_scales = None

    # -- probes ----------------------------------------------------------------------------
    def set_probe(self, recorder: Any) -> None:
        """Measure ``ip/text`` (``||scale * IP attention|| / ||text attention||``) in every
        IP layer with a non-zero scale, one value per sample; samples outside the adapter's
        window record 0 (the adapter adds nothing there)."""
        super().set_probe(recorder)
        self._install_probe_hooks(self.attached_to)

    def _make_probe_hooks(self, backbone: Backbone) -> ProbeHooks:
        return ProbeHooks(backbone.pipe.unet, self._record_probe)

    def _record_probe(self, layer: str, values: Any) -> None:
        """Spread one UNet forward's values (the active rows, ``[uncond; cond]`` with CFG) over
        the batch ``predict`` got: the conditional rows where active, 0 elsewhere."""
        rows, batch = self._probe_rows
        if self.probe is None or not rows:
            return
        values = values.detach().float().cpu().reshape(-1)[-len(rows):].tolist()
        full = [0.0] * batch
        for row, value in zip(rows, values):
            full[row] = value
        self.probe.record(layer, self.probe_quantity, full)

    # -- reference / steps -----------------------------------------------------------------
    def encode_reference(self, image: Any, backbone: Backbone) -> TensorBundle:
        """CLIP embeddings of the reference and of the unconditional input, as diffusers'
        ``encode_image`` makes them: the projected image embedding and zeros, or (Plus) the
        penultimate hidden states of the image and of an all-zero image. Shape ``(1, 1, ...)``
        (one row, one image)."""
        import torch

        from adapterswap.denoise import TensorBundle

        picture = load_image(image)
        if not self.loaded:
            self.load()
        encoder = self.image_encoder
        param = next(encoder.parameters())
        pixels = self.feature_extractor(picture, return_tensors="pt").pixel_values
        pixels = pixels.to(device=param.device, dtype=param.dtype)
        with torch.no_grad():
            if self.uses_hidden_states:
                cond = encoder(pixels, output_hidden_states=True).hidden_states[-2]
                uncond = encoder(torch.zeros_like(pixels),
                                 output_hidden_states=True).hidden_states[-2]
            else:
                cond = encoder(pixels).image_embeds
                uncond = torch.zeros_like(cond)
        device = backbone.device or param.device
        dtype = backbone.dtype or param.dtype
        return TensorBundle({"image_embeds": cond[:, None].to(device=device, dtype=dtype),
                             "negative_image_embeds": uncond[:, None].to(device=device,
                                                                         dtype=dtype)})

    def denoiser_inputs(self, backbone: Backbone, conditioning: TensorBundle,
                        latents: torch.Tensor, ctx: StepContext,
                        prompt: TensorBundle) -> IPAdapterInputs:
        """The reference's embeddings repeated to the batch and, per row, the layer scales
        times the adapter scale inside the adapter's window (``None`` outside it)."""
        if self._layer_scales is None or self.attached_to is not backbone:
            raise UsageError(f"adapter {self.name!r} is not attached to backbone "
                             f"{backbone.name!r}: call adapter.attach(backbone) first")
        batch = latents.shape[0]
        if conditioning.batch_size == 1 and batch > 1:
            conditioning = conditioning.repeat(batch)
        active = {name: scale * self.scale for name, scale in self._layer_scales.items()}
        mask = self.active_mask(ctx)
        self._probe_rows = ([row for row, on in enumerate(mask) if on], batch)
        return IPAdapterInputs(
            image_embeds=[conditioning["image_embeds"]],
            negative_image_embeds=[conditioning["negative_image_embeds"]],
            scales=[active if on else None for on in mask])
