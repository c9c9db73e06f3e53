"""The "Compacted model" section of report.md, from the figures a run's compaction step records."""

from __future__ import annotations

from typing import Any


def render_compaction(figures: dict[str, Any]) -> str:
    """Markdown lines for report.md."""
    pb, pa = figures["params_before"], figures["params_after"]
    mb, ma = figures["macs_before"], figures["macs_after"]
    lines = [
        f"- Parameters: {pb:,} -> {pa:,} ({pb / max(1, pa):.2f}x fewer)",
        f"- MACs per sample: {mb:,} -> {ma:,} ({mb / max(1, ma):.2f}x fewer)",
        f"- Outputs vs the masked model: max |diff| {figures['max_abs_diff']:.2e} on {figures['random_inputs']} "
        f"random inputs (atol {figures['atol']:g})",
    ]
    removed = figures.get("removed") or {}
    if removed:
        shown = ", ".join(f"{label} {r}/{n}" for label, (r, n) in list(removed.items())[:8])
        more = f" and {len(removed) - 8} more groups" if len(removed) > 8 else ""
        lines.append(f"- Channels removed: {shown}{more}")
    if figures.get("folder"):
        folder = figures["folder"]
        lines.append(f"- Files: {folder}/manifest.json + {folder}/model.safetensors (reload: load_compacted)")
    return "\n".join(lines)


__all__ = ["render_compaction"]
