"""Checkpoints that survive a kill at any point and never unpickle code.

Training state goes through ``torch.save`` and is read back with ``weights_only=True``
(tensors and plain containers only). Final weights and masks are written as safetensors.
Every file is written to a temporary name in the same folder, flushed to disk, then
renamed over the old one, so a crash leaves either the old or the new file, never half.
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from admmcompress.atomic import atomic_write, nearest_existing
from admmcompress.messages import first_line


class OutputFolderError(ValueError):
    """An output folder that cannot be written (a file, or no write permission); names it and the fix."""


def check_output_folder(folder: str | Path) -> None:
    """Refuse, before any work, an output folder that is a file or that this user cannot write; creates nothing.

    A folder not there yet is judged by its nearest existing parent (where it would be created).
    """
    folder = Path(folder)
    existing = nearest_existing(folder)
    if existing.exists() and not existing.is_dir():
        where = "is a file" if existing == folder else f"cannot be created: '{existing}' is a file"
        raise OutputFolderError(f"output folder '{folder}' {where}, not a folder; choose another --out")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "is not writable" if existing == folder else f"cannot be created: '{existing}' is not writable"
        raise OutputFolderError(
            f"output folder '{folder}' {where} (read-only for this user); make it writable or choose another --out"
        )


def save_state(path: str | Path, state: dict[str, Any]) -> Path:
    """Save a training state (tensors, numbers, strings, lists, dicts) atomically."""
    return atomic_write(path, lambda tmp: _torch_save(state, tmp))


def _torch_save(state: dict[str, Any], tmp: Path) -> None:
    # Through a Python file, so a full disk surfaces as the OSError (ENOSPC) behind torch's RuntimeError.
    with open(tmp, "wb") as handle:
        torch.save(state, handle)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file and the fix.

    ``problem``: the message without the fix, for a caller that gives its own (compress's resume check).
    """

    def __init__(self, message: str, problem: str | None = None):
        super().__init__(message)
        self.problem = message if problem is None else problem


class UnsafeCheckpointError(CheckpointError, pickle.UnpicklingError):
    """A state file holding objects a weights-only load refuses (never unpickled); also an ``UnpicklingError``."""


# How to go on from a run's checkpoint that cannot be resumed: the checks below take it from their caller, which
# names the command line's flags (the default) or compress()'s arguments.
RESTART_CLI = "start the run again (--overwrite) or in another --out"
RESTART_API = "pass overwrite=True to start over, or choose another out_dir"


def cannot_resume(problem: str, advice: str, why: str = "",
                  kind: type[CheckpointError] = CheckpointError) -> CheckpointError:
    """The error for a checkpoint a run cannot resume from: ``problem`` (naming the file), ``why`` where given,
    then ``advice``; ``problem`` alone is the error's ``problem``."""
    return kind(f"{problem}; {why}a run cannot resume from it: {advice}", problem)


def load_state(path: str | Path, advice: str = RESTART_CLI) -> dict[str, Any]:
    """Load a training state without unpickling arbitrary objects.

    A missing file raises ``FileNotFoundError``; a truncated, damaged or foreign one a :class:`CheckpointError`
    naming it (its objects are never unpickled) and ending in ``advice``. A zip checkpoint (what ``torch.save``
    writes) has every member checked against its CRC-32 first (:func:`check_archive`): torch's reader does not, so
    a flipped byte in a tensor would otherwise load as a silently different weight.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    check_archive(path, advice)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged pickle stream can raise nearly anything from torch's rebuild functions
        unsafe = isinstance(err, pickle.UnpicklingError)
        reason = "objects other than tensors, refused by the weights only load" if unsafe else first_line(err, 120)
        raise cannot_resume(
            f"checkpoint '{path}' cannot be read ({reason}): it is truncated, damaged or not a training state",
            advice, kind=UnsafeCheckpointError if unsafe else CheckpointError,
        ) from None
    if not isinstance(state, dict):
        raise cannot_resume(f"checkpoint '{path}' holds a {type(state).__name__}, not a training state", advice)
    return state


def check_archive(path: str | Path, advice: str = RESTART_CLI) -> None:
    """Raise :class:`CheckpointError` (naming the file and the member, ending in ``advice``) unless every member of
    the zip archive ``path`` matches the CRC-32 its header records (``zipfile.ZipFile.testzip``: it reads the whole
    file once, 1.5 ms for a 4 MB checkpoint that torch.load reads in 3.7 ms). A file that is not a zip archive is
    left to ``torch.load``: torch's legacy (pre-1.6, non-zip) format carries no checksum, and a truncated archive
    has no directory to check against; so is one saved with torch's CRCs turned off (every member's CRC is 0)."""
    path = Path(path)
    try:
        if not zipfile.is_zipfile(path):
            return
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            # torch.save with serialization.config.save.compute_crc32 = False records 0 for every member: no
            # checksum to check against (a real CRC-32 of 0 on every non-empty member is not a damage pattern)
            unchecked = all(m.CRC == 0 for m in members if m.file_size)
            bad = None if unchecked else archive.testzip()
    except Exception as err:  # a damaged header can raise nearly anything (BadZipFile, zlib.error, "encrypted", ...)
        raise cannot_resume(f"checkpoint '{path}' is damaged ({first_line(err, 120)})", advice) from None
    if bad is not None:
        raise cannot_resume(
            f"checkpoint '{path}' is damaged: its member '{bad}' does not match its CRC-32 (bytes changed on disk or "
            "in a copy)", advice,
        )


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None) -> Path:
    """Save named tensors as safetensors; ``metadata`` values are stored as JSON strings."""
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    # No metadata at all rather than an empty mapping: safetensors writes an unreadable file for no tensors
    # and empty metadata (a dense run's masks.safetensors).
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()} or None
    return atomic_write(path, lambda tmp: save_file(flat, str(tmp), metadata=meta), private_folder=True)


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Named tensors of a safetensors file; a damaged or non-safetensors file is a :class:`CheckpointError`."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint '{path}' is a folder; give the .safetensors file in it")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(
            f"checkpoint '{path}' is not a readable safetensors file ({first_line(err, 120)}): it is truncated, "
            "damaged or in another format; give a .safetensors file (a torch.save state dict converts with "
            "safetensors.torch.save_file(state_dict, 'model.safetensors'))"
        ) from None


def _truncated(value: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether casting the float ``value`` to the integer or bool ``dtype`` changes it (integers into floats do not
    count: a model's float buffers take integer checkpoints' values exactly up to 2**24)."""
    if not value.is_floating_point() or dtype.is_floating_point or dtype.is_complex:
        return False
    return not torch.equal(value.to(dtype).to(value.dtype), value)


