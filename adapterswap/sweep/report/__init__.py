"""Reports a person can look at: ``report.html`` (self-contained), ``plots/*.png``,
``results.csv`` and ``analysis.json``, all rebuilt from the store alone.

The page reads top to bottom as a researcher would show it to a colleague: a banner when the
models had random weights (tiny / random presets), the verdicts in words (swap, ablations,
recommendations, trajectories), the run as resolved (backbones, adapter per backbone, the
step grid and size the cells actually ran, device, dtype, weights identity, code hash,
versions, dates, host) with the reference images, then plots at full width, one compact
per-step table, image grids with click-to-enlarge (CSS only: no script), and the methods.

Every mean is shown with its interval (or "n too small") and its share of images scored;
regimes and knees with their bootstrap intervals; recommendations only on a fidelity metric
of the adapter's kind (:mod:`adapterswap.sweep.analysis` has the statistics). Every picture
in the page is also a file in ``plots/`` (one file per picture).

The package, data flowing down (a module imports only those listed before it):

- :mod:`.words`, :mod:`.tables`: numbers and verdicts in words; HTML tables;
- :mod:`.results_csv`: ``results.csv``;
- :mod:`.figures`, :mod:`.heatmaps`, :mod:`.plots`: matplotlib plumbing; the ablation and
  probe heatmaps; every plot of a report (:func:`plot_curves`);
- :mod:`.page`: the page's style, parts and pictures, and the written document;
- :mod:`.images`: reference thumbnails, image grids, x0-preview strips;
- :mod:`.runs`: the run as resolved;
- :mod:`.glance`: banners, warnings and the verdicts at the top of the page;
- :mod:`.comparisons`, :mod:`.steps`, :mod:`.along_run`, :mod:`.methods`: the sections
  (swap, ablation, exit; metrics vs steps, recommendations, latency, per step; trajectories
  and probes; methods and score coverage);
- :mod:`.build`: :func:`build_report`, the entry point.

Every name importers use is re-exported here.
"""

from __future__ import annotations

from adapterswap.sweep.report.build import build_report
from adapterswap.sweep.report.figures import _pyplot, _tidy_axis
from adapterswap.sweep.report.glance import CONFOUND_TEXT, PRESET_BANNER
from adapterswap.sweep.report.heatmaps import ablation_heatmaps
from adapterswap.sweep.report.images import (
    GRID_COLUMNS,
    THUMB_MAX,
    THUMB_MIN,
    ImageGrid,
    image_grids,
    reference_file,
    reference_thumbnails,
)
from adapterswap.sweep.report.page import STYLE
from adapterswap.sweep.report.plots import plot_curves
from adapterswap.sweep.report.results_csv import CSV_COLUMNS, write_csv
from adapterswap.sweep.report.runs import resolved_runs
from adapterswap.sweep.report.words import plural, safe_name

__all__ = [
    "CONFOUND_TEXT", "CSV_COLUMNS", "GRID_COLUMNS", "PRESET_BANNER", "STYLE", "THUMB_MAX",
    "THUMB_MIN", "ImageGrid", "_pyplot", "_tidy_axis", "ablation_heatmaps", "build_report",
    "image_grids", "plot_curves", "plural", "reference_file", "reference_thumbnails",
    "resolved_runs", "safe_name", "write_csv",
]
