"""diffusers schedulers driven one step at a time by the engine.

The engine runs the denoising loop itself, possibly with samples of different step counts in
one batch, while a diffusers scheduler keeps per-run state (its step index, LCM's noise). So:

* every run gets a scheduler copy of its own (:func:`run_scheduler`), held in its
  :class:`~adapterswap.denoise.Schedule`'s ``state``;
* every call pins the step index explicitly (:func:`at_step`) instead of trusting the copy's
  counter;
* ``scale_model_input`` runs row by row with a scheduler set up for that row's step count
  (:meth:`StepSchedulers.scale_model_input`), so per-sample timesteps are exact;
* an initial noise scale that depends on the step count (Euler with "leading" spacing) is
  applied at the first step, where the count is known (:meth:`StepSchedulers.first_step_latents`);
* :func:`injects_noise` tells from the scheduler object whether its ``step`` draws fresh noise,
  in which case the backbone passes each sample's generator to it
  (:class:`adapterswap.kit.noise.SampleGenerators`).

A backbone built on a diffusers pipeline with a scheduler uses :class:`StepSchedulers` for its
``schedule`` / ``step`` / ``predict_x0`` (:class:`adapterswap.kit.unet_backbone.UNetBackbone`
does). torch and diffusers are imported lazily.
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from adapterswap.denoise import Schedule, StepContext


def at_step(scheduler: Any, step_index: int) -> Any:
    """Pin a scheduler's step counter (Euler, LCM) so ``step``/``scale_model_input`` act at
    ``step_index`` whatever was called before; schedulers without one (DDIM) are unchanged."""
    if hasattr(scheduler, "_step_index"):
        scheduler._step_index = step_index
    return scheduler


def run_scheduler(scheduler: Any, num_inference_steps: int, device: Any) -> Any:
    """A copy of ``scheduler`` set up for one run of ``num_inference_steps`` steps."""
    run = copy.deepcopy(scheduler)
    run.set_timesteps(num_inference_steps, device=device)
    return run


def scheduler_start_noise(run: Any, sigmas: Any) -> float | None:
    """The noise share of the denoiser's input at the first step as a scheduler set up for a
    run assumes it (:attr:`adapterswap.denoise.Schedule.start_noise`): from the first sigma for
    Euler-type schedulers (``sigmas`` of the run, else ``None``), from ``alphas_cumprod`` at the
    first timestep for DDIM/DDPM/LCM; ``None`` for a scheduler with neither."""
    from adapterswap.denoise import start_noise_from_alpha_cumprod, start_noise_from_sigma

    if sigmas is not None:
        return start_noise_from_sigma(float(sigmas[0]))
    alphas_cumprod = getattr(run, "alphas_cumprod", None)
    if alphas_cumprod is None:
        return None
    return start_noise_from_alpha_cumprod(float(alphas_cumprod[int(run.timesteps[0])]))


#: The values of the ``timestep_spacing`` backbone option, as diffusers' DDIM and Euler
#: schedulers take them (Table 2 of Lin et al., "Common Diffusion Noise Schedules and Sample
#: Steps are Flawed", arXiv 2305.08891): "leading" starts at
#: ``t = (N - 1) * (1000 // N) + steps_offset`` (t = 1 at N = 1 with ``steps_offset`` 1: far
#: from noise at low N), "trailing" at t = 999 for every N, "linspace" at 999 from N = 2 on
#: (at 0 for N = 1).
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


#: Schedulers whose ``scale_model_input`` at step 0 depends only on the first timestep and
#: sigma (or is the identity), so :meth:`StepSchedulers.first_step_key` can vouch for equal
#: first-step inputs across step counts.
SHAREABLE_FIRST_STEP = frozenset({
    "DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler", "LCMScheduler", "TCDScheduler"})


#: Schedulers whose ``step`` adds fresh Gaussian noise at every step whatever their config:
#: consistency samplers (LCM re-noises the clean estimate), ancestral samplers (Euler and
#: KDPM2 ancestral), DDPM's posterior sampling and the SDE solvers.
_NOISY_CLASSES = frozenset({
    "LCMScheduler", "FlowMatchLCMScheduler", "CMStochasticIterativeScheduler",
    "EulerAncestralDiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
    "DDPMScheduler", "DDPMParallelScheduler", "DDPMWuerstchenScheduler",
    "DPMSolverSDEScheduler"})

#: ``step`` arguments that scale the fresh noise a step adds (DDIM's and TCD's ``eta``, the
#: Karras "churn" of Euler): the engine never passes them, so their defaults decide.
_NOISE_STEP_ARGUMENTS = ("eta", "s_churn")


def injects_noise(scheduler: Any) -> bool:
    """Whether ``scheduler.step`` draws fresh noise at each step, as the engine calls it.

    Derived from the scheduler object, so swapping a backbone's scheduler updates it:

    * the class (or a base class) is one whose ``step`` always adds noise: LCM (and
      flow-match LCM), consistency models, ancestral Euler and KDPM2, DDPM (and its parallel
      and Wuerstchen variants), DPM-Solver SDE;
    * its config asks for a stochastic solver: an ``algorithm_type`` starting with ``sde-``
      (DPM-Solver multistep and singlestep) or ``stochastic_sampling`` (flow-match Euler);
    * its ``step`` takes a noise amount the engine leaves at the default and that default is
      above 0: ``eta`` (TCD's 0.3 draws noise, DDIM's 0.0 does not) or ``s_churn`` (0.0 for
      Euler).

    Everything else is deterministic: DDIM, Euler, Heun, DPM-Solver(++) multistep, UniPC,
    PNDM, flow-match Euler at their defaults. A scheduler this rule does not know and that
    has none of these markers counts as deterministic.
    """
    names = {klass.__name__ for klass in type(scheduler).__mro__}
    if names & _NOISY_CLASSES:
        return True
    config = getattr(scheduler, "config", None) or {}
    if str(config.get("algorithm_type", "")).startswith("sde-"):
        return True
    if config.get("stochastic_sampling"):
        return True
    parameters = _step_parameters(type(scheduler))
    for name in _NOISE_STEP_ARGUMENTS:
        default = parameters[name].default if name in parameters else None
        if isinstance(default, (int, float)) and default > 0:
            return True
    return False


@functools.cache
def _step_parameters(klass: type) -> dict[str, inspect.Parameter]:
    """The parameters of ``klass.step`` (empty when it has none or no signature); cached per
    class, as :func:`scheduler_step` asks at every step."""
    step = getattr(klass, "step", None)
    if step is None:
        return {}
    try:
        return dict(inspect.signature(step).parameters)
    except (TypeError, ValueError):
        return {}


class StepSchedulers:
    """Reference schedulers per step count, for per-row ``scale_model_input`` and the
    initial noise scale. Cached: ``set_timesteps`` runs once per step count.

    The schedulers live on the CPU: their per-step arithmetic is on scalars (DDIM indexes
    ``alphas_cumprod`` by the timestep, LCM compares timesteps), and doing it with device
    tensors would copy each scalar back to the host, synchronising the loop at every step.
    Only the timesteps the denoiser takes are copied to the device, once per schedule."""

    def __init__(self, scheduler: Any, device: Any) -> None:
        self.scheduler = scheduler
        self.device = device
        self._by_steps: dict[int, Any] = {}
        self._sigma_varies: bool | None = None
        #: Whether the scheduler's ``step`` draws fresh noise (:func:`injects_noise`).
        self.injects_noise = injects_noise(scheduler)

    def __call__(self, num_inference_steps: int) -> Any:
        if num_inference_steps not in self._by_steps:
            self._by_steps[num_inference_steps] = run_scheduler(
                self.scheduler, num_inference_steps, "cpu")
        return self._by_steps[num_inference_steps]

    def schedule(self, num_inference_steps: int) -> Schedule:
        """A :class:`Schedule` whose ``state`` is a (CPU) scheduler of its own; its
        ``timesteps`` are on the device."""
        from adapterswap.denoise import Schedule
        from adapterswap.fastpath import host_to_device

        run = run_scheduler(self.scheduler, num_inference_steps, "cpu")
        sigmas = getattr(run, "sigmas", None)
        # Euler-type schedulers have N + 1 sigmas ending in 0; DDIM/LCM have none
        if sigmas is None or len(sigmas) != num_inference_steps + 1:
            sigmas = None
        return Schedule(num_inference_steps, host_to_device(run.timesteps, self.device),
                        sigmas=sigmas, state=run,
                        first_step_key=self.first_step_key(run, num_inference_steps),
                        start_noise=scheduler_start_noise(run, sigmas))

    def first_step_key(self, run: Any, num_inference_steps: int) -> Any:
        """What the denoiser's input at step 0 depends on besides the noise: the first
        timestep, the input scaling (Euler: the first sigma) and a step-count-dependent noise
        scale (:meth:`first_step_latents`); ``None`` for schedulers whose input scaling this
        does not know (:data:`SHAREABLE_FIRST_STEP`). Schedules with "trailing" spacing start
        at the same timestep whatever the step count, so a sweep computes their first step
        once; "leading" ones do not."""
        if type(run).__name__ not in SHAREABLE_FIRST_STEP:
            return None
        sigmas = getattr(run, "sigmas", None)
        sigma = float(sigmas[0]) if sigmas is not None and len(sigmas) else None
        noise = float(self(num_inference_steps).init_noise_sigma) \
            if self.noise_sigma_depends_on_steps else None
        return ("unet", type(run).__name__, float(run.timesteps[0]), sigma, noise)

    @property
    def noise_sigma_depends_on_steps(self) -> bool:
        """True when ``init_noise_sigma`` changes with the step count (Euler with "leading"
        spacing): then the first step, not ``prepare_latents``, scales the noise (see
        :meth:`first_step_latents`)."""
        if self._sigma_varies is None:
            first = self(1).init_noise_sigma
            self._sigma_varies = any(bool(self(n).init_noise_sigma != first) for n in (2, 30))
        return self._sigma_varies

    def init_noise_sigma(self) -> Any:
        """The step-count-independent ``init_noise_sigma`` (only when it is one)."""
        return self(1).init_noise_sigma

    def first_step_latents(self, latents: torch.Tensor, step_indices: Sequence[int],
                           num_steps: Sequence[int]) -> torch.Tensor:
        """Rows at step 0 times their run's ``init_noise_sigma`` when it depends on the step
        count (so ``prepare_latents`` could not apply it); other rows unchanged."""
        import torch

        if not self.noise_sigma_depends_on_steps or all(i != 0 for i in step_indices):
            return latents
        rows = [row * self(n).init_noise_sigma if i == 0 else row
                for row, i, n in zip(latents.split(1), step_indices, num_steps)]
        return torch.cat(rows)

    def scale_model_input(self, latents: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """The scheduler's ``scale_model_input`` for each row at its own step."""
        import torch

        rows = []
        for row, t, i, n in zip(latents.split(1), ctx.timesteps, ctx.step_indices,
                                ctx.num_steps):
            rows.append(at_step(self(n), i).scale_model_input(row, t))
        return torch.cat(rows)


