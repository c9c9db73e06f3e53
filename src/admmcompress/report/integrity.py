"""Checksums of a finished run's outputs, recorded when the run ends and verified by ``report`` and ``export``.

When ``admmcompress run`` has written its outputs, ``record_output_checksums(out_dir)`` stores in
``metrics.json`` (under ``metrics["integrity"]``) the SHA-256 of ``model.safetensors``,
``masks.safetensors`` and, for ``compact: true`` runs, ``compact/manifest.json`` and
``compact/model.safetensors``, plus a SHA-256 of ``metrics.json``'s own content (its canonical JSON,
so re-indenting it changes nothing, but any changed value is seen) and of ``config.yaml``'s values (the
model is rebuilt from them). Infinity and NaN are written as the strings "inf", "-inf" and "nan" (JSON has no
such numbers; ``read_nonfinite`` turns them back). ``verify_run(out_dir)`` checks all
of them and that the weights agree with the masks (every weight a mask prunes is exactly zero); a
mismatch is one ``RunIntegrityError`` line naming the file. Runs written before checksums were
recorded are still verified against their masks, and get a note instead of a refusal. ``report --rehash``
(files changed on purpose) skips the checksums but not the rest: every output the record lists must still be
there (a missing one would drop out of the new record), masks included, and a compacted model's manifest must
read and match its weights.

What ``admmcompress run`` does at its end, then what ``report`` and ``export`` do first::

    record_output_checksums("runs/lenet5")
    verify_run("runs/lenet5")        # [] (no notes), or RunIntegrityError naming the file
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file

from admmcompress.atomic import atomic_write
from admmcompress.config_keys import LOCATION_KEYS, SPEED_KEYS, without_keys
from admmcompress.executors.manifest import canonical_sha256, read_compact_manifest, sha256_hex
from admmcompress.finalize.quantized import SEP
from admmcompress.strict_yaml import safe_load_unique, yaml_problem

KEY = "integrity"
METRICS = "metrics.json"
MODEL, MASKS = "model.safetensors", "masks.safetensors"
COMPACT_MANIFEST, COMPACT_WEIGHTS = "compact/manifest.json", "compact/model.safetensors"
CHECKED_FILES = (MODEL, MASKS, COMPACT_MANIFEST, COMPACT_WEIGHTS)
CONFIG = "config.yaml"  # checked by content (parsed YAML), not bytes


class RunIntegrityError(ValueError):
    """A run folder whose outputs are not what the run wrote (changed, damaged or missing); one line."""


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def config_sha256(path: str | Path) -> str:
    """SHA-256 of a run config's values (its parsed YAML as canonical JSON, locations left out): comments and
    layout may change, and the speed and location keys of :mod:`admmcompress.config_keys`; a value that shapes
    the run may not, since ``report`` and ``export`` rebuild the model from it."""
    return _config_digests(path)[0]


def _config_digests(path: str | Path) -> tuple[str, str]:
    """The config checksum as written now, and as runs finished before 2026-12-06 wrote it (they left out
    fewer keys: ``distributed.check_ranks`` was hashed); both verify."""
    try:
        spec = safe_load_unique(Path(path).read_bytes().decode("utf-8"))
    except yaml.YAMLError as err:
        raise RunIntegrityError(f"'{path}' is not readable YAML ({yaml_problem(err)}): the file is damaged") from None
    except UnicodeDecodeError:
        raise RunIntegrityError(f"'{path}' is not text (UnicodeDecodeError): the file is damaged") from None
    if not isinstance(spec, dict):
        return (canonical_sha256(_as_json(spec)),) * 2
    legacy = {k: v for k, v in spec.items() if k not in _LEGACY_TOP}
    if isinstance(legacy.get("data"), dict):
        legacy["data"] = {k: v for k, v in legacy["data"].items() if k not in ("data_dir", "eval_batch_size")}
    current = without_keys(spec, SPEED_KEYS + LOCATION_KEYS)
    return canonical_sha256(_as_json(current)), canonical_sha256(_as_json(legacy))


# What runs finished before 2026-12-06 left out of the checksum at the top level (kept as it was, so they verify).
_LEGACY_TOP = ("plugins", "threads", "logging", "pretrained", "teacher", "checkpoint_every_epochs", "save_stages")


def _as_json(value: Any) -> Any:
    """``value`` as JSON holds it once written (numpy scalars and the like become what the writer makes of
    them), so a checksum is the same before writing and after reading. Config checksums and the legacy content
    checksum: infinity stays a float here (written as the bare ``Infinity`` that strict JSON readers refuse)."""
    return json.loads(json.dumps(value, default=str))


# JSON has no infinity or NaN: metrics.json spells them as compare's summary.json does, str(float)
NONFINITE = ("inf", "-inf", "nan")


def spell_nonfinite(value: Any) -> Any:
    """A copy of ``value`` (dicts, lists, tuples walked) with each infinite or NaN float as its spelling in
    ``NONFINITE``, so that ``json.dumps`` writes standard JSON instead of a bare ``Infinity`` or ``NaN``.

    >>> spell_nonfinite({"ratio": float("inf"), "loss": [1.5, float("nan"), -float("inf")]})
    {'ratio': 'inf', 'loss': [1.5, 'nan', '-inf']}
    """
    if isinstance(value, float):  # numpy's float64 too; other scalars go through json's default=str
        return value if math.isfinite(value) else str(float(value))
    if isinstance(value, dict):
        return {key: spell_nonfinite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [spell_nonfinite(item) for item in value]
    return value


def read_nonfinite(value: Any) -> Any:
    """A copy of ``value`` read from ``metrics.json`` with each string of ``NONFINITE`` turned back into its float
    (the figures a reader computes with); a legacy file's bare ``Infinity`` already reads as a float.

    >>> read_nonfinite({"ratio": "inf", "name": "fc1", "loss": [1.5, "nan"]})
    {'ratio': inf, 'name': 'fc1', 'loss': [1.5, nan]}
    """
    if isinstance(value, str):
        return float(value) if value in NONFINITE else value
    if isinstance(value, dict):
        return {key: read_nonfinite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [read_nonfinite(item) for item in value]
    return value


def metrics_text(data: dict[str, Any]) -> str:
    """``metrics.json``'s text for ``data`` (``{"metrics": ..., "history": ...}``): standard JSON, infinity and
    NaN spelled as in ``NONFINITE`` (``allow_nan=False``: a bare ``Infinity`` can no longer slip through)."""
    return json.dumps(spell_nonfinite(data), indent=2, default=str, allow_nan=False)


def _content(metrics: dict[str, Any], history: list[dict[str, Any]]) -> dict[str, Any]:
    """What the content checksum covers: metrics and history, the integrity record without its own value."""
    record = {k: v for k, v in metrics.get(KEY, {}).items() if k != "content"}
    return {"metrics": {**metrics, KEY: record}, "history": history}


def content_sha256(metrics: dict[str, Any], history: list[dict[str, Any]]) -> str:
    """SHA-256 of ``metrics.json``'s content as written now (infinity and NaN spelled, as the file holds them).

    A figure read back as a float or as its spelling hashes the same, so a report may decode them first.
    """
    return canonical_sha256(_as_json(spell_nonfinite(_content(metrics, history))))


def _content_digests(metrics: dict[str, Any], history: list[dict[str, Any]]) -> tuple[str, str]:
    """The content checksum as written now, and as runs written before metrics.json spelled infinity and NaN
    wrote it (bare ``Infinity``/``NaN`` in the hashed text): both verify, as ``_config_digests``' two do."""
    return content_sha256(metrics, history), canonical_sha256(_as_json(_content(metrics, history)))


