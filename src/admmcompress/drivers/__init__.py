"""How training is pushed toward a structure: ADMM, reweighted group lasso and magnitude baselines."""

from admmcompress.drivers.admm import ADMM, RhoSchedule
from admmcompress.drivers.magnitude import GradualMagnitude, one_shot
from admmcompress.drivers.reweighted import Reweighted, ReweightedConfig

__all__ = ["ADMM", "GradualMagnitude", "Reweighted", "ReweightedConfig", "RhoSchedule", "one_shot"]
