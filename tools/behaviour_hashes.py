"""Hashes of the weights after a few steps of every ready config: the refactoring guard.

Each ``configs/*.yaml`` is shrunk (a few hundred training images, one epoch per phase, updates every
two steps) and run in-process on one thread; the SHA-256 of the final weights and masks is printed per
config. Record before a refactor, check after it, on the same machine (float summation order differs
across CPUs, so hashes are only comparable on one machine)::

    python tools/behaviour_hashes.py --record /tmp/before.json
    python tools/behaviour_hashes.py --check /tmp/before.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch

from admmcompress.data.datasets import load_dataset
from admmcompress.models import create_model
from admmcompress.train import checkpoint as ckpt
from admmcompress.train.config import RunConfig
from admmcompress.train.runner import Runner

ROOT = Path(__file__).resolve().parents[1]
DENSE = {"lenet5": ROOT / "checkpoints" / "lenet5_mnist_dense.safetensors"}


def shrink(config: RunConfig) -> RunConfig:
    """Tiny data, one epoch per phase, frequent driver updates; everything else as configured."""
    config.data.train_limit = min(config.data.train_limit or 320, 320)
    config.data.test_limit = 200
    config.threads = 1
    phases = [config.pretrain] if config.pretrain is not None else []
    for stage in config.stages:
        phases += [stage.admm, stage.retrain]
        if stage.admm.update_every_steps is not None:
            stage.admm.update_every_steps = 2
    for phase in phases:
        phase.epochs = min(phase.epochs, 1)
        if phase.average_from_epoch is not None:
            phase.average_from_epoch = 1
    if config.pretrained and not Path(config.pretrained).is_file():  # a benchmark output not present here
        config.pretrained = str(DENSE.get(config.model["name"], ""))
    if config.teacher and not all(Path(t).is_file() for t in ([config.teacher] if isinstance(config.teacher, str)
                                                              else config.teacher)):
        config.teacher = None
    if config.compact is not None:
        config.compact.samples = 2
    return config


def weights_hash(path: Path) -> str:
    config = shrink(RunConfig.from_yaml(path))
    torch.set_num_threads(1)
    torch.manual_seed(config.seed)
    model = create_model(config.model["name"], **{k: v for k, v in config.model.items() if k != "name"})
    if config.pretrained:
        ckpt.load_weights(model, config.pretrained)
    train = load_dataset(config.data.dataset, "train", config.data.data_dir, config.data.train_limit)
    test = load_dataset(config.data.dataset, "test", config.data.data_dir, config.data.test_limit)
    runner = Runner(config, model, train, test, out_dir=None, progress=False)
    runner.run()
    digest = hashlib.sha256()
    for source in (model.state_dict(), runner.masks.state_dict()):
        for name in sorted(source):
            digest.update(name.encode())
            digest.update(source[name].detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--record", help="write the hashes to this JSON file")
    mode.add_argument("--check", help="compare with the hashes in this JSON file")
    parser.add_argument("configs", nargs="*", help="configs to run (default: configs/*.yaml)")
    args = parser.parse_args()
    paths = [Path(p) for p in args.configs] or sorted((ROOT / "configs").glob("*.yaml"))
    hashes = {}
    for path in paths:
        try:
            hashes[path.name] = weights_hash(path)
        except Exception as err:  # a config that cannot run here is recorded as such, and must stay so
            hashes[path.name] = f"error: {type(err).__name__}: {err}"
        print(f"{path.name}: {hashes[path.name]}", flush=True)
    if args.record:
        Path(args.record).write_text(json.dumps(hashes, indent=1) + "\n")
        return 0
    expected = json.loads(Path(args.check).read_text())
    changed = sorted(k for k in hashes if expected.get(k) != hashes[k])
    print("identical" if not changed else f"CHANGED: {changed}")
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
