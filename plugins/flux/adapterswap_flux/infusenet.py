"""InfiniteYou's InfuseNet: an identity ControlNet for FLUX that moves between FLUX backbones.

InfiniteYou-FLUX v1.0 (ByteDance, ICCV 2025) conditions FLUX.1-dev on a face through two parts,
both loaded from its published layout::

    <root>/infu_flux_v1.0/<aes_stage2|sim_stage1>/InfuseNetModel/   diffusers FluxControlNetModel
                                                                     (4 double + 10 single blocks,
                                                                     guidance embedding)
    <root>/infu_flux_v1.0/<aes_stage2|sim_stage1>/image_proj_model.bin   {"image_proj": Resampler}
    <root>/supports/insightface/models/antelopev2/                  face detector (insightface)

A reference image goes through InfiniteYou's face pipeline (:mod:`adapterswap_flux.face`) to one
ArcFace embedding, which the resampler turns into 8 ID tokens. At every step, inside the active
window, InfuseNet runs as InfiniteYou's pipeline runs it:

- ``encoder_hidden_states``: the 8 ID tokens, with 8 zero ``txt_ids``;
- ``pooled_projections``: the prompt's pooled CLIP embedding;
- ``guidance``: 1.0 (InfuseNet has its own guidance embedding; InfiniteYou's
  ``controlnet_guidance_scale``), whatever the backbone's guidance;
- ``controlnet_cond``: the packed VAE latents of the control image: the 5 face keypoints of an
  optional control image drawn on a black canvas, or the black canvas alone;
- its block residuals, multiplied by the conditioning scale (0 outside the window), enter the
  transformer as ControlNet block samples.

Because nothing of this depends on the backbone's guidance or schedule, the same loaded object
attaches to ``flux-dev`` and then to ``flux-schnell`` (the training-free swap): only the backbone
path changes and guidance goes off.

Deliberate differences from InfiniteYou's code: the control image is encoded with the mean of
the VAE's posterior rather than a sample drawn from the global RNG, so that a conditioning is
deterministic and can be cached (FLUX's VAE posterior is nearly deterministic); the starting
noise comes from a per-seed CPU generator (InfiniteYou seeds the global RNG); schnell encodes
T5 at 256 tokens (InfiniteYou: 512). ``reproduce="infiniteyou"`` removes all three, so that a
seed gives InfiniteYou's image (:mod:`adapterswap_flux.reproduce`).

Memory: InfuseNet (about 3.0B parameters, 5.9 GB in bf16) lives on the backbone's execution
device, also when the backbone uses model CPU offload (as in InfiniteYou, whose offload leaves the
ControlNet on the GPU after its first call); ``quantize_8bit=True`` halves it. Under the
backbone's ``memory_budget`` it loads on the CPU and the backbone places it in the room its plan
keeps for an adapter, its large linears in float8 where the plan has them
(:meth:`~adapterswap_flux.backbones.FluxBackbone.place_adapter_modules`); cast so, it attaches
afterwards only to backbones whose budget has float8 too.

Probes (``set_probe``): ``residual/hidden``, the norm of each residual over the norm of the
image-token hidden state it is added to, for every double and single block it feeds.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from adapterswap.adapter import Adapter, load_image
from adapterswap.errors import InvalidArgumentError, UsageError, WeightsNotFoundError
from adapterswap.fastpath import device_tensor

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from adapterswap.backbone import Backbone
    from adapterswap.denoise import StepContext, TensorBundle
    from adapterswap_flux.inputs import FluxDenoiserInputs

INFU_FLUX_VERSIONS: tuple[str, ...] = ("v1.0",)
MODEL_VERSIONS: tuple[str, ...] = ("aes_stage2", "sim_stage1")
HOW_TO_GET = (
    "InfiniteYou's weights are on the Hugging Face Hub as ByteDance/InfiniteYou (CC-BY-NC-4.0, "
    "academic research only): `hf download ByteDance/InfiniteYou`, or pass the local copy as "
    "the source. Its supports/insightface face models are insightface's antelopev2 pack "
    "(non-commercial research only); the ArcFace weights are facexlib's "
    "recognition_arcface_ir_se50.pth (put it in <source>/supports/facexlib/)."
)


def model_files(infu_flux_version: str = "v1.0",
                model_version: str = "aes_stage2") -> tuple[str, ...]:
    """The files of one InfiniteYou model version, relative to the repository root."""
    base = f"infu_flux_{infu_flux_version}/{model_version}"
    return (
        f"{base}/InfuseNetModel/config.json",
        f"{base}/InfuseNetModel/diffusion_pytorch_model.safetensors"
        f"|{base}/InfuseNetModel/diffusion_pytorch_model.safetensors.index.json",
        f"{base}/image_proj_model.bin",
    )


class InfuseNet(Adapter):
    """InfiniteYou's InfuseNet identity adapter (trained on FLUX.1-dev; works on any FLUX.1).

    Options (``InfuseNet(source, scale=..., start=..., end=..., **options)``):

    :param model_version: ``"aes_stage2"`` (default; after SFT, better text alignment and
        aesthetics) or ``"sim_stage1"`` (higher identity similarity).
    :param infu_flux_version: InfiniteYou-FLUX version; only ``"v1.0"`` exists.
    :param insightface_root: a directory holding ``models/antelopev2/`` (or the pack itself);
        default ``$ADAPTERSWAP_INSIGHTFACE_ROOT`` if set, ``<source>/supports/insightface``, then
        ``~/.insightface``.
    :param arcface_path: facexlib's ``recognition_arcface_ir_se50.pth`` (or its directory);
        default ``$ADAPTERSWAP_ARCFACE_PATH`` if set, ``<source>/supports/facexlib/``, then
        facexlib's own weights folder.
    :param control_image: an image (or path) whose face keypoints steer the pose; ``None``
        (default) uses InfiniteYou's black canvas.
    :param quantize_8bit: 8-bit InfuseNet weights with optimum-quanto (InfiniteYou's
        ``--quantize_8bit``).
    :param reproduce: ``"infiniteyou"``: seed and draw as InfiniteYou's pipeline does (the
        control posterior sampled per seed, then the starting noise, from the seed's
        generator; T5 at 512 tokens), so that a seed gives InfiniteYou's image for it
        (:mod:`adapterswap_flux.reproduce`). Left out: adapterswap's own seeding.

    The source is the repository root (hub id ``ByteDance/InfiniteYou``, a local copy, or the HF
    cache) or directly a model-version directory holding ``InfuseNetModel/``.
    """

    name = "infusenet"
    kind = "identity"
    families = frozenset({"flux"})
    default_source = "ByteDance/InfiniteYou"
    default_scale = 1.0
    required_files = model_files()
    how_to_get = HOW_TO_GET
    description = "InfiniteYou's InfuseNet identity ControlNet (FLUX.1-dev weights, any FLUX.1)"
    options_known: ClassVar[tuple[str, ...]] = (
        "model_version", "infu_flux_version", "insightface_root", "arcface_path",
        "control_image", "quantize_8bit", "reproduce")
    #: Probes: ``||residual|| / ||hidden state||`` at every block InfuseNet feeds.
    supports_probes = True
    probe_quantity = "residual/hidden"
    #: ``--ref face.npy``: a 512-d ArcFace embedding (InfiniteYou's IR-SE50 gives one) goes
    #: straight to the resampler; no face model loads (:meth:`encode_reference`).
    embedding_dim = 512

    def __init__(self, source: str | None = None, *, scale: float | None = None,
                 start: float = 0.0, end: float = 1.0, device: str | None = None,
                 dtype: Any = None, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.options_known))
        if unknown:
            raise InvalidArgumentError(
                "option", unknown[0],
                f"adapter {self.name!r} knows only {', '.join(self.options_known)}")
        model_version = options.get("model_version", MODEL_VERSIONS[0])
        if model_version not in MODEL_VERSIONS:
            raise InvalidArgumentError("model_version", model_version,
                                       f"choose one of {', '.join(MODEL_VERSIONS)}")
        version = options.get("infu_flux_version", INFU_FLUX_VERSIONS[0])
        if version not in INFU_FLUX_VERSIONS:
            raise InvalidArgumentError("infu_flux_version", version,
                                       f"choose one of {', '.join(INFU_FLUX_VERSIONS)}")
        quantize = options.get("quantize_8bit", False)
        if not isinstance(quantize, bool):
            raise InvalidArgumentError("quantize_8bit", quantize, "must be True or False")
        from adapterswap_flux.reproduce import check_reproduce

        #: ``"infiniteyou"`` or ``None`` (:mod:`adapterswap_flux.reproduce`)
        self.reproduce: str | None = check_reproduce(options.get("reproduce"))
        super().__init__(source, scale=scale, start=start, end=end, device=device, dtype=dtype,
                         **options)
        self.model_version: str = model_version
        self.infu_flux_version: str = version
        self.quantize_8bit = quantize
        root, arcface = options.get("insightface_root"), options.get("arcface_path")
        self.insightface_root = Path(root).expanduser() if root is not None else None
        self.arcface_path = Path(arcface).expanduser() if arcface is not None else None
        self.infusenet: Any = None
        self.resampler: Any = None
        self._face: Any = None
        self.weights_root: Path | None = None
        self.model_dir: Path | None = None
        self.control_image: Image.Image | None = None
        self.control_image_name = ""
        #: control latents (and, for ``reproduce``, posteriors) per backbone and size
        self._control_cache: dict[tuple[Any, ...], Any] = {}
        #: the name of the backbone whose ``memory_budget`` cast InfuseNet to float8, if any
        self.float8_from_budget: str | None = None
        self.set_control_image(options.get("control_image"))

    @classmethod
    def backbone_options(cls, adapter_options: Any) -> dict[str, Any]:
        """``reproduce="infiniteyou"`` runs the backbone as InfiniteYou does: T5 at 512
        tokens and generators on the device the models run on (see
        :mod:`adapterswap_flux.reproduce`); otherwise nothing."""
        from adapterswap_flux.reproduce import backbone_options

        return backbone_options(adapter_options)

    @classmethod
    def run_defaults(cls, adapter_options: Any, backbone_cls: Any) -> Any:
        """``reproduce="infiniteyou"``: InfiniteYou's defaults where the user gave none
        (864 wide x 1152 high; 30 steps on flux-dev) and sizes rounded down to multiples of
        16 as its pipeline rounds them; otherwise none."""
        from adapterswap_flux.reproduce import run_defaults

        return run_defaults(adapter_options, backbone_cls)

    # ------------------------------------------------------------------ settings
    def set_control_image(self, image: Any) -> None:
        """Use the face keypoints of ``image`` (PIL image or path) as the control canvas, or the
        black canvas for ``None``. Takes effect at the next run."""
        from adapterswap_flux.face import describe_image

        if image is None:
            self.control_image, self.control_image_name = None, ""
        else:
            self.control_image = load_image(image, argument="control_image")
            self.control_image_name = describe_image(image)
        self._control_cache.clear()

    # ------------------------------------------------------------------ loading
    def locate(self) -> tuple[Path, Path]:
        """``(repository root, model-version directory)`` of the source, checked for the files
        of this model version (without loading anything)."""
        from adapterswap.hub import resolve_source

        what = f"adapter {self.name!r}"
        rel = f"infu_flux_{self.infu_flux_version}/{self.model_version}"
        source = Path(self.source).expanduser()
        if source.is_dir() and (source / "InfuseNetModel").exists():
            if source.name in MODEL_VERSIONS and source.name != self.model_version:
                if "model_version" in self.options:
                    raise InvalidArgumentError(
                        "model_version", self.model_version,
                        f"the source {str(source)!r} is the {source.name} model")
                self.model_version = source.name
            rel = f"infu_flux_{self.infu_flux_version}/{self.model_version}"
            own = tuple(f.replace(f"{rel}/", "") for f in model_files(self.infu_flux_version,
                                                                       self.model_version))
            resolve_source(str(source), what=what, required=own, how_to_get=self.how_to_get)
            return source.parent.parent, source
        resolved = resolve_source(
            self.source, what=what, how_to_get=self.how_to_get,
            required=model_files(self.infu_flux_version, self.model_version))
        if resolved.local:
            root = Path(resolved.source)
        elif resolved.cached_path is not None and (
                resolved.local_files_only
                or (resolved.cached_path / "supports" / "insightface").is_dir()):
            root = resolved.cached_path
        else:
            from huggingface_hub import snapshot_download

            root = Path(snapshot_download(
                self.source, local_files_only=resolved.local_files_only,
                allow_patterns=[f"{rel}/*", f"{rel}/InfuseNetModel/*",
                                "supports/insightface/models/antelopev2/*"]))
        return root, root / rel

    def load_weights(self) -> None:
        """Load InfuseNet, the resampler and the face models (once; attach only moves them).

        Broken or foreign files raise one error naming them: a truncated safetensors file, an
        ``InfuseNetModel`` that is not a ``FluxControlNetModel`` or whose config does not match
        its weights, an image projection that is not tensors only or does not fit InfuseNet
        (see :mod:`adapterswap.weights`)."""
        from diffusers import FluxControlNetModel

        from adapterswap.weights import load_model, read_pickle
        from adapterswap_flux.resampler import Resampler

        root, model_dir = self.locate()
        what = f"adapter {self.name!r}"
        infusenet_dir = model_dir / "InfuseNetModel"
        infusenet = load_model(FluxControlNetModel, infusenet_dir, what=what, dtype=self.dtype)
        if self.quantize_8bit:
            from adapterswap_flux.backbones import _import_quanto

            quanto = _import_quanto("quantize_8bit")
            quanto.quantize(infusenet, weights=quanto.qint8)
            quanto.freeze(infusenet)
        infusenet.to(self.device).eval()

        proj_path = model_dir / "image_proj_model.bin"
        checkpoint = read_pickle(proj_path, what=what)
        if not isinstance(checkpoint, dict) or "image_proj" not in checkpoint:
            raise WeightsNotFoundError(
                f"adapter {self.name!r}: {str(proj_path)!r} has no 'image_proj' state dict")
        try:
            resampler = Resampler.from_state_dict(checkpoint["image_proj"])
        except (ValueError, RuntimeError) as exc:
            raise WeightsNotFoundError(
                f"adapter {self.name!r}: {str(proj_path)!r} is not InfiniteYou's image "
                f"projection ({exc})") from None
        resampler.to(self.device, self.dtype)

        joint = infusenet.config.joint_attention_dim
        if resampler.config.output_dim != joint:
            raise WeightsNotFoundError(
                f"adapter {self.name!r}: {str(infusenet_dir)!r} is not the InfuseNet of "
                f"{str(proj_path)!r}: its config has joint_attention_dim={joint}, but the image "
                f"projection gives {resampler.config.output_dim}-d ID tokens")
        self.infusenet, self.resampler = infusenet, resampler
        self.weights_root, self.model_dir = root, model_dir

    # ------------------------------------------------------------------ face models (lazy)
    @property
    def face(self) -> Any:
        """InfiniteYou's face models (detector + ArcFace, :class:`~adapterswap_flux.face.
        FaceAnalyzer`), loaded on first use: only an image reference or a control image needs
        them, so a run from embeddings (``--ref face.npy``) never looks for them."""
        if self._face is None:
            if not self.loaded:
                raise UsageError(f"adapter {self.name!r}: load it before using its face models")
            self._face = self._load_face()
        return self._face

    @face.setter
    def face(self, value: Any) -> None:
        self._face = value

    def check_references(self, references: Any) -> None:
        """The face models an image reference (or a control image) needs, found without
        loading them, so that a run fails before loading FLUX rather than at its first
        reference; embeddings need none. A Hub source not in the cache is left to its
        download (which brings InfiniteYou's face pack)."""
        from adapterswap.references import is_embedding

        images = [r for r in references if not is_embedding(r)]
        if not images and self.control_image is None:
            return
        root = self._local_root()
        if root is None and self.insightface_root is None and self.arcface_path is None:
            return
        self._find_face_files(root)

    def _local_root(self) -> Path | None:
        """The repository root of a local or cached source; ``None`` where :meth:`locate`
        would still download (a Hub id not in the cache, or cached without its face pack
        while online). Nothing is downloaded here."""
        from adapterswap.hub import resolve_source

        if self.weights_root is not None:
            return self.weights_root
        source = Path(str(self.source)).expanduser()
        if source.is_dir():
            return self.locate()[0]
        try:
            resolved = resolve_source(str(self.source), what=f"adapter {self.name!r}")
        except WeightsNotFoundError:
            return None
        cached = resolved.cached_path
        if cached is None or not (resolved.local_files_only
                                  or (cached / "supports" / "insightface").is_dir()):
            return None  # load() downloads the face pack with the rest (see locate)
        return cached

    def _find_face_files(self, root: Path | None) -> tuple[Path, Path]:
        """``(detector, arcface)`` files for this source and options, or
        :class:`WeightsNotFoundError` naming where they were looked for."""
        from adapterswap_flux.face import (
            arcface_candidates,
            find_arcface,
            find_detector,
            insightface_root_candidates,
        )

        detector = find_detector([self.insightface_root] if self.insightface_root is not None
                                 else insightface_root_candidates(root))
        arcface = (find_arcface([self.arcface_path], explicit=True)
                   if self.arcface_path is not None else find_arcface(arcface_candidates(root)))
        return detector, arcface

    def _load_face(self) -> Any:
        """The face detector and ArcFace of this source (see the options), checked against the
        resampler's embedding width."""
        from adapterswap_flux.face import FaceAnalyzer

        root = self.weights_root if self.weights_root is not None else Path(self.source)
        detector, arcface = self._find_face_files(root)
        face = FaceAnalyzer(detector, arcface, device=self.device).load()
        embedding_dim = face.arcface.config.embedding_dim
        if self.resampler.config.embedding_dim != embedding_dim:
            raise WeightsNotFoundError(
                f"adapter {self.name!r}: the ArcFace model {str(arcface)!r} gives "
                f"{embedding_dim}-d embeddings but the image projection of "
                f"{str(self.model_dir)!r} expects {self.resampler.config.embedding_dim}-d")
        return face

    def _ensure_loaded(self, backbone: Backbone) -> None:
        if not self.loaded:
            self.device = self.device or _load_device(backbone)
            self.dtype = self.dtype or backbone.dtype
            self.load()

    def attach(self, backbone: Backbone) -> None:
        """:meth:`Adapter.attach`; loading first on the CPU when the backbone runs under a
        ``memory_budget`` (it places InfuseNet on the GPU itself, chunk by chunk)."""
        if not self.loaded and self.device is None:
            self.device = _load_device(backbone)
        super().attach(backbone)

    # ------------------------------------------------------------------ attach / detach
    def fast_modules(self) -> dict[str, Any]:
        """InfuseNet (a FLUX ControlNet) is compiled, fused and cast along with the
        transformer; the resampler runs once per reference and is left alone."""
        return {"infusenet": self.infusenet} if self.infusenet is not None else {}

    def _attach(self, backbone: Backbone) -> None:
        """Move (never reload) InfuseNet and the resampler to the backbone's device and dtype;
        nothing is installed in the pipeline: the residuals go through ``predict``."""
        pipe = backbone.pipe
        for component in ("transformer", "vae"):
            if getattr(pipe, component, None) is None:
                raise InvalidArgumentError(
                    "backbone", backbone.name,
                    f"adapter {self.name!r} needs a FLUX pipeline with a {component}")
        mismatched = fits_transformer(self.infusenet.config, pipe.transformer.config)
        if mismatched:
            raise InvalidArgumentError(
                "backbone", backbone.name,
                f"its transformer does not fit InfuseNet's residuals ({'; '.join(mismatched)})")
        device = backbone.execution_device
        dtype = backbone.dtype or self.dtype
        placement = getattr(backbone, "placement", None)
        float8 = placement is not None and "adapter" in placement.plan.float8
        if self.float8_from_budget is not None and not float8:
            raise UsageError(
                f"adapter {self.name!r} has float8 linears from memory_budget on backbone "
                f"{self.float8_from_budget!r}; backbone {backbone.name!r} runs without float8: "
                "load the adapter again to attach it there")
        cast = not self.quantize_8bit and self.infusenet.dtype != dtype
        if placement is not None:  # the budget's room for an adapter (float8 where planned)
            if cast:
                self.infusenet.to(dtype)
            backbone.place_adapter_modules(self.fast_modules())
            self.float8_from_budget = self.float8_from_budget or (backbone.name if float8
                                                                  else None)
        elif cast:
            self.infusenet.to(device, dtype)
        else:
            self.infusenet.to(device)
        self.resampler.to(device, dtype)
        if self._face is not None:  # loaded only if an image needed it
            self._face.arcface.to(device)
            self._face.device = device
        self.device, self.dtype = str(device), dtype
        self._control_cache.clear()
        self._install_probe_hooks(backbone)

    def _detach(self, backbone: Backbone) -> None:
        self._control_cache.clear()
        self._install_probe_hooks(None)

    # ------------------------------------------------------------------ probes
    def set_probe(self, recorder: Any) -> None:
        """Record ``residual/hidden`` for every transformer block InfuseNet feeds while
        ``recorder`` is set (hooks on the attached backbone's transformer); ``None`` stops."""
        super().set_probe(recorder)
        self._install_probe_hooks(self.attached_to)

    def _make_probe_hooks(self, backbone: Backbone) -> Any:
        from adapterswap_flux.probes import residual_probe

        return residual_probe(backbone.pipe.transformer, self._record_probe)

    def _record_probe(self, block: str, quantity: str, values: Any) -> None:
        if self.probe is not None:
            self.probe.record(block, quantity, values)

    # ------------------------------------------------------------------ reference
    def encode_reference(self, image: Any, backbone: Backbone) -> TensorBundle:
        """The 8 ID tokens ``id_embeds`` ``(1, 8, D)`` of the largest face in ``image``, or of
        an ArcFace embedding given as a ``.npy`` file (:mod:`adapterswap.references`; no face
        model loads for it)."""
        import torch

        from adapterswap.denoise import TensorBundle
        from adapterswap.references import is_embedding, load_embedding
        from adapterswap_flux.face import describe_image, pil_to_bgr

        if is_embedding(image):
            self._ensure_loaded(backbone)
            vector = load_embedding(image, dim=self.resampler.config.embedding_dim)
            return TensorBundle({"id_embeds": self.id_tokens(torch.from_numpy(vector))})
        pil = load_image(image, argument="reference")
        self._ensure_loaded(backbone)
        embedding, _ = self.face.embed(pil_to_bgr(pil), argument="reference",
                                       image_name=describe_image(image))
        return TensorBundle({"id_embeds": self.id_tokens(embedding)})

    def id_tokens(self, embedding: torch.Tensor) -> torch.Tensor:
        """ArcFace embedding ``(1, E)`` -> ID tokens ``(1, num_queries, D)`` (the resampler)."""
        import torch

        embedding = embedding.reshape(1, -1, self.resampler.config.embedding_dim)
        with torch.no_grad():
            return self.resampler(embedding.to(self.device, self.dtype))

    # ------------------------------------------------------------------ control canvas
    def control_canvas(self, width: int, height: int) -> Image.Image:
        """The control image for a ``width`` x ``height`` generation: the keypoints of the
        control image's largest face (after InfiniteYou's resize-and-pad), or a black canvas."""
        from adapterswap_flux.face import (
            blank_canvas,
            draw_keypoints,
            pil_to_bgr,
            resize_and_pad,
        )

        if self.control_image is None:
            return blank_canvas((width, height))
        padded = resize_and_pad(self.control_image, (width, height))
        face = self.face.largest_face(pil_to_bgr(padded), argument="control_image",
                                      image_name=self.control_image_name)
        return draw_keypoints((width, height), face.kps)

    def _control_posterior(self, backbone: Backbone, height: int, width: int) -> Any:
        """The VAE's posterior (a ``DiagonalGaussianDistribution``) of :meth:`control_canvas`,
        before scaling and packing."""
        import torch

        pipe = backbone.pipe
        if self.control_image is None:
            # the black canvas, preprocessed (0 -> 2 * 0/255 - 1 = -1 exactly), made on the
            # device: its PIL drawing and preprocessing took ~50 ms of host time per image
            pixels = blank_pixels(height, width, backbone.execution_device, pipe.vae.dtype)
        else:
            canvas = self.control_canvas(width, height)
            pixels = pipe.image_processor.preprocess(canvas, height=height, width=width)
            # contiguous NCHW like diffusers' prepare_image (a channels-last view would pick
            # other convolution kernels and change the latents in the last digits)
            pixels = pixels.contiguous().to(device=backbone.execution_device,
                                            dtype=pipe.vae.dtype)
        with torch.no_grad():
            return pipe.vae.encode(pixels).latent_dist

    def control_latents(self, backbone: Backbone, height: int, width: int) -> torch.Tensor:
        """Packed VAE latents ``(1, L, 4C)`` of :meth:`control_canvas`: its posterior's mean
        (cached per size)."""
        key = (id(backbone), int(height), int(width))
        if key not in self._control_cache:
            vae = backbone.pipe.vae
            latents = self._control_posterior(backbone, height, width).mode()
            latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
            self._control_cache[key] = backbone.pack_latents(latents)
        return self._control_cache[key]

    def draw_before_latents(self, generators: Any, backbone: Backbone, *, height: int,
                            width: int) -> TensorBundle | None:
        """With ``reproduce="infiniteyou"``: per row, a sample of the control canvas's VAE
        posterior drawn from that row's generator (``mean + std * randn``, scaled and packed:
        ``control_latents`` ``(B, L, 4C)``), before the backbone draws the row's starting
        noise from the same generator, in InfiniteYou's order. Otherwise ``None`` (the
        posterior's mean, :meth:`control_latents`, serves every row)."""
        if self.reproduce is None:
            return None
        from adapterswap.denoise import TensorBundle
        from adapterswap_flux.reproduce import sample_posterior

        key = ("posterior", id(backbone), int(height), int(width))
        if key not in self._control_cache:  # the mean and std do not depend on the seed
            posterior = self._control_posterior(backbone, height, width)
            self._control_cache[key] = (posterior.mean, posterior.std)
        mean, std = self._control_cache[key]
        vae = backbone.pipe.vae
        latents = sample_posterior(generators, mean, std)
        latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
        return TensorBundle({"control_latents": backbone.pack_latents(latents)})

    # ------------------------------------------------------------------ per step
    def denoiser_inputs(self, backbone: Backbone, conditioning: TensorBundle,
                        latents: torch.Tensor, ctx: StepContext,
                        prompt: TensorBundle) -> FluxDenoiserInputs | None:
        """InfuseNet's residuals for this step, scaled per row (``None`` when no row is
        active)."""
        import torch

        from adapterswap_flux.inputs import FluxDenoiserInputs

        scales = [self.scale if active else 0.0 for active in self.active_mask(ctx)]
        if not any(scales):
            return None
        batch = latents.shape[0]
        device = latents.device
        id_embeds = conditioning["id_embeds"]
        if id_embeds.shape[0] != batch:
            raise InvalidArgumentError("conditioning", tuple(id_embeds.shape),
                                       f"has {id_embeds.shape[0]} rows for a batch of {batch}")
        if "control_latents" in conditioning:  # drawn per row (draw_before_latents)
            control = conditioning["control_latents"]
        elif self.reproduce is not None:
            raise UsageError(
                f"adapter {self.name!r} with reproduce={self.reproduce!r} samples its control "
                "latents per seed: pass the conditioning through draw_before_latents first "
                "(denoise() and sweeps do)")
        else:
            control = self.control_latents(backbone, ctx.height, ctx.width)
            control = control.expand(batch, -1, -1)
        timesteps = torch.as_tensor(ctx.timesteps, device=device).reshape(-1)
        timestep = timesteps.expand(batch) if timesteps.numel() == 1 else timesteps
        guidance = None
        if self.infusenet.config.guidance_embeds:
            guidance = torch.ones(1, device=device).expand(batch)  # no host-to-device copy
        img_ids = backbone.latent_image_ids(ctx.height, ctx.width)  # cached per size
        txt_ids = torch.zeros(id_embeds.shape[1], 3, device=device, dtype=latents.dtype)
        uniform = len(set(scales)) == 1
        with torch.no_grad():
            blocks, singles = self.infusenet(
                hidden_states=latents,
                controlnet_cond=control,
                controlnet_mode=None,
                conditioning_scale=scales[0] if uniform else 1.0,
                timestep=timestep.to(latents.dtype) / 1000,
                guidance=guidance,
                pooled_projections=prompt["pooled_prompt_embeds"],
                encoder_hidden_states=id_embeds.to(device),
                txt_ids=txt_ids,
                img_ids=img_ids,
                return_dict=False,
            )
        if not uniform:
            factor = device_tensor(scales, device, latents.dtype).reshape(-1, 1, 1)
            blocks = None if blocks is None else [b * factor for b in blocks]
            singles = None if singles is None else [s * factor for s in singles]
        return FluxDenoiserInputs(
            controlnet_block_samples=blocks,
            controlnet_single_block_samples=singles,
            controlnet_blocks_repeat=self.infusenet.input_hint_block is not None,
        )

    # ------------------------------------------------------------------ presets
    @classmethod
    def tiny(cls, backbone: Backbone, seed: int = 0, *, cache_dir: str | None = None,
             **kwargs: Any) -> InfuseNet:
        """A loaded InfuseNet of tiny random weights fitting ``backbone``'s transformer, saved in
        InfiniteYou's layout (both model versions, tiny face models under ``supports/``) and
        loaded through :meth:`load`."""
        from adapterswap.presets import tiny_dir
        from adapterswap_flux.backbones import _save_atomically

        config = backbone.pipe.transformer.config
        signature = (f"j{config.joint_attention_dim}-h{config.num_attention_heads}"
                     f"x{config.attention_head_dim}-c{config.in_channels}-e{cls.embedding_dim}")
        path = tiny_dir(f"{cls.name}-{signature}", seed, cache_dir)
        if not path.exists():
            _save_atomically(path, lambda tmp: save_tiny_infiniteyou(tmp, config, seed))
        kwargs.setdefault("device", backbone.device)
        kwargs.setdefault("dtype", backbone.dtype)
        return cls(str(path), **kwargs).load()

    @classmethod
    def random(cls, backbone: Backbone, seed: int = 0, **kwargs: Any) -> InfuseNet:
        """InfuseNet and its Resampler at the published size with random weights, no face
        models: the ID embedding of a reference is a random vector seeded by its pixels (the
        ``random`` preset, for latency studies; face detection is not timed)."""
        from adapterswap_flux.published import random_infusenet

        kwargs.setdefault("device", _load_device(backbone))
        kwargs.setdefault("dtype", backbone.dtype)
        adapter = cls(**kwargs)
        adapter.infusenet, adapter.resampler = random_infusenet(adapter.device, adapter.dtype,
                                                                seed + 1)
        adapter.face = _RandomIdentity(adapter.device)
        adapter.loaded = True
        return adapter

    @classmethod
    def tiny_reference(cls, seed: int = 0) -> Image.Image:
        """A synthetic 256 px portrait whose face (and 5 keypoints) the tiny detector finds."""
        from adapterswap_flux.tiny_face import tiny_face_image

        return tiny_face_image(seed)


#: What an InfuseNet's config must share with the transformer it feeds: its residuals are
#: added to the transformer's image tokens (width ``num_attention_heads x attention_head_dim``)
#: and it reads the same packed latents (``in_channels``) and pooled text
#: (``pooled_projection_dim``). Its ``joint_attention_dim`` is the width of the ID tokens it
#: attends to (the image projection's output), which need not be the T5 width.
_SHARED_WITH_TRANSFORMER = ("in_channels", "pooled_projection_dim")


def fits_transformer(infusenet_config: Any, transformer_config: Any) -> list[str]:
    """What keeps an InfuseNet from feeding a transformer (empty: it fits)."""
    def width(config: Any) -> int:
        return int(config.num_attention_heads) * int(config.attention_head_dim)

    problems = []
    if width(infusenet_config) != width(transformer_config):
        problems.append(f"residual width {width(infusenet_config)} (heads x head dim) against "
                        f"the transformer's {width(transformer_config)}")
    for name in _SHARED_WITH_TRANSFORMER:
        ours, theirs = infusenet_config.get(name), transformer_config.get(name)
        if ours is not None and ours != theirs:
            problems.append(f"{name}={ours} against the transformer's {theirs}")
    return problems


def save_tiny_infiniteyou(root: str | Path, transformer_config: Any, seed: int = 0, *,
                          embedding_dim: int = InfuseNet.embedding_dim,
                          id_token_dim: int | None = None) -> Path:
    """Write a tiny InfiniteYou repository under ``root``: for each model version an
    ``InfuseNetModel/`` (a tiny ``FluxControlNetModel`` with guidance embedding, fitting
    ``transformer_config``) and an ``image_proj_model.bin`` (``{"image_proj": state_dict}`` of a
    tiny resampler ending at ``id_token_dim``, the width of the ID tokens InfuseNet attends to:
    by default the transformer's ``joint_attention_dim``, as in InfiniteYou), plus the tiny face
    models under ``supports/``."""
    import torch

    from adapterswap_flux.resampler import Resampler, ResamplerConfig
    from adapterswap_flux.tiny import tiny_flux_controlnet
    from adapterswap_flux.tiny_face import save_tiny_face_models

    root = Path(root)
    config = dict(transformer_config)
    if id_token_dim is not None:
        config["joint_attention_dim"] = id_token_dim
    for offset, model_version in enumerate(MODEL_VERSIONS):
        model_dir = root / f"infu_flux_{INFU_FLUX_VERSIONS[0]}" / model_version
        controlnet = tiny_flux_controlnet(seed + offset, transformer_config=config,
                                          guidance_embeds=True)
        controlnet.save_pretrained(str(model_dir / "InfuseNetModel"), safe_serialization=True)
        torch.manual_seed(seed + offset)
        resampler = Resampler(ResamplerConfig(
            dim=32, depth=1, heads=2, num_queries=8, embedding_dim=embedding_dim,
            output_dim=int(config["joint_attention_dim"]), ff_mult=2))
        torch.save({"image_proj": resampler.state_dict()}, str(model_dir / "image_proj_model.bin"))
    save_tiny_face_models(root, seed, embedding_dim=embedding_dim)
    return root


def _load_device(backbone: Backbone) -> Any:
    """Where InfuseNet loads for ``backbone``: the CPU under a ``memory_budget`` (the backbone
    places it on the GPU, float8 where planned, so its 16-bit weights never all sit there),
    else the backbone's device."""
    return "cpu" if getattr(backbone, "placement", None) is not None else backbone.device


class _RandomIdentity:
    """Stands in for the face models in the ``random`` preset: a 512-d embedding drawn from a
    generator seeded by the image's pixels (deterministic per reference, no detection)."""

    def __init__(self, device: Any) -> None:
        import torch

        self.device = device
        self.arcface = torch.nn.Identity()

    def embed(self, image_bgr: Any, **_: Any) -> tuple[Any, None]:
        import hashlib

        import numpy as np
        import torch

        digest = hashlib.sha256(np.ascontiguousarray(image_bgr).tobytes()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        return torch.randn(1, 512, generator=generator), None


def blank_pixels(height: int, width: int, device: Any, dtype: Any) -> Any:
    """diffusers' preprocessing of InfiniteYou's black control canvas (``(1, 3, H, W)``, all
    -1), made directly on ``device``."""
    import torch

    return torch.full((1, 3, int(height), int(width)), -1.0, device=device, dtype=dtype)
