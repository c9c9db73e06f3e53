"""User extensions by import path: a run config's ``plugins:`` list (or ``--plugin``) names modules whose
import registers drivers, structures and executors (``@register_driver``, ``@register_structure``,
``@register_executor``) before anything is looked up.

An entry is a dotted module name (``mypkg.my_driver``, importable from ``sys.path``) or a path to a
``.py`` file (relative paths are taken from ``base_dir``, e.g. the config's folder).

>>> load_plugins([])   # nothing to load
[]
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any


class PluginError(ValueError):
    """A plugin that cannot be imported; the message names it and the fix."""


# The flag of the commands that read a run folder (report, export, hardware): see entries_inside.
TRUST_FLAG = "--trust-plugins"
TRUST_HELP = "import the plugins the run folder's config.yaml names from inside that folder (their code runs here)"


def load_plugins(entries: list[str] | None, base_dir: str | Path | None = None) -> list[ModuleType]:
    """Import every entry once (a module already imported is not run again); returns the modules."""
    if entries is None:
        return []
    if not isinstance(entries, list) or not all(isinstance(e, str) and e for e in entries):
        raise PluginError(f"plugins={entries!r}: give a list of module names or .py files, e.g. [mypkg.toy_driver]")
    return [_load(entry, Path(base_dir) if base_dir is not None else Path.cwd()) for entry in entries]


def entries_inside(entries: Any, folder: str | Path) -> list[str]:
    """The ``entries`` whose code lies inside ``folder``: ``.py`` files there (relative paths taken from it) and
    modules that ``sys.path`` finds there (the current folder is on it under ``python -m``).

    A run folder read by ``report``, ``export`` or ``hardware`` may come from someone else; its ``plugins:``
    would run their code here. Looking a top-level module up runs none of it.

    >>> entries_inside(["json", "/opt/mine.py"], "/tmp/shared_run"), entries_inside(["evil.py"], "/tmp/run")
    ([], ['evil.py'])
    """
    root = Path(folder).resolve()
    found = []
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, str) or not entry:
            continue
        if entry.endswith(".py"):
            places = [Path(entry) if Path(entry).is_absolute() else root / entry]
        else:
            try:
                spec = importlib.util.find_spec(entry.split(".")[0])
            except (ImportError, ValueError):
                spec = None
            places = [] if spec is None else [
                Path(p) for p in ([spec.origin] if spec.has_location and spec.origin else [])
                + list(spec.submodule_search_locations or [])
            ]
        if any(place.resolve().is_relative_to(root) for place in places):
            found.append(entry)
    return found


def _load(entry: str, base_dir: Path) -> ModuleType:
    if entry.endswith(".py"):
        path = Path(entry) if Path(entry).is_absolute() else (base_dir / entry)
        path = path.resolve()
        if not path.is_file():
            raise PluginError(f"plugin file '{path}' does not exist; give a .py file or an importable module name")
        name = f"admmcompress_plugin_{path.stem}_{abs(hash(str(path))) % 10**8}"
        if name in sys.modules:
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as err:
            del sys.modules[name]
            raise PluginError(f"plugin '{entry}' failed to import: {type(err).__name__}: {err}") from err
        return module
    try:
        return importlib.import_module(entry)
    except ImportError as err:
        raise PluginError(
            f"plugin '{entry}' cannot be imported ({err}); install it, put its folder on PYTHONPATH, "
            "or give the path of its .py file"
        ) from None


__all__ = ["TRUST_FLAG", "TRUST_HELP", "PluginError", "entries_inside", "load_plugins"]
