"""Compile profiles: in which mode and scope a backbone's denoiser compiles, and from how much
planned work compiling repays itself, as measured per backbone and device.

Compiling costs time once (tens of seconds to minutes on a cold inductor cache) and saves time
on every forward; whether a sweep earns that back depends on the backbone, the card and the
work planned. Those figures are measurements, so they are data, not class attributes: each
plugin ships a ``fastpath_profile.json`` in the package of its backbone classes (package
data), and the user's own measurements in ``$XDG_CACHE_HOME/adapterswap/fastpath_profile.json``
(``~/.cache/adapterswap/...`` without ``XDG_CACHE_HOME``) take precedence over them.

The file (both places)::

    {"format": 1,
     "profiles": [
       {"backbones": ["sd15", "sd15-lcm"],
        "device": "NVIDIA H100 80GB HBM3",
        "compile_mode": "reduce-overhead",
        "compile_scope": "model",
        "pays_after_forwards": 3000,
        "measured": "SD1.5 + IP-Adapter Plus, fp16, ..."}]}

- ``backbones``: the registry names the entry is for;
- ``device``: the card measured on, as ``torch.cuda.get_device_name`` names it;
- ``compile_mode`` / ``compile_scope``: how the fast path compiles the denoiser (one of
  :data:`~adapterswap.fastpath.switches.COMPILE_MODES` /
  :data:`~adapterswap.fastpath.switches.COMPILE_SCOPES`);
- ``pays_after_forwards``: planned denoiser forwards from which compiling repays itself
  (launch-bound denoisers save about the same per forward at any batch), or
  ``pays_after_image_steps``: the same in image-steps, forwards x images per forward
  (compute-bound denoisers save per image); exactly one of the two;
- ``measured``: how the figure was obtained (free text, shown in reports).

:func:`find_profile` picks, for a backbone on a card: the entry for that exact card (the
user's file first); else the nearest card that has one (most leading words of the name in
common, so an "NVIDIA H100 PCIe" takes an "NVIDIA H100 80GB HBM3" figure before an A100's; ties
go to the user's file, then to file order), with a note saying so; else the general default
(mode ``default``, scope ``regions``,
:data:`~adapterswap.fastpath.switches.AUTO_COMPILE_FORWARDS` forwards).
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from adapterswap.errors import UsageError
from adapterswap.fastpath.switches import AUTO_COMPILE_FORWARDS, COMPILE_MODES, COMPILE_SCOPES

#: The file name, in a plugin's package and in the user's cache directory.
PROFILE_FILE = "fastpath_profile.json"
#: The ``format`` this module reads and writes.
FORMAT = 1
_BREAK_EVENS = ("pays_after_forwards", "pays_after_image_steps")
_FIELDS = {"backbones", "device", "compile_mode", "compile_scope", *_BREAK_EVENS, "measured"}


@dataclass(frozen=True)
class CompileProfile:
    """How one backbone compiles on one card and when that repays itself (module docstring).

    :ivar backbone: the registry name it is for.
    :ivar compile_mode: ``torch.compile`` mode of the denoiser.
    :ivar compile_scope: ``"regions"``, ``"blocks"`` or ``"model"``.
    :ivar pays_after_forwards: break-even in planned denoiser forwards, or ``None``.
    :ivar pays_after_image_steps: break-even in image-steps; used instead when set.
    :ivar device: the card the figures were measured on (``None``: the general default).
    :ivar measured: how they were measured.
    :ivar source: the file they were read from (``"general default"`` without one).
    :ivar note: set when the figures are not this card's (the nearest card's, or none).
    """

    backbone: str
    compile_mode: str = "default"
    compile_scope: str = "regions"
    pays_after_forwards: int | None = AUTO_COMPILE_FORWARDS
    pays_after_image_steps: int | None = None
    device: str | None = None
    measured: str = ""
    source: str = "general default"
    note: str | None = None

    def repays(self, forwards: int, batch: int = 1) -> bool:
        """Whether compiling repays itself over ``forwards`` planned denoiser forwards of
        ``batch`` images each."""
        if self.pays_after_image_steps is not None:
            return forwards * max(1, batch) >= self.pays_after_image_steps
        return forwards >= (self.pays_after_forwards or AUTO_COMPILE_FORWARDS)

    def report(self) -> dict[str, Any]:
        """The profile as a flat dict for logs, sweep summaries and benchmark records."""
        return {k: v for k, v in asdict(self).items() if v is not None and v != ""}

    def entry(self) -> dict[str, Any]:
        """The profile as one entry of a profile file (see the module docstring)."""
        entry: dict[str, Any] = {"backbones": [self.backbone], "device": self.device,
                                 "compile_mode": self.compile_mode,
                                 "compile_scope": self.compile_scope}
        for name in _BREAK_EVENS:
            if getattr(self, name) is not None:
                entry[name] = getattr(self, name)
        entry["measured"] = self.measured
        return entry


def user_profile_path() -> Path:
    """The user's own profile file, which overrides the plugins' (``XDG_CACHE_HOME`` honoured,
    as for the weights-hash cache of :mod:`adapterswap.sweep.provenance`)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "adapterswap" / PROFILE_FILE


