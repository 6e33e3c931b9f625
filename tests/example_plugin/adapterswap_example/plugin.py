"""Registers one metric, as a third-party plugin would."""

from adapterswap import hookimpl
from adapterswap.metrics import Metric, MetricBatch


class MeanBrightness(Metric):
    name = "example-brightness"
    needs = frozenset()
    higher_is_better = True
    description = "Mean luma in [0, 1] (example plugin)"

    def score(self, batch: MetricBatch) -> list[float | None]:
        return [sum(img.convert("L").getdata()) / (255.0 * img.width * img.height)
                for img in batch.images]


@hookimpl
def register_metrics(register):
    register(MeanBrightness)
