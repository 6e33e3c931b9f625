"""Metric-vs-steps curves with paired, clustered bootstrap intervals; the effective regime and
the knee with their bootstrap distributions; kind-matched fidelity and the recommendation;
missing-score rates; confounds; the latency-fidelity Pareto front; swap and ablation deltas.

Everything here is plain numpy over the rows of a :class:`~adapterswap.sweep.store.RunStore`,
so a report can be rebuilt from the store alone. Nothing is guessed from a metric's or an
adapter's name: directions and kinds are passed in (``metric_info``, ``adapter_kinds``).

The statistics, once (the report and ``analysis.json`` say the same):

- **Units and clusters.** A curve's unit is one seed of one (reference, prompt): its images at
  every step count. Units of one (reference, prompt) form a *cluster*: they share the
  conditioning, so they are not independent.
- **Resampling.** The bootstrap resamples *clusters* with replacement (cluster-only
  resampling, the one-stage cluster bootstrap of Davison & Hinkley 1997, sec. 3.8; it stays
  valid whatever the correlation of seeds inside a cluster, where a second stage that also
  resamples seeds would count the seed noise twice). A drawn cluster brings all its seeds at
  all step counts, so every statistic computed from one resample (means at two step counts,
  their difference, the regime, the knee) is paired. With a single cluster the seeds are the
  only replication there is, and they are resampled instead (``resampling: "seeds"``: the
  interval then covers seed noise only, not other references or prompts). With one unit, or
  fewer than two resampling units at a step, there is **no interval** (``None``; the report
  says "n too small"), never a zero-width one.
- **Intervals.** Percentile intervals, 95% for means and differences, 90% for the regime and
  the knee (percentiles of the step count across resamples, so both ends are step counts that
  were run). Means weight every image alike (a cluster with more scored images counts more).
- **Effective regime.** The fewest step count whose paired mean difference from the largest
  step count is within ``margin`` in the metric's better direction: ``d >= -margin`` for
  higher-is-better, ``d <= margin`` for lower-is-better (within the margin of the plateau, or
  better than it). The default margin is the metric's own seed-to-seed noise at the largest
  step count: the standard deviation of scored values across seeds inside a cluster, pooled
  over clusters (``sqrt(sum (y - mean_cluster)^2 / sum (n_cluster - 1))``). Without two seeds
  in any cluster that noise is unknown and so is the regime, unless ``margin`` is given. The
  margin is a fixed tolerance: it is not re-estimated per resample.
- **Missing scores.** ``None`` in ``row["scores"]`` is an attempted image the metric could not
  score (no face found); a metric absent from ``row["scores"]`` was not attempted. Every step
  carries ``scored / attempted``. ``missing="drop"`` leaves unscored images out;
  ``missing="worst"`` scores them as the metric's worst value (``metric_info["worst"]``, else
  the worst value observed for that metric anywhere in the sweep), which bounds the bias of
  dropping them.
- **Knee.** Kneedle on the mean curve, and on every resample's mean curve; a curve whose
  means span no more than the margin has no knee (it is flat within the noise).
- **Fidelity.** A setting is judged on a metric that declares its adapter's kind among the
  kinds it measures fidelity for (the record's ``kinds``; ``"none"``: the prompt, for no
  adapter); several such metrics: the first by name. Adapter kinds are open strings. Stores
  written before ``kinds`` was recorded match the metric's recorded ``kind`` instead.
- **Confounds.** A cell with an adapter whose window acted at no step
  (``adapter_active_steps == 0``) is an adapter-off cell under an adapter label: it is left
  out of the setting's curve, regime and ablation deltas, and counted in ``confounds``.

The package, data flowing down (a module imports only those listed before it):

- :mod:`.resampling`: the bootstrap core (clusters, resampling, percentile intervals);
- :mod:`.paired`: paired deltas and their verdicts in words;
- :mod:`.regime`: the effective regime, the knee and their distributions over resamples;
- :mod:`.curves`: a metric against steps (:class:`Curve`);
- :mod:`.labels`, :mod:`.confounds`, :mod:`.facts`, :mod:`.missing`: setting labels,
  confounded cells, where metric and adapter facts come from, missing scores;
- :mod:`.latency`: latency rows summarised and matched to settings;
- :mod:`.recommendation`: the recommendation and the Pareto front;
- :mod:`.fidelity`: which metrics judge an adapter kind's fidelity;
- :mod:`.deltas`: swap and ablation deltas;
- :mod:`.trajectories`: along a run (trajectory curves, probe maps);
- :mod:`.result` and :mod:`.pipeline`: the :class:`Analysis` and :func:`analyse`.

Every name importers use is re-exported here.
"""

from __future__ import annotations

from adapterswap.sweep.analysis.confounds import (
    WINDOW_NEVER_OPENS,
    confound_counts,
    window_never_opens,
)
from adapterswap.sweep.analysis.curves import Curve, Observation, curve_from_observations
from adapterswap.sweep.analysis.deltas import ablation_deltas, swap_comparison, swap_comparisons
from adapterswap.sweep.analysis.enhancers import enhancer_deltas
from adapterswap.sweep.analysis.facts import resolve_adapter_kinds, resolve_metric_info
from adapterswap.sweep.analysis.labels import row_label, setting_label
from adapterswap.sweep.analysis.latency import latency_summary, match_latency
from adapterswap.sweep.analysis.missing import MISSING_POLICIES, worst_values
from adapterswap.sweep.analysis.paired import (
    BETTER,
    N_TOO_SMALL_TO_TELL,
    NO_DIFFERENCE,
    WORSE,
    delta_verdict,
    paired_delta,
)
from adapterswap.sweep.analysis.pipeline import analyse
from adapterswap.sweep.analysis.recommendation import Recommendation, pareto_front, recommend
from adapterswap.sweep.analysis.regime import (
    REGIME_LEVEL,
    _knees,
    effective_regime,
    knee,
    pooled_seed_sd,
)
from adapterswap.sweep.analysis.resampling import CI_LEVEL, N_TOO_SMALL, RESAMPLES, bootstrap_ci
from adapterswap.sweep.analysis.result import Analysis
from adapterswap.sweep.analysis.trajectories import ProbeMap, probe_maps, trajectory_curves

__all__ = [
    "BETTER", "CI_LEVEL", "MISSING_POLICIES", "NO_DIFFERENCE", "N_TOO_SMALL",
    "N_TOO_SMALL_TO_TELL", "REGIME_LEVEL", "RESAMPLES", "WINDOW_NEVER_OPENS", "WORSE",
    "Analysis", "Curve", "Observation", "ProbeMap", "Recommendation",
    "_knees", "ablation_deltas", "analyse", "bootstrap_ci", "confound_counts",
    "curve_from_observations", "delta_verdict", "effective_regime", "knee", "latency_summary",
    "match_latency", "paired_delta", "pareto_front", "pooled_seed_sd", "probe_maps",
    "recommend", "resolve_adapter_kinds", "resolve_metric_info", "row_label", "setting_label",
    "enhancer_deltas", "swap_comparison", "swap_comparisons", "trajectory_curves",
    "window_never_opens", "worst_values",
]
