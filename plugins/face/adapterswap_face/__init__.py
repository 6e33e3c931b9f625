"""Offline face identity for adapterswap: the ``identity-dlib`` metric.

Installed as the ``adapterswap-face`` distribution; ``adapterswap_face.plugin`` registers the
metric through the ``adapterswap`` entry-point group. dlib and its model files load only when
the metric loads (``adapterswap list`` stays fast).
"""

__version__ = "0.1.0"