def seal(metrics: dict[str, Any], history: list[dict[str, Any]]) -> None:
    """Update the content checksum of ``metrics`` (in place) after its figures changed; no-op without a record."""
    if isinstance(metrics.get(KEY), dict):
        metrics[KEY]["content"] = content_sha256(metrics, history)


def pending_record() -> dict[str, Any]:
    """What ``metrics.json`` holds under ``integrity`` from its first write until ``record_output_checksums``: a
    run stopped in between is then refused as unfinished, not passed as one written before checksums existed."""
    return {"algorithm": "sha256", "pending": True}


def record_output_checksums(out_dir: str | Path) -> dict[str, Any]:
    """Record the SHA-256 of the run's output files and of ``metrics.json``'s content in ``metrics.json``.

    Called once the run's outputs are all written (the end of ``admmcompress run``); returns the record.
    """
    out = Path(out_dir)
    path = out / METRICS
    data = json.loads(path.read_text())
    metrics, history = data["metrics"], data["history"]
    files = {name: file_sha256(out / name) for name in CHECKED_FILES if (out / name).is_file()}
    metrics[KEY] = {"algorithm": "sha256", "files": files}
    if (out / CONFIG).is_file():
        metrics[KEY]["config"] = config_sha256(out / CONFIG)
    seal(metrics, history)
    payload = metrics_text({**data, "metrics": metrics})
    atomic_write(path, lambda tmp: tmp.write_text(payload))
    return metrics[KEY]


