"""One markdown table (and one PNG) across finished runs: ``admmcompress report --compare RUN_DIR...``.

Each run folder is the ``--out`` of ``admmcompress run`` (or any folder with the same ``metrics.json`` and
``config.yaml``); nothing is retrained or re-measured, the figures are those the runs recorded. Results made
outside the runner (a benchmark's baseline from another library, say) join the same table by writing a
``summary.json`` with :func:`save_summary`.

Example::

    summaries = [load_summary(d) for d in ("runs/lenet5-admm", "runs/lenet5-magnitude")]
    print(compare_table(summaries))
    plot_compare(summaries, "compare.png")
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from admmcompress.atomic import atomic_write, temp_target
from admmcompress.report.integrity import read_metrics, spell_nonfinite, verify_run
from admmcompress.strict_yaml import safe_load_unique


@dataclass(frozen=True)
class RunSummary:
    """The figures of one run that the comparison shows (None: the run did not record it)."""

    name: str
    folder: str
    method: str
    compression: float | None = None
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    accuracy_hard_pruned: float | None = None  # the last stage's, right after hard pruning
    storage_reduction: float | None = None
    params_after: int | None = None  # of the physically compacted model (compact: true)
    macs_after: int | None = None
    wall_seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def load_summary(run_dir: str | Path) -> RunSummary:
    """Read ``metrics.json`` and ``config.yaml`` of a finished run folder, verified first as ``report`` verifies
    it (a ``RunIntegrityError`` line naming the changed file; notes, such as a run written before checksums, on
    stderr): a tampered run must not join a table.

    >>> load_summary("/nonexistent")
    Traceback (most recent call last):
    ...
    FileNotFoundError: compare: no metrics.json in '/nonexistent'; give the --out folder of a finished run
    """
    folder = Path(run_dir)
    metrics_file, config_file = folder / "metrics.json", folder / "config.yaml"
    if not metrics_file.is_file() and (folder / SUMMARY_FILE).is_file():
        return _read_summary(folder / SUMMARY_FILE)
    if not metrics_file.is_file():
        raise FileNotFoundError(f"compare: no metrics.json in '{folder}'; give the --out folder of a finished run")
    for note in verify_run(folder, require_history=False):
        print(f"admmcompress: note: {note}", file=sys.stderr)
    metrics = read_metrics(folder, require_history=False)["metrics"]
    config: dict[str, Any] = {}
    if config_file.is_file():
        config = safe_load_unique(config_file.read_text()) or {}
    stages = [s for s in config.get("stages") or [] if isinstance(s, dict)]
    methods = [str(s.get("method", "admm")) for s in stages]
    method = " + ".join(dict.fromkeys(methods)) if methods else "dense"
    stage_metrics = [s for s in metrics.get("stages") or [] if s]
    compaction = metrics.get("compaction") or {}
    model, data = config.get("model"), config.get("data")
    setting = {  # what makes two runs' accuracies comparable at all (compared by compare_runs' caveat)
        "model": model.get("name") if isinstance(model, dict) else None,
        "dataset": data.get("dataset") if isinstance(data, dict) else None,
        "evaluated_on": metrics.get("evaluated_on"),
    }
    return RunSummary(
        name=str(config.get("name") or folder.name),
        folder=folder.name,
        method=method,
        compression=_number((metrics.get("stats") or {}).get("overall_compression")),
        accuracy_before=_number(metrics.get("accuracy_before")),
        accuracy_after=_number(metrics.get("accuracy_after")),
        accuracy_hard_pruned=_number(stage_metrics[-1].get("accuracy_after_hard_prune")) if stage_metrics else None,
        storage_reduction=_storage_reduction(metrics.get("storage") or {}),
        params_after=compaction.get("params_after"),
        macs_after=compaction.get("macs_after"),
        wall_seconds=_number(metrics.get("wall_seconds")),
        extra={k: str(v) for k, v in setting.items() if isinstance(v, str) and v},
    )


SETTINGS = ("model", "dataset", "evaluated_on")


def caveat(summaries: Sequence[RunSummary]) -> str:
    """One line when the runs differ in model, dataset or the split their accuracy was measured on (their
    accuracies then do not compare directly); empty otherwise. Runs that did not record a setting are not counted.

    >>> a = RunSummary("a", "a", "admm", extra={"model": "lenet5", "dataset": "mnist"})
    >>> caveat([a, RunSummary("b", "b", "admm", extra={"model": "resnet20", "dataset": "mnist"})])
    'note: the runs differ in model (lenet5, resnet20); their accuracies do not compare directly'
    """
    differ = []
    for key in SETTINGS:
        seen = list(dict.fromkeys(str(s.extra[key]) for s in summaries if s.extra.get(key)))
        if len(seen) > 1:
            differ.append(f"{key.replace('_', ' ')} ({', '.join(seen)})")
    return f"note: the runs differ in {'; '.join(differ)}; their accuracies do not compare directly" if differ else ""


SUMMARY_FILE = "summary.json"


def save_summary(summary: RunSummary, folder: str | Path) -> Path:
    """Write ``summary`` as ``folder/summary.json``, which :func:`load_summary` reads where no run left metrics.

    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> _ = save_summary(RunSummary("L1 keep 0.5", "l1", "magnitude (Torch-Pruning)", 4.0, 56.8, 56.1), folder)
    >>> load_summary(folder).accuracy_after
    56.1
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fields = dataclasses.asdict(summary)
    for key in _FIGURES:  # JSON has no infinity (json.dumps would write a bare Infinity other readers refuse)
        fields[key] = spell_nonfinite(fields[key])  # "inf", "-inf", "nan": as metrics.json spells them
    text = json.dumps(fields, indent=1, default=str)
    return atomic_write(folder / SUMMARY_FILE, lambda tmp: tmp.write_text(text))


