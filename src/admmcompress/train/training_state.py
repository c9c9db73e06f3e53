"""A run's training state (``checkpoint.pt``): what it holds, and its one checked reader.

Every reader of a run folder's checkpoint (resume, ``--dry-run``, ``report``'s progress) goes through
:func:`load_training_state`, so a damaged or foreign file is one line naming the file and the key, never a
``KeyError`` or a traceback deep inside a ``load_state_dict``.

>>> import tempfile
>>> read_progress(tempfile.mkdtemp()) is None   # a folder without a checkpoint yet
True
>>> try:
...     check_training_state({"epoch": 1}, "checkpoint.pt")
... except ckpt.CheckpointError as err:
...     print(str(err).split(";")[0])
checkpoint 'checkpoint.pt' is not a training state of this tool (no 'phase_index')
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import torch

from admmcompress.messages import first_line
from admmcompress.train import checkpoint as ckpt

STATE_FILE = "checkpoint.pt"
STAGES_DIR = "stages"  # save_stages: every finished stage's model and masks, beside the checkpoint
_NONE = type(None)
# What a training state (checkpoint.pt) holds and the types of its values: check_training_state checks a loaded
# state once against these, so a damaged or foreign file is one line naming the key, not a KeyError or a
# traceback deep in a load_state_dict (or, for history, in the plots after training).
STATE_KEYS: dict[str, tuple[type, ...]] = {
    "phase_index": (int,),
    "epoch": (int,),
    "model": (dict,),
    "optimizer": (dict, _NONE),
    "driver": (dict, _NONE),
    "masks": (dict,),
    "loader": (dict,),
    "rng": (torch.Tensor,),
    "history": (list,),
    "metrics": (dict,),
}
# Keys later versions added: absent from older checkpoints (their defaults apply), checked where present.
OPTIONAL_STATE_KEYS: dict[str, tuple[type, ...]] = {
    "average": (dict, _NONE),
    "threads": (int, _NONE),
    "transforms": (list,),
    "teacher": (dict, _NONE),
    "config": (dict,),  # the run's config (config_dict), for compress(resume=True); from 2026-12-06
    "rng_ranks": (torch.Tensor,),  # every rank's random state (one row each); from 2026-12-06
}


def read_progress(out_dir: str | Path) -> tuple[int, int] | None:
    """``(phase_index, epoch)`` of the checkpoint in a run folder, None if it has none yet."""
    path = Path(out_dir) / STATE_FILE
    if not path.is_file():
        return None
    state = load_training_state(path)
    return state["phase_index"], state["epoch"]


def load_training_state(path: str | Path, advice: str = ckpt.RESTART_CLI) -> dict[str, Any]:
    """A run folder's checkpoint, loaded weights-only (:func:`ckpt.load_state`) and checked by
    :func:`check_training_state`: every reader of a training state goes through here. ``advice``: how to start
    over, at the end of a refusal (the command line's flags by default)."""
    state = ckpt.load_state(path, advice)
    check_training_state(state, path, advice)
    return state


def check_training_state(state: dict[str, Any], path: str | Path, advice: str = ckpt.RESTART_CLI) -> None:
    """Raise :class:`ckpt.CheckpointError` naming the file and the key (and ending in ``advice``) unless ``state``
    has every key of ``STATE_KEYS`` with a value of its type (and ``OPTIONAL_STATE_KEYS``' where present)."""
    for key in STATE_KEYS:
        if key not in state:
            raise ckpt.cannot_resume(f"checkpoint '{path}' is not a training state of this tool (no '{key}')", advice)
    for key, types in (STATE_KEYS | OPTIONAL_STATE_KEYS).items():
        value = state.get(key)
        if key not in state or (isinstance(value, types) and not isinstance(value, bool)):
            continue
        expected = " or ".join("None" if t is _NONE else t.__name__ for t in types)
        _damaged(path, f"'{key}' is {type(value).__name__}, expected {expected}", advice)
    for key in ("phase_index", "epoch"):
        if state[key] < 0:
            _damaged(path, f"'{key}' is {state[key]}, expected a count >= 0", advice)
    parts = {  # the containers' items that the resume reads directly
        "model": (state["model"].values(), torch.Tensor),
        "masks": (state["masks"].values(), torch.Tensor),
        "history": (state["history"], dict),
        "transforms": (state.get("transforms") or [], dict),
    }
    for key, (items, kind) in parts.items():
        odd = next((item for item in items if not isinstance(item, kind)), None)
        if odd is not None:
            _damaged(path, f"'{key}' holds a {type(odd).__name__}, expected {kind.__name__} items", advice)
    if state["rng"].dtype != torch.uint8:
        _damaged(path, f"'rng' is a {state['rng'].dtype} tensor, expected torch's random state (uint8)", advice)
    metrics = state["metrics"]
    if not isinstance(metrics.get("stages"), list) or not isinstance(metrics.get("phase_seconds"), dict):
        _damaged(path, "'metrics' has no 'stages' list or no 'phase_seconds' mapping", advice)


def _damaged(path: str | Path, problem: str, advice: str) -> NoReturn:
    raise ckpt.cannot_resume(f"checkpoint '{path}': {problem}", advice,
                             why="it is damaged or not a training state of this tool: ")


@contextlib.contextmanager
def restoring(path: str | Path, key: str, advice: str = ckpt.RESTART_CLI) -> Iterator[None]:
    """Restoring the checkpoint's ``key`` into the run: content that does not fit (a damaged or foreign state,
    right in type but not in its insides) is one line naming the file and the key (and ending in ``advice``),
    not a traceback."""
    try:
        yield
    except ckpt.CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as err:
        _damaged(path, f"its '{key}' cannot be restored ({first_line(err, 120)})", advice)


__all__ = [
    "OPTIONAL_STATE_KEYS",
    "STAGES_DIR",
    "STATE_FILE",
    "STATE_KEYS",
    "check_training_state",
    "load_training_state",
    "read_progress",
    "restoring",
]
