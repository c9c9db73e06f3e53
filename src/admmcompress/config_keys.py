"""Run-config keys that do not change the model a run builds (dotted paths into ``config.yaml``), in one place
for the two checks that need them: ``--resume`` (which config changes it accepts) and the run integrity
record (which values its config checksum covers).

- ``SPEED_KEYS``: how fast or how verbosely a run goes. ``--resume`` accepts changes to them at any point.
  ``threads`` also changes the order of float sums, so the weights' last bits: a resume with another thread
  count than the run's checkpoint says so (a warning), as it is then no longer bit-identical.
- ``LOCATION_KEYS``: where things are on a machine (plugin files, the data folder, the checkpoints a run
  started from); a run folder moved to another machine may need them edited.

The integrity checksum leaves both out, so editing them never makes ``report`` or ``export`` refuse a run.

>>> without_keys({"threads": 2, "data": {"dataset": "mnist", "data_dir": "/d"}, "logging": {"csv": True}},
...              SPEED_KEYS + LOCATION_KEYS)
{'data': {'dataset': 'mnist'}}
>>> without_keys({"threads": 2, "seed": 0}, "threads")
{'seed': 0}
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

SPEED_KEYS = (
    "threads",
    "checkpoint_every_epochs",
    "save_stages",
    "data.eval_batch_size",
    "distributed.check_ranks",
    "logging.csv",
    "logging.tensorboard",
)
LOCATION_KEYS = ("plugins", "pretrained", "teacher", "data.data_dir")


def without_keys(spec: dict[str, Any], dotted: Iterable[str]) -> dict[str, Any]:
    """A copy of ``spec`` without the ``dotted`` keys; a section they leave empty goes too (so a config that
    writes ``logging: {csv: true}`` and one that leaves ``logging`` out agree)."""
    if isinstance(dotted, str):  # one key, not its letters
        dotted = (dotted,)
    out = dict(spec)
    for key in dotted:
        head, _, rest = key.partition(".")
        if not rest:
            out.pop(head, None)
        elif isinstance(out.get(head), dict):
            inner = without_keys(out[head], [rest])
            if inner:
                out[head] = inner
            else:
                out.pop(head)
    return out
