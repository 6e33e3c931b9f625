"""A toolkit for plugins whose backbones and adapters run on diffusers pipelines.

Nothing here is specific to one model family: the built-in plugins use it, and a third-party
plugin can too. Importing this package imports nothing heavy (torch, diffusers and transformers
load inside the functions that need them); import the modules you use.

Backbones:

* :mod:`adapterswap.kit.unet_backbone`: :class:`~adapterswap.kit.unet_backbone.UNetBackbone`,
  the base class for a backbone on a Stable Diffusion-style UNet pipeline. Subclass it to get
  noise, schedules, CFG batching, scheduler steps and IP-Adapter inputs; write loading,
  prompt encoding, ``denoise_rows`` and decoding.
* :mod:`adapterswap.kit.schedules`: a diffusers scheduler driven one step at a time with
  per-sample step counts (:class:`~adapterswap.kit.schedules.StepSchedulers`,
  ``scheduler_step``, ``predicted_x0``, ``TIMESTEP_SPACINGS``) and
  :func:`~adapterswap.kit.schedules.injects_noise`, which tells from a scheduler whether its
  step draws fresh noise. Use it for any backbone whose pipeline has a scheduler.
* :mod:`adapterswap.kit.noise`: :func:`~adapterswap.kit.noise.draw_noise` (initial latents as a
  pipeline draws them, one row per seed) and
  :class:`~adapterswap.kit.noise.SampleGenerators` (each sample's generator for step noise).
  Every backbone's ``prepare_latents`` uses the first.
* :mod:`adapterswap.kit.guidance`: classifier-free guidance (``uses_cfg``, ``guided``,
  ``check_prompt``), for backbones with ``guidance_mode = "cfg"``.
* :mod:`adapterswap.kit.rows`: group the rows of a batch by their adapter setting, run each
  group, merge the outputs, for adapters active on only some rows (windows per sample).
* :mod:`adapterswap.kit.lora`: distilled backbones that ship as a LoRA: where the file comes
  from (``lora_location``, ``weights_entry`` for provenance), fusing it safely
  (``fuse_lora``: refused when none of its keys names a layer) and the step count a
  step-distilled file runs at (``lora_file_steps``).

IP-Adapters (h94 layout, diffusers' native support):

* :mod:`adapterswap.kit.ip_adapter`: :class:`~adapterswap.kit.ip_adapter.DiffusersIPAdapter`,
  the base class; subclass it and name the weight file and image encoder folder.
* :mod:`adapterswap.kit.ip_adapter_inputs`:
  :class:`~adapterswap.kit.ip_adapter_inputs.IPAdapterInputs`, the typed per-step conditioning
  the adapter hands the backbone, and its validation.
* :mod:`adapterswap.kit.ip_adapter_files`: read and check weight files before diffusers does.
* :mod:`adapterswap.kit.ip_adapter_install`: install, move and uninstall the modules on a
  UNet; layer names and shapes.
* :mod:`adapterswap.kit.instantstyle`: per-layer scales from InstantStyle block targets.
* :mod:`adapterswap.kit.probe_hooks`: ``ip/text`` probes inside the IP attention layers.
* :mod:`adapterswap.kit.attention_manipulation`: the ``attention-manipulation`` enhancer
  (FastFace's scale-power transform of the image tokens' attention weights), and
  :mod:`adapterswap.kit.am_processor`, its patched IP-Adapter attention processor.

Tests and the ``tiny`` preset:

* :mod:`adapterswap.kit.tiny`: the shared tiny recipe (seeding, tiny CLIP / T5 / CLIP-vision
  encoders, a tiny VAE, saving in diffusers' layout and loading back, tiny IP-Adapter files);
  a plugin's own ``tiny`` module adds its denoiser and registers its pipelines in a
  :class:`~adapterswap.kit.tiny.TinyPipelines`.
* :mod:`adapterswap.kit.tiny_tokenizers`: CLIP and T5 tokenizers built locally.
* :mod:`adapterswap.kit.tiny_lora`: tiny LoRA files in the kohya, diffusers and PEFT layouts.
* :mod:`adapterswap.kit.parity`: :func:`~adapterswap.kit.parity.pipeline_parity`, the images of
  ``denoise`` and of the plain diffusers pipeline for the same seeds, for a plugin's parity
  tests.
"""
