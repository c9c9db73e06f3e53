"""YAML for configs and plans: PyYAML's safe loader, except that a key given twice in one mapping is an error.

PyYAML keeps the last of duplicate keys silently, so a second ``retrain:`` or ``stages:`` block would replace
the first without a word; a config is the record of a run, so that is refused instead.
"""

from __future__ import annotations

from typing import Any

import yaml


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping names the same key twice (``problem`` says which, ``problem_mark`` where)."""


MERGE_TAG = "tag:yaml.org,2002:merge"


def _check_unique_keys(node: yaml.Node | None, visited: set[int]) -> None:
    """Walk the composed document (before any merge is applied) and refuse a mapping that names a key twice.

    Checked on the node tree as written, not while constructing: PyYAML applies ``<<: *anchor`` merges by
    editing the merged mapping's node in place, so a check during construction would see an inherited key and
    its override as a duplicate.
    """
    if node is None or id(node) in visited:  # an alias is the same node: check it once
        return
    visited.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen: dict[tuple[str, str], yaml.Node] = {}
        for key_node, value_node in node.value:
            if key_node.tag != MERGE_TAG and isinstance(key_node, yaml.ScalarNode):
                key = (key_node.tag, key_node.value)
                first = seen.get(key)
                if first is not None:
                    line = first.start_mark.line + 1
                    raise DuplicateKeyError(
                        None, None, f"duplicate key {key_node.value!r} (first at line {line}); keep one of them",
                        key_node.start_mark,
                    )
                seen[key] = key_node
            _check_unique_keys(key_node, visited)
            _check_unique_keys(value_node, visited)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_unique_keys(item, visited)


def safe_load_unique(text: str) -> Any:
    """``yaml.safe_load`` that refuses a key given twice in one mapping.

    >>> safe_load_unique("a: 1\\nb: 2")
    {'a': 1, 'b': 2}
    >>> try:
    ...     safe_load_unique("a: 1\\na: 2")
    ... except DuplicateKeyError as err:
    ...     print(err.problem, "- line", err.problem_mark.line + 1)
    duplicate key 'a' (first at line 1); keep one of them - line 2
    """
    loader = yaml.SafeLoader(text)  # safe: builds plain data only, never arbitrary objects
    try:
        node = loader.get_single_node()
        _check_unique_keys(node, set())
        return None if node is None else loader.construct_document(node)
    finally:
        loader.dispose()


def yaml_problem(err: yaml.YAMLError) -> str:
    """One line: the parser's problem and where (``str(err)`` spans several lines with a caret drawing)."""
    problem = getattr(err, "problem", None)
    mark = getattr(err, "problem_mark", None)
    if problem is None:
        return str(err).splitlines()[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}"
