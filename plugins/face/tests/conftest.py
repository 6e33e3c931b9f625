"""Fixtures of the adapterswap-face tests (photos from :mod:`face_samples`). Fixture names
start with ``face_``."""

from __future__ import annotations

import pytest
from face_samples import astronaut, coffee, grace_hopper
from PIL import Image


@pytest.fixture(scope="session")
def face_photos() -> dict[str, Image.Image]:
    """``astronaut``, ``grace_hopper`` and ``coffee`` (no face)."""
    return {"astronaut": astronaut(), "grace_hopper": grace_hopper(), "coffee": coffee()}


@pytest.fixture(scope="session")
def face_metric():
    """One loaded ``identity-dlib`` metric with the default options, for the session."""
    from adapterswap_face.identity import DlibIdentity

    return DlibIdentity().load()
