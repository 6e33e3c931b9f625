"""Installing an h94 IP-Adapter on a diffusers UNet, moving it between UNets, and removing it.

Weights load through diffusers' native path (``pipe.load_ip_adapter`` with the h94 state dict),
which installs ``IPAdapterAttnProcessor2_0`` processors and the image projection on the UNet.
The modules built there are kept (:class:`IPAdapterModules`) and re-installed on the next
backbone, so moving the adapter never reloads it; uninstalling puts back the very processor
objects that were there before (:class:`InstalledIPAdapter`), so the base output returns bit for
bit.

The layer helpers (:func:`cross_attention_names`, :func:`ip_layer_shapes`) number and size the
layers exactly as diffusers and h94's files do (``1.to_k_ip``, ``3.to_k_ip``, ...), for checks
and for random weights. torch and diffusers are imported lazily.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from adapterswap.errors import UsageError


def ip_processor_types() -> tuple[type, ...]:
    """The diffusers attention processor classes that carry an IP-Adapter branch."""
    from diffusers.models.attention_processor import (
        IPAdapterAttnProcessor,
        IPAdapterAttnProcessor2_0,
        IPAdapterXFormersAttnProcessor,
    )

    return IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0, IPAdapterXFormersAttnProcessor


#: Attribute under which :func:`install_ip_adapter` keeps the installed IP processors, so the
#: per-step path need not walk the UNet's ~2000 modules (``unet.attn_processors`` costs ~5 ms
#: on a large UNet, every step).
_IP_CACHE = "_adapterswap_ip_processors"


def ip_processors(unet: Any) -> dict[str, Any]:
    """The UNet's IP-Adapter attention processors by name (empty when none is installed)."""
    cached = getattr(unet, _IP_CACHE, None)
    if cached is not None:
        return cached
    types = ip_processor_types()
    return {name: proc for name, proc in unet.attn_processors.items() if isinstance(proc, types)}


def has_ip_adapter(unet: Any) -> bool:
    """Whether an IP-Adapter is installed (diffusers marks it in the UNet's config)."""
    return getattr(unet.config, "encoder_hid_dim_type", None) == "ip_image_proj" \
        or bool(getattr(unet, _IP_CACHE, None))


def cross_attention_names(unet: Any) -> list[str]:
    """Processors an IP-Adapter replaces (every attention that is not self-attention), in the
    order diffusers numbers their weights (``1.to_k_ip``, ``3.to_k_ip``, ...)."""
    return [name for name in unet.attn_processors
            if not name.endswith("attn1.processor") and "motion_modules" not in name]


def ip_layer_shapes(unet: Any) -> list[tuple[str, int]]:
    """``(processor name, hidden size)`` of every layer an IP-Adapter adds ``to_k_ip`` /
    ``to_v_ip`` to, sized as diffusers sizes them (from ``block_out_channels``)."""
    channels = list(unet.config.block_out_channels)
    shapes = []
    for name in cross_attention_names(unet):
        if name.startswith("mid_block"):
            hidden = channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(channels))[int(name.split(".")[1])]
        else:
            hidden = channels[int(name.split(".")[1])]
        shapes.append((name, hidden))
    return shapes


@dataclass
class IPAdapterModules:
    """What diffusers' loader built from an IP-Adapter state dict, kept to move between UNets:
    the IP attention processors by name and the image projection."""

    processors: dict[str, Any]
    image_projection: Any


@dataclass
class InstalledIPAdapter:
    """What a UNet and its pipeline held before :func:`install_ip_adapter`, to put back."""

    pipe: Any
    processors: dict[str, Any]
    encoder_hid_proj: Any
    encoder_hid_dim_type: Any
    pipeline_modules: dict[str, Any] = field(default_factory=dict)


def install_ip_adapter(pipe: Any, state_dict: dict[str, dict[str, Any]], *,
                       image_encoder: Any, feature_extractor: Any,
                       modules: IPAdapterModules | None) -> tuple[IPAdapterModules,
                                                                  InstalledIPAdapter]:
    """Install an IP-Adapter on ``pipe`` and register its image encoder and feature extractor.

    The first time (``modules is None``) diffusers' ``pipe.load_ip_adapter`` builds the
    processors and the image projection from ``state_dict``; later calls re-install those
    ``modules`` (moved to this UNet's device and dtype), so the adapter is never reloaded.
    Returns the modules and what to restore with :func:`uninstall_ip_adapter`.
    """
    unet = pipe.unet
    if has_ip_adapter(unet):
        raise UsageError("this pipeline already has an IP-Adapter installed; detach it first")
    saved = InstalledIPAdapter(
        pipe=pipe,
        processors=dict(unet.attn_processors),
        encoder_hid_proj=unet.encoder_hid_proj,
        encoder_hid_dim_type=getattr(unet.config, "encoder_hid_dim_type", None),
        pipeline_modules={name: getattr(pipe, name, None)
                          for name in ("image_encoder", "feature_extractor")},
    )
    pipe.register_modules(image_encoder=image_encoder, feature_extractor=feature_extractor)
    try:
        if modules is None:
            # diffusers' own loader: converts h94's layout, sets processors and projection
            pipe.load_ip_adapter(state_dict, subfolder="", weight_name="",
                                 image_encoder_folder=None)
            modules = IPAdapterModules(processors=ip_processors(unet),
                                       image_projection=unet.encoder_hid_proj)
        else:
            _reinstall(unet, modules)
        setattr(unet, _IP_CACHE, dict(modules.processors))
    except Exception:
        uninstall_ip_adapter(saved)
        raise
    return modules, saved


def _reinstall(unet: Any, modules: IPAdapterModules) -> None:
    """Put modules built for another UNet on ``unet``, after checking every layer fits."""
    shapes = dict(ip_layer_shapes(unet))
    cross = unet.config.cross_attention_dim
    misfits = sorted(name for name, proc in modules.processors.items()
                     if (proc.to_k_ip[0].out_features, proc.to_k_ip[0].in_features)
                     != (shapes.get(name), cross))
    if misfits:
        raise UsageError(
            "the IP-Adapter was built for a UNet with other attention layers; these do "
            f"not fit: {', '.join(misfits[:3])}{' ...' if len(misfits) > 3 else ''}")
    param = next(unet.parameters())
    for module in (*modules.processors.values(), modules.image_projection):
        module.to(device=param.device, dtype=param.dtype)
    processors = dict(unet.attn_processors)
    processors.update(modules.processors)
    unet.set_attn_processor(processors)  # before encoder_hid_proj, as diffusers does
    unet.encoder_hid_proj = modules.image_projection
    unet.config.encoder_hid_dim_type = "ip_image_proj"


def uninstall_ip_adapter(saved: InstalledIPAdapter) -> None:
    """Put back exactly the processors, projection and pipeline modules that were there."""
    pipe = saved.pipe
    unet = pipe.unet
    # the projection goes first: IP-Adapter Plus's resampler has attention processors of its
    # own, and set_attn_processor wants one processor per attention layer present
    unet.encoder_hid_proj = saved.encoder_hid_proj
    unet.config.encoder_hid_dim_type = saved.encoder_hid_dim_type
    if hasattr(unet, _IP_CACHE):
        delattr(unet, _IP_CACHE)
    unet.set_attn_processor(dict(saved.processors))
    pipe.register_modules(**saved.pipeline_modules)
