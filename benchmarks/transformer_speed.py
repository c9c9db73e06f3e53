"""Speed on transformer shapes: a BERT-base encoder layer and a GPT-2-small MLP, compacted or block-sparse, vs dense.

    python benchmarks/transformer_speed.py                  # batch 1 and 8, sequence 128, 2 threads
    python benchmarks/transformer_speed.py --quick          # smoke run: sequence 16, 3 rounds

Weights are random (speed does not depend on their values). Contenders, each checked equal to the masked model
it came from before timing:

- dense;
- compacted: 50% of the FFN hidden units (coupled ``filter`` on the first FFN layer) and, in the encoder layer,
  25% of the attention heads (``heads`` on the query projection), pruned by magnitude and sliced out by
  ``compact``;
- block-sparse at 4x and 10x: ``Block(block=(16, 16))`` on every Linear (masked model), then ``to_blocksparse``.

Timing: eval mode, ``torch.inference_mode()``, the contenders interleaved round by round (``interleaved_ms``:
medians), malloc settings of BENCHMARKING.md (the script re-executes itself with them), ``--threads`` threads.
The output table gives milliseconds and the speed-up over dense in the same run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import warnings

import torch
from structured_common import command_line, ensure_malloc_env, interleaved_ms, machine
from torch import nn

from admmcompress.executors.blocksparse import to_blocksparse
from admmcompress.executors.compact import compact
from admmcompress.finalize import hard_prune
from admmcompress.plan import Plan, Rule
from admmcompress.structures import Block, Filter, Heads


class EncoderLayer(nn.Module):
    """transformers' BertLayer at BERT-base size (768 wide, 12 heads, FFN 3072), hidden states in and out."""

    def __init__(self) -> None:
        super().__init__()
        import transformers

        config = transformers.BertConfig(hidden_size=768, num_attention_heads=12, intermediate_size=3072)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.layer = transformers.models.bert.modeling_bert.BertLayer(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer(x)
        return out[0] if isinstance(out, tuple) else out


def gpt2_mlp() -> nn.Module:
    """A GPT-2-small MLP (768 -> 3072 -> 768, GELU) as Linears (GPT-2's Conv1D is the same product)."""
    return nn.Sequential(nn.Linear(768, 3072), nn.GELU(), nn.Linear(3072, 768))


def structured(model: nn.Module, x: torch.Tensor, encoder: bool) -> nn.Module:
    rules = [Rule(Filter(sparsity=0.5), match="*intermediate.dense" if encoder else "0")]
    if encoder:
        rules.append(Rule(Heads(sparsity=0.25), match="*attention.self.query"))
    masked = _copy(model)
    masks = hard_prune(masked, Plan(rules).resolve_coupled(masked, x))
    return compact(masked, x, masks).model.eval()


def block_sparse(model: nn.Module, x: torch.Tensor, compression: float) -> nn.Module:
    masked = _copy(model)
    hard_prune(masked, Plan([Rule(Block(compression=compression, block=(16, 16)), type="Linear")]).resolve(masked))
    with torch.no_grad():
        expected = masked(x)
        to_blocksparse(masked, block_rows=16, min_sparsity=0.0)
        torch.testing.assert_close(masked(x), expected, atol=1e-3, rtol=1e-3)
    return masked.eval()


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--sequence", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    if args.quick:
        args.sequence, args.rounds = 16, 3
    ensure_malloc_env()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"# {datetime.datetime.now():%Y-%m-%d %H:%M} | {machine()}\n# {command_line()}")
    rows = []
    for name, model, encoder in (("BERT-base encoder layer", EncoderLayer().eval(), True),
                                 ("GPT-2-small MLP", gpt2_mlp().eval(), False)):
        example = torch.randn(2, args.sequence, 768)
        contenders = {
            "dense": model,
            "compacted (50% FFN" + (" + 25% heads)" if encoder else ")"): structured(model, example, encoder),
            "block-sparse 4x": block_sparse(model, example, 4),
            "block-sparse 10x": block_sparse(model, example, 10),
        }
        for batch in args.batches:
            x = torch.randn(batch, args.sequence, 768)
            with torch.inference_mode():
                ms = interleaved_ms({k: (lambda m=m, x=x: m(x)) for k, m in contenders.items()}, rounds=args.rounds)
            for contender, value in ms.items():
                rows.append({"model": name, "contender": contender, "batch": batch, "sequence": args.sequence,
                             "ms": round(value, 3), "speedup": round(ms["dense"] / value, 2)})
    print("| model | contender | batch x sequence | ms | speed-up vs dense |")
    print("|---|---|---|---:|---:|")
    for r in rows:
        shape = f"{r['batch']} x {r['sequence']}"
        print(f"| {r['model']} | {r['contender']} | {shape} | {r['ms']:.2f} | {r['speedup']:.2f}x |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"rows": rows, "machine": machine(), "command": command_line()}, handle, indent=1)


if __name__ == "__main__":
    main()
