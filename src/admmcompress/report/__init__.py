"""Reports computed from the model: per-layer sparsity, compression, plots."""

from admmcompress.report.metrics import LayerStats, ModelStats, measure
from admmcompress.report.render import load_report, render_markdown, save_report

__all__ = ["LayerStats", "ModelStats", "load_report", "measure", "render_markdown", "save_report"]
