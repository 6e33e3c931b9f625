"""A complete, tiny, pure-torch backbone family and adapter for testing the core.

It implements every abstract method the way a real plugin does (weights saved in a directory
and loaded through ``Backbone.load``), so the contract mixins, the reference loop and the CLI
can be tested without diffusers. The denoiser is a small MLP on a flow-matching schedule.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from adapterswap import hookimpl
from adapterswap.adapter import Adapter, load_image
from adapterswap.backbone import Backbone
from adapterswap.metrics import Metric
from adapterswap.presets import tiny_dir

LATENT = (4, 8, 8)
TEXT_DIM = 16


def _build_modules(seed: int) -> dict[str, Any]:
    import torch

    torch.manual_seed(seed)
    numel = LATENT[0] * LATENT[1] * LATENT[2]
    return {
        "embed": torch.nn.Embedding(256, TEXT_DIM),
        "denoiser": torch.nn.Sequential(
            torch.nn.Linear(numel + TEXT_DIM + 2, 64), torch.nn.SiLU(), torch.nn.Linear(64, numel)
        ),
    }


class ToyPipe:
    """Holds the toy modules like a diffusers pipeline holds its components."""

    def __init__(self, modules: dict[str, Any]) -> None:
        self.components = modules
        self.adapter_projection: Any = None

    def to(self, device: str) -> ToyPipe:
        for module in self.components.values():
            module.to(device)
        return self


class ToyBackbone(Backbone):
    family = "toy"
    default_source = "adapterswap-test/toy"
    default_height = 16
    default_width = 16
    tiny_size = (16, 16)
    required_files = ("model_index.json", "denoiser.safetensors")
    how_to_get = "Build one with ToyBackbone.save_random(path)."

    @staticmethod
    def save_random(path: Path, seed: int = 0) -> Path:
        from safetensors.torch import save_file

        path.mkdir(parents=True, exist_ok=True)
        modules = _build_modules(seed)
        state = {f"{name}.{k}": v.contiguous() for name, m in modules.items()
                 for k, v in m.state_dict().items()}
        save_file(state, str(path / "denoiser.safetensors"))
        (path / "model_index.json").write_text(json.dumps({"_class_name": "ToyPipe"}))
        return path

    def load_pipeline(self, source: str, *, local_files_only: bool) -> Any:
        from safetensors.torch import load_file

        modules = _build_modules(0)
        state = load_file(str(Path(source) / "denoiser.safetensors"))
        for name, module in modules.items():
            module.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items()
                                    if k.split(".", 1)[0] == name})
            module.to(self.device, self.dtype).eval()
        return ToyPipe(modules)

    @classmethod
    def tiny(cls, seed: int = 0, *, cache_dir: str | None = None) -> Backbone:
        path = tiny_dir(cls.name, seed, cache_dir)
        if not path.exists():
            cls.save_random(path, seed)
        return cls(str(path), device="cpu").load()

    def encode_prompt(self, prompts, *, guidance_scale=None, negative_prompts=None):  # noqa: ANN001
        import torch

        from adapterswap.denoise import TensorBundle

        embed = self.pipe.components["embed"]
        rows = []
        for prompt in prompts:
            ids = torch.tensor(list(prompt.encode("utf-8"))[:64] or [0])
            rows.append(embed(ids).mean(0))
        return TensorBundle({"prompt_embeds": torch.stack(rows).detach()})

    def prepare_latents(self, generators, *, height, width):  # noqa: ANN001
        import torch

        return torch.cat([torch.randn((1, *LATENT), generator=g) for g in generators])

    def schedule(self, num_inference_steps, *, height, width):  # noqa: ANN001
        import torch

        from adapterswap.denoise import Schedule

        sigmas = torch.linspace(1.0, 0.0, num_inference_steps + 1)
        return Schedule(num_inference_steps, sigmas[:-1] * 1000, sigmas,
                        start_noise=float(sigmas[0]))

    def predict(self, latents, ctx, prompt, *, guidance_scale, adapter_inputs=None):  # noqa: ANN001
        import torch

        b = latents.shape[0]
        guidance = torch.full((b, 1), float(guidance_scale or 0.0))
        x = torch.cat([latents.reshape(b, -1), prompt["prompt_embeds"],
                       ctx.timesteps.reshape(b, 1) / 1000, guidance], dim=1)
        with torch.no_grad():
            v = self.pipe.components["denoiser"](x).reshape(latents.shape)
        if self.probe is not None:
            from adapterswap.probes import relative_norm

            self.probe.record("text", "text/latent", relative_norm(prompt["prompt_embeds"],
                                                                   latents))
        if adapter_inputs and "residual" in adapter_inputs:
            residual = adapter_inputs["residual"]
            probe = adapter_inputs.get("probe")
            if probe is not None:
                from adapterswap.probes import relative_norm

                probe.record("out", "residual/velocity",
                             relative_norm(residual.expand_as(v), v))
            v = v + residual
        return v

    def step(self, model_output, latents, schedule, step_index):  # noqa: ANN001
        sig = schedule.sigmas
        return latents + (sig[step_index + 1] - sig[step_index]) * model_output

    def predict_x0(self, model_output, latents, schedule, step_index):  # noqa: ANN001
        return latents - schedule.sigmas[step_index] * model_output

    def decode(self, latents, *, height, width, output_type="pil"):  # noqa: ANN001
        import numpy as np
        import torch
        from PIL import Image

        image = ((latents[:, :3].clamp(-1, 1) + 1) / 2)
        image = torch.nn.functional.interpolate(image, size=(height, width), mode="nearest")
        if output_type == "pt":
            return image
        array = image.permute(0, 2, 3, 1).cpu().numpy()
        if output_type == "np":
            return array
        return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]


ToyBackbone.supports_probes = True


class ToyDev(ToyBackbone):
    name = "toy-dev"
    default_steps = 8
    guidance_mode = "embedded"
    default_guidance_scale = 3.5
    default_adapter = "toy-adapter"
    description = "Toy backbone with embedded guidance (tests only)"


class ToyFast(ToyBackbone):
    name = "toy-fast"
    default_steps = 2
    guidance_mode = "none"
    default_adapter = "toy-adapter"
    description = "Toy distilled backbone without guidance (tests only)"


class ToyAdapter(Adapter):
    name = "toy-adapter"
    kind = "style"
    families = frozenset({"toy"})
    default_source = "adapterswap-test/toy-adapter"
    required_files = ("toy_adapter.safetensors",)
    description = "Adds a colour-derived residual to the velocity (tests only)"
    supports_probes = True
    probe_quantity = "residual/velocity"

    @staticmethod
    def save_random(path: Path, seed: int = 0) -> Path:
        import torch
        from safetensors.torch import save_file

        torch.manual_seed(seed + 100)
        path.mkdir(parents=True, exist_ok=True)
        save_file({"proj.weight": torch.randn(LATENT[0], 3), "proj.bias": torch.randn(LATENT[0])},
                  str(path / "toy_adapter.safetensors"))
        return path

    def load_weights(self) -> None:
        import torch
        from safetensors.torch import load_file

        from adapterswap.hub import resolve_source

        resolved = resolve_source(self.source, what=f"adapter {self.name!r}",
                                  required=self.required_files)
        state = load_file(str(Path(resolved.source) / "toy_adapter.safetensors"))
        self.proj = torch.nn.Linear(3, LATENT[0])
        self.proj.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items()})
        self.proj.to(self.device, self.dtype)

    @classmethod
    def tiny(cls, backbone, seed=0, *, cache_dir=None, **kwargs):  # noqa: ANN001
        path = tiny_dir(cls.name, seed, cache_dir)
        if not path.exists():
            cls.save_random(path, seed)
        return cls(str(path), **kwargs).load()

    def _attach(self, backbone) -> None:  # noqa: ANN001
        backbone.pipe.adapter_projection = self.proj

    def _detach(self, backbone) -> None:  # noqa: ANN001
        backbone.pipe.adapter_projection = None

    def encode_reference(self, image, backbone):  # noqa: ANN001
        import numpy as np
        import torch

        from adapterswap.denoise import TensorBundle

        rgb = np.asarray(load_image(image), dtype=np.float32) / 255.0
        mean = torch.from_numpy(rgb.reshape(-1, 3).mean(0)).reshape(1, 3)
        return TensorBundle({"colour": mean})

    def denoiser_inputs(self, backbone, conditioning, latents, ctx, prompt):  # noqa: ANN001
        import torch

        mask = torch.tensor(self.active_mask(ctx), dtype=latents.dtype).reshape(-1, 1, 1, 1)
        with torch.no_grad():
            residual = backbone.pipe.adapter_projection(conditioning["colour"])
        inputs = {"residual": residual.reshape(-1, LATENT[0], 1, 1) * self.scale * mask}
        if self.probe is not None:
            inputs["probe"] = self.probe
        return inputs


class ToyOtherFamilyAdapter(ToyAdapter):
    name = "toy-other-adapter"
    kind = "identity"
    families = frozenset({"other"})
    description = "An adapter for a family no toy backbone has (tests only)"


class ToyColourMatch(Metric):
    """1 - mean absolute difference of the mean colours of image and reference (in [0, 1])."""

    name = "toy-colour-match"
    needs = frozenset({"reference"})
    kinds = frozenset({"style"})
    higher_is_better = True
    description = "Mean-colour agreement with the reference (tests only)"

    def score(self, batch):  # noqa: ANN001
        import numpy as np

        self.check_batch(batch)
        out = []
        for image, ref in zip(batch.images, batch.references):
            a = np.asarray(image, dtype=np.float64).reshape(-1, 3).mean(0) / 255
            b = np.asarray(ref, dtype=np.float64).reshape(-1, 3).mean(0) / 255
            out.append(float(1 - np.abs(a - b).mean()))
        return out


class ToyPlugin:
    """The hook implementations, registered by tests with ``register_plugin``."""

    @hookimpl
    def register_backbones(self, register):  # noqa: ANN001
        register(ToyDev)
        register(ToyFast)

    @hookimpl
    def register_adapters(self, register):  # noqa: ANN001
        register(ToyAdapter)
        register(ToyOtherFamilyAdapter)

    @hookimpl
    def register_metrics(self, register):  # noqa: ANN001
        register(ToyColourMatch)
