"""``varprune prune``: the one-shot pruning sweep of trained runs (prune.json, table, plot); ``--list-weights``;
``--model hf:DIR --dataset D --out OUT``: the same sweep of a model folder without a run (engine/pretrained.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from varprune.commands import common as c
from varprune.errors import UsageError


def add_parser(sub, epilog: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "prune",
        help="one-shot pruning sweep of trained runs",
        description="Prune every RUN's final weights one-shot at each sparsity, with and without "
        "BN re-tuning, into RUN/prune.{json,csv,png}. Weights and checkpoints are "
        "only read. With --model hf:DIR --dataset D --out OUT instead of RUNs: the same sweep of a "
        "Hugging Face model folder as it is (no training), into OUT/prune.{json,csv,png}.",
    )
    p.add_argument("runs", nargs="*", metavar="RUN")
    c.add_sweep_flags(p)
    p.add_argument(
        "--exclude",
        help="comma-separated parameter names or patterns not to prune; "
        "'first' and 'last' name the stem and the classifier",
    )
    p.add_argument("--data-dir", help="dataset folder, if not the one the run was trained from")
    c.add_folder_flags(p, "sweep")
    p.add_argument("--out", help="with --model hf:DIR: the folder to write prune.json, prune.csv and prune.png into")
    c.add_other_data_flag(p)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--plot", help="combined plot of all runs, a .png (default prune_comparison.png for several runs)")
    c.add_overwrite_flag(p, "the --plot file")
    p.add_argument(
        "--list-weights",
        action="store_true",
        help="print every parameter of each RUN's model and whether it is pruned or why not (with --exclude: "
        "what the patterns exclude), then stop",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="sweep every run again; by default a run whose prune.json was made from its current "
        "weights with the same sparsities, scope, exclusions and BNT settings is reused, so an "
        "interrupted sweep over several runs continues where it stopped (with --model hf:DIR: an "
        "OUT/prune.json of the same folder, data and settings)",
    )
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from varprune.engine.sweep import check_runs, choices_run_problems, prune_runs
    from varprune.report.figures import sweep_plot
    from varprune.report.tables import sweep_table

    runs = [Path(r) for r in args.runs]
    found = c.folder_problems(args, bool(runs), "prune")
    if args.model is not None or found:
        return _prune_folder(args, found)
    if args.out is not None:
        found.append("--out applies to --model hf:DIR; a RUN's sweep is written into the RUN")
    if not runs:
        found.append("give one or more RUN folders, or --model hf:DIR --dataset D --out OUT")
    found += c.half_replaced(runs)
    if found:
        raise UsageError("; ".join(found))
    if args.list_weights:
        return _list_weights(runs, c.names(args.exclude or ""))
    spec = c.sweep_spec(args)
    found = spec.problems() + c.device_problem(args.device)
    if len(set(map(str, runs))) != len(runs):
        found.append("a RUN is named twice")
    configs, more = check_runs(runs, args.data_dir)
    found += more + choices_run_problems(runs, spec)
    if not more:  # calibration flags where no calibration happens, or not for these runs' task
        from varprune.engine.checks import Scope

        found += c.calibration_flag_problems(args, Scope.of_runs(configs, runs, spec.pruners))
    exclude = c.names(args.exclude or "")
    plot = c.output_file(
        args.plot or ("prune_comparison.png" if len(runs) > 1 else None), "--plot", args.overwrite, "png"
    )
    if exclude and not found:
        found += _exclude_problems(configs, exclude, runs)
    if found:  # every problem at once, before any work
        raise UsageError("; ".join(found))
    rows = prune_runs(runs, spec, args.data_dir, args.device, reuse=not args.force, other_data=args.other_data)
    print(sweep_table(rows))
    if plot is not None:
        sweep_plot(rows, plot)
        print(f"plot: {plot}")
    return 0


def _prune_folder(args, found: list[str]) -> int:
    """``prune --model hf:DIR --dataset D --out OUT``: the sweep of a folder as it is."""
    from varprune.engine.pretrained import out_problems, pretrained_problems, sweep_folder
    from varprune.report.tables import sweep_table

    if args.out is None:
        found.append("--model hf:DIR needs --out, the folder to write prune.json, prune.csv and prune.png into")
    if args.list_weights or args.plot:
        found.append("--list-weights and --plot apply to RUNs, not to --model hf:DIR")
    if args.other_data:  # as export and finetune say it
        found.append("--other-data applies to a RUN: a model folder is measured on the --dataset given")
    spec = c.sweep_spec(args)
    found += spec.problems() + c.device_problem(args.device)
    if found:
        raise UsageError("; ".join(found))
    cfg = c.folder_config(args)
    found = pretrained_problems(cfg) + out_problems(Path(args.out), Path(args.model[3:]))
    if not found:  # calibration flags where nothing calibrates (engine.checks, the one rule)
        from varprune.engine.checks import Scope

        found += c.calibration_flag_problems(args, Scope.of_config(cfg, spec.pruners))
    if found:  # every problem at once, before any weight is read
        raise UsageError("; ".join(found))
    doc = sweep_folder(cfg, spec, Path(args.out), reuse=not args.force)
    print(sweep_table([(doc["label"], doc)]))
    print(f"wrote {Path(args.out) / 'prune.json'}, prune.csv and prune.png")
    return 0


def _list_weights(runs, exclude) -> int:
    """``prune RUN --list-weights``: every parameter of the model, prunable or why not (a tied one once under
    each name)."""
    from varprune.engine.runconfig import load_run_config
    from varprune.numerics.weights import PRUNABLE, classify_parameters, prunable_weights

    for run in runs:
        cfg = load_run_config(run)
        model = c.meta_model(cfg, run)
        kept = {n for n, _ in prunable_weights(model, exclude)}  # a pattern matching nothing is refused here
        labels = classify_parameters(model)
        if len(runs) > 1:
            print(f"{run} ({cfg.model}):")
        first: dict[int, str] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            owner = first.setdefault(id(p), name)
            if owner != name:
                label = f"tied to {owner} (decided there)"
            elif name in labels:
                label = labels[name]
                if label == PRUNABLE and name not in kept:
                    label = "excluded by --exclude"
                elif label != PRUNABLE:
                    label = f"not pruned: {label}"
            else:
                label = "not pruned: one-dimensional (bias, norm or scale; only matrices and kernels are pruned)"
            shape = "x".join(map(str, p.shape)) or "scalar"
            print(f"{name:<40} {shape:<16} {label}")
    return 0


def _exclude_problems(configs, exclude, runs) -> list[str]:
    """An --exclude pattern that matches no prunable weight of some run is a typo, not a choice."""
    from varprune.numerics.weights import prunable_weights

    for cfg, run in zip(configs, runs):
        model = c.meta_model(cfg, run)
        try:
            prunable_weights(model, exclude)
        except ValueError as e:
            return [str(e)]
    return []
