"""GPT-style ``Conv1D`` layers (weight stored ``(in, out)``) as ``nn.Linear``, and back.

transformers' ``Conv1D`` (GPT-2, GPT, ...) is a Linear whose weight is stored transposed and applied with
``addmm``. Rather than teach every structure, executor and the coupling graph a second weight layout, the
library swaps each one for an ``nn.Linear`` with the transposed weight: the same function, exactly (the same
products; only the stored layout differs), after which every structure, ``resolve_coupled``, ``compact`` and
the executors apply. :func:`conv1d_from_linear` turns them back (for ``save_pretrained``, which writes the
original layout); a compacted layer comes back with its new width.

Found by duck typing (class name ``Conv1D`` with ``nf``/``nx`` and an ``(nx, nf)`` weight), so this module
does not import transformers.

>>> import torch
>>> class Conv1D(torch.nn.Module):  # the transformers layer, reduced to what matters here
...     def __init__(self, nf, nx):
...         super().__init__()
...         self.nf, self.nx = nf, nx
...         self.weight, self.bias = torch.nn.Parameter(torch.randn(nx, nf)), torch.nn.Parameter(torch.randn(nf))
...     def forward(self, x):
...         return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(*x.shape[:-1], self.nf)
>>> model = torch.nn.Sequential(Conv1D(8, 4))
>>> x = torch.randn(2, 3, 4)
>>> before = model(x)
>>> linear_from_conv1d(model), model[0]
(['0'], Linear(in_features=4, out_features=8, bias=True))
>>> torch.allclose(model(x), before, atol=1e-6)
True
"""

from __future__ import annotations

import torch
from torch import nn

from admmcompress.module_swap import replace_module


def is_conv1d(module: nn.Module) -> bool:
    """A GPT-style Conv1D: weight ``(nx, nf)`` applied as ``x @ W + b``."""
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and hasattr(module, "nf")
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and weight.shape[1] == module.nf
    )



@torch.no_grad()
def linear_from_conv1d(model: nn.Module) -> list[str]:
    """Replace every Conv1D of ``model`` by the equal ``nn.Linear``, in place; returns their names."""
    names = [n for n, m in model.named_modules() if n and is_conv1d(m)]
    for name in names:
        old = model.get_submodule(name)
        nx, nf = old.weight.shape
        new = nn.Linear(nx, nf, bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype)
        new.weight.copy_(old.weight.t())
        if old.bias is not None:
            new.bias.copy_(old.bias)
        new.train(old.training)
        replace_module(model, name, new)
    return names


@torch.no_grad()
def conv1d_from_linear(model: nn.Module, names: list[str]) -> None:
    """Turn the named ``nn.Linear`` layers back into transformers' ``Conv1D`` (needs transformers)."""
    from transformers.pytorch_utils import Conv1D  # the layer the original model used

    if isinstance(names, str):  # a str is iterated by character: 't' is no layer (an AttributeError, a review)
        raise ValueError(f"conv1d_from_linear: names={names!r} is one string; give the list linear_from_conv1d "
                         "returned, e.g. ['transformer.h.0.attn.c_attn']")
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"conv1d_from_linear: the model has no layer {missing[0]!r}; give the names "
                         "linear_from_conv1d returned for this model")
    for name in names:  # all checked before any is swapped: a refusal leaves the model as it was
        if not isinstance(modules[name], nn.Linear):
            kind = type(modules[name]).__name__
            raise ValueError(f"conv1d_from_linear: '{name}' is {kind}, not the Linear it was made into")
    for name in names:
        old = modules[name]
        new = Conv1D(old.out_features, old.in_features).to(device=old.weight.device, dtype=old.weight.dtype)
        new.weight.copy_(old.weight.t())
        if old.bias is not None:
            new.bias.copy_(old.bias)
        else:
            new.bias.zero_()
        new.train(old.training)
        replace_module(model, name, new)


__all__ = ["conv1d_from_linear", "is_conv1d", "linear_from_conv1d"]