def read_metrics(out_dir: str | Path, require_history: bool = True) -> dict[str, Any]:
    """``metrics.json`` of a run folder as a dict, or one ``RunIntegrityError`` line when it is damaged.

    The one reader of the file: ``report``, ``export``, ``compare`` and ``hardware`` all come here, so a
    damaged file reads the same everywhere. ``require_history=False`` accepts a file without the per-epoch
    history (summaries that only need the final figures).

    >>> read_metrics("/nonexistent")
    Traceback (most recent call last):
    ...
    FileNotFoundError: no metrics.json in '/nonexistent'; is it the --out folder of a finished run?
    """
    path = Path(out_dir) / METRICS
    if not path.is_file():
        raise FileNotFoundError(f"no {METRICS} in '{out_dir}'; is it the --out folder of a finished run?")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        raise RunIntegrityError(f"'{path}' is not valid JSON ({err}): the file is damaged") from None
    if not isinstance(data, dict) or not isinstance(data.get("metrics"), dict):
        raise RunIntegrityError(f"'{path}' is not a run's {METRICS} (no 'metrics' entry): the file is damaged")
    if require_history and not isinstance(data.get("history"), list):
        raise RunIntegrityError(f"'{path}' is not a run's {METRICS} (no 'history' entry): the file is damaged")
    return data


def verify_run(out_dir: str | Path, files: bool = True, require_history: bool = True) -> list[str]:
    """Check a finished run folder; return notes (one line each), raise ``RunIntegrityError`` on a mismatch.

    Checks ``metrics.json``'s content checksum and the recorded SHA-256 of every output file (``files=False``,
    ``report --rehash``, skips those two: files changed on purpose, but every output the record lists must still
    be there and a compacted model's manifest still read), then that ``model.safetensors`` agrees with
    ``masks.safetensors`` (which must be there). A run without recorded checksums (written before they were)
    gets a note; ``require_history=False`` accepts one without per-epoch history too (``compare``'s summaries).
    """
    out = Path(out_dir)
    data = read_metrics(out, require_history=False)
    if require_history or KEY in data["metrics"]:  # a recorded content checksum covers the history too
        data = read_metrics(out)
    metrics, history = data["metrics"], data.get("history", [])
    record = metrics.get(KEY)
    notes = []
    if record is None:
        for key, value in metrics.items():  # a record under a damaged key must not pass as an older run
            if isinstance(value, dict) and ("files" in value or "content" in value) and "algorithm" in value:
                raise RunIntegrityError(f"'{out / METRICS}' holds its checksum record under {key!r}: it is damaged")
        notes.append(
            f"'{out}' was written before runs recorded checksums: its files cannot be verified "
            "(the weights are still checked against the masks)"
        )
    elif isinstance(record, dict) and record.get("pending") is True:
        raise RunIntegrityError(
            f"'{out}' is a run that stopped while writing its final outputs (its checksums were never recorded); "
            f"finish it: admmcompress run CONFIG --out {out} --resume"
        )
    elif files:
        _check_record(out, record, metrics, history)
    else:  # --rehash: changed files get new checksums, but what the run wrote must still be there and readable
        _check_outputs_present(out, record)
    if (out / MODEL).is_file() and not (out / MASKS).is_file():
        if record is not None or not files:  # a legacy run may predate masks.safetensors; --rehash needs it
            raise RunIntegrityError(
                f"'{out / MASKS}' is missing; the run wrote it: restore it (the weights cannot be checked "
                "against the masks without it, so --rehash refuses too)"
            )
        notes.append(f"'{out}' has no {MASKS}: its weights cannot be checked against the masks")
    _check_masks(out)
    return notes


