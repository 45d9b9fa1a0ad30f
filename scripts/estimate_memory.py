"""What a training run needs in memory per process, as ``varprune train`` estimates it before it starts.

The same estimate that refuses a run that cannot fit (engine/memory.py: the model built on the meta device,
one forward pass measured; weights, gradients and optimizer state; ``--fsdp`` divides what is sharded by the
number of processes, ``--grad-checkpoint`` keeps only the blocks' outputs), printed for a machine you do not
have: ``--processes N`` stands for ``torchrun --nproc-per-node N``. Nothing is allocated or read but the
model's config (for ``hf:DIR``, the folder's config.json and tokenizer.json).

    python scripts/estimate_memory.py --processes 8 -- --dataset text --model llama \\
        --model-arg num_hidden_layers=32 --model-arg hidden_size=4096 ... --fsdp --grad-checkpoint
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace


def main(argv: list[str]) -> int:
    import torch

    from varprune.commands.flags import add_flags, from_args
    from varprune.data import dataset_info
    from varprune.engine.runs import memory_estimate, model_arguments
    from varprune.engine.textruns import is_text_task
    from varprune.models import create_model

    head = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    head.add_argument("--processes", type=int, default=1, help="processes torchrun would start (1: no torchrun)")
    ours, rest = head.parse_known_args(argv)
    train = argparse.ArgumentParser(prog="estimate_memory.py -- (train flags)")
    add_flags(train)
    cfg = from_args(train.parse_args([a for a in rest if a != "--"]))
    if ours.processes > 1:  # what torchrun sets; the estimate reads the world size from it
        os.environ.update(WORLD_SIZE=str(ours.processes), RANK="0")
    info = dataset_info(cfg.dataset)
    text = is_text_task(info.task)
    tokenizer = SimpleNamespace(vocab_size=cfg.vocab_size, pad_id=0) if text else None
    if text and cfg.model.startswith("hf:"):  # the folder's own vocabulary
        folder = json.loads((Path(cfg.model[3:]).expanduser() / "config.json").read_text())
        tokenizer = SimpleNamespace(vocab_size=folder["vocab_size"], pad_id=None)
    size = cfg.image_size or info.size or 32
    shape = dataclasses.replace(info, channels=info.channels or 3, size=size, num_classes=info.num_classes or 2)
    args, kwargs = model_arguments(cfg, shape, tokenizer)
    with torch.device("meta"):
        model = create_model(cfg.model, *args, **kwargs)
        example = (
            torch.zeros((1, cfg.seq_len), dtype=torch.long) if text else torch.zeros((1, shape.channels, size, size))
        )
    est = memory_estimate(cfg, model, example, 0, text)
    if isinstance(est, str):
        print(est, file=sys.stderr)
        return 2
    n = sum(p.numel() for p in model.parameters())
    print(
        f"{cfg.model}: {n / 1e9:.2f} B parameters, --batch-size {cfg.batch_size} (global), {ours.processes} processes"
    )
    print(f"needs {est.describe('each device')}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
