"""Every constant of the hardware cost models, with its unit and where it comes from (fixed, never fitted).

These numbers were written down before any run of this project and are never tuned toward a paper's
figures: a modelled reduction is only as good as this table, which is why reports print it beside every
figure (``constants_table()``). Confidence tags as in SPEC 0: **[M]** = from memory of the named
publication's table, not re-checked against the paper; nothing here is **[V]**erified. Replace a value by
editing this file only (and say so in the results): no other module holds a hardware number.

Memristor crossbar (ReRAM), per 128x128 array with 2-bit cells, 1-bit input DACs and one shared 8-bit ADC,
32 nm, 100 ns read cycle. Source: the ISAAC tile table (Shafiee et al., "ISAAC: A Convolutional Neural
Network Accelerator with In-Situ Analog Arithmetic in Crossbars", ISCA 2016, Table 6 [M]), divided by the
8 arrays of an ISAAC in-situ MAC unit; this is the table NeuroSim-style estimators are usually compared with.

=====================  ===============  ==================  ===============================================
component              area (um^2)      power (mW)          ISAAC per-IMA entry it is taken from [M]
=====================  ===============  ==================  ===============================================
crossbar array         25               0.3                 8 arrays: 0.0002 mm^2, 2.4 mW
ADC (8 bit, 1.28 GS/s) 1200             2.0                 8 ADCs: 0.0096 mm^2, 16 mW
DAC (1 bit) x rows     0.166 each       0.0039 each         8x128 DACs: 0.00017 mm^2, 4 mW
sample & hold x cols   0.039 each       0.0000098 each      8x128 S+H: 0.00004 mm^2, 0.01 mW
shift & add            30               0.025               4 units: 0.00024 mm^2, 0.2 mW (half per array)
input/output regs      358.75           0.184               IR 2 KB 0.0021 mm^2 1.24 mW; OR 256 B 0.00077 mm^2
                                                            0.23 mW (one eighth each)
=====================  ===============  ==================  ===============================================

ADC scaling with resolution (our model [M]): a SAR ADC's energy per conversion is about ``FOM * 2^bits``
(Walden figure of merit), so ADC power and area are scaled by ``2^(bits - 8)`` from the 8-bit entry.

Device conductance range (ReRAM cell, [M] typical HfOx values): ``G_min = 1 uS``, ``G_max = 100 uS``.

SOT-MRAM processing-in-memory (bit-wise in-memory computing, IMCE-style: Angizi, He, Fan et al. [M]).
No verified table was available when this file was written; these are order-of-magnitude values for a
45 nm 2T1MTJ SOT cell and are tagged [M] as such. Only *ratios* under the same constants are reported.

=============================  ==========  ======  ===========================================================
constant                       value       unit    note
=============================  ==========  ======  ===========================================================
SOT cell area                  0.12        um^2    ~60 F^2 at F = 45 nm [M]
sub-array periphery / column   4.0         um^2    sense amplifier + bit counter per bitline [M]
row operation energy / column  0.02        pJ      one bit-wise AND sensed on one bitline (20 fJ) [M]
bit-count + shift energy / col 0.01        pJ      counter increment and shift per cycle (10 fJ) [M]
cycle time                     1.0         ns      one row operation [M]
write energy / bit             0.1         pJ      SOT write, paid once (weights written once) [M]
=============================  ==========  ======  ===========================================================
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Constant:
    """One modelled constant: ``value`` in ``unit``, and the source it was taken from."""

    value: float
    unit: str
    source: str


_ISAAC = "ISAAC (Shafiee et al., ISCA 2016) Table 6, per array [M]"
_SOT = "SOT-MRAM PIM order of magnitude (IMCE-style, Angizi/He/Fan et al.) [M]"


@dataclass(frozen=True)
class CrossbarConstants:
    """Per-array figures of a 128x128 ReRAM crossbar and its periphery (reference size and resolution)."""

    reference_rows: Constant = Constant(128, "cells", _ISAAC)
    reference_cols: Constant = Constant(128, "cells", _ISAAC)
    reference_adc_bits: Constant = Constant(8, "bits", _ISAAC)
    cycle_time: Constant = Constant(100.0, "ns", _ISAAC)
    array_area: Constant = Constant(25.0, "um^2", _ISAAC)
    array_power: Constant = Constant(0.3, "mW", _ISAAC)
    adc_area: Constant = Constant(1200.0, "um^2", _ISAAC)
    adc_power: Constant = Constant(2.0, "mW", _ISAAC)
    dac_area: Constant = Constant(0.166, "um^2 per row", _ISAAC)
    dac_power: Constant = Constant(0.0039, "mW per row", _ISAAC)
    sample_hold_area: Constant = Constant(0.039, "um^2 per column", _ISAAC)
    sample_hold_power: Constant = Constant(0.0000098, "mW per column", _ISAAC)
    shift_add_area: Constant = Constant(30.0, "um^2", _ISAAC)
    shift_add_power: Constant = Constant(0.025, "mW", _ISAAC)
    registers_area: Constant = Constant(358.75, "um^2", _ISAAC)
    registers_power: Constant = Constant(0.184, "mW", _ISAAC)


@dataclass(frozen=True)
class DeviceConstants:
    """Conductance range of one ReRAM cell (the linear level grid of ``conductance`` lies on it)."""

    g_min: Constant = Constant(1.0, "uS", "typical HfOx ReRAM off state, on/off ratio ~100 [M]")
    g_max: Constant = Constant(100.0, "uS", "typical HfOx ReRAM on state [M]")


@dataclass(frozen=True)
class PIMConstants:
    """SOT-MRAM processing-in-memory sub-array figures."""

    cell_area: Constant = Constant(0.12, "um^2", _SOT)
    column_periphery_area: Constant = Constant(4.0, "um^2 per column", _SOT)
    row_op_energy: Constant = Constant(0.02, "pJ per column per cycle", _SOT)
    count_energy: Constant = Constant(0.01, "pJ per column per cycle", _SOT)
    cycle_time: Constant = Constant(1.0, "ns", _SOT)
    write_energy: Constant = Constant(0.1, "pJ per bit", _SOT)


CROSSBAR = CrossbarConstants()
DEVICE = DeviceConstants()
PIM = PIMConstants()


def constants_table(constants: CrossbarConstants | DeviceConstants | PIMConstants) -> list[tuple[str, float, str, str]]:
    """``(name, value, unit, source)`` rows of a constants set, for printing beside modelled figures.

    >>> constants_table(CROSSBAR)[4]
    ('array_area', 25.0, 'um^2', 'ISAAC (Shafiee et al., ISCA 2016) Table 6, per array [M]')
    """
    rows = []
    for f in fields(constants):
        c = getattr(constants, f.name)
        rows.append((f.name, c.value, c.unit, c.source))
    return rows


__all__ = [
    "CROSSBAR", "DEVICE", "PIM", "Constant", "CrossbarConstants", "DeviceConstants", "PIMConstants", "constants_table",
]
