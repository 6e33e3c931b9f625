"""Running one batch whose rows need different adapter settings.

The engine batches rows that do not all want the same thing from an adapter:

* **Windows per sample.** A step-parallel sweep runs samples of different step counts, at
  different steps, in one forward; an adapter's window (``start``, ``end``) can be open for some
  rows and closed for others (:meth:`adapterswap.adapter.Adapter.active_mask`). A row outside
  the window must get exactly the output it would get without the adapter.
* **Row splitting.** When the setting lives in module state rather than in a tensor (an
  IP-Adapter's per-layer scales sit on its attention processors), rows with different settings
  cannot share a forward: they are grouped (:func:`group_rows`), each group runs as its own
  forward on its rows (:func:`select_rows`), and the outputs are put back in batch order
  (:func:`merge_rows`). Grouping costs nothing when every row agrees (one group, no copies).
* **CFG negatives.** With classifier-free guidance a row becomes ``[uncond; cond]`` inside the
  forward; group first, then double the rows of each group, so a row's setting covers both of
  its halves.

These helpers know nothing about any adapter: a setting is ``None`` (inactive), a mapping of
names to numbers (inactive when every number is 0) or any hashable value.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from adapterswap.fastpath import device_tensor

if TYPE_CHECKING:
    import torch


def _setting_key(setting: Any) -> Hashable:
    """A hashable key equal for equal settings; ``None`` for an inactive one."""
    if setting is None:
        return None
    if isinstance(setting, Mapping):
        if not setting or not any(setting.values()):
            return None
        return tuple(sorted(setting.items()))
    return setting


def group_rows(settings: Sequence[Any]) -> tuple[list[list[int]], list[Any]]:
    """Rows that share a setting, as ``(groups, group_settings)`` in order of first appearance.

    ``settings`` has one entry per row. Inactive rows (``None``, an empty mapping or one whose
    values are all 0) form one group whose setting is ``None``; a mapping setting comes back
    as a ``dict``. Every row is in exactly one group."""
    groups: dict[Hashable, list[int]] = {}
    for row, setting in enumerate(settings):
        groups.setdefault(_setting_key(setting), []).append(row)
    group_settings = []
    for key, rows in groups.items():
        first = settings[rows[0]]
        group_settings.append(None if key is None
                              else dict(first) if isinstance(first, Mapping) else first)
    return list(groups.values()), group_settings


def select_rows(values: Sequence[Any] | None, rows: list[int], batch: int) -> Any:
    """``values`` (a list of batch-first tensors) restricted to ``rows``; unchanged (the same
    list, no copy) when ``rows`` is the whole batch or ``values`` is ``None``."""
    if values is None or len(rows) == batch:
        return values
    index = device_tensor(rows, values[0].device)
    return [v.index_select(0, index) for v in values]


def merge_rows(parts: list[tuple[list[int], torch.Tensor]]) -> torch.Tensor:
    """Put group outputs back in batch order: ``parts`` holds ``(rows, output)`` for every
    group of :func:`group_rows`; a single group's output is returned as it is."""
    if len(parts) == 1:
        return parts[0][1]
    batch = sum(len(rows) for rows, _ in parts)
    first = parts[0][1]
    out = first.new_empty((batch, *first.shape[1:]))
    for rows, value in parts:
        out[device_tensor(rows, out.device)] = value
    return out