def scheduler_step(schedule: Schedule, model_output: torch.Tensor, latents: torch.Tensor,
                   step_index: int, generators: Sequence[torch.Generator] | None) -> Any:
    """``schedule.state.step`` at ``step_index``; returns diffusers' step output.

    ``generators`` (one per row) go to ``step`` as the pipeline passes its generator, for a
    scheduler whose ``step`` takes one (DPM-Solver SDE seeds its own noise and takes none)."""
    scheduler = at_step(schedule.state, step_index)
    if hasattr(scheduler, "is_scale_input_called"):
        scheduler.is_scale_input_called = True  # done per row by StepSchedulers
    kwargs: dict[str, Any] = {}
    if generators is not None and "generator" in _step_parameters(type(scheduler)):
        kwargs["generator"] = list(generators)
    # the scheduler's own (CPU) timestep: no device-to-host copy inside the loop
    return scheduler.step(model_output, scheduler.timesteps[step_index], latents, **kwargs,
                          return_dict=True)


def predicted_x0(schedule: Schedule, model_output: torch.Tensor, latents: torch.Tensor,
                 step_index: int) -> torch.Tensor:
    """The scheduler's own clean-sample estimate at ``step_index`` (Euler/DDIM
    ``pred_original_sample``, LCM ``denoised``) without advancing the run."""
    import torch

    scheduler = schedule.state
    before = getattr(scheduler, "_step_index", None)
    # LCM draws noise inside step(); a throwaway generator keeps every real stream untouched
    scratch = [torch.Generator("cpu").manual_seed(0) for _ in range(latents.shape[0])]
    try:
        out = scheduler_step(schedule, model_output, latents, step_index, scratch)
    finally:
        if hasattr(scheduler, "_step_index"):
            scheduler._step_index = before
    x0 = getattr(out, "denoised", None)
    if x0 is None:
        x0 = out.pred_original_sample
    return x0.to(latents.dtype)
