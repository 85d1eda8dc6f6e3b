"""What a run measures: model size, FLOPs and measured latency, and the Jacobian singular values
(trainability)."""

from tpp.metrics.complexity import count_flops, count_params
from tpp.metrics.jacobian import jacobian_singular_values, jsv_summary
from tpp.metrics.latency import latency, latency_metrics

__all__ = ["count_flops", "count_params", "jacobian_singular_values", "jsv_summary", "latency",
           "latency_metrics"]
