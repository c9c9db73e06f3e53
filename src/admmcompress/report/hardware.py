"""The hardware section of a report: tiles before/after, where the area goes, SOT-MRAM bit widths, accuracy
under variation and ADC resolution. Every cost figure is labelled "modelled" and printed with its constants.

>>> import torch
>>> from admmcompress.hardware import CrossbarSpec, analyze
>>> text = render_hardware(analyze(torch.nn.Linear(64, 32), CrossbarSpec(), pim_bits=(2,)))
>>> "modelled" in text.splitlines()[0], "ISAAC" in text
(True, True)
"""

from __future__ import annotations

from pathlib import Path

from admmcompress.atomic import atomic_write
from admmcompress.hardware.analysis import HardwareAnalysis
from admmcompress.hardware.constants import CROSSBAR, DEVICE, PIM, constants_table

MODELLED = "modelled"


def _x(value: float) -> str:
    return "inf" if value == float("inf") else f"{value:.2f}x"


def _change(ratio: float) -> str:
    """A ``reference / mapping`` ratio as the signed change from the reference: 2.0 -> "-50.00%"."""
    return f"{100 * (1 / ratio - 1):+.2f}%"


def _tiles(ratio: float) -> str:
    """A tile ratio in words that stay true either way: "2.00x fewer" or "2.00x more"."""
    return f"{_x(ratio)} fewer" if ratio >= 1 else f"{_x(1 / ratio)} more"


def _constants_markdown() -> list[str]:
    lines = ["", f"Constants of the {MODELLED} figures (admmcompress/hardware/constants.py; [M] = from memory "
             "of the named table, not re-checked):", "", "| constant | value | unit | source |", "|---|---|---|---|"]
    for group in (CROSSBAR, DEVICE, PIM):
        for name, value, unit, source in constants_table(group):
            lines.append(f"| {type(group).__name__}.{name} | {value:g} | {unit} | {source} |")
    return lines


