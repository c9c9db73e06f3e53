"""Library inputs that are numbers whichever library made them: Python, numpy or a 0-d torch tensor.

A value read from an array (``np.float32(0.9)``, ``np.int64(3)``, ``torch.tensor(0.5)``) is the number
the caller means; :func:`plain_number` turns it into the Python ``int`` or ``float`` that every check
and every YAML/JSON writer expects. Booleans are *not* numbers here (Python, numpy or torch): checks
that refuse ``True`` keep refusing it. Anything else is returned unchanged, so the caller's own check
still names it.

>>> import numpy as np, torch
>>> plain_number(np.float32(0.9)), plain_number(np.int64(3)), plain_number(torch.tensor(0.5))
(0.9, 3, 0.5)
>>> type(plain_number(np.bool_(True))).__name__, plain_number("0.9"), plain_number(True)
('bool', '0.9', True)
"""

from __future__ import annotations

import numbers
import operator
from typing import Any

import numpy as np
import torch


def plain_number(value: Any) -> Any:
    """``value`` as a Python ``int``/``float`` if it is a numpy or 0-d torch real scalar, else unchanged.

    Floats narrower than 64 bits become the shortest decimal that reads back as the same value in their
    own precision (``np.float32(0.9)`` -> ``0.9``, not ``0.8999999761581421``): that is the number written.
    """
    if isinstance(value, bool) or type(value) in (int, float):  # the common case, untouched
        return value
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.is_complex():
            return value
        if value.dtype == torch.bfloat16:  # numpy has no bfloat16: its float32 value is exact
            value = value.float()
        value = value.detach().cpu().numpy()[()]  # the numpy scalar of the same dtype
    elif isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    if isinstance(value, (bool, np.bool_)):
        return value
    if isinstance(value, numbers.Integral):
        return operator.index(value)
    if isinstance(value, np.floating) and value.dtype.itemsize < 8:
        return float(str(value))  # numpy prints the shortest round-tripping decimal of its precision
    if isinstance(value, numbers.Real):
        return float(value)
    return value


__all__ = ["plain_number"]