def _check_outputs_present(out: Path, record: Any) -> None:
    """``--rehash``: every output the old record lists still exists, and a compacted model's files still load.

    A missing output would silently drop out of the new record, and a damaged one be recorded as genuine.
    """
    if record is None:
        return  # a run written before checksums: nothing records which outputs it wrote
    if not isinstance(record, dict) or not isinstance(record.get("files"), dict):
        raise RunIntegrityError(f"'{out / METRICS}': its '{KEY}' record is malformed; the file is damaged")
    for name in record["files"]:
        target = out / str(name)
        if name in CHECKED_FILES and name != MASKS and not target.is_file():  # masks: verify_run's own line
            raise RunIntegrityError(
                f"'{target}' is missing; the run wrote it ({METRICS} records its checksum): restore it "
                "(--rehash records new checksums of changed outputs, not of missing ones)"
            )
    if (out / COMPACT_MANIFEST).is_file():
        _check_compact(out)


def _check_compact(out: Path) -> None:
    """The compacted model's manifest reads (JSON, its own checksum, its fields) and names its weights file."""
    manifest = read_compact_manifest(out / COMPACT_MANIFEST)  # ManifestError: one line naming the file
    recorded = manifest.get("weights")
    weights = out / COMPACT_WEIGHTS
    if isinstance(recorded, dict) and weights.is_file():
        data = weights.read_bytes()
        if len(data) != recorded.get("bytes") or sha256_hex(data) != recorded.get("sha256"):
            raise RunIntegrityError(
                f"'{weights}' is not the file '{out / COMPACT_MANIFEST}' records: the compacted model would not "
                "load; restore the run's compact/ folder"
            )


def _check_record(out: Path, record: Any, metrics: dict[str, Any], history: list[dict[str, Any]]) -> None:
    path = out / METRICS
    if not (
        isinstance(record, dict)
        and isinstance(record.get("files"), dict)
        and isinstance(record.get("content"), str)
        and all(isinstance(v, str) for v in record["files"].values())
        and isinstance(record.get("config", ""), str)
    ):
        raise RunIntegrityError(f"'{path}': its '{KEY}' record is malformed; the file is damaged")
    if record["content"] not in _content_digests(metrics, history):
        raise RunIntegrityError(
            f"'{path}' does not match the checksum recorded in it when the run finished: it was changed or damaged"
        )
    if "config" in record:  # runs before 2026-12-05 recorded no config checksum
        config = out / CONFIG
        if not config.is_file():
            raise RunIntegrityError(f"'{config}' is missing; the run wrote it ({METRICS} records its checksum)")
        if record["config"] not in _config_digests(config):
            raise RunIntegrityError(
                f"'{config}' holds other values than the run was made with (its checksum was recorded when the run "
                "finished): report and export rebuild the model from it; undo the change, or add --rehash if it "
                "was on purpose"
            )
    for name, digest in record["files"].items():
        if name not in CHECKED_FILES:
            raise RunIntegrityError(f"'{path}' records a checksum for '{name}', which is not a run output: damaged")
        target = out / name
        if not target.is_file():
            raise RunIntegrityError(f"'{target}' is missing; the run wrote it ({METRICS} records its checksum)")
        actual = file_sha256(target)
        if actual != digest:
            raise RunIntegrityError(
                f"'{target}' does not match the SHA-256 recorded when the run finished ({actual[:12]}... != "
                f"{digest[:12]}...): it was changed or damaged; if you changed it on purpose, add --rehash"
            )


