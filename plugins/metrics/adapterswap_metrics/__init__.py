"""Model-based image metrics for adapterswap: LPIPS, CLIP-I, CLIP-T, DINO and style similarity.

Installed as the ``adapterswap-metrics`` distribution; ``adapterswap_metrics.plugin`` registers
the metrics through the ``adapterswap`` entry-point group. Heavy libraries (torch, transformers,
lpips) are imported only when a metric loads its model.
"""

__version__ = "0.1.0"
