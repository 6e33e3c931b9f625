"""``adapterswap score``: score existing images against a reference with any registered metric.

Every argument is checked before any model loads: the metric's name and what it needs, its
options, the device, the reference and every image (each decoded once, so a truncated file is
refused up front, naming it). The images then go through :meth:`Metric.score
<adapterswap.metrics.base.Metric.score>` in chunks, decoded again chunk by chunk so that a large
folder never sits in memory whole.

A metric may say why it could not score an image: after each ``score`` call an attribute
``last_reasons`` (one entry per image, None where scored) is read when the metric has one.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import click

from adapterswap.cli.common import parse_options, warn_plugin_failures

#: Images per :meth:`Metric.score` call unless ``--batch-size`` says otherwise.
DEFAULT_CHUNK = 16


@click.command("score", epilog="""Examples:

\b
  adapterswap score --metric sharpness out/*.png
  adapterswap score --metric identity-dlib --ref face.jpg runs/flux/images
  adapterswap score --metric clip-t --prompt "a portrait of a chef" out/ --json
  adapterswap score --metric identity-dlib --ref face.jpg out/ \\
      --metric-option detector=mtcnn --device cuda
""")
@click.argument("images", nargs=-1, required=True, metavar="IMAGE_OR_FOLDER...")
@click.option("--metric", "metric_name", required=True,
              help="Metric name (see `adapterswap list metrics`).")
@click.option("--ref", "reference", default=None,
              help="Reference image, for metrics that compare with one.")
@click.option("--prompt", default=None, help="Prompt, for metrics that read one.")
@click.option("--metric-option", "metric_options", multiple=True, metavar="KEY=VALUE",
              help="Metric option (repeatable), e.g. detector=mtcnn.")
@click.option("--device", default=None, help="cuda, cpu, ... (default: the metric's).")
@click.option("--batch-size", default=DEFAULT_CHUNK, type=click.IntRange(min=1),
              show_default=True, help="Images per metric call.")
@click.option("--json", "as_json", is_flag=True,
              help="A JSON list of {image, metric, score, reason} instead of lines.")
def score_command(images: tuple[str, ...], metric_name: str, reference: str | None,
                  prompt: str | None, metric_options: tuple[str, ...], device: str | None,
                  batch_size: int, as_json: bool) -> None:
    """Score image files (a folder: its image files, sorted, not recursive) with one metric.

    One line per image (its score, or `missing (reason)` where the metric could not score it,
    e.g. no face), then how many were scored and missing and the mean of the scored ones."""
    from adapterswap.adapter import load_image
    from adapterswap.errors import MetricUnavailableError
    from adapterswap.plugins import get_metric

    warn_plugin_failures()
    metric_cls = get_metric(metric_name)
    check_needs(metric_cls, reference=reference, prompt=prompt)
    options = parse_options(metric_options, "--metric-option")
    if device is not None:
        from adapterswap.sweep.checks import check_device

        check_device("--device", device)
    paths = image_paths(images)
    ref_image = load_image(reference, argument="--ref") if reference is not None else None
    for path in paths:
        load_image(path, argument="image")
    metric = metric_cls(device=device, **options)  # unknown options are refused here
    reason = metric.availability()
    if reason is not None:
        raise MetricUnavailableError(f"metric {metric_cls.name!r} is unavailable: {reason}")
    metric.load()
    rows = []
    for chunk in chunked(paths, batch_size):
        for row in score_chunk(metric, chunk, ref_image, prompt):
            rows.append(row)
            if not as_json:
                click.echo(row_line(row))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        click.echo(summary_line(metric_cls, rows))


def check_needs(metric_cls: Any, *, reference: str | None, prompt: str | None) -> None:
    """Refuse a metric this command cannot feed: one that needs a sweep's timings or baseline
    images, or a reference or prompt that was not given."""
    from adapterswap.errors import InvalidArgumentError, UsageError

    name = metric_cls.name
    for need, what in (("timing", "timings"), ("baseline", "baseline images")):
        if need in metric_cls.needs:
            raise UsageError(f"metric {name!r} needs {what}, which only a sweep has: it is "
                             "scored by `adapterswap sweep`, not on existing images")
    if "reference" in metric_cls.needs and reference is None:
        raise InvalidArgumentError("--ref", None, f"metric {name!r} compares each image with "
                                                  "a reference image: give --ref FILE")
    if "prompt" in metric_cls.needs and prompt is None:
        raise InvalidArgumentError("--prompt", None, f"metric {name!r} reads the prompt of "
                                                     "each image: give --prompt TEXT")


def image_paths(arguments: Sequence[str]) -> list[str]:
    """The files to score: each file argument as given, and each folder's image files (by
    extension, those PIL can open), sorted by name. A missing path or a folder without images
    is an error naming it; whether a file is a readable image is checked by the caller."""
    from adapterswap.errors import InvalidArgumentError

    paths: list[str] = []
    for argument in arguments:
        path = Path(argument).expanduser()
        if not path.exists():
            raise InvalidArgumentError("image", argument, "no such file or folder")
        if not path.is_dir():
            paths.append(argument)
            continue
        found = sorted(child for child in path.iterdir()
                       if child.is_file() and is_image_name(child.name))
        if not found:
            raise InvalidArgumentError("image", argument, "the folder holds no image files")
        paths.extend(str(child) for child in found)
    return paths


def is_image_name(name: str) -> bool:
    """Whether the file name's extension is one PIL opens (``.png``, ``.jpg``, ``.webp``...)."""
    from PIL import Image

    Image.init()
    if name.startswith("."):
        return False
    suffix = Path(name).suffix.lower()
    return Image.registered_extensions().get(suffix) in Image.OPEN


def chunked(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    """Consecutive slices of at most ``size`` items."""
    for start in range(0, len(items), size):
        yield items[start:start + size]


def score_chunk(metric: Any, paths: Sequence[str], reference: Any,
                prompt: str | None) -> list[dict[str, Any]]:
    """Score one chunk of image files: ``{image, metric, score, reason}`` per file, ``score``
    None (and ``reason`` said) where the metric gave no finite score."""
    from adapterswap.adapter import load_image
    from adapterswap.errors import AdapterswapError
    from adapterswap.metrics.base import MetricBatch

    images = [load_image(path, argument="image") for path in paths]
    n = len(images)
    batch = MetricBatch(images=images,
                        references=[reference] * n if reference is not None else None,
                        prompts=[prompt] * n if prompt is not None else None,
                        purpose="final")
    values = list(metric.score(batch))
    if len(values) != n:
        raise AdapterswapError(f"metric {metric.name!r} returned {len(values)} scores for "
                               f"{n} images")
    reasons = getattr(metric, "last_reasons", None)
    if not isinstance(reasons, (list, tuple)) or len(reasons) != n:
        reasons = [None] * n
    rows = []
    for path, value, reason in zip(paths, values, reasons):
        if value is not None and not math.isfinite(value):
            value, reason = None, f"the metric returned {value}"
        elif value is None:
            reason = reason or "the metric gave no score"
        else:
            value, reason = float(value), None
        rows.append({"image": path, "metric": metric.name, "score": value, "reason": reason})
    return rows


def row_line(row: dict[str, Any]) -> str:
    """``path  score`` or ``path  missing (reason)``."""
    if row["score"] is None:
        return f"{row['image']}  missing ({row['reason']})"
    return f"{row['image']}  {row['score']:.4f}"


def summary_line(metric_cls: Any, rows: Sequence[dict[str, Any]]) -> str:
    """How many images were scored and missing, and the mean of the scored ones with its
    standard error (n >= 2)."""
    scores = [row["score"] for row in rows if row["score"] is not None]
    missing = len(rows) - len(scores)
    direction = "higher" if metric_cls.higher_is_better else "lower"
    head = f"{metric_cls.name}: {len(scores)} scored, {missing} missing"
    if not scores:
        return f"{head}, no mean"
    mean = sum(scores) / len(scores)
    if len(scores) < 2:
        error = "n too small for an error"
    else:
        variance = sum((s - mean) ** 2 for s in scores) / (len(scores) - 1)
        error = f"standard error {math.sqrt(variance / len(scores)):.4f}"
    return f"{head}, mean {mean:.4f} ({error}; {direction} is better)"
