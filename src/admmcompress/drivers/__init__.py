"""How training is pushed toward a structure: one :class:`Driver` protocol and a registry of methods
(ADMM, reweighted group lasso, one-shot and gradual magnitude baselines, iterative quantization, and any
plugin registered with :func:`register_driver`)."""

from admmcompress.drivers.admm import ADMM, ADMMConfig, RhoSchedule
from admmcompress.drivers.base import (
    Driver,
    DriverContext,
    DriverError,
    DriverSpec,
    ModuleTransform,
    get_driver,
    list_drivers,
    register_driver,
    unregister_driver,
)
from admmcompress.drivers.iterative_quantization import IterativeQuantization, IterativeQuantizationConfig
from admmcompress.drivers.magnitude import GradualMagnitude, MagnitudeConfig, OneShotMagnitude, one_shot
from admmcompress.drivers.penni import Penni, PenniConfig
from admmcompress.drivers.reweighted import Reweighted, ReweightedConfig
from admmcompress.drivers.soft import SoftConfig, SoftThreshold

__all__ = [
    "ADMM", "ADMMConfig", "Driver", "DriverContext", "DriverError", "DriverSpec", "GradualMagnitude",
    "IterativeQuantization", "IterativeQuantizationConfig", "MagnitudeConfig", "ModuleTransform",
    "OneShotMagnitude", "Penni", "PenniConfig", "Reweighted", "ReweightedConfig", "RhoSchedule", "get_driver",
    "list_drivers",
    "one_shot", "register_driver", "unregister_driver", "SoftConfig", "SoftThreshold",
]
