"""YAML for configs and plans: PyYAML's safe loader, except that a key given twice in one mapping is an error.

PyYAML keeps the last of duplicate keys silently, so a second ``retrain:`` or ``stages:`` block would replace
the first without a word; a config is the record of a run, so that is refused instead.
"""

from __future__ import annotations

from typing import Any

import yaml


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping names the same key twice (``problem`` says which, ``problem_mark`` where)."""


class _UniqueKeyLoader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` keys may be overridden on purpose
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class gives its own error
                break
            if first is not None:
                raise DuplicateKeyError(
                    None, None,
                    f"duplicate key {key!r} (first at line {first.start_mark.line + 1}); keep one of them",
                    key_node.start_mark,
                )
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


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
    return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: builds no arbitrary objects


def yaml_problem(err: yaml.YAMLError) -> str:
    """One line: the parser's problem and where (``str(err)`` spans several lines with a caret drawing)."""
    problem = getattr(err, "problem", None)
    mark = getattr(err, "problem_mark", None)
    if problem is None:
        return str(err).splitlines()[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}"