# safetensors 0.4-0.8 write an empty dict with empty metadata as this malformed header (and cannot read it
# back); dense runs' masks.safetensors are that file. It means "no masks", so it is read as such.
_EMPTY_WITH_METADATA = b'{},"__metadata__":{}}'


def _load(path: Path) -> dict[str, torch.Tensor]:
    data = path.read_bytes()
    if data[8 : 8 + int.from_bytes(data[:8], "little")].rstrip(b" ") == _EMPTY_WITH_METADATA:
        return {}
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors' own error type for a damaged file, said in one line
        raise RunIntegrityError(f"'{path}' is not a readable safetensors file ({type(err).__name__}: {err})") from None


def _check_masks(out: Path) -> None:
    """Every weight that ``masks.safetensors`` prunes is exactly zero in ``model.safetensors``."""
    if not (out / MODEL).is_file() or not (out / MASKS).is_file():
        return
    weights, masks = _load(out / MODEL), _load(out / MASKS)
    for name, mask in masks.items():
        if SEP in name:
            continue  # held quantized values (codes, levels), not a mask
        weight = weights.get(name)
        if weight is None or weight.shape != mask.shape:
            found = "no such tensor" if weight is None else f"shape {list(weight.shape)}"
            raise RunIntegrityError(
                f"'{out / MASKS}' masks '{name}' of shape {list(mask.shape)}, '{out / MODEL}' has {found}"
            )
        revived = weight[~mask.bool()] != 0
        if bool(revived.any()):
            raise RunIntegrityError(
                f"'{out / MODEL}': {int(revived.sum())} weights of '{name}' that masks.safetensors prunes are not "
                "zero; the file was changed after the run"
            )
        _check_levels(out, name, weight, masks)


def _check_levels(out: Path, name: str, weight: torch.Tensor, masks: dict[str, torch.Tensor]) -> None:
    """A quantized weight holds exactly its recorded levels (``levels[codes]``) wherever it is held: the storage
    report counts those levels, so a weight moved off them after the run would be reported wrongly."""
    codes, levels = masks.get(f"{name}{SEP}codes"), masks.get(f"{name}{SEP}levels")
    if codes is None or levels is None or codes.shape != weight.shape:
        return
    codes = codes.to(torch.int64)
    held = codes >= 0
    frozen = masks.get(f"{name}{SEP}frozen")
    if frozen is not None and frozen.shape == weight.shape:  # partial quantization holds a subset only
        held &= frozen.bool()
    if not bool(held.any()) or int(codes.max()) >= levels.numel():
        return
    expected = levels.to(weight.dtype)[codes.clamp_min(0)]
    off = held & (weight != expected)
    if bool(off.any()):
        raise RunIntegrityError(
            f"'{out / MODEL}': {int(off.sum())} weights of '{name}' are off the quantization levels masks.safetensors "
            "records for them; the file was changed after the run"
        )


__all__ = [
    "CHECKED_FILES",
    "RunIntegrityError",
    "content_sha256",
    "file_sha256",
    "metrics_text",
    "read_metrics",
    "read_nonfinite",
    "record_output_checksums",
    "seal",
    "spell_nonfinite",
    "verify_run",
]
