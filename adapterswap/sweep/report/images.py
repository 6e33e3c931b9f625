"""Pictures of the cells: reference thumbnails, image grids (backbones and settings side by
side where they ran the same steps), the x0-preview strips of trajectory cells, and the
page's image section with click-to-enlarge."""

from __future__ import annotations

import hashlib
import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterswap.sweep.analysis import row_label
from adapterswap.sweep.images_io import (  # noqa: F401 - THUMB_* re-exported
    THUMB_MAX,
    THUMB_MIN,
    png_bytes,
    thumbnail_file,
    thumbnail_long_side,
)
from adapterswap.sweep.images_io import thumbnail as _thumbnail
from adapterswap.sweep.report.page import _Page
from adapterswap.sweep.report.words import _setting_order, plural
from adapterswap.sweep.store import RunStore

#: Most image columns side by side before groups are stacked as rows.
GRID_COLUMNS = 8


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        import matplotlib

        path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
        return ImageFont.truetype(str(path), size)
    except Exception:  # noqa: BLE001 - no matplotlib font: Pillow's own
        return ImageFont.load_default(size=size)


def _encode(image: Any) -> bytes:
    return png_bytes(image)


def reference_file(out: Path, reference: str) -> Path:
    """Where the sweep saved a reference image (:class:`~adapterswap.sweep.models.
    ModelFactory`: the first 16 hex digits of the sha256 of the reference string)."""
    return out / "references" / (hashlib.sha256(reference.encode()).hexdigest()[:16] + ".png")


def _reference_name(reference: str) -> str:
    return reference if reference.startswith("synthetic:") else (Path(reference).name
                                                                 or reference)


def reference_thumbnails(out: Path, rows: Sequence[Mapping[str, Any]]
                         ) -> list[tuple[str, bytes | None, bool]]:
    """Per reference the cells used: its name, its thumbnail (``None``: not saved) and
    whether the thumbnail was enlarged."""
    from PIL import Image

    shown = []
    for reference in sorted({r["reference"] for r in rows if r.get("reference")}):
        path = reference_file(out, reference)
        if not path.is_file():
            shown.append((reference, None, False))
            continue
        with Image.open(path) as image:
            thumb, enlarged = _thumbnail(image)
        shown.append((reference, _encode(thumb), enlarged))
    return shown


@dataclass
class ImageGrid:
    """One (reference, prompt): column groups (backbone and setting side by side when they
    ran the same steps), seeds within each group, one row per step count (or per backbone,
    setting and step count)."""

    reference: str
    prompt: str
    groups: list[str]
    seeds: list[int]
    rows: list[tuple[str, list[tuple[bytes, bool] | None]]] = field(default_factory=list)


def _setting_names(settings: Sequence[tuple[str, str]]) -> dict[tuple[str, str], list[str]]:
    """What tells (backbone, setting) pairs apart: the backbone where several ran, the
    setting where several ran ("adapter off" for none)."""
    several_backbones = len({b for b, _ in settings}) > 1
    several_settings = len({label for _, label in settings}) > 1
    return {(b, label): ([b] if several_backbones else [])
            + ([label if label != "none" else "adapter off"] if several_settings else [])
            for b, label in settings}


def grid_tile(out: Path, row: Mapping[str, Any]) -> tuple[bytes, bool] | None:
    """A cell's grid thumbnail (PNG bytes) and whether it was enlarged: the one the sweep
    made from the image in memory (``thumbnails/<key>.png``), else made now from the file
    the ``image`` column names (any format); ``None`` when the file is gone."""
    from PIL import Image

    path = out / row["image"]
    if not path.is_file():
        return None
    stored = thumbnail_file(out, row["key"])
    width, height = row.get("width"), row.get("height")
    if width and height and stored.is_file():
        try:
            with Image.open(stored) as image:  # reads the header only
                fits = max(image.size) == thumbnail_long_side(width, height)
        except OSError:  # unreadable: made again below
            fits = False
        if fits:
            return stored.read_bytes(), max(width, height) < THUMB_MIN
    with Image.open(path) as image:
        thumb, enlarged = _thumbnail(image)
    return _encode(thumb), enlarged


