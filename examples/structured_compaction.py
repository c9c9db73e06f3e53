"""Structured ADMM on a residual net, then a physically smaller model with the same outputs.

    python examples/structured_compaction.py

ResNet-20 (CIFAR shapes; random data here so it runs in seconds): one coupled filter target per
channel group on every Conv2d (the residual stream's convs, BNs and readers are decided together),
a few ADMM steps, hard prune, ``compact`` (Torch-Pruning's pruning functions remove the channels),
then save as a shape manifest + safetensors and load back without the original widths.
"""

from __future__ import annotations

import tempfile

import torch
from torch import nn

from admmcompress import ADMM, Filter, Plan, Rule, compact
from admmcompress.executors import get_executor
from admmcompress.models import create_model


def main(steps: int = 6) -> dict:
    torch.manual_seed(0)
    model = create_model("resnet20")
    x = torch.randn(2, 3, 32, 32)  # what the model is called with: used to trace the channel coupling
    targets = Plan([Rule(Filter(sparsity=0.5), type="Conv2d")]).resolve_coupled(model, x)
    admm = ADMM(model, targets, rho=1e-2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images, labels = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    for step in range(steps):
        loss = nn.functional.cross_entropy(model(images), labels) + admm.penalty()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 2 == 1:
            admm.step()
    masks = admm.finalize()  # hard prune: the masked model
    model.eval()
    result = compact(model, x, masks)  # the compacted model: smaller, same outputs
    print(result.summary().splitlines()[0])
    folder = tempfile.mkdtemp()
    compact_executor = get_executor("compact")  # convert / save / load / export, one verb per act
    compact_executor.save(result.model, folder, model_spec={"name": "resnet20", "kwargs": {}})
    restored = compact_executor.load(folder).eval()
    fresh = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        diff = float((restored(fresh) - model(fresh)).abs().max())
    print(f"reloaded compacted model vs masked model: max |diff| = {diff:.2e}")
    return {"params_before": result.params_before, "params_after": result.params_after, "max_abs_diff": diff}


if __name__ == "__main__":
    main()
