"""Pruning time of magnitude, Wanda and SparseGPT side by side, on one model with the same calibration batches.

One process, one model: its dense weights are saved once and restored before every pruning call; the
methods take turns in rounds (magnitude, Wanda, SparseGPT, then the next round), so a load change on a
shared machine hits them alike. Every timer synchronises the device. Magnitude is layer-wise (the same
fraction of every tensor, as the calibrated pruners do) or N:M (``prune_magnitude(pattern=...)``); it needs
no calibration.

Printed and written as JSON (``--json``): per method and setting the median (and every) pruning time,
its ratio to magnitude, the realised sparsity, the calibrated pruners' forward-pass counts
(``PruneResult.passes``) and the relative output error on a held-out batch,
``||f_pruned(x) - f_dense(x)||² / ||f_dense(x)||²`` (a quality hint only: random weights, random inputs).

Models:

* ``--model gpt2``: a ``transformers.GPT2LMHeadModel`` built from ``GPT2Config`` with the sizes given
  (``--n-layer --n-embd --n-head --vocab --seqlen``), random init, random token batches (nothing downloaded);
* ``--model resnet18`` (or any name ``varprune.models.create_model`` knows, e.g. ``resnet20``): built as
  ``create_model(name, 1, 10, --image-size)``, random calibration images.

    python benchmarks/bench_pruners.py --model gpt2 --n-layer 2 --n-embd 32 --seqlen 16 --batches 2 --repeats 1
    python benchmarks/bench_pruners.py --model resnet18 --batches 4 --batch-size 32 --json out/pruners.json
    python benchmarks/bench_pruners.py --model gpt2 --n-layer 12 --n-embd 768 --n-head 12 --seqlen 512 \\
        --batches 32 --batch-size 1 --device cuda        # GPT-2 small's shape (random weights)

No speed target is judged: the calibrated pruners do far more work than magnitude (forward passes, and
SparseGPT a Cholesky inverse and a column loop per layer); this shows how much.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch
from common import add_device_args, load_average, machine, setup_device, sync, write_json

from varprune.numerics.pruning import prune_magnitude, realised_sparsity
from varprune.numerics.sparsegpt import prune_sparsegpt
from varprune.numerics.wanda import prune_wanda
from varprune.numerics.weights import prunable_weights

METHODS = ("magnitude", "wanda", "sparsegpt")


def build(args, device):
    """``(model, calibration batches, held-out batch, description)``."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if args.model == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(
            n_layer=args.n_layer,
            n_embd=args.n_embd,
            n_head=args.n_head,
            vocab_size=args.vocab,
            n_positions=max(args.seqlen, 8),
            bos_token_id=0,
            eos_token_id=0,
        )
        model = GPT2LMHeadModel(cfg).to(device).eval()

        def batch():
            return {"input_ids": torch.randint(0, args.vocab, (args.batch_size, args.seqlen), generator=g).to(device)}

        what = (
            f"GPT-2 (GPT2Config n_layer={args.n_layer}, n_embd={args.n_embd}, n_head={args.n_head}, "
            f"vocab={args.vocab}), {args.batches} batches of {args.batch_size} x {args.seqlen} tokens"
        )
    else:
        from varprune.models import create_model

        model = create_model(args.model, 1, 10, args.image_size).to(device).eval()

        def batch():
            return torch.randn(args.batch_size, 1, args.image_size, args.image_size, generator=g).to(device)

        what = (
            f"{args.model} (1x{args.image_size}x{args.image_size}), {args.batches} batches of {args.batch_size} images"
        )
    calib = [batch() for _ in range(args.batches)]
    return model, calib, batch(), what


def output(model, batch):
    with torch.no_grad():
        out = model(**batch) if isinstance(batch, dict) else model(batch)
    return (out.logits if hasattr(out, "logits") else out).float()


def prune(method, model, calib, setting, args):
    sparsity, pattern = (None, setting) if ":" in setting else (float(setting), None)
    if method == "magnitude":
        return prune_magnitude(model, sparsity, scope="layerwise", pattern=pattern)
    if method == "wanda":
        return prune_wanda(model, calib, sparsity=sparsity, pattern=pattern)
    return prune_sparsegpt(model, calib, sparsity=sparsity, pattern=pattern, blocksize=args.blocksize)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--model", default="gpt2", help="gpt2, resnet18, or another varprune model name")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--batches", type=int, default=8, help="calibration batches")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--settings", default="0.5,2:4", help="comma-separated sparsities and N:M patterns")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--repeats", type=int, default=3, help="rounds; the median is reported")
    p.add_argument("--blocksize", type=int, default=128, help="SparseGPT's column block")
    p.add_argument("--json", default=None, help="also write the figures as JSON to this file")
    add_device_args(p)
    args = p.parse_args(argv)
    device = setup_device(args)
    methods = [m.strip() for m in args.methods.split(",")]
    if unknown := set(methods) - set(METHODS):
        p.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    settings = [s.strip() for s in args.settings.split(",")]

    model, calib, held_out, what = build(args, device)
    named = prunable_weights(model)
    n = sum(w.numel() for _, w in named)
    dense = {k: v.detach().clone() for k, v in model.state_dict().items()}
    reference = output(model, held_out)
    print("bench_pruners: one-shot pruning time of magnitude, Wanda and SparseGPT, side by side")
    print(f"machine   {machine(device)}")
    print(f"load avg  {load_average()} (1/5/15 min, at start)")
    print(f"sizes     {what}; {n:,} prunable weights in {len(named)} tensors; {args.repeats} rounds")

    times = {(m, s): [] for s in settings for m in methods}
    info = {}
    for r in range(args.repeats):
        for s in settings:
            for m in methods[r % len(methods) :] + methods[: r % len(methods)]:
                model.load_state_dict(dense)
                sync(device)
                t = time.perf_counter()
                masks = prune(m, model, calib, s, args)
                sync(device)
                times[(m, s)].append(time.perf_counter() - t)
                if r == 0:
                    out = output(model, held_out)
                    info[(m, s)] = {
                        "realised_sparsity": realised_sparsity(masks),
                        "output_error": float((out - reference).square().sum() / reference.square().sum()),
                        "passes": getattr(masks, "passes", None),
                        "mode": getattr(masks, "mode", None),
                        "fallback": sorted(getattr(masks, "fallback", {})),
                    }
    model.load_state_dict(dense)

    rows = []
    print(f"\n{'setting':<8}{'method':<11}{'median s':>10}{'x magnitude':>13}{'sparsity':>10}{'out err':>10}  passes")
    for s in settings:
        base = statistics.median(times[("magnitude", s)]) if "magnitude" in methods else None
        for m in methods:
            med = statistics.median(times[(m, s)])
            row = {"setting": s, "method": m, "median_s": med, "times_s": times[(m, s)], **info[(m, s)]}
            row["ratio_to_magnitude"] = med / base if base else None
            rows.append(row)
            ratio = f"{med / base:>12.1f}x" if base else f"{'':>13}"
            passes = info[(m, s)]["passes"] or ""
            print(
                f"{s:<8}{m:<11}{med:>10.3f}{ratio}{info[(m, s)]['realised_sparsity']:>10.4f}"
                f"{info[(m, s)]['output_error']:>10.4f}  {passes} {info[(m, s)]['mode'] or ''}"
            )
    print(f"load avg  {load_average()} at end")
    write_json(
        args.json,
        {
            "benchmark": "bench_pruners",
            "machine": machine(device),
            "threads": torch.get_num_threads(),
            "model": what,
            "prunable_weights": n,
            "repeats": args.repeats,
            "blocksize": args.blocksize,
            "results": rows,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
