"""Metrics: batched scores of generated images. See :class:`adapterswap.metrics.base.Metric`."""

from adapterswap.metrics.base import METRIC_NEEDS, Metric, MetricBatch

__all__ = ["METRIC_NEEDS", "Metric", "MetricBatch"]
