"""YAML for configs and plans: PyYAML's safe loader, except that a key given twice in one mapping is an error.

PyYAML keeps the last of duplicate keys silently, so a second ``retrain:`` or ``stages:`` block would replace
the first without a word; a config is the record of a run, so that is refused instead.
"""

from __future__ import annotations

from typing import Any

import yaml


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping names the same key twice (``problem`` says which, ``problem_mark`` where)."""


class AliasBombError(yaml.constructor.ConstructorError):
    """Aliases expand the document past ``MAX_EXPANDED_VALUES`` values (``problem`` says so, ``problem_mark`` where)."""


MERGE_TAG = "tag:yaml.org,2002:merge"
# A config or plan is hundreds of values; nested aliases (``*a`` nine times, nine levels deep) can make a few
# hundred bytes expand to 10**9 values once anything walks or copies the data (a resume's comparison, json).
MAX_EXPANDED_VALUES = 1_000_000


def _expanded_size(node: yaml.Node | None, sizes: dict[int, int]) -> int:
    """How many values ``node`` stands for with every alias written out (memoized: aliases share nodes)."""
    if node is None:
        return 0
    known = sizes.get(id(node))
    if known is not None:
        return known
    sizes[id(node)] = 1  # a recursive alias (``&a [*a]``) counts once; the constructor builds it as a cycle
    if isinstance(node, yaml.MappingNode):
        total = 1 + sum(_expanded_size(k, sizes) + _expanded_size(v, sizes) for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        total = 1 + sum(_expanded_size(item, sizes) for item in node.value)
    else:
        total = 1
    sizes[id(node)] = total
    return total


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


def _smallest_too_large(node: yaml.Node, sizes: dict[int, int]) -> yaml.Node:
    """The innermost node past the limit (where the user's nesting is), for the error's line number."""
    while True:
        children = [v for pair in node.value for v in pair] if isinstance(node, yaml.MappingNode) else (
            node.value if isinstance(node, yaml.SequenceNode) else [])
        inner = next((c for c in children if sizes.get(id(c), 0) > MAX_EXPANDED_VALUES), None)
        if inner is None:
            return node
        node = inner


def safe_load_unique(text: str) -> Any:
    """``yaml.safe_load`` that refuses a key given twice in one mapping.

    >>> safe_load_unique("a: 1\\nb: 2")
    {'a': 1, 'b': 2}
    >>> try:
    ...     safe_load_unique("a: 1\\na: 2")
    ... except DuplicateKeyError as err:
    ...     print(err.problem, "- line", err.problem_mark.line + 1)
    duplicate key 'a' (first at line 1); keep one of them - line 2
    >>> bomb = "a0: &a0 [x, x, x, x, x, x, x, x, x]\\n" + "".join(
    ...     f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\\n" for i in range(1, 9))
    >>> try:
    ...     safe_load_unique(bomb)
    ... except AliasBombError as err:
    ...     print(err.problem)
    aliases (*name) expand this document to more than 1,000,000 values; write the values out instead of nesting aliases
    """
    loader = yaml.SafeLoader(text)  # safe: builds plain data only, never arbitrary objects
    try:
        node = loader.get_single_node()
        _check_unique_keys(node, set())
        sizes: dict[int, int] = {}
        if _expanded_size(node, sizes) > MAX_EXPANDED_VALUES:
            raise AliasBombError(
                None, None, f"aliases (*name) expand this document to more than {MAX_EXPANDED_VALUES:,} values; "
                "write the values out instead of nesting aliases", _smallest_too_large(node, sizes).start_mark,
            )
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
