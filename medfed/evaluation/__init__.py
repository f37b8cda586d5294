"""Metrics aggregation, cross-site matrix and the run report."""

from medfed.evaluation.report import json_safe, write_report

__all__ = ["json_safe", "write_report"]
