"""What a run measures: model size and FLOPs, and the Jacobian singular values (trainability)."""

from tpp.metrics.complexity import count_flops, count_params
from tpp.metrics.jacobian import jacobian_singular_values, jsv_summary

__all__ = ["count_flops", "count_params", "jacobian_singular_values", "jsv_summary"]