def read_profiles(text: str, source: str) -> list[dict[str, Any]]:
    """The checked entries of a profile file's ``text`` (``source`` names it in errors):
    :class:`~adapterswap.errors.UsageError` naming the file and the entry when one is
    malformed, so a bad measurement never decides silently."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"compile profile {source}: not JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT \
            or not isinstance(data.get("profiles"), list):
        raise UsageError(f"compile profile {source}: expected {{\"format\": {FORMAT}, "
                         "\"profiles\": [...]}")
    for index, entry in enumerate(data["profiles"]):
        problem = _entry_problem(entry)
        if problem:
            raise UsageError(f"compile profile {source}, entry {index}: {problem}")
    return data["profiles"]


def _entry_problem(entry: Any) -> str | None:
    """What is wrong with one entry of a profile file, or ``None``."""
    if not isinstance(entry, dict):
        return "must be an object"
    unknown = set(entry) - _FIELDS
    if unknown:
        return f"unknown fields {sorted(unknown)} (known: {sorted(_FIELDS)})"
    names = entry.get("backbones")
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        return "'backbones' must be a non-empty list of backbone names"
    if not (isinstance(entry.get("device"), str) and entry["device"]):
        return "'device' must name the card (torch.cuda.get_device_name)"
    if entry.get("compile_mode") not in COMPILE_MODES:
        return f"'compile_mode' must be one of {', '.join(COMPILE_MODES)}"
    if entry.get("compile_scope") not in COMPILE_SCOPES:
        return f"'compile_scope' must be one of {', '.join(COMPILE_SCOPES)}"
    given = [name for name in _BREAK_EVENS if entry.get(name) is not None]
    if len(given) != 1:
        return f"give exactly one of {' or '.join(_BREAK_EVENS)}"
    value = entry[given[0]]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return f"{given[0]!r} must be an integer >= 1"
    if not isinstance(entry.get("measured", ""), str):
        return "'measured' must be text"
    return None


@functools.cache
def _package_profiles(package: str) -> tuple[str, tuple[dict[str, Any], ...]]:
    """The profiles a package ships (read once per process): ``(source, entries)``."""
    try:
        file = resources.files(package).joinpath(PROFILE_FILE)
        text = file.read_text(encoding="utf-8") if file.is_file() else None
    except (ModuleNotFoundError, TypeError, OSError):  # not a package, or no files
        text = None
    if text is None:
        return "", ()
    source = f"{package}/{PROFILE_FILE}"
    return source, tuple(read_profiles(text, source))


def profile_sources(backbone_cls: type) -> list[tuple[str, list[dict[str, Any]]]]:
    """Where profiles for ``backbone_cls`` come from, in order of precedence: the user's file,
    then the file in the package of the class's module. Each as ``(source, entries)``."""
    sources = []
    user = user_profile_path()
    if user.is_file():
        sources.append((str(user), read_profiles(user.read_text(encoding="utf-8"), str(user))))
    package = backbone_cls.__module__.rpartition(".")[0]
    if package:
        source, entries = _package_profiles(package)
        if entries:
            sources.append((source, list(entries)))
    return sources


def _common_words(a: str, b: str) -> int:
    """How many leading words two card names share (case and hyphens ignored)."""
    count = 0
    for x, y in zip(a.lower().replace("-", " ").split(), b.lower().replace("-", " ").split()):
        if x != y:
            break
        count += 1
    return count


def find_profile(backbone_cls: type, card: str) -> CompileProfile:
    """The compile profile of ``backbone_cls`` (its registry ``name``) on ``card``
    (:func:`adapterswap.devices.device_name`); see the module docstring for the order."""
    name = backbone_cls.name
    candidates = [(source, entry) for source, entries in profile_sources(backbone_cls)
                  for entry in entries if name in entry["backbones"]]
    if not candidates:
        return CompileProfile(name, note=f"no measured compile profile for {name!r}: the "
                                         f"general break-even of {AUTO_COMPILE_FORWARDS} "
                                         "forwards")
    exact = [c for c in candidates if c[1]["device"] == card]
    note = None
    if exact:
        source, entry = exact[0]
    else:  # max() keeps the first of equals: the user's file, then file order
        source, entry = max(candidates, key=lambda c: _common_words(c[1]["device"], card))
        note = f"measured on {entry['device']}, not this card ({card})"
    return CompileProfile(
        name, compile_mode=entry["compile_mode"], compile_scope=entry["compile_scope"],
        pays_after_forwards=entry.get("pays_after_forwards"),
        pays_after_image_steps=entry.get("pays_after_image_steps"), device=entry["device"],
        measured=entry.get("measured", ""), source=source, note=note)


def save_profile(profile: CompileProfile, path: str | os.PathLike[str] | None = None) -> Path:
    """Add ``profile`` to the user's profile file (default :func:`user_profile_path`),
    replacing what it held for the same backbone and card; returns the file. Written to a
    temporary file and renamed, so a reader never sees half a file."""
    if profile.device is None:
        raise UsageError("a compile profile to save needs the card it was measured on")
    target = Path(path) if path is not None else user_profile_path()
    entries = read_profiles(target.read_text(encoding="utf-8"), str(target)) \
        if target.is_file() else []
    kept = []
    for entry in entries:
        if entry["device"] == profile.device and profile.backbone in entry["backbones"]:
            entry = {**entry, "backbones": [n for n in entry["backbones"]
                                            if n != profile.backbone]}
        if entry["backbones"]:
            kept.append(entry)
    new = profile.entry()
    problem = _entry_problem(new)
    if problem:
        raise UsageError(f"compile profile for {profile.backbone!r}: {problem}")
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(target.name + ".tmp")
    temporary.write_text(json.dumps({"format": FORMAT, "profiles": [*kept, new]}, indent=2)
                         + "\n", encoding="utf-8")
    temporary.replace(target)
    return target