def _names(keys: list[str], limit: int = 8) -> str:
    """``['a', 'b']``, or the first ``limit`` and a count: a checkpoint of another model differs everywhere."""
    return repr(keys) if len(keys) <= limit else f"{keys[:limit]!r} and {len(keys) - limit} more"


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load a safetensors state dict into ``model``; a mismatch names the missing/unexpected keys."""
    state = load_tensors(path)
    own = model.state_dict()  # once: both checks below read it
    mismatch = _mismatch(own, state)
    if mismatch:
        raise CheckpointError(
            f"checkpoint '{path}' does not fit {type(model).__name__}: {mismatch}; is it for another model?"
        )
    _warn_narrowing(own, state, path)
    model.load_state_dict(state)


def _warn_narrowing(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], path: str | Path) -> None:
    """load_state_dict casts to the model's dtypes; one that loses precision or range (float32 weights into a
    bfloat16 model; bfloat16 into float16, where values above 65504 become inf) is said, not done silently.
    Widening (bf16 or fp16 into float32) is exact and passes quietly. ``own``: the model's state dict."""
    narrowed = sorted(  # not exactly representable in the model's dtype: bf16 <-> fp16 either way, fp32 -> either
        k
        for k, v in state.items()
        if k in own and v.is_floating_point() and own[k].is_floating_point()
        and torch.promote_types(v.dtype, own[k].dtype) != own[k].dtype
    )
    if narrowed:
        pairs = {(str(state[k].dtype), str(own[k].dtype)) for k in narrowed}
        warnings.warn(
            f"checkpoint '{path}': {_names(narrowed)} are loaded with less precision than saved "
            f"({', '.join(f'{a} -> {b}' for a, b in sorted(pairs))}); convert the model first (e.g. model.float()) "
            "to keep them exact",
            RuntimeWarning,
            stacklevel=3,
        )


def check_state_fits(model: torch.nn.Module, state: dict[str, Any], path: str | Path,
                     advice: str = RESTART_CLI) -> None:
    """Raise :class:`CheckpointError` (ending in ``advice``) unless the training state's ``"model"`` weights fit
    ``model`` (resume).

    Call it between :func:`load_state` and ``model.load_state_dict(state["model"])``: a run folder's
    checkpoint replaced by another model's names the file instead of a size-mismatch traceback.
    """
    weights = state.get("model")
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        mismatch = "it has no model weights"
    else:
        mismatch = _mismatch(model.state_dict(), weights)
    if mismatch:
        raise cannot_resume(f"checkpoint '{path}' does not fit {type(model).__name__}: {mismatch}", advice)


def _mismatch(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> str:
    """How ``state`` differs from a model's state dict ``own`` (keys, shapes); empty when it fits."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    # A float tensor for an integer buffer is truncated by the cast: not this model's, unless every value is whole
    # (a checkpoint cast wholesale to fp16 also casts BatchNorm's num_batches_tracked, and loads exactly).
    kinds = sorted(
        k for k in set(own) & set(state) if own[k].shape == state[k].shape and _truncated(state[k], own[k].dtype)
    )
    if not (missing or unexpected or wrong or kinds):
        return ""
    found = f"missing {_names(missing)}, unexpected {_names(unexpected)}, wrong shapes {_names(wrong)}"
    return found + (f", fractional values for integer tensors {_names(kinds)}" if kinds else "")