def render_hardware(result: HardwareAnalysis, title: str = "Hardware") -> str:
    """Markdown of ``result``: crossbar tiles and costs, layers, SOT-MRAM, accuracy curves, constants."""
    spec, costs, base = result.spec, result.costs, result.baseline_cost
    lines = [
        f"## {title} ({MODELLED}: crossbar and SOT-MRAM figures come from a cost model, not from hardware)",
        "",
        f"Crossbar mapping: {spec.describe()}; inputs applied in {result.act_bits} bit-serial cycles. "
        f"Reference: the unpruned model at {result.baseline_bits}-bit weights, same tiles and constants "
        f"({base.tiles} tiles).",
        "",
        f"| mapping | tiles | area (um^2, {MODELLED}) | power (mW, {MODELLED}) | energy / inference (nJ, {MODELLED}) "
        f"| area reduction ({MODELLED}) | power reduction ({MODELLED}) | energy reduction ({MODELLED}) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = [(f"unpruned, {result.baseline_bits}-bit (reference)", base)]
    rows += [(f"{kind}, {spec.weight_bits}-bit", costs[kind]) for kind in ("dense", "masked", "compact")]
    for label, cost in rows:
        r = cost.ratios(base)
        lines.append(
            f"| {label} | {cost.tiles} | {cost.area_um2:,.0f} | {cost.power_mw:,.2f} | {cost.energy_nj:,.1f} "
            f"| {_x(r['area'])} | {_x(r['power'])} | {_x(r['energy'])} |"
        )
    ratios = result.ratios
    lines += [
        "",
        f"Compacted + masked mapping vs the reference ({MODELLED}): {_tiles(ratios['tiles'])} tiles, "
        f"area {_change(ratios['area'])}, power {_change(ratios['power'])}, energy {_change(ratios['energy'])}."
        if all(ratios[k] not in (0.0, float("inf")) for k in ("tiles", "area", "power", "energy")) else "",
        "",
        f"Where the area goes (compact mapping, {MODELLED}):",
        "",
        f"| component | area (um^2, {MODELLED}) | share | power (mW, {MODELLED}) |",
        "|---|---|---|---|",
    ]
    compact = costs["compact"]
    total = compact.area_um2 or 1.0
    for name, area in compact.area.items():
        lines.append(f"| {name} | {area:,.1f} | {100 * area / total:.1f}% | {compact.power[name]:,.3f} |")
    lines += [
        "",
        f"| layer | matrix | kept outputs x inputs | nonzero | tiles dense | tiles masked | tiles compact "
        f"| positions / steps | energy (nJ, {MODELLED}) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for layer in result.mapping.layers:
        groups = f" ({layer.groups} groups, block-diagonal)" if layer.groups > 1 else ""
        lines.append(
            f"| {layer.name} | {layer.outputs}x{layer.inputs}{groups} | {layer.kept_outputs}x{layer.kept_inputs} "
            f"| {layer.nonzero:,} | {layer.dense} | {layer.masked} | {layer.compact} | {layer.positions} "
            f"| {compact.layer_energy_nj.get(layer.name, 0.0):,.2f} |"
        )
    for note in result.mapping.notes:
        lines.append(f"\nNote: {note}")
    if result.pim and result.pim_baseline is not None:
        ref = result.pim_baseline
        lines += [
            "",
            f"SOT-MRAM processing-in-memory ({MODELLED}; {ref.spec.rows}x{ref.spec.cols} sub-arrays, "
            f"{ref.spec.act_bits}-bit activations, bit-serial: weight bits x activation bits cycles per row "
            f"operation; reference: unpruned, {ref.spec.weight_bits}-bit weights, {ref.subarrays} sub-arrays):",
            "",
            f"| weight bits | sub-arrays | cycles / row op | area (um^2, {MODELLED}) | energy (nJ, {MODELLED}) "
            f"| latency (us, {MODELLED}) | area reduction ({MODELLED}) | energy reduction ({MODELLED}) "
            f"| one-time write energy (nJ, {MODELLED}) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for cost in result.pim:
            r = cost.ratios(ref)
            lines.append(
                f"| {cost.spec.weight_bits} | {cost.subarrays} | {cost.spec.cycles_per_row_op} "
                f"| {cost.area_um2:,.0f} | {cost.energy_nj:,.2f} | {cost.latency_us:,.2f} | {_x(r['area'])} "
                f"| {_x(r['energy'])} | {cost.write_energy_nj:,.2f} |"
            )
    if result.variation:
        lines += [
            "",
            f"Accuracy under device non-idealities ({MODELLED} device, accuracy measured on the test set; "
            f"clean {result.accuracy:.2f}%, mapped without noise {result.mapped_accuracy:.2f}%):",
            "",
            "| model | sigma (log-normal) | stuck-on | stuck-off | accuracy mean (%) | sd | draws |",
            "|---|---|---|---|---|---|---|",
        ]
        for point in result.variation:
            n = point.noise
            lines.append(
                f"| {point.label or '-'} | {n.sigma:g} | {n.stuck_on:g} | {n.stuck_off:g} "
                f"| {point.accuracy.mean:.2f} | {point.accuracy.sd:.2f} | {len(point.accuracy.values)} |"
            )
    if result.adc:
        lines += [
            "",
            f"Accuracy vs ADC resolution ({MODELLED} ADC: each tile's partial sum quantized, analog inputs"
            + (f"; full scales set on {result.adc_calibration} training inputs" if result.adc_calibration else "")
            + "):",
            "",
            "| ADC bits | accuracy (%) |",
            "|---|---|",
        ]
        lines += [f"| {bits} | {acc:.2f} |" for bits, acc in result.adc]
        lines += _adc_exact_notes(result)
    lines += _constants_markdown()
    return "\n".join(line for line in lines if line is not None) + "\n"


def _adc_exact_notes(result: HardwareAnalysis) -> list[str]:
    """Notes naming the mapped layers the ADC sweep left exact, by why: a kind the ADC model does not cover, or a
    covered Linear/Conv2d that never ran through its own forward (one note listed both as of other kinds)."""
    uncalled = [name for name in result.adc_exact if name in result.adc_uncalled]
    other = [name for name in result.adc_exact if name not in result.adc_uncalled]
    notes = []
    if other:
        notes += ["", "Note: the ADC model covers Linear and ungrouped zero-padded Conv2d layers; these mapped layers "
                      f"of other kinds were left exact (no ADC on their partial sums): {_quoted(other)}"]
    if uncalled:
        notes += ["", "Note: these mapped Linear/Conv2d layers never ran through their own forward on the calibration "
                      "inputs (unused, or called inside another layer as MultiheadAttention's out_proj is), so no ADC "
                      f"was set for them and they were left exact (no ADC on their partial sums): {_quoted(uncalled)}"]
    return notes


def _quoted(names: list[str]) -> str:
    return ", ".join(f"'{name}'" for name in names)


def plot_hardware(result: HardwareAnalysis, path: str | Path) -> Path:
    """One PNG: tiles per layer (dense / masked / compact) and the compact mapping's area by component."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = result.mapping.layers
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 1]})
    x = range(len(layers))
    width = 0.27
    for i, kind in enumerate(("dense", "masked", "compact")):
        left.bar([p + (i - 1) * width for p in x], [getattr(layer, kind) for layer in layers], width, label=kind)
    left.set_xticks(list(x))
    left.set_xticklabels([layer.name for layer in layers], rotation=60, ha="right", fontsize=7)
    left.set_ylabel("crossbar tiles")
    left.set_title(f"tiles per layer ({result.spec.rows}x{result.spec.cols}, {MODELLED})")
    left.legend()
    area = sorted(result.costs["compact"].area.items(), key=lambda kv: kv[1])
    total = sum(v for _, v in area) or 1.0
    shares = [100.0 * v / total for _, v in area]
    right.barh([k for k, _ in area], shares)  # bars, not a pie: components of 0.3% stay readable
    for i, share in enumerate(shares):
        right.text(share, i, f" {share:.1f}%", va="center", fontsize=7)
    right.set_xlim(0, max(shares) * 1.25 if shares else 1)
    right.set_xlabel("share of the compact mapping's area (%)")
    right.set_title(f"area by component ({MODELLED})")
    fig.tight_layout()
    out = atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return out


def save_hardware(result: HardwareAnalysis, folder: str | Path, title: str = "Hardware") -> tuple[Path, Path]:
    """Write ``hardware.md`` and ``hardware.png`` into ``folder`` (atomically)."""
    folder = Path(folder)
    text = render_hardware(result, title)
    md = atomic_write(folder / "hardware.md", lambda tmp: tmp.write_text(text))
    return md, plot_hardware(result, folder / "hardware.png")


__all__ = ["MODELLED", "plot_hardware", "render_hardware", "save_hardware"]
