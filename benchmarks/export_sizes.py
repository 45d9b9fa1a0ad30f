"""File sizes of `save_pruned` exports against the dense safetensors, for the README table.

Sizes depend only on the model's shapes and the number of weights kept (not on
which, nor on the machine), so the figures this prints are exact and
reproducible: global magnitude pruning of a freshly initialised model keeps
exactly round((1 - s) * N) weights, as a trained one would.

    PYTHONPATH=src python benchmarks/export_sizes.py [--out sizes.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch

from varprune import MagnitudePruner, create_model
from varprune.storage.checkpoint import save_weights
from varprune.storage.pruned_format import save_pruned

MODELS = ("resnet20", "resnet18", "mlp")
SPARSITIES = (0.90, 0.95, 0.98, 0.99)
VALUES = ("fp32", "fp16")
ARGS = {"in_channels": 1, "num_classes": 10, "image_size": 28}  # the Fashion-MNIST shape


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            model = create_model(name, **ARGS)
            save_weights(Path(tmp) / "dense.safetensors", model, {"model": name})
            dense = os.path.getsize(Path(tmp) / "dense.safetensors")
            pruner = MagnitudePruner(model)
            for s in SPARSITIES:
                masks = pruner.apply(s)
                row = {"model": name, "sparsity": s, "prunable": pruner.numel, "dense_bytes": dense}
                for v in VALUES:
                    out = Path(tmp) / f"{v}.safetensors"
                    save_pruned(
                        out, model, masks, {"model": name, "model_args": ARGS, "pattern": f"global:{s}"}, values=v
                    )
                    row[f"{v}_bytes"] = os.path.getsize(out)
                    row[f"{v}_ratio"] = dense / row[f"{v}_bytes"]
                rows.append(row)
    print(
        f"{'model':9} {'weights':>10} {'dense':>11} {'sparsity':>8} "
        + " ".join(f"{v + ' bytes':>11} {'x smaller':>9}" for v in VALUES)
    )
    for r in rows:
        print(
            f"{r['model']:9} {r['prunable']:>10,} {r['dense_bytes']:>11,} {r['sparsity']:>8.0%} "
            + " ".join(f"{r[v + '_bytes']:>11,} {r[v + '_ratio']:>9.1f}" for v in VALUES)
        )
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
