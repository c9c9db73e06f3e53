"""How training is pushed toward a structure: ADMM, reweighted group lasso, magnitude baselines and
iterative quantization."""

from admmcompress.drivers.admm import ADMM, RhoSchedule
from admmcompress.drivers.iterative_quantization import IterativeQuantization
from admmcompress.drivers.magnitude import GradualMagnitude, one_shot
from admmcompress.drivers.reweighted import Reweighted, ReweightedConfig

__all__ = [
    "ADMM", "GradualMagnitude", "IterativeQuantization", "Reweighted", "ReweightedConfig", "RhoSchedule", "one_shot",
]
