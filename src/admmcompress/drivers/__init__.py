"""How training is pushed toward a structure: ADMM and magnitude baselines."""

from admmcompress.drivers.admm import ADMM, RhoSchedule
from admmcompress.drivers.magnitude import GradualMagnitude, one_shot

__all__ = ["ADMM", "GradualMagnitude", "RhoSchedule", "one_shot"]