def _read_summary(path: Path) -> RunSummary:
    try:
        data = json.loads(path.read_text())
        known = {f.name for f in dataclasses.fields(RunSummary)}
        summary = RunSummary(**{k: v for k, v in data.items() if k in known})
    except (json.JSONDecodeError, TypeError, AttributeError):
        raise ValueError(f"compare: '{path}' is not a summary written by save_summary") from None
    wrong = _wrong_fields(summary)
    if wrong:
        raise ValueError(f"compare: '{path}' holds {wrong[0]}; write it with save_summary (numbers as numbers)")
    return dataclasses.replace(summary, **{k: _number(getattr(summary, k)) for k in _FIGURES})


# The figures of a summary: numbers, or the strings "inf"/"-inf"/"nan" (JSON has no infinity)
_FIGURES = ("compression", "accuracy_before", "accuracy_after", "accuracy_hard_pruned", "storage_reduction",
            "wall_seconds")
_COUNTS = ("params_after", "macs_after")


def _wrong_fields(summary: RunSummary) -> list[str]:
    """What in a summary read from JSON the table could not show, as ``"<field> = <value>"`` (empty: all fine)."""
    wrong = [f"{k} = {getattr(summary, k)!r}" for k in ("name", "folder", "method")
             if not isinstance(getattr(summary, k), str)]
    for key in _FIGURES:
        value = getattr(summary, key)
        if value is not None and (isinstance(value, bool) or _number(value) is None):
            wrong.append(f"{key} = {value!r}, not a number")
    for key in _COUNTS:
        value = getattr(summary, key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            wrong.append(f"{key} = {value!r}, not a whole number")
    if not isinstance(summary.extra, dict):
        wrong.append(f"extra = {summary.extra!r}, not an object")
    return wrong


def _storage_reduction(storage: dict[str, Any]) -> float | None:
    """32-bit dense bits / stored bits of the pruned layers under the report's scheme (indices counted)."""
    reduction = storage.get("storage_reduction")
    if isinstance(reduction, dict):  # one figure per scheme: the report's own (default: the cheapest)
        reduction = reduction.get(storage.get("scheme") or "best", reduction.get("best"))
    return _number(reduction)


def _number(value: Any) -> float | None:
    """A recorded figure as a float (metrics.json writes infinity as the string "inf")."""
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def compare_table(summaries: Sequence[RunSummary], extra_columns: Sequence[str] = ()) -> str:
    """The markdown table, one row per run in the given order.

    Columns that no run recorded (accuracy after hard pruning, compacted params/MACs) are left out;
    ``extra_columns`` name entries of ``RunSummary.extra`` shown after the method.

    >>> a = RunSummary("lenet5", "a", "admm", 10.0, 99.1, 98.9, wall_seconds=61.0)
    >>> print(compare_table([a]))
    | run | method | compression | accuracy before | accuracy after | change | storage reduction | wall time |
    |---|---|---:|---:|---:|---:|---:|---:|
    | lenet5 | admm | 10.0x | 99.10% | 98.90% | -0.20 | - | 61 s |
    """
    if not summaries:
        raise ValueError("compare: give at least one run folder")
    repeated = {n for n, c in Counter(s.name for s in summaries).items() if c > 1}
    optional = [
        ("acc. after hard prune", "accuracy_hard_pruned", _pct),
        ("params after compaction", "params_after", _count),
        ("MACs after compaction", "macs_after", _count),
    ]
    shown = [(title, key, fmt) for title, key, fmt in optional if any(getattr(s, key) is not None for s in summaries)]
    header = ["run", "method", *extra_columns, "compression", "accuracy before", "accuracy after", "change",
              *(t for t, _, _ in shown[:1]), "storage reduction", *(t for t, _, _ in shown[1:]), "wall time"]
    align = ["---", "---", *("---" for _ in extra_columns)] + ["---:"] * (len(header) - 2 - len(extra_columns))
    lines = [_row(header), "|" + "|".join(align) + "|"]
    for s in summaries:
        change = (
            f"{s.accuracy_after - s.accuracy_before:+.2f}"
            if s.accuracy_after is not None and s.accuracy_before is not None
            else "-"
        )
        hard = [fmt(getattr(s, key)) for _, key, fmt in shown if key == "accuracy_hard_pruned"]
        compacted = [fmt(getattr(s, key)) for _, key, fmt in shown if key != "accuracy_hard_pruned"]
        cells = [
            f"{s.name} ({s.folder})" if s.name in repeated else s.name,
            s.method,
            *(str(s.extra.get(c, "-")) for c in extra_columns),
            _rate(s.compression),
            _pct(s.accuracy_before),
            _pct(s.accuracy_after),
            change,
            *hard,
            _rate(s.storage_reduction),
            *compacted,
            _seconds(s.wall_seconds),
        ]
        lines.append(_row(cells))
    return "\n".join(lines)


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _rate(x: float | None) -> str:
    if x is None:
        return "-"
    return "inf" if math.isinf(x) else f"{x:,.1f}x"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}%"


