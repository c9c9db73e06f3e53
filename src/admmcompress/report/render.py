"""Turn measured run metrics into report.md, metrics.json and PNG plots."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from admmcompress.atomic import atomic_write
from admmcompress.report.integrity import metrics_text, read_metrics, read_nonfinite


def _fmt_rate(x: float | str) -> str:
    x = float(x)  # metrics.json holds infinity as "inf"; a stage's compression is read back as written
    return "inf" if math.isinf(x) else f"{x:,.1f}x"


def render_markdown(metrics: dict[str, Any], title: str = "admmcompress report") -> str:
    """A human-readable report: per-layer table, overall figures, accuracy, per-stage results, time."""
    stats = metrics["stats"]
    lines = [f"# {title}", "", "| layer | type | shape | weights | kept | sparsity | compression |",
             "|---|---|---|---:|---:|---:|---:|"]
    factorized = [layer for layer in stats["layers"] if layer.get("factorized") is not None]
    for layer in stats["layers"]:
        shape = "x".join(str(d) for d in layer["shape"])
        lines.append(
            f"| {layer['name']} | {layer['type']} | {shape} | {layer['params']:,} | {layer['kept']:,} | "
            f"{_sparsity_cell(layer)} | {_fmt_rate(layer['compression'])} |"
        )
    pruned, kept = stats["pruned_layer_weights"], stats["kept_weights"]
    if factorized:  # weights of dense convs against factors: not a sparsity
        which = "factorized" if len(factorized) == len(stats["layers"]) else "pruned and factorized"
        lines.append(f"| **total ({which} layers)** | | | {pruned:,} | {kept:,} | - | "
                     f"**{_fmt_rate(stats['overall_compression'])}** |")
    else:
        lines.append(
            f"| **total (pruned layers)** | | | {pruned:,} | {kept:,} | "
            f"{100 * (1 - kept / pruned) if pruned else 0.0:.2f}% | "
            f"**{_fmt_rate(stats['overall_compression'])}** |"
        )
    before, after = metrics.get("accuracy_before"), metrics.get("accuracy_after")
    lines += [""] + (_factorized_lines(stats, factorized) if factorized else [
        f"- Overall compression (pruned layers' weights / nonzero): **{_fmt_rate(stats['overall_compression'])}**",
        f"- Compression over all {stats['total_params']:,} parameters (biases and unpruned layers included): "
        f"{_fmt_rate(stats['compression_all_params'])}",
    ])
    if before is not None and after is not None:
        where = f" ({metrics['evaluated_on']})" if metrics.get("evaluated_on") else ""
        lines.append(f"- Top-1 accuracy{where}: {before:.2f}% before -> {after:.2f}% after "
                     f"({after - before:+.2f} points)")
    if metrics.get("test_accuracy") is not None:
        lines.append(f"- Test top-1 accuracy, measured once at the end: **{metrics['test_accuracy']:.2f}%**")
    if metrics.get("wall_seconds") is not None:
        lines.append(f"- Wall time: {metrics['wall_seconds']:.1f} s")
    if metrics.get("world_size", 1) > 1:  # a torchrun run (issue 24); one-process reports stay as they were
        lines.append(f"- Processes (torch.distributed world size): {metrics['world_size']}")
    lines += [f"- Data file: {metrics['data_file']}"] if metrics.get("data_file") else []
    stages = [s for s in metrics.get("stages", []) if s]
    if stages:
        lines += ["", "| stage | compression | acc. before hard prune | after hard prune | after retrain |",
                  "|---:|---:|---:|---:|---:|"]
        for i, stage in enumerate(stages, 1):
            lines.append(
                f"| {i} | {_fmt_rate(stage.get('overall_compression', float('nan')))} | "
                f"{_pct(stage.get('accuracy_before_hard_prune'))} | {_pct(stage.get('accuracy_after_hard_prune'))} | "
                f"{_pct(stage.get('accuracy_after_retrain'))} |"
            )
    averages = metrics.get("weight_average", {})
    lines += [""] if averages else []
    for phase, average in averages.items():
        lines.append(
            f"- {phase} ended on the mean of its last {average['snapshots']} epochs' weights: "
            f"{_pct(average['accuracy_last_weights'])} with the last weights -> {_pct(average['accuracy_averaged'])}"
        )
    seconds = metrics.get("phase_seconds", {})
    if seconds:
        lines += ["", "Time per phase: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items())]
    if metrics.get("storage"):  # SPEC 4.2 storage: indices and codebooks counted
        from admmcompress.report.storage import render_storage

        lines += ["", "## Storage (SPEC 4.2)", "", render_storage(metrics["storage"]).rstrip()]
    from admmcompress.report.rates import render_rates, soft_record

    if soft_record(metrics):  # rates an automatic (method soft) stage found
        lines += ["", "## Rates found (SS-Auto)", "", render_rates(soft_record(metrics))]
    if metrics.get("compaction"):  # the physically compacted model (compact: true)
        from admmcompress.report.compaction import render_compaction

        lines += ["", "## Compacted model", "", render_compaction(metrics["compaction"])]
    return "\n".join(lines) + "\n"


def _sparsity_cell(layer: dict[str, Any]) -> str:
    """A pruned layer's sparsity; a factorized layer is said to be one (and its factors' zeros, if any)."""
    if layer.get("factorized") is None:
        return f"{100 * layer['sparsity']:.2f}%"
    zeros = f", {100 * layer['sparsity']:.2f}% of its factor weights zero" if layer["kept"] < layer["factors"] else ""
    return f"factorized ({layer['factorized']}){zeros}"


# What the factors of each factorized layer type are (report.md's note under the layer table).
_FACTORS = {
    "Tucker2Conv": "1x1 (in -> r_in), k x k core (r_in -> r_out), 1x1 (r_out -> out) convs",
    "SharedKernelConv": "d shared basis kernels and a coefficient per (out, in, basis)",
}


def _factorized_lines(stats: dict[str, Any], factorized: list[dict[str, Any]]) -> list[str]:
    """The overall figures of a model some of whose layers were replaced by their factors: against the dense
    model (its convs' weights and its parameters before the rewrite), in words that say what they count."""
    kinds = dict.fromkeys(layer["type"] for layer in factorized)
    forms = "; ".join(f"{kind}: {_FACTORS[kind]}" if kind in _FACTORS else kind for kind in kinds)
    dense = sum(layer["params"] for layer in factorized)
    factors = sum(layer["factors"] for layer in factorized)
    model_params = stats.get("model_params", stats["total_params"] - dense + factors)
    return [
        f"- Factorized, not pruned: {len(factorized)} layer(s) were replaced by their factors ({forms}); their rows "
        f"count the weights of the dense conv each replaced ({dense:,} in all) against the nonzero weights of its "
        f"factors ({factors:,} factor weights in all)",
        f"- Overall compression (these layers' dense weights / their nonzero weights, the factors' for factorized "
        f"layers): **{_fmt_rate(stats['overall_compression'])}**",
        f"- Compression over all {stats['total_params']:,} parameters of the dense model (biases and uncompressed "
        f"layers included): {_fmt_rate(stats['compression_all_params'])} (the model as it ends holds "
        f"{model_params:,} parameters, {stats['nonzero_params']:,} of them nonzero)",
    ]


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}%"


