"""Inference latency of an exported sparse model against its dense twin, side by side.

For each sparsity the MLP (two hidden Linear layers of 1024, BatchNorm) is
pruned layer-wise (every Linear at the same sparsity), exported with
``save_pruned`` and reloaded with ``load_pruned``. The reloaded model is the
dense twin (zeros stored densely); a copy of it with every Linear swapped for a
module holding its weight as a torch.sparse CSR tensor is the sparse variant.
Both must give the same logits (checked) before anything is timed.

* CPU: CSR Linear vs dense Linear at 90/95/98/99% sparsity, batch 1 and 256.
* CUDA (if available): 2:4 semi-structured Linear
  (``torch.sparse.to_sparse_semi_structured``, fp16) vs dense fp16 Linear,
  batch 1 and 256; layers whose shape the 2:4 kernels refuse stay dense
  (they are listed). Skipped with a line saying so when there is no GPU.

Variants alternate within each round (AB, BA, ...), so load from other
processes hits both alike; each round times ``--inner`` calls; the table
reports medians over ``--rounds`` rounds and dense/sparse (speed-up > 1: the
sparse model is faster).

    PYTHONPATH=src python benchmarks/bench_sparse_inference.py [--threads 2] [--out results.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch
import torch.nn.functional as F
from common import load_average, machine
from torch import nn

from varprune import MagnitudePruner, create_model
from varprune.storage.pruned_format import load_pruned, save_pruned

ARGS = {"in_channels": 1, "num_classes": 10, "image_size": 28}  # Fashion-MNIST shape: 784 -> 1024 -> 1024 -> 10
GPU_ARGS = {"in_channels": 1, "num_classes": 10, "image_size": 32}  # 1024 inputs: shapes the 2:4 kernels take

warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
warnings.filterwarnings("ignore", message=".*semi-structured.*prototype.*")


class CSRLinear(nn.Module):
    """y = x W^T + b with W held as a torch.sparse CSR tensor (CPU)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", linear.weight.detach().to_sparse_csr())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class SemiStructuredLinear(nn.Module):
    """y = x W^T + b with a 2:4 weight in torch's semi-structured format (CUDA, fp16/bf16)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        from torch.sparse import to_sparse_semi_structured

        self.weight = nn.Parameter(to_sparse_semi_structured(linear.weight.detach()), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


def swap_linears(model: nn.Module, make, skipped: list[str] | None = None) -> nn.Module:
    """Replace every nn.Linear of ``model`` (in place) by ``make(linear)``; a refusal leaves it dense."""
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                try:
                    setattr(parent, child_name, make(child))
                except (RuntimeError, ValueError) as e:
                    if skipped is None:
                        raise
                    skipped.append(
                        f"{parent_name + '.' if parent_name else ''}{child_name} "
                        f"{list(child.weight.shape)}: {str(e).splitlines()[0][:80]}"
                    )
    return model


def two_four_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """2:4 keep-masks for every Linear weight: the 2 largest |w| of each 4 consecutive inputs."""
    masks = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.in_features % 4 == 0:
            w = module.weight.detach()
            groups = w.abs().reshape(w.shape[0], -1, 4)
            top = groups.topk(2, dim=-1).indices
            keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
            masks[f"{name}.weight" if name else "weight"] = keep.reshape(w.shape)
    return masks


def export_and_reload(model: nn.Module, masks, meta: dict, tmp: str) -> nn.Module:
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, m in masks.items():
            params[name].masked_fill_(~m, 0.0)
    path = Path(tmp) / "model.safetensors"
    save_pruned(path, model, masks, meta)
    return load_pruned(path)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_pair(dense: nn.Module, sparse: nn.Module, x: torch.Tensor, rounds: int, inner: int) -> dict:
    """Median ms per call of each, alternating which goes first (no_grad: CSR linear fails under inference_mode)."""
    device = x.device
    times = {"dense": [], "sparse": []}
    with torch.no_grad():
        for model in (dense, sparse):  # warm-up
            for _ in range(3):
                model(x)
        sync(device)
        for r in range(rounds):
            order = (("dense", dense), ("sparse", sparse)) if r % 2 == 0 else (("sparse", sparse), ("dense", dense))
            for name, model in order:
                sync(device)
                t0 = time.perf_counter()
                for _ in range(inner):
                    model(x)
                sync(device)
                times[name].append((time.perf_counter() - t0) / inner * 1e3)
    d, s = statistics.median(times["dense"]), statistics.median(times["sparse"])
    return {"dense_ms": d, "sparse_ms": s, "speedup": d / s}


def check_same(dense: nn.Module, sparse: nn.Module, x: torch.Tensor, atol: float) -> float:
    with torch.no_grad():
        diff = float((dense(x).float() - sparse(x).float()).abs().max())
    if not diff <= atol:
        raise SystemExit(f"sparse and dense logits differ by {diff:.3g} (> {atol}): the swap is wrong")
    return diff


def inner_for(batch: int, device: torch.device) -> int:
    return 200 if device.type == "cuda" else (50 if batch == 1 else 5)


def run_cpu(args, tmp: str) -> list[dict]:
    rows = []
    device = torch.device("cpu")
    torch.manual_seed(0)
    base = create_model("mlp", **ARGS).eval()
    pruner = MagnitudePruner(base, scope="layerwise")
    for s in args.sparsities:
        model = copy.deepcopy(base)
        masks = pruner.masks(s)
        dense = export_and_reload(model, masks, {"model": "mlp", "model_args": ARGS, "pattern": f"layerwise:{s}"}, tmp)
        sparse = swap_linears(copy.deepcopy(dense), CSRLinear).eval()
        for batch in args.batches:
            x = torch.randn(batch, *[ARGS["in_channels"], ARGS["image_size"], ARGS["image_size"]])
            diff = check_same(dense, sparse, x, atol=1e-4)
            r = time_pair(dense, sparse, x, args.rounds, args.inner or inner_for(batch, device))
            rows.append({"device": "cpu", "kernel": "csr", "sparsity": s, "batch": batch, "max_abs_diff": diff, **r})
            print_row(rows[-1])
    return rows


def run_cuda(args, tmp: str) -> list[dict]:
    if not torch.cuda.is_available():
        print("CUDA: skipped (no GPU visible to torch); the 2:4 semi-structured comparison needs one")
        return []
    try:
        from torch.sparse import to_sparse_semi_structured  # noqa: F401
    except ImportError:
        print(f"CUDA: skipped (torch {torch.__version__} has no torch.sparse.to_sparse_semi_structured)")
        return []
    device = torch.device("cuda")
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        print(f"CUDA: skipped (2:4 sparse kernels need compute capability >= 8.0, this GPU is {major}.{minor})")
        return []
    torch.manual_seed(0)
    model = create_model("mlp", **GPU_ARGS).eval()
    masks = two_four_masks(model)
    dense = export_and_reload(model, masks, {"model": "mlp", "model_args": GPU_ARGS, "pattern": "2:4"}, tmp)
    dense = dense.to(device=device, dtype=torch.float16).eval()
    skipped: list[str] = []
    sparse = swap_linears(copy.deepcopy(dense), SemiStructuredLinear, skipped).eval()
    for line in skipped:
        print(f"CUDA: left dense (2:4 kernel refused): {line}")
    rows = []
    for batch in args.batches:
        x = torch.randn(
            batch,
            GPU_ARGS["in_channels"],
            GPU_ARGS["image_size"],
            GPU_ARGS["image_size"],
            device=device,
            dtype=torch.float16,
        )
        try:
            diff = check_same(dense, sparse, x, atol=5e-2)
        except (RuntimeError, ValueError) as e:
            print(f"CUDA: batch {batch} skipped (2:4 kernel refused the input: {str(e).splitlines()[0][:100]})")
            continue
        r = time_pair(dense, sparse, x, args.rounds, args.inner or inner_for(batch, device))
        rows.append(
            {
                "device": "cuda",
                "kernel": "2:4",
                "sparsity": 0.5,
                "batch": batch,
                "max_abs_diff": diff,
                "dense_layers_left": len(skipped),
                **r,
            }
        )
        print_row(rows[-1])
    return rows


def print_row(r: dict) -> None:
    print(
        f"{r['device']:5} {r['kernel']:5} {r['sparsity']:>8.0%} {r['batch']:>6} {r['dense_ms']:>10.3f} "
        f"{r['sparse_ms']:>10.3f} {r['speedup']:>8.2f}"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.90, 0.95, 0.98, 0.99])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 256])
    p.add_argument("--rounds", type=int, default=10, help="alternating rounds per variant (median reported)")
    p.add_argument("--inner", type=int, default=0, help="calls per round (default: by batch size and device)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-cuda", action="store_true", help="skip the CUDA 2:4 part even if a GPU is visible")
    p.add_argument("--out", type=Path, help="write the rows and the machine as JSON here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = load_average()
    print(f"machine: {machine(torch.device('cpu'))}, {torch.get_num_threads()} threads; load {load_before}")
    print(f"{'dev':5} {'kern':5} {'sparsity':>8} {'batch':>6} {'dense ms':>10} {'sparse ms':>10} {'speedup':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        rows = run_cpu(args, tmp)
        if not args.no_cuda:
            rows += run_cuda(args, tmp)
        else:
            print("CUDA: skipped (--no-cuda)")
    load_after = load_average()
    print(f"load {load_before} -> {load_after}")
    if args.out:
        info = {
            "machine": machine(torch.device("cpu")),
            "threads": torch.get_num_threads(),
            "gpu": machine(torch.device("cuda")) if torch.cuda.is_available() else None,
            "load_before": load_before,
            "load_after": load_after,
            "rows": rows,
        }
        args.out.write_text(json.dumps(info, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
