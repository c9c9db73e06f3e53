"""The per-layer rates an automatic (SS-Auto) stage found: a markdown table and a bar plot.

Reads a stage's ``soft`` record in metrics.json (``SoftThreshold.summary()``): kept rows and columns per
layer, the budget met, and how the pruned groups were chosen (soft threshold vs the final top-k cut).

>>> record = {"rates": {"fc1": {"rows_kept": 30, "rows": 300, "cols_kept": 392, "cols": 784}},
...           "budget": {"kind": "params", "target": 12000.0, "final": 11760.0},
...           "zeroed_by_soft_threshold": 900, "cut_by_final_topk": 100, "share_soft_threshold": 0.9,
...           "targets": 1, "targets_at_bound": 1, "zeroed_at_bound": 900}
>>> print(render_rates(record))  # doctest: +NORMALIZE_WHITESPACE
| layer | rows kept | row sparsity | columns kept | column sparsity |
|---|---:|---:|---:|---:|
| fc1 | 30 / 300 | 90.0% | 392 / 784 | 50.0% |
<BLANKLINE>
- Budget (params): 11,760 of 12,000 allowed
- Pruned groups: 900 zeroed by the soft threshold, 100 cut by the final top-k (90.0% by the threshold)
- Targets at their rule's sparsity bound: 1 of 1 (their rates are the plan's bounds, not the threshold's); 900 of
  the pruned groups are theirs
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from admmcompress.atomic import atomic_write


def render_rates(record: dict[str, Any]) -> str:
    """Markdown table of kept rows/columns per layer, the budget line and the soft-vs-cut line."""
    lines = ["| layer | rows kept | row sparsity | columns kept | column sparsity |", "|---|---:|---:|---:|---:|"]
    for name, r in record.get("rates", {}).items():
        lines.append(
            f"| {name} | {r['rows_kept']} / {r['rows']} | {100 * (1 - r['rows_kept'] / r['rows']):.1f}% | "
            f"{r['cols_kept']} / {r['cols']} | {100 * (1 - r['cols_kept'] / r['cols']):.1f}% |"
        )
    lines.append("")
    budget = record.get("budget")
    if budget:
        lines.append(f"- Budget ({budget['kind']}): {budget['final']:,.0f} of {budget['target']:,.0f} allowed")
    if "zeroed_by_soft_threshold" in record:
        lines.append(
            f"- Pruned groups: {record['zeroed_by_soft_threshold']} zeroed by the soft threshold, "
            f"{record['cut_by_final_topk']} cut by the final top-k "
            f"({100 * record['share_soft_threshold']:.1f}% by the threshold)"
        )
    if record.get("targets_at_bound"):  # records before 2026-12-07 do not say
        lines.append(
            f"- Targets at their rule's sparsity bound: {record['targets_at_bound']} of {record['targets']} (their "
            f"rates are the plan's bounds, not the threshold's); {record['zeroed_at_bound']} of the pruned groups "
            "are theirs"
        )
    return "\n".join(lines)


def plot_rates(record: dict[str, Any], path: str | Path) -> Path:
    """rates.png: row and column sparsity per layer, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = record.get("rates", {})
    names = list(rates)
    xs = range(len(names))
    rows = [100 * (1 - r["rows_kept"] / r["rows"]) for r in rates.values()]
    cols = [100 * (1 - r["cols_kept"] / r["cols"]) for r in rates.values()]
    fig, ax = plt.subplots(figsize=(max(4, 0.45 * len(names) + 2), 3.2))
    ax.bar([x - 0.2 for x in xs], rows, width=0.4, label="rows (filters)", color="#3b6ea8")
    ax.bar([x + 0.2 for x in xs], cols, width=0.4, label="columns", color="#d08c3b")
    ax.set_xticks(list(xs), names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("sparsity (%)")
    ax.set_ylim(0, 100)
    ax.set_title("per-layer rates found")
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return out


def soft_record(metrics: dict[str, Any]) -> dict[str, Any] | None:
    """The last stage's ``soft`` record in a run's metrics, or None."""
    found = [s["soft"] for s in metrics.get("stages", []) if isinstance(s, dict) and s.get("soft")]
    return found[-1] if found else None


__all__ = ["plot_rates", "render_rates", "soft_record"]
