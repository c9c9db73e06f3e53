"""Plans: per-layer rules that say which structure each layer must reach.

A plan is a list of rules. A rule selects layers by a glob on the module name
(``match``) and/or by module type (``type``, which also matches subclasses), minus the layers whose names
match any ``exclude`` glob, and names a structure with its target.
``Plan.resolve(model)`` turns rules into concrete targets and raises one ``PlanError``
listing every problem before anything trains.

>>> import torch.nn as nn
>>> from admmcompress.structures import Unstructured
>>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
>>> plan = Plan({"0": Unstructured(sparsity=0.5), "2": Unstructured(compression=4)})
>>> [(t.layer, t.structure.target_sparsity) for t in plan.resolve(model)]
[('0', 0.5), ('2', 0.75)]

The same plan in YAML::

    rules:
      - {match: "0", structure: unstructured, sparsity: 0.5}
      - {match: "2", structure: unstructured, compression: 4}

"Every Linear but the classifier" is one rule::

      - {type: Linear, exclude: [classifier, "*.head"], structure: block, block: [4, 4], sparsity: 0.75}
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from admmcompress.messages import short_repr
from admmcompress.plan.coupled import couple, couple_heads
from admmcompress.plan.targets import PlanError, Target
from admmcompress.strict_yaml import safe_load_unique, yaml_problem
from admmcompress.structures.base import Structure
from admmcompress.structures.groups import gemm_params
from admmcompress.structures.registry import structure_class, structure_from_dict
from admmcompress.structures.sparsity import GEMM_MODULES

RULE_KEYS = {"match", "type", "exclude", "structure", "sparsity", "compression"}


@dataclass(frozen=True)
class Rule:
    """Select layers by name glob and/or module type name (subclasses too), minus ``exclude`` globs.

    ``exclude`` is one glob or a sequence of globs on module names; a layer matching any is left out.
    """

    structure: Structure
    match: str | None = None
    type: str | None = None
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.match is None and self.type is None:
            raise PlanError("a rule needs 'match' (a glob on module names) or 'type' (e.g. Conv2d), or both")
        exclude = (self.exclude,) if isinstance(self.exclude, str) else self.exclude
        if not isinstance(exclude, Iterable) or not all(isinstance(g, str) for g in exclude):
            raise PlanError(
                f"rule exclude={self.exclude!r} must be a glob or a list of globs on module names, "
                "e.g. exclude: [classifier, \"*.head\"]"
            )
        object.__setattr__(self, "exclude", tuple(exclude))
        for key in ("match", "type"):
            value = getattr(self, key)
            if isinstance(value, (list, tuple)):  # quoting the list would make one bracket glob: say what works
                raise PlanError(
                    f"rule {key}={list(value)!r}: {key} takes one glob, e.g. {key}: \"conv*\"; for several layers "
                    "write one rule per pattern"
                )
            if value is not None and not isinstance(value, str):
                raise PlanError(
                    f"rule {key}={value!r} must be a string (got {type(value).__name__}); "
                    f"quote it in YAML, e.g. {key}: \"{value}\""
                )
        if not isinstance(self.structure, Structure):
            raise PlanError(
                "rule structure must be a SparsityStructure or QuantizationStructure (a registered Structure, "
                f"e.g. Unstructured(sparsity=0.5)), got {type(self.structure).__name__}"
            )

    def describe(self) -> str:
        parts = [f"match={self.match!r}"] if self.match is not None else []
        if self.type is not None:
            parts.append(f"type={self.type!r}")
        if self.exclude:
            parts.append(f"exclude={list(self.exclude)!r}")
        return f"rule({', '.join(parts)}, {self.structure.kind})"

    def selects(self, name: str, module: torch.nn.Module) -> bool:
        if self.match is not None and not fnmatch.fnmatchcase(name, self.match):
            return False
        if any(fnmatch.fnmatchcase(name, glob) for glob in self.exclude):
            return False
        return self.type is None or is_of_type(module, self.type)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.match is not None:
            out["match"] = self.match
        if self.type is not None:
            out["type"] = self.type
        if self.exclude:
            out["exclude"] = list(self.exclude)
        out.update(self.structure.to_dict())
        return out

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any], where: str = "rule") -> Rule:
        if not isinstance(spec, Mapping):
            example = "{match: conv1, structure: unstructured, sparsity: 0.8}"
            raise PlanError(f"{where}: expected a mapping like {example}")
        named = structure_class(spec.get("structure"))
        if named is None and spec.get("structure") is not None:  # a misspelt name: say that, not its options' keys
            try:
                structure_from_dict(dict(spec), where)
            except ValueError as err:
                raise PlanError(str(err)) from None
        allowed = RULE_KEYS | set(named.options if named is not None else ())
        unknown = sorted(set(spec) - allowed)
        if unknown:
            raise PlanError(f"{where}: unknown key(s) {unknown}; allowed keys are {sorted(allowed)}")
        try:
            structure = structure_from_dict(dict(spec), where)
        except ValueError as err:
            raise PlanError(str(err)) from None
        return cls(structure=structure, match=spec.get("match"), type=spec.get("type"), exclude=spec.get("exclude", ()))


def is_of_type(module: torch.nn.Module, name: str) -> bool:
    """Whether ``module``'s class or one of its base classes is called ``name`` (``Conv2d`` matches subclasses)."""
    return any(cls.__name__ == name for cls in type(module).__mro__)