def _seconds(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.1f} s" if x < 10 else f"{x:.0f} s"


def _count(x: int | None) -> str:
    return "-" if x is None else f"{x:,}"


def plot_compare(summaries: Sequence[RunSummary], path: str | Path) -> Path:
    """Accuracy after vs overall compression (log scale), one labelled point per run; hollow: before."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [s for s in summaries if s.compression is not None and s.accuracy_after is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    for s in points:
        x = s.compression if math.isfinite(s.compression) else float("nan")
        ax.scatter([x], [s.accuracy_after], zorder=3)
        ax.annotate(s.name if len(points) < 16 else s.folder, (x, s.accuracy_after), fontsize=7,
                    textcoords="offset points", xytext=(4, 3))
        if s.accuracy_before is not None:
            ax.scatter([x], [s.accuracy_before], facecolors="none", edgecolors="grey", zorder=2)
    if points and all(s.compression > 0 for s in points):
        ax.set_xscale("log")
    ax.set_xlabel("overall compression (pruned layers' weights / nonzero)")
    ax.set_ylabel("top-1 accuracy (%) after (hollow: before)")
    ax.set_title(f"{len(summaries)} runs")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path


DEFAULT_PLOT = "compare.png"  # the plot of a comparison without ``out``, in the current folder
_DEFAULT_PLOT_NAMES = re.compile(r"^compare(-[0-9]+)?\.png$")  # it, and the free names _free_name gives beside it


def default_plot_targets(folder: str | Path = ".") -> list[str]:
    """The default plot's names (``compare.png``, ``compare-2.png``, ...) that temporary files in ``folder`` were
    written for: the targets whose leftovers a killed comparison without ``out`` may have left there.

    >>> default_plot_targets("/nonexistent")
    []
    """
    targets = {temp_target(p.name) for p in Path(folder).glob(".compare*.tmp")}
    return sorted(name for name in targets if name is not None and _DEFAULT_PLOT_NAMES.match(name))


def _free_name(path: Path) -> Path:
    """``path``, or ``stem-2``, ``stem-3``, ... beside it: the first that does not exist (the default plot's name,
    so a repeated ``report --compare`` without ``--out`` neither fails nor replaces an earlier plot)."""
    candidate, n = path, 1
    while candidate.exists() or candidate.is_symlink():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


def compare_runs(run_dirs: Sequence[str | Path], out: str | Path | None = None) -> str:
    """Table of ``run_dirs``; writes ``out`` (markdown) and its PNG beside it, or ``compare.png`` here.

    Neither file may exist yet (nothing the user has is overwritten); both are written atomically. Returns the
    markdown with a last line naming the files written.
    """
    md = None if out is None else Path(out)
    if md is not None and md.suffix != ".md":
        raise ValueError(f"compare: --out {out}: give a markdown file name ending in .md, e.g. compare.md")
    png = _free_name(Path(DEFAULT_PLOT)) if md is None else md.with_suffix(".png")
    for target in (md, png):  # checked before anything is read or written: a user's file is never replaced
        if target is not None and (target.exists() or target.is_symlink()):
            raise ValueError(f"'{target}' exists; give --out NEW.md or remove it")
    summaries = [load_summary(d) for d in run_dirs]
    table = compare_table(summaries)
    if note := caveat(summaries):
        table = f"{table}\n\n{note}"
    if md is not None:
        atomic_write(md, lambda tmp: tmp.write_text(table + "\n"))
        plot_compare(summaries, png)
        return f"{table}\n\n(table in {md}, plot in {png})"
    plot_compare(summaries, png)
    return f"{table}\n\n(plot in {png})"


__all__ = [
    "DEFAULT_PLOT",
    "SETTINGS",
    "RunSummary",
    "caveat",
    "compare_runs",
    "compare_table",
    "default_plot_targets",
    "load_summary",
    "plot_compare",
    "save_summary",
]
