"""``admmcompress export --packed|--onnx|--compact RUN_DIR --out ...``: a finished run's model as a file.

Run-folder glue for the CLI (reads ``config.yaml`` and the checkpoints), kept out of ``executors/``
so that the executors never depend on the training package.

The packed file is checked before the command returns: it is loaded back into a fresh model,
whose state dict must equal the run's bit for bit and whose outputs must be identical; the printed
summary puts the file's size next to the storage report's figure.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from admmcompress.executors.compact import CompactionError, count_params
from admmcompress.executors.compact_run import compact_checked, model_spec, random_inputs, save_compact
from admmcompress.executors.manifest import load_compacted
from admmcompress.models import create_model
from admmcompress.report.compaction import render_compaction
from admmcompress.report.storage import StorageReport, render_storage, storage
from admmcompress.train import checkpoint as ckpt
from admmcompress.train.config import RunConfig

if TYPE_CHECKING:
    from admmcompress.executors.packed import PackedSummary


def load_run_model(run_dir: str | Path) -> tuple[torch.nn.Module, RunConfig]:
    """The model of a finished run folder (its ``config.yaml`` and ``model.safetensors``)."""
    run_dir = Path(run_dir)
    if not (run_dir / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"'{run_dir}' has no model.safetensors; give the --out folder of a finished `admmcompress run`"
        )
    config = RunConfig.from_yaml(run_dir / "config.yaml")
    model = create_model(config.model["name"], **{k: v for k, v in config.model.items() if k != "name"})
    ckpt.load_weights(model, run_dir / "model.safetensors")
    return model.eval(), config


def example_input(config: RunConfig, count: int = 8) -> torch.Tensor:
    from admmcompress.data.datasets import load_dataset

    return load_dataset(config.data.dataset, "test", config.data.data_dir, count).x[:count]


def export_packed_run(
    run_dir: str | Path, out: str | Path, scheme: str = "best", index_bits: int | str = "best"
) -> str:
    """Write the packed file, verify the round trip, return a printable summary."""
    from admmcompress.executors.packed import load_packed, save_packed

    model, config = load_run_model(run_dir)
    summary = save_packed(model, out, scheme=scheme, index_bits=index_bits, model_spec=dict(config.model))
    restored = load_packed(out).eval()
    for name, value in model.state_dict().items():
        if not torch.equal(value, restored.state_dict()[name]):
            raise RuntimeError(f"packed round trip changed '{name}'; please report this as a bug")
    x = example_input(config)
    with torch.no_grad():
        identical = torch.equal(model(x), restored(x))
    report = storage(model, index_bits=index_bits)
    lines = [render_storage(report), *packed_size_lines(Path(out).stat().st_size, summary, report, scheme)]
    lines.append(f"round trip: state dict bit-identical, outputs identical: {identical}")
    return "\n".join(lines)


def packed_size_lines(size: int, summary: PackedSummary, report: StorageReport, scheme: str = "best") -> list[str]:
    """The packed file's size against the storage report (SPEC 4.2), every byte of difference named.

    The report counts weight bits (codes, indices, codebooks) and, apart, the other parameters;
    the file adds the container header, each packed weight's last partial byte and any buffers
    (BN statistics), which the report does not count.
    """
    weight_bits, other_bits = report.bits(scheme), report.other_bits
    figure = (weight_bits + other_bits) / 8
    buffers = summary.other_bytes - other_bits / 8
    return [
        f"storage report (SPEC 4.2): weights {weight_bits:,} bits = {weight_bits / 8:,.1f} B, "
        f"other parameters {other_bits / 8:,.0f} B; together {figure:,.1f} B",
        f"container overhead: header {summary.header_bytes:,} B (format, layout checksum, model spec, "
        f"per-tensor scheme/nnz/length), byte padding {summary.padding_bits:,} bits "
        f"({len(summary.schemes)} packed weights)"
        + (f", buffers not in the report {buffers:,.0f} B" if buffers else ""),
        f"packed file: {size:,} B = {summary.header_bytes:,} header + {summary.weight_bytes:,} weights + "
        f"{summary.other_bytes:,} other tensors; file / report = {size / figure:.4f} "
        f"({100 * (size / figure - 1):+.2f}%)",
    ]


def export_onnx_run(run_dir: str | Path, out: str | Path) -> str:
    """Export to ONNX (integer weights + DequantizeLinear), check against ONNX Runtime, summarize."""
    from admmcompress.executors.onnx_export import export_onnx, run_onnx

    model, config = load_run_model(run_dir)
    x = example_input(config)
    summary = export_onnx(model, (x,), out)
    with torch.no_grad():
        # Two batch sizes: the graph's batch dimension is dynamic.
        diff = max(float((torch.from_numpy(run_onnx(out, b)[0]) - model(b)).abs().max()) for b in (x, x[:1]))
    return (
        f"onnx: {out}; integer weights + DequantizeLinear: {summary.quantized or 'none'}; "
        f"codebook indices + Gather: {summary.codebook or 'none'}; "
        f"float weights: {summary.float_weights or 'none'}; dynamic batch: {summary.dynamic_batch}; "
        f"max |onnxruntime - torch| on {len(x)} test inputs (batches of {len(x)} and 1): {diff:.3g}"
    )


def export_compact_run(run_dir: str | Path, out: str | Path, atol: float = 1e-4, samples: int = 8) -> str:
    """``admmcompress export --compact RUN_DIR --out FOLDER``: compact a finished run's model and save it."""
    model, config = load_run_model(run_dir)
    options = config.compact
    atol = options.atol if options is not None else atol
    columns = options.columns if options is not None else "off"
    example = example_input(config, 2)
    result, figures = compact_checked(model, example, atol=atol, samples=samples, columns=columns)
    figures = save_compact(result, figures, out, model_spec(config.model))
    restored = load_compacted(out).eval()
    check = random_inputs(example, samples, seed=2)
    with torch.no_grad():
        diff = float((restored(check) - model(check)).abs().max())
    if not diff <= atol:
        raise CompactionError(f"the reloaded compacted model differs by {diff:.3g} (> atol={atol:g}); report this")
    return (
        f"compacted: {out}/manifest.json + model.safetensors ({count_params(restored):,} parameters)\n"
        + render_compaction(figures)
        + f"\n- Reloaded from {out} without the model's widths: max |diff| {diff:.2e}"
    )