def plot_run(metrics: dict[str, Any], history: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """sparsity.png (per-layer sparsity) and training.png (accuracy and ADMM residual per epoch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    layers = metrics["stats"]["layers"]
    fig, ax = plt.subplots(figsize=(max(4, 0.9 * len(layers) + 2), 3.2))
    factorized = [layer.get("factorized") is not None for layer in layers]
    colors = ["#c77c2e" if f else "#3b6ea8" for f in factorized] if any(factorized) else "#3b6ea8"
    ax.bar([layer["name"] for layer in layers], [100 * layer["sparsity"] for layer in layers], color=colors)
    ax.set_ylabel("sparsity (%)" if not any(factorized) else "sparsity (%; orange: zeros of the factors)")
    ax.set_ylim(0, 100)
    ax.set_title(f"per-layer sparsity, overall {_fmt_rate(metrics['stats']['overall_compression'])}")
    fig.tight_layout()
    written.append(_save_fig(fig, out_dir / "sparsity.png"))
    plt.close(fig)
    from admmcompress.report.rates import plot_rates, soft_record

    if soft_record(metrics):
        written.append(plot_rates(soft_record(metrics), out_dir / "rates.png"))

    if history:
        fig, (acc_ax, res_ax) = plt.subplots(1, 2, figsize=(9, 3.2))
        steps = range(1, len(history) + 1)
        acc_ax.plot(steps, [h["accuracy"] for h in history], marker=".")
        acc_ax.set_xlabel("epoch (all phases)")
        acc_ax.set_ylabel("test accuracy (%)")
        residual_points = [(i, h["residual"]) for i, h in enumerate(history, 1) if h.get("residual")]
        keys = sorted({k for _, r in residual_points for k in r})
        for key in keys:
            pts = [(i, r[key]) for i, r in residual_points if key in r and r[key] > 0]
            if pts:
                res_ax.semilogy(*zip(*pts, strict=True), marker=".", label=key)
        res_ax.set_xlabel("epoch (all phases)")
        res_ax.set_ylabel("||W - Z|| / ||W||")
        if keys:
            res_ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(_save_fig(fig, out_dir / "training.png"))
        plt.close(fig)
    return written


def _save_fig(fig, path: Path) -> Path:
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def save_report(out_dir: str | Path, metrics: dict[str, Any], history: list[dict[str, Any]], title: str) -> str:
    """Write metrics.json, report.md and the plots; return the markdown."""
    out_dir = Path(out_dir)
    text = render_markdown(metrics, title)
    payload = metrics_text({"metrics": metrics, "history": history})  # standard JSON: infinity as "inf"
    atomic_write(out_dir / "metrics.json", lambda tmp: tmp.write_text(payload))
    atomic_write(out_dir / "report.md", lambda tmp: tmp.write_text(text))
    plot_run(metrics, history, out_dir)
    return text


def load_report(out_dir: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The metrics and per-epoch history a finished run wrote (one clear line when the file is damaged, or when
    an entry the report reads holds a value of the wrong type: see :func:`check_report_metrics`). Infinity and
    NaN, which the file spells "inf", "-inf" and "nan", come back as floats: the report computes with them."""
    data = read_nonfinite(read_metrics(out_dir))
    check_report_metrics(data["metrics"], data["history"], Path(out_dir) / "metrics.json")
    return data["metrics"], data["history"]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_rate(value: Any) -> bool:  # metrics.json writes infinity as the string "inf"
    return _is_number(value) or value in ("inf", "nan")


_ACCURACY = ("a number or null (a top-1 accuracy in %)", "98.5")
# Top-level entries the report shows: what each must hold, and an example of it.
_SCALARS: dict[str, tuple[Any, str, str]] = {
    "accuracy_before": (_is_number, *_ACCURACY),
    "accuracy_after": (_is_number, *_ACCURACY),
    "test_accuracy": (_is_number, *_ACCURACY),
    "wall_seconds": (_is_number, "a number or null (seconds)", "61.0"),
    "world_size": (lambda v: isinstance(v, int) and not isinstance(v, bool), "a whole number (processes)", "1"),
    "evaluated_on": (lambda v: isinstance(v, str), "a string or null", '"test"'),
    "data_file": (lambda v: isinstance(v, str), "a string or null (a path)", '"data/mnist.npz"'),
}
_STAGE_SCALARS = {
    "overall_compression": (_is_rate, 'a number or "inf"', "10.0"),
    "accuracy_before_hard_prune": (_is_number, *_ACCURACY),
    "accuracy_after_hard_prune": (_is_number, *_ACCURACY),
    "accuracy_after_retrain": (_is_number, *_ACCURACY),
}


def check_report_metrics(metrics: dict[str, Any], history: list[Any], path: str | Path) -> None:
    """Refuse, in one ``ValueError`` line naming ``path`` and the key, an entry of ``metrics.json`` that the
    report reads and that holds the wrong type (an edit made before ``report --rehash``, say): the report would
    otherwise stop with a traceback, or a message naming neither the file nor the key.

    >>> check_report_metrics({"stats": {"layers": []}, "test_accuracy": "high"}, [], "run/metrics.json")
    ... # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: 'run/metrics.json': metrics.test_accuracy holds 'high' (a str); it must hold a number or null ...
    """

    def fail(key: str, value: Any, want: str, example: str) -> None:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise ValueError(
            f"'{path}': {key} holds {shown} (a {type(value).__name__}); it must hold {want}, e.g. {example}"
        )

    def check(entries: dict[str, Any], prefix: str, spec: dict[str, tuple[Any, str, str]]) -> None:
        for key, (valid, want, example) in spec.items():
            value = entries.get(key)
            if value is not None and not valid(value):
                fail(f"{prefix}.{key}", value, want, example)

    stats = metrics.get("stats")
    if stats is None:
        raise ValueError(f"'{path}' has no 'stats' entry under 'metrics' (the per-layer figures of the run; the "
                         "report reads the pruned layers' names from it): the file is damaged; restore it")
    if not isinstance(stats, dict):
        fail("metrics.stats", stats, "an object with a 'layers' list", '{"layers": [{"name": "fc1", ...}]}')
    layers = stats.get("layers")
    if not isinstance(layers, list):
        fail("metrics.stats.layers", layers, "a list of layer rows", '[{"name": "fc1", ...}]')
    for i, row in enumerate(layers):
        if not isinstance(row, dict) or not isinstance(row.get("name"), str):
            fail(f"metrics.stats.layers[{i}]", row, "an object whose 'name' is a layer's name", '{"name": "fc1"}')
    check(metrics, "metrics", _SCALARS)
    stages = metrics.get("stages", [])
    if not isinstance(stages, list):
        fail("metrics.stages", stages, "a list of per-stage objects", '[{"overall_compression": 10.0}]')
    for i, stage in enumerate(stages):
        if stage and not isinstance(stage, dict):
            fail(f"metrics.stages[{i}]", stage, "an object (or null)", '{"overall_compression": 10.0}')
        if stage:
            check(stage, f"metrics.stages[{i}]", _STAGE_SCALARS)
            if stage.get("soft") is not None and not isinstance(stage["soft"], dict):
                fail(f"metrics.stages[{i}].soft", stage["soft"], "an object (the rates found)", '{"rates": {}}')
    seconds = metrics.get("phase_seconds", {})
    if not isinstance(seconds, dict):
        fail("metrics.phase_seconds", seconds, "an object of seconds per phase", '{"pretrain": 12.5}')
    for phase, value in seconds.items():
        if not _is_number(value):
            fail(f"metrics.phase_seconds.{phase}", value, "a number (seconds)", "12.5")
    averages = metrics.get("weight_average", {})
    if not isinstance(averages, dict):
        fail("metrics.weight_average", averages, "an object per phase", '{"retrain": {"snapshots": 3, ...}}')
    for phase, average in averages.items():
        if not isinstance(average, dict) or not isinstance(average.get("snapshots"), int):
            fail(f"metrics.weight_average.{phase}", average, "an object with 'snapshots' (a whole number)",
                 '{"snapshots": 3, "accuracy_last_weights": 98.1, "accuracy_averaged": 98.4}')
        check(average, f"metrics.weight_average.{phase}",
              {"accuracy_last_weights": (_is_number, *_ACCURACY), "accuracy_averaged": (_is_number, *_ACCURACY)})
    for key in ("compaction", "storage"):
        if metrics.get(key) is not None and not isinstance(metrics[key], dict):
            fail(f"metrics.{key}", metrics[key], "an object (as the run wrote it)", "{...}")
    if not isinstance(metrics.get("transforms", []), list):
        fail("metrics.transforms", metrics["transforms"], "a list (the modules a driver rewrote)", "[]")
    for i, row in enumerate(history):
        if not isinstance(row, dict) or not _is_number(row.get("accuracy")):
            fail(f"history[{i}]", row, "an object whose 'accuracy' is a number", '{"accuracy": 98.5, ...}')
        if row.get("residual") is not None and not (
            isinstance(row["residual"], dict) and all(_is_number(v) for v in row["residual"].values())
        ):
            fail(f"history[{i}].residual", row["residual"], "an object of numbers", '{"fc1": 0.01}')
