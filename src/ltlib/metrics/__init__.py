"""Long-tail evaluation metrics: top-1, per-class and many/medium/few-shot accuracy."""

from ltlib.metrics.long_tail import SHOT_NAMES, LongTailMetrics, shot_groups, shot_name

__all__ = ["SHOT_NAMES", "LongTailMetrics", "shot_groups", "shot_name"]