def _one_dimensional(module: torch.nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() < 2


def prunable_layers(model: torch.nn.Module) -> list[str]:
    """Names of modules with a 'weight' tensor or GRU/LSTM weight matrices (what a plan may target)."""
    return [n for n, m in model.named_modules() if gemm_params(m)]


class Plan:
    """An ordered list of rules; build from Python, a dict, or YAML."""

    def __init__(self, rules: Mapping[str, Structure] | Iterable[Rule]):
        if isinstance(rules, Mapping) and isinstance(rules.get("rules"), list):  # the YAML shape, not {glob: s}
            raise PlanError("Plan({'rules': [...]}) is a plan's YAML shape: build it with Plan.from_dict(...), or "
                            "Plan.from_yaml(...) from a file or a YAML string")
        if isinstance(rules, Mapping):
            rules = [Rule(structure=s, match=pattern) for pattern, s in rules.items()]
        elif isinstance(rules, (str, bytes)) or not isinstance(rules, Iterable):  # "fc1" would be rules f, c, 1
            raise PlanError(f"Plan({short_repr(rules)}): {PLAN_TAKES}")
        self.rules: list[Rule] = list(rules)
        if not self.rules:
            raise PlanError("the plan has no rules; add at least one {match: ..., structure: ..., sparsity: ...}")
        for i, rule in enumerate(self.rules):  # checked now, not as an AttributeError when the plan is resolved
            if not isinstance(rule, Rule):
                hint = " (a rule mapping goes through Plan.from_dict)" if isinstance(rule, Mapping) else ""
                raise PlanError(
                    f"Plan rule #{i} is {type(rule).__name__} {short_repr(rule)}, not a Rule{hint}: {PLAN_TAKES}"
                )

    def __repr__(self) -> str:
        return f"Plan({[r.describe() for r in self.rules]})"

    # --- construction ------------------------------------------------------------------
    @classmethod
    def from_dict(cls, spec: Mapping[str, Any] | list[Any]) -> Plan:
        """From ``{"rules": [...]}`` or a bare list of rule mappings."""
        if isinstance(spec, Mapping):
            unknown = sorted(set(spec) - {"rules"})
            if unknown:
                raise PlanError(f"plan: unknown key(s) {unknown}; a plan has only 'rules'")
            spec = spec.get("rules")
        if not isinstance(spec, list):
            raise PlanError("plan: 'rules' must be a list of rule mappings")
        errors, rules = [], []
        for i, item in enumerate(spec):
            try:
                rules.append(Rule.from_dict(item, where=f"plan rule #{i}"))
            except PlanError as err:
                errors.append(str(err))
        if errors:
            raise PlanError.listing("invalid plan", errors)
        return cls(rules)

    @classmethod
    def from_yaml(cls, source: str | Path) -> Plan:
        """From a YAML file path (an existing file, whatever its suffix) or a YAML string."""
        if not isinstance(source, (str, Path)):
            raise PlanError(
                f"Plan.from_yaml takes a YAML file path or a YAML string, got {type(source).__name__}; "
                "for a mapping or a list use Plan.from_dict"
            )
        path = _plan_path(source)
        text = _read_plan_file(path) if path is not None else str(source)
        where = f"plan file '{path}'" if path is not None else "plan"
        try:
            spec = safe_load_unique(text)
        except yaml.YAMLError as err:
            raise PlanError(f"{where} is not valid YAML: {yaml_problem(err)}") from None
        if path is None and isinstance(spec, str) and "\n" not in text:  # one word: a file name that is not there
            raise PlanError(
                f"plan file '{source}' does not exist (check the path, relative to {Path.cwd()}); a YAML plan "
                "string is a mapping, e.g. 'rules: [{match: fc1, structure: unstructured, sparsity: 0.5}]'"
            )
        if path is not None and not isinstance(spec, (Mapping, list)):
            raise PlanError(
                f"{where} holds no plan ({'it is empty' if spec is None else f'a YAML {type(spec).__name__}'}); "
                "a plan file is a mapping with a list of rules, e.g. 'rules: [{match: fc1, structure: unstructured, "
                "sparsity: 0.5}]'"
            )
        return cls.from_dict(spec)

    def to_dict(self) -> dict[str, Any]:
        return {"rules": [r.to_dict() for r in self.rules]}

    # --- validation --------------------------------------------------------------------
    def resolve(self, model: torch.nn.Module) -> list[Target]:
        """Concrete targets for ``model``; raises ``PlanError`` listing every problem."""
        modules = dict(model.named_modules())
        candidates = prunable_layers(model)
        errors: list[str] = []
        targets: list[Target] = []
        seen: dict[tuple[str, str], int] = {}
        for i, rule in enumerate(self.rules):
            selected = [n for n in candidates if rule.selects(n, modules[n])]
            if rule.structure.quantizes and rule.match != "" and not any(n == rule.match for n in selected):
                # A pattern ('*', type: ...) quantizes matrices and kernels, not the 1-D scales of norm layers it
                # also matches (a review's finding); a rule naming such a layer is refused by check_module.
                selected = [n for n in selected if not _one_dimensional(modules[n])] or selected
            if not selected:
                errors.append(_nothing_matched(i, rule, modules, candidates))
                continue
            if rule.exclude and not any(fnmatch.fnmatchcase(n, g) for n in modules for g in rule.exclude):
                # a misspelt exclude protects nothing: said, not refused (one plan may serve several models, some
                # without the excluded layer, e.g. exclude: [lm_head] on encoders)
                warnings.warn(f"rule #{i} {rule.describe()}: exclude {list(rule.exclude)} matches no layer of this "
                              f"model, so it keeps nothing out; check the names (prunable layers: "
                              f"{_shown(candidates)})", UserWarning, stacklevel=2)
            for name in selected:
                try:
                    rule.structure.check_module(modules[name], name)
                except ValueError as err:
                    errors.append(f"rule #{i} {rule.describe()}: {err}")
                    continue
                # A layer takes each structure once, and at most one level set (quantizations share a slot).
                slot = "quantization" if rule.structure.quantizes else rule.structure.kind
                previous = seen.get((name, slot))
                if previous is not None:
                    errors.append(
                        f"rule #{i} {rule.describe()} and rule #{previous} {self.rules[previous].describe()} both give "
                        f"layer '{name}' a '{slot}' target; keep one (each layer takes each structure once)"
                    )
                    continue
                seen[(name, slot)] = i
                for param in rule.structure.params(modules[name]):  # "weight", or GRU/LSTM weight_ih/hh_l{k}
                    structure = rule.structure.bind(modules[name], param)
                    targets.append(Target(layer=name, param=param, structure=structure, rule=i))
        errors += _tied_targets(targets, modules)
        errors += _tied_elsewhere(targets, modules, model)
        if errors:
            raise PlanError.listing("the plan does not fit this model", errors)
        return couple_heads(model, targets)  # a heads target always spans its block's q/k/v rows and o columns

    def resolve_coupled(
        self,
        model: torch.nn.Module,
        example: Any,
        mode: str = "strict",
        extra_channelwise_ops: Iterable[str] | None = None,
    ) -> list[Target]:
        """``resolve``, then filter/channel targets on tied channels become one coupled target per group.

        The entry point for coupled targets. Residual adds, concatenations, depthwise convs and BN tie
        channels; the model's dependency graph is traced once per model and example shape and then
        cached (:func:`~admmcompress.plan.graph.cached_channel_groups`). ``mode`` is "strict" (the plan
        must name every tied layer) or "extend" (prune the whole group); ``extra_channelwise_ops`` names
        further autograd ops known to act per channel. See :func:`admmcompress.plan.coupled.couple`.

        >>> import torch.nn as nn
        >>> from admmcompress.structures import Filter
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
        >>> [t.key for t in Plan({"0": Filter(sparsity=0.5)}).resolve_coupled(model, torch.zeros(1, 3, 8, 8))]
        ['0:coupled-filter']
        """
        return couple(model, self.resolve(model), example, mode, extra_channelwise_ops)


def resolve_targets(model: torch.nn.Module, plan: Any, where: str) -> list:
    """The targets ``where`` (a driver, ``hard_prune``...) works on: a :class:`Plan`, or what builds one (a mapping
    ``{glob: structure}``, a list of :class:`Rule`), is resolved on ``model``; a list of resolved targets (what
    ``Plan.resolve`` / ``Plan.resolve_coupled`` return) is taken as it is. Anything else is one ``PlanError``
    naming the fix.

    >>> import torch.nn as nn
    >>> from admmcompress.structures import Unstructured
    >>> model = nn.Sequential(nn.Linear(4, 2))
    >>> [t.key for t in resolve_targets(model, [Rule(Unstructured(sparsity=0.5), match="0")], "ADMM")]
    ['0.weight:unstructured']
    """
    if isinstance(plan, Mapping) or (isinstance(plan, (list, tuple)) and plan and isinstance(plan[0], Rule)):
        plan = Plan(plan)  # checks every rule, one line for the first that is not one
    if isinstance(plan, Plan):
        return plan.resolve(model)
    if isinstance(plan, (str, bytes, Path)):
        raise PlanError(f"{where} got {type(plan).__name__} {short_repr(plan)}: it takes a Plan or resolved targets; "
                        "read a YAML plan with Plan.from_yaml(path or text)")
    if not isinstance(plan, Iterable):
        raise PlanError(f"{where} got {type(plan).__name__} {short_repr(plan)}: it takes a Plan, e.g. "
                        "Plan({'fc1': Unstructured(sparsity=0.5)}), or the targets Plan.resolve(model) returns")
    targets = list(plan)
    for item in targets:  # the driver/finalizer interface (Target and CoupledTarget; a plugin's own too)
        if not all(hasattr(item, name) for name in ("structure", "value", "masks", "key")):
            raise PlanError(f"{where}: {type(item).__name__} {short_repr(item)} is not a resolved target; pass the "
                            "Plan itself, or the list Plan.resolve(model) / Plan.resolve_coupled(model, x) returns")
    return targets


PLAN_TAKES = (
    "a plan takes a mapping {'layer glob': structure} or a list of Rule(structure, match=..., type=...), "
    "e.g. Plan({'fc1': Unstructured(sparsity=0.5)})"
)


def _plan_path(source: str | Path) -> Path | None:
    """The file ``source`` names, or None when it is YAML text; a named file that cannot be read is a PlanError.

    A ``Path``, a ``.yaml``/``.yml`` name (any case) or the name of anything that exists is a path; other text
    is YAML (a file name that does not exist is caught by ``from_yaml`` once it parses to a bare word).
    """
    if isinstance(source, str) and "\n" in source:
        return None
    path = Path(source)
    try:  # a long one-line YAML string is no file name: the OS may say "name too long"
        is_dir, is_file = path.is_dir(), path.is_file()
    except (OSError, ValueError):
        is_dir = is_file = False
    if isinstance(source, str) and not (is_dir or is_file or source.strip().lower().endswith((".yaml", ".yml"))):
        return None
    if is_dir:
        raise PlanError(f"plan file '{path}' is a folder; give the plan's YAML file in it")
    if not is_file:
        raise PlanError(f"plan file '{path}' does not exist; check the path (relative to {Path.cwd()})")
    return path


def _read_plan_file(path: Path) -> str:
    """The text of a plan file; unreadable or binary files are a one-line PlanError."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise PlanError(f"plan file '{path}' cannot be read ({err.strerror or err}); check its permissions") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise PlanError(
            f"plan file '{path}' is not a text (YAML) file: byte {data[err.start]:#04x} at offset {err.start} is not "
            "UTF-8; give the plan's YAML file"
        ) from None


def _tied_targets(targets: list[Target], modules: dict[str, torch.nn.Module]) -> list[str]:
    """Two targets on one tensor (tied weights, e.g. an LM head sharing the token embedding) would be driven
    twice toward different sets; name both and say how to keep one."""
    first: dict[int, Target] = {}
    errors = []
    for t in targets:
        tensor = getattr(modules[t.layer], t.param)
        other = first.setdefault(id(tensor), t)
        if other is not t and other.layer != t.layer:
            errors.append(
                f"layers '{other.layer}' and '{t.layer}' share one '{t.param}' tensor (tied weights) and both "
                f"have a target; target it under one name only (e.g. add exclude: ['{t.layer}'] to rule #{t.rule})"
            )
    return errors


def _tied_elsewhere(targets: list[Target], modules: dict[str, torch.nn.Module], model: torch.nn.Module) -> list[str]:
    """A target on a tied tensor that the model lists under another name (GPT-2's LM head sharing the token
    embedding) would be looked up under a name drivers never see; say which name holds it."""
    names = {id(p): n for n, p in model.named_parameters()}
    errors = []
    for t in targets:
        owner = names.get(id(getattr(modules[t.layer], t.param)))
        if owner is not None and owner != t.param_name:
            errors.append(
                f"layer '{t.layer}' shares its '{t.param}' tensor with '{owner}' (tied weights); exclude it from "
                f"rule #{t.rule} (e.g. exclude: ['{t.layer}']): the tensor is pruned, if at all, as '{owner}'"
            )
    return errors


def _shown(names: list[str]) -> str:
    return ", ".join(names[:12]) + (" ..." if len(names) > 12 else "")


def _nothing_matched(i: int, rule: Rule, modules: dict[str, torch.nn.Module], candidates: list[str]) -> str:
    shown = _shown(candidates)
    if rule.match is not None and rule.match in modules and rule.match not in candidates:
        kind = type(modules[rule.match]).__name__
        return (
            f"rule #{i} {rule.describe()}: layer '{rule.match}' is {kind} and has no weight to prune; "
            f"prunable: {shown}"
        )
    if rule.type is not None and not any(is_of_type(m, rule.type) for m in modules.values()):
        types = sorted({type(modules[n]).__name__ for n in candidates})
        return (
            f"rule #{i} {rule.describe()}: the model has no module of type '{rule.type}'; "
            f"its prunable types: {types}"
        )
    if rule.exclude:
        return (
            f"rule #{i} {rule.describe()}: matches no layer once exclude={list(rule.exclude)!r} is applied; "
            f"prunable layers are: {shown}"
        )
    return f"rule #{i} {rule.describe()}: matches no layer of the model; prunable layers are: {shown}"


__all__ = ["GEMM_MODULES", "Plan", "PlanError", "Rule", "Target", "prunable_layers", "resolve_targets"]