def image_grids(store: RunStore, rows: Sequence[Mapping[str, Any]]) -> list[ImageGrid]:
    """Per reference and prompt, every image as a thumbnail (:func:`grid_tile`, each made
    once): backbones and settings side by side (columns: seeds) with one row per step count
    when they ran the same steps and fit :data:`GRID_COLUMNS` columns; otherwise one row per
    backbone, setting and step count."""
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for row in rows:
        if row["status"] == "done" and row.get("image"):
            groups.setdefault((row["reference"], row["prompt"]), []).append(row)
    order = {b: i for i, b in enumerate(dict.fromkeys(r["backbone"] for r in rows))}

    # the first cell of each (reference, prompt, backbone, setting, steps, seed), as listed
    by_setting: dict[tuple[Any, ...], Mapping[str, Any]] = {}
    for r in rows:
        if r["status"] == "done" and r.get("image"):
            by_setting.setdefault((r["reference"], r["prompt"], r["backbone"], row_label(r),
                                   r["steps"], r["seed"]), r)

    def tile(members: Sequence[Mapping[str, Any]], backbone: str, label: str, steps: int,
             seed: int) -> tuple[bytes, bool] | None:
        match = by_setting.get((members[0]["reference"], members[0]["prompt"], backbone, label,
                                steps, seed))
        return grid_tile(store.out, match) if match else None

    grids = []
    for (reference, prompt), members in groups.items():  # in the order the cells ran
        seeds = sorted({r["seed"] for r in members})
        first = {}
        for r in members:
            first.setdefault((r["backbone"], row_label(r)), r)
        settings = sorted(first, key=lambda k: (order.get(k[0], 0), _setting_order(first[k])))
        steps_of = {k: sorted({r["steps"] for r in members
                               if (r["backbone"], row_label(r)) == k}) for k in settings}
        names = _setting_names(settings)
        side_by_side = (len(settings) > 1 and len({tuple(v) for v in steps_of.values()}) == 1
                        and len(settings) * len(seeds) <= GRID_COLUMNS)
        if side_by_side:
            grid = ImageGrid(reference, prompt, [", ".join(names[k]) for k in settings], seeds)
            for steps in steps_of[settings[0]]:
                grid.rows.append((plural(steps, "step"),
                                  [tile(members, b, label, steps, seed)
                                   for b, label in settings for seed in seeds]))
        else:
            grid = ImageGrid(reference, prompt, [""], seeds)
            for backbone, label in settings:
                for steps in steps_of[(backbone, label)]:
                    title = ", ".join(names[(backbone, label)] + [plural(steps, "step")])
                    grid.rows.append((title, [tile(members, backbone, label, steps, seed)
                                              for seed in seeds]))
        grids.append(grid)
    return grids


def _trajectory_strips(store: RunStore, rows: Sequence[Mapping[str, Any]]) -> list[
        tuple[str, bytes]]:
    """The x0 preview strips of trajectory cells (first seed of each group only), redrawn
    with the step number under each preview, at most ten previews a row."""
    from PIL import Image, ImageDraw

    strips = []
    seen = set()
    font = _font(13)
    for row in rows:
        path = store.out / "images" / f"{row['key']}-trajectory.png"
        group = (row["backbone"], row_label(row), row["reference"], row["prompt"],
                 row["steps"])
        if row["status"] != "done" or group in seen or not path.is_file():
            continue
        seen.add(group)
        with Image.open(path) as strip:
            strip = strip.convert("RGB")
        side = strip.height
        count = max(1, strip.width // side)
        size = max(96, min(side, 160))
        per_row = min(count, 10)
        lines = math.ceil(count / per_row)
        gap, label_h = 6, 20
        canvas = Image.new("RGB", (per_row * (size + gap) - gap, lines * (size + label_h)),
                           "white")
        draw = ImageDraw.Draw(canvas)
        for k in range(count):
            tile = strip.crop((k * side, 0, (k + 1) * side, side))
            resample = Image.Resampling.NEAREST if size >= side else Image.Resampling.LANCZOS
            tile = tile.resize((size, size), resample)
            x, y = (k % per_row) * (size + gap), (k // per_row) * (size + label_h)
            canvas.paste(tile, (x, y))
            text = f"step {k + 1}"
            width = draw.textlength(text, font=font)
            draw.text((x + (size - width) / 2, y + size + 2), text, fill="black", font=font)
        title = (f"{row['backbone']} + {row_label(row)} | {plural(row['steps'], 'step')} | "
                 f"seed {row['seed']} | {row['prompt']}")
        strips.append((title, _encode(canvas)))
    return strips


def _image_section(page: _Page, grids: Sequence[ImageGrid]) -> list[str]:
    if not grids:
        return []
    parts = ["<h2>Images</h2>", "<p>Click an image to enlarge it; click again to close.</p>"]
    for g, grid in enumerate(grids):
        parts.append(f"<h3>Reference {html.escape(_reference_name(grid.reference))}, "
                     f"prompt &ldquo;{html.escape(grid.prompt)}&rdquo;</h3>")
        head = ""
        if len(grid.groups) > 1:
            head = "<tr><th></th>" + "".join(
                f'<th class="g" colspan="{len(grid.seeds)}">{html.escape(name)}</th>'
                for name in grid.groups) + "</tr>"
        head += "<tr><th></th>" + "".join(
            f'<th{" class=g" if i == 0 else ""}>seed {s}</th>'
            for _ in grid.groups for i, s in enumerate(grid.seeds)) + "</tr>"
        body = []
        for r, (label, tiles) in enumerate(grid.rows):
            cells = []
            for k, thumb in enumerate(tiles):
                group, seed = grid.groups[k // len(grid.seeds)], grid.seeds[k % len(grid.seeds)]
                css = ' class="g"' if k % len(grid.seeds) == 0 else ""
                if thumb is None:
                    cells.append(f"<td{css}>-</td>")
                    continue
                png, enlarged = thumb
                caption = ", ".join(p for p in (group, label, f"seed {seed}") if p)
                cells.append(f"<td{css}>" + page.zoomable(
                    f"cell-{g:03d}-{r:03d}-{k:02d}", png, caption, pixelated=enlarged)
                    + "</td>")
            body.append(f'<tr><th class="row">{html.escape(label)}</th>{"".join(cells)}</tr>')
        parts.append(f'<div class="scroll"><table class="grid"><thead>{head}</thead><tbody>'
                     f'{"".join(body)}</tbody></table></div>')
    return parts
