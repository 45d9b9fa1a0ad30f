"""Command line: ``varprune train | prune | study | tune | report | demo | doctor`` (and more).

Only argument parsing and exit codes live here; every command calls the
library (loop, sweep, study, demo, report). Exit codes, in one place:

* 0 done; 2 bad input (one line on stderr naming the problem and the fix:
  UsageError, RunError, DatasetError, CheckpointError, any ValueError);
* 3 training stopped being finite (NonFiniteError);
* 1 the disk or the system failed (OSError, with the file named);
* 130 / 143 interrupted by Ctrl-C / SIGTERM (what was kept is said).

Under torchrun (``torchrun --nproc-per-node N -m varprune train ...``) train,
finetune and study run data-parallel (distributed.py); every other command
runs on rank 0 alone while the other processes exit 0 at once. Each process
exits with the codes above (a non-finite loss on any process: 3 on all of
them; torchrun itself then exits 1 and lists the processes' exit codes).

Nothing heavy is imported at module level, so ``varprune doctor`` runs even
where torch or numpy are broken: that is when it is needed.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from .errors import NonFiniteError

EXIT_USAGE, EXIT_NONFINITE = 2, 3
DATA_PARALLEL = ("train", "finetune", "study")   # the commands that run on every torchrun process
IMAGE_SUFFIXES = (".png",)
SWEEP_SPARSITIES = [0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99]


class UsageError(ValueError):
    pass


class Terminated(Exception):
    """SIGTERM, turned into an exception so that what was kept can be said (exit 143)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not a usage dump
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _sparsities(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    bad = [v for v in values if not 0 <= v < 1]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"sparsities must be in [0, 1), got {text!r}")
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"sparsities must be unique, got {text!r}")
    return values


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _floats_arg(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _plot_path(text: str | None) -> Path | None:
    """A plot path, checked before any work: a .png file name in an existing folder."""
    if text is None:
        return None
    path = Path(text)
    if path.is_dir():
        raise UsageError(f"--plot {text} is a folder; give a file name such as {path / 'comparison.png'}")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise UsageError(f"--plot {text} does not end in .png; varprune writes PNG images and will not replace "
                         f"a file of another kind")
    if not path.parent.is_dir():
        raise UsageError(f"--plot {text}: folder {path.parent} does not exist")
    return path


def _device_problem(name: str) -> list[str]:
    from .config import _device_check
    from .device import resolve_device
    msg = _device_check(name)
    if msg:
        return [msg]
    try:
        resolve_device(name)
    except ValueError as e:
        return [str(e)]
    return []


def _mask_problems(args) -> list[str]:
    """export and finetune prune once: a sparsity (unstructured) or an N:M pattern, never both."""
    if (args.sparsity is None) == (args.pattern == "unstructured"):
        return ["give --sparsity for unstructured pruning, or --pattern N:M (not both)"]
    return []


def _bnt_problems(args) -> list[str]:
    found = []
    if not 0 <= args.bnt_batches <= 100_000:
        found.append(f"--bnt-batches must be in [0, 100000] (0 skips re-tuning), got {args.bnt_batches}")
    if not 1 <= args.bnt_batch_size <= 1 << 20:
        found.append(f"--bnt-batch-size must be in [1, 1048576], got {args.bnt_batch_size}")
    return found


# ----------------------------------------------------------------- commands

def cmd_train(args) -> int:
    from .config import flag_of, from_args, given_fields, load_run_config
    from .loop import train
    if args.resume:
        given = given_fields(args)
        machine = {k: given.pop(k) for k in ("device", "data_dir") if k in given}   # where, not what
        flags = [flag_of(k) for k in given] + ["--out"] * bool(args.out) + ["--overwrite"] * bool(args.overwrite)
        if flags:
            raise UsageError(f"--resume takes its configuration from RUN/config.json; drop {', '.join(flags)} "
                             f"(only --device and --data-dir may change)")
        run = Path(args.resume)
        cfg = load_run_config(run)
        for key, value in machine.items():
            setattr(cfg, key, value)
        train(cfg, run, resume=True, progress=not args.quiet)
        return 0
    if not args.out:
        raise UsageError("train needs --out RUN_DIR (or --resume RUN_DIR)")
    train(from_args(args), args.out, overwrite=args.overwrite, progress=not args.quiet)
    _say_on_main(f"wrote {args.out}/model.safetensors; next: varprune prune {args.out}")
    return 0


def _recover(runs) -> None:
    """Folders where an ``--overwrite`` was killed before the new run's first checkpoint get
    their old run back before anything reads them (rundir.RunFolder.recover_if_idle)."""
    from .rundir import RunFolder
    for run in runs:
        RunFolder(run).recover_if_idle()


def _say_on_main(text: str) -> None:
    from . import distributed
    if distributed.is_main():
        print(text)


def cmd_prune(args) -> int:
    from .report import sweep_plot, sweep_table
    from .sweep import check_runs, prune_runs
    runs = [Path(r) for r in args.runs]
    _recover(runs)
    if args.list_weights:
        return _list_weights(runs, _names(args.exclude or ""))
    found = _bnt_problems(args) + _device_problem(args.device)
    if len(set(map(str, runs))) != len(runs):
        found.append("a RUN is named twice")
    configs, more = check_runs(runs, args.data_dir)
    found += more
    exclude = _names(args.exclude or "")
    plot = _plot_path(args.plot) if args.plot else (Path("prune_comparison.png") if len(runs) > 1 else None)
    if exclude and not found:
        found += _exclude_problems(configs, exclude)
    if found:  # every problem at once, before any work
        raise UsageError("; ".join(found))
    rows = prune_runs(runs, args.sparsities, args.scope, exclude, args.bnt_batches, args.bnt_batch_size,
                      args.data_dir, args.device, reuse=not args.force, patterns=args.patterns)
    print(sweep_table(rows))
    if plot is not None:
        sweep_plot(rows, plot)
        print(f"plot: {plot}")
    return 0


def _meta_model(cfg):
    """The run's model on the meta device (shapes and names, no memory)."""
    import torch

    from .data import dataset_info
    from .models import create_model
    info = dataset_info(cfg.dataset)
    with torch.device("meta"):
        return create_model(cfg.model, info.channels or 1, info.num_classes or 2, info.size or 32, **cfg.model_args)


def _list_weights(runs, exclude) -> int:
    """``prune RUN --list-weights``: every parameter with dim >= 2, prunable or why not."""
    from .config import load_run_config
    from .weights import PRUNABLE, classify_parameters, prunable_weights
    for run in runs:
        cfg = load_run_config(run)
        model = _meta_model(cfg)
        shapes = dict(model.named_parameters())
        kept = {n for n, _ in prunable_weights(model, exclude)}   # a pattern matching nothing is refused here
        if len(runs) > 1:
            print(f"{run} ({cfg.model}):")
        for name, label in classify_parameters(model).items():
            if label == PRUNABLE and name not in kept:
                label = "excluded by --exclude"
            shape = "x".join(map(str, shapes[name].shape)) if name in shapes else "?"
            print(f"{name:<40} {shape:<16} {label}")
    return 0


def _exclude_problems(configs, exclude) -> list[str]:
    """An --exclude pattern that matches no prunable weight of some run is a typo, not a choice."""
    from .weights import prunable_weights
    for cfg in configs:
        model = _meta_model(cfg)
        try:
            prunable_weights(model, exclude)
        except ValueError as e:
            return [str(e)]
    return []


def cmd_report(args) -> int:
    from .report import metric_of, read_prune_json, read_study_report, runs_html, study_html, sweep_plot, sweep_table
    plot = _plot_path(args.plot)
    html = Path(args.html) if args.html else None
    if html is not None and (html.is_dir() or html.suffix.lower() not in (".html", ".htm")):
        raise UsageError(f"--html {args.html} must be a file name ending in .html")
    _recover([Path(r) for r in args.runs])
    if len(args.runs) == 1 and (Path(args.runs[0]) / "report.json").is_file():   # a study folder
        study = read_study_report(Path(args.runs[0]))
        if html is None:
            print(study["table"], end="")   # report.md is this table; report.json is the source
            return 0
        print(f"html: {study_html(Path(args.runs[0]), html)}")
        return 0
    rows = []
    for run in map(Path, args.runs):
        doc = read_prune_json(run)
        rows.append((doc.get("label", str(run)), doc))
    if len({metric_of(d) for _, d in rows}) > 1:
        raise UsageError("these runs report different metrics (accuracy and dice): report them separately")
    print(sweep_table(rows))
    if plot:
        sweep_plot(rows, plot)
        print(f"plot: {plot}")
    if html:
        analysis = Path(args.analysis) if args.analysis else None
        print(f"html: {runs_html(rows, [Path(r) for r in args.runs], html, analysis)}")
    return 0


def cmd_study(args) -> int:
    from .config import from_args
    from .study import run_study
    found = _bnt_problems(args)
    seeds = []
    for v in _names(args.seeds):
        try:
            seeds.append(int(v))
        except ValueError:
            found.append(f"--seeds takes comma-separated integers, got {args.seeds!r}")
            break
    if found:
        raise UsageError("; ".join(found))
    run_study(Path(args.out), from_args(args), _names(args.methods), seeds, args.sparsities, args.scope,
              args.bnt_batches, args.bnt_batch_size, progress=not args.quiet, analysis=not args.no_analysis,
              patterns=args.patterns)
    return 0


def cmd_analyze(args) -> int:
    from .analyze import analyze_runs
    _recover([Path(r) for r in args.runs])
    found = _bnt_problems(args) + _device_problem(args.device)
    if not 0 < args.sensitivity_sparsity < 1:
        found.append(f"--sensitivity-sparsity must be in (0, 1), got {args.sensitivity_sparsity}")
    if found:
        raise UsageError("; ".join(found))
    analyze_runs([Path(r) for r in args.runs], Path(args.out), args.sensitivity_sparsity,
                 bnt_batches=args.bnt_batches, bnt_batch_size=args.bnt_batch_size,
                 sensitivity=not args.no_sensitivity, hessian_iters=args.hessian_iters, device=args.device,
                 data_dir=args.data_dir)
    return 0


def cmd_doctor(args) -> int:
    from .doctor import report
    print(report(args.data_dir), end="")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo
    from .rundir import path_problem
    bad = path_problem(args.out)
    if bad:
        raise UsageError(bad)
    run_demo(Path(args.out), size=args.size, data_dir=args.data_dir, progress=not args.quiet, task=args.task)
    return 0


def cmd_export(args) -> int:
    from .export import export_run
    _recover([Path(args.run)])
    found = _mask_problems(args) + _bnt_problems(args) + _device_problem(args.device)
    if found:
        raise UsageError("; ".join(found))
    export_run(Path(args.run), Path(args.out), args.sparsity, args.pattern, args.scope, _names(args.exclude or ""),
               args.values, args.bnt_batches, args.bnt_batch_size, args.device, args.data_dir)
    return 0


def cmd_evaluate(args) -> int:
    from .export import evaluate_file
    found = _device_problem(args.device)
    if not Path(args.file).is_file():
        found.append(f"{args.file} is not a file; give a file written by `varprune export`")
    if found:
        raise UsageError("; ".join(found))
    metrics = evaluate_file(Path(args.file), args.data_dir, args.device)
    m = metrics.pop("metric")
    print(f"{m}: {100 * metrics[m]:.2f}%" + "".join(f"  {k}: {100 * v:.2f}%" for k, v in metrics.items()
                                                    if k != m and isinstance(v, float)))
    if args.json:
        print(json.dumps(metrics | {"metric": m}))
    return 0


def cmd_finetune(args) -> int:
    import dataclasses

    from .config import given_fields, load_run_config, read_resolved
    from .loop import train
    source = Path(args.run)
    _recover([source])
    found = _mask_problems(args)
    if found:
        raise UsageError(found[0])
    base = load_run_config(source)
    given = given_fields(args)
    # model and data come from RUN; training flags that are not given start from RUN's, with a
    # fine-tuning schedule: a tenth of its learning rate and no warm-up
    defaults = {"lr": base.lr / 10, "warmup_epochs": 0.0}
    if "var_strength" not in given and base.var_strength is not None:
        # RUN's strength was relative to psi at ITS initial weights: keep the lambda it resolved to (not
        # s / psi(pruned trained weights), another lambda), unless --var-lambda is given
        lam = read_resolved(source).get("var_lambda")
        known = isinstance(lam, (int, float)) and not isinstance(lam, bool)
        if known or "var_lambda" in given:
            defaults.update(var_lambda=float(lam) if known else base.var_lambda, var_strength=None)
    cfg = dataclasses.replace(base, **{**defaults, **given}, finetune_from=str(source),
                              finetune_sparsity=args.sparsity, finetune_pattern=args.pattern,
                              finetune_scope=args.scope, init=None, init_exclude=None)   # RUN's weights, not --init
    train(cfg, args.out, overwrite=args.overwrite, progress=not args.quiet)
    _say_on_main(f"wrote {args.out}/model.safetensors; next: varprune prune {args.out}")
    return 0


def cmd_tune(args) -> int:
    from .config import from_args, given_fields
    from .tune import run_tune
    searched = [f"--{k.replace('_', '-')}" for k in ("var_lambda", "var_strength") if k in given_fields(args)]
    found = _bnt_problems(args)
    if searched:
        found.append(f"tune searches VAR's strength: drop {' and '.join(searched)} (--grid sets the candidates)")
    if found:
        raise UsageError("; ".join(found))
    run_tune(Path(args.out), from_args(args), args.sparsity, args.search, args.grid, args.rounds,
             None if args.baseline == "none" else args.baseline, args.validation_fraction, args.scope,
             args.bnt_batches, args.bnt_batch_size, progress=not args.quiet)
    return 0


# ----------------------------------------------------------------- the parser

def _epilog() -> str:
    from .methods import method_help
    from .models import describe_models
    models = "\n".join(f"  {k:<14} {v}" for k, v in describe_models().items())
    return f"methods:\n{method_help()}\n\nmodels:\n{models}"


def _patterns(text: str) -> list[str]:
    from .pruning import PruningError, parse_pattern
    out = []
    for v in _names(text):
        try:
            n, m = parse_pattern(v)
        except PruningError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        out.append(f"{n}:{m}")
    if len(set(out)) != len(out):
        raise argparse.ArgumentTypeError(f"patterns must be unique, got {text!r}")
    return out


def _add_scope_flag(p) -> None:
    from .pruning import SCOPES
    p.add_argument("--scope", choices=SCOPES, default="global",
                   help="global: rank all prunable weights together (CrAM's protocol); layerwise: the same "
                        "fraction from every tensor")


def _add_bnt_flags(p) -> None:
    p.add_argument("--bnt-batches", type=int, default=20,
                   help="BN re-tuning batches (default 20 of 500 = 10,000 training images, the reference "
                        "measurement's protocol; CrAM re-tunes on 100 batches of 128 = 12,800); 0 skips "
                        "re-tuning")
    p.add_argument("--bnt-batch-size", type=int, default=500, help="BN re-tuning batch size (default 500)")


def _add_mask_flags(p) -> None:
    """One pruning setting (export, finetune): --sparsity or --pattern, and --scope."""
    p.add_argument("--sparsity", type=float, help="unstructured sparsity in [0, 1)")
    p.add_argument("--pattern", default="unstructured", help="unstructured (default) or N:M, e.g. 2:4")
    _add_scope_flag(p)


def _add_sweep_flags(p) -> None:
    p.add_argument("--sparsities", type=_sparsities, default=SWEEP_SPARSITIES,
                   help="comma-separated sparsities in [0, 1) (default 0.5,...,0.99)")
    p.add_argument("--patterns", type=_patterns, default=[],
                   help="comma-separated N:M semi-structured patterns swept beside the sparsities, e.g. 2:4,1:4,1:8 "
                        "(N largest of every M consecutive weights along the input dimension; tensors whose input "
                        "size is not a multiple of M stay dense)")
    _add_scope_flag(p)
    _add_bnt_flags(p)


def build_parser() -> argparse.ArgumentParser:
    from .config import add_flags
    parser = _Parser(prog="varprune", description="Train networks that survive one-shot magnitude pruning.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")
    sub.required = True
    epilog = _epilog()

    p = sub.add_parser("train", help="train one run", formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train a model with or without VAR into a run folder.", epilog=epilog)
    p.add_argument("--out", help="run folder to create")
    p.add_argument("--resume", metavar="RUN", help="continue RUN from its last complete epoch (--device and "
                                                   "--data-dir may be given: they describe the machine)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run in --out (and the prune results made from its weights); the old run is "
                        "kept until the new one has written its first checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("prune", help="one-shot pruning sweep of trained runs",
                       description="Prune every RUN's final weights one-shot at each sparsity, with and without "
                                   "BN re-tuning, into RUN/prune.{json,csv,png}. Weights and checkpoints are "
                                   "only read.")
    p.add_argument("runs", nargs="+", metavar="RUN")
    _add_sweep_flags(p)
    p.add_argument("--exclude", help="comma-separated parameter names or patterns not to prune; "
                                     "'first' and 'last' name the stem and the classifier")
    p.add_argument("--data-dir", help="dataset folder, if not the one the run was trained from")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--plot", help="combined plot of all runs, a .png (default prune_comparison.png for several runs)")
    p.add_argument("--list-weights", action="store_true",
                   help="print every parameter with 2 or more dimensions of each RUN's model and whether it is "
                        "pruned or why not (with --exclude: what the patterns exclude), then stop")
    p.add_argument("--force", action="store_true",
                   help="sweep every run again; by default a run whose prune.json was made from its current "
                        "weights with the same sparsities, scope, exclusions and BNT settings is reused, so an "
                        "interrupted sweep over several runs continues where it stopped")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("study", help="train and prune several methods x seeds, one report",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train every (method, seed), prune each, and write report.md, report.json and "
                                   "report.png in --out. Finished runs are reused, interrupted ones resumed.",
                       epilog=epilog)
    p.add_argument("--out", required=True, help="study folder")
    p.add_argument("--methods", default="sgd,var", help="comma-separated methods (default sgd,var)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    _add_sweep_flags(p)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--no-analysis", action="store_true",
                   help="skip `analyze` of the first seed of each method (histograms, sensitivity, flatness)")
    add_flags(p, exclude=("method", "seed"))
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("tune", help="choose VAR's strength for a target sparsity by successive halving",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Pick VAR's strength s (lambda = s / psi(w_init)) or lambda for --sparsity: "
                                   "successive halving over a log grid. Round r of R trains its candidates for "
                                   "ceil(E / 2^(R-r)) epochs (the last round: --epochs E) and keeps the better half; "
                                   "the choice is the last round's best. Score: the primary metric after one-shot "
                                   "pruning at --sparsity and BN re-tuning, on a validation split carved from the "
                                   "training set (the test split is never read; --limit-test caps the validation examples). Runs are kept in "
                                   "OUT/candidates (the same command resumes). Writes OUT/tune.json and "
                                   "OUT/tune.png and prints the `varprune train` command for the choice.",
                       epilog=epilog)
    p.add_argument("--out", required=True, help="tuning folder")
    p.add_argument("--sparsity", type=float, help="target sparsity in (0, 1), e.g. 0.95 (required)")
    p.add_argument("--search", choices=("strength", "lambda"), default="strength",
                   help="search the relative strength s (default) or lambda itself")
    p.add_argument("--grid", type=_floats_arg, help="comma-separated positive candidates (default strength "
                                                    "0.03,0.1,0.3,1,3,10; lambda 1e-7,1e-6,1e-5,1e-4,1e-3)")
    p.add_argument("--rounds", type=int, help="halving rounds (default: the last round compares two candidates)")
    p.add_argument("--baseline", default="sgd", help="reference method trained for --epochs and scored the same "
                                                     "way (default sgd; none to skip)")
    p.add_argument("--validation-fraction", type=float, default=0.1,
                   help="fraction of the training set held out to score candidates (default 0.1, fixed seed)")
    _add_scope_flag(p)
    _add_bnt_flags(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--method", default="var", help="a method with VAR: var (default), var+sam, var+cram+")
    add_flags(p, exclude=("method",))
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("analyze", help="weight distributions, per-layer sensitivity and flatness of runs",
                       description="For finished RUNs: weight-magnitude histograms, per-layer variance of |w| over "
                                   "training, the per-layer sparsity global pruning chooses, one-layer pruning "
                                   "sensitivity against variance, the top Hessian eigenvalue and a loss profile. "
                                   "Writes OUT/analysis.json and figures.")
    p.add_argument("runs", nargs="+", metavar="RUN")
    p.add_argument("--out", required=True, help="folder for analysis.json and the figures")
    p.add_argument("--sensitivity-sparsity", type=float, default=0.9,
                   help="sparsity of the one-layer pruning (default 0.9)")
    p.add_argument("--no-sensitivity", action="store_true", help="skip the per-layer sensitivity (L evaluations)")
    p.add_argument("--hessian-iters", type=int, default=20, help="power iterations (default 20)")
    _add_bnt_flags(p)
    p.add_argument("--data-dir")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("export", help="prune a run one-shot and write a compressed, shippable model file",
                       description="Prune RUN's final weights exactly as `varprune prune` does, re-tune BatchNorm, "
                                   "and write one compressed safetensors file (packed bit masks + kept values; "
                                   "load it with varprune.load_pruned). No pickle.")
    p.add_argument("run", metavar="RUN")
    p.add_argument("--out", required=True, help="the file to write (.safetensors)")
    _add_mask_flags(p)
    p.add_argument("--exclude", help="comma-separated parameter names or patterns not to prune")
    p.add_argument("--values", choices=("fp32", "fp16", "bf16"), default="fp32",
                   help="dtype of the kept values (fp32: bit for bit the evaluated weights)")
    _add_bnt_flags(p)
    p.add_argument("--data-dir", help="dataset folder, if not the one the run was trained from")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("evaluate", help="measure an exported model on its run's test split")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--data-dir", help="dataset folder, if not the one the run was trained from")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="also print the metrics as JSON")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("finetune", help="prune a run one-shot, then train with the mask fixed",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Prune RUN's final weights one-shot (the sweep's masks) and train them with the "
                                   "mask fixed: pruned weights, their gradients and optimizer state stay exactly "
                                   "zero. Model and data come from RUN; training flags default to RUN's, with a "
                                   "tenth of its learning rate and no warm-up. Resumable like train.",
                       epilog=epilog)
    p.add_argument("run", metavar="RUN")
    p.add_argument("--out", required=True, help="run folder to create")
    _add_mask_flags(p)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")
    add_flags(p, exclude=("dataset", "model", "model_args", "init", "init_exclude", "image_size", "download"))
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("report", help="table, plot and HTML page from existing prune.json files or a study",
                       description="Re-print the table of RUNs' prune.json files (or of a STUDY folder), and "
                                   "optionally write a plot and one self-contained HTML page.")
    p.add_argument("runs", nargs="+", metavar="RUN|STUDY")
    p.add_argument("--plot", help="write a combined plot here (.png)")
    p.add_argument("--html", help="write one self-contained HTML page here (figures embedded, configs, machine)")
    p.add_argument("--analysis", help="an `analyze` output folder to include in the HTML page")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("doctor", help="print the environment (versions, devices, datasets) for bug reports",
                       description="Print versions, the devices torch sees and where each dataset was looked "
                                   "for and found. Reads no dataset file; paste the output into bug reports.")
    p.add_argument("--data-dir", help="look for the datasets here instead of their default folders")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("demo", help="SGD against VAR, pruned one-shot, sized to this machine")
    p.add_argument("--out", default="runs/demo", help="folder for the demo's runs (default runs/demo)")
    p.add_argument("--task", choices=("classification", "segmentation"), default="classification",
                   help="classification: Fashion-MNIST; segmentation: the Colin27 brain MRI (mricron-data)")
    p.add_argument("--size", choices=("auto", "cpu", "gpu", "tiny"), default="auto",
                   help="auto: the GPU setup on a GPU, the CPU setup otherwise; tiny: a smoke test")
    p.add_argument("--data-dir", help="dataset folder (default: the Debian package's)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)
    return parser


def _on_sigterm(signum, frame):
    raise Terminated()


def _interrupted(argv) -> str:
    command = next((a for a in argv if not a.startswith("-")), "")
    if command == "train":
        return "completed epochs are kept (`varprune train --resume RUN` continues)"
    if command in ("study", "demo"):
        return "finished runs and sweeps are kept; the same command continues"
    if command == "prune":
        return "runs whose prune.json was written are kept; the same command continues with the others"
    return "nothing was left half-written"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["doctor"]:   # before anything that imports torch
        return _doctor_only(argv)
    from . import distributed
    from .errors import CheckpointError, DatasetError, RunError
    who = f"varprune[rank {distributed.env_rank()}]" if distributed.env_rank() else "varprune"
    previous = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:   # not the main thread
        previous = None
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command not in DATA_PARALLEL and not distributed.main_only():
            return 0     # under torchrun, rank 0 runs this command alone
        return args.func(args)
    except (UsageError, RunError, DatasetError, CheckpointError) as e:
        print(f"{who}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ValueError as e:  # library-level validation (unknown names, bad ranges)
        print(f"{who}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except NonFiniteError as e:
        print(f"{who}: error: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    except OSError as e:  # the disk or the file system, not the input: still one line, no traceback
        print(f"{who}: error: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{who}: interrupted; {_interrupted(argv)}", file=sys.stderr)
        return 130
    except Terminated:
        print(f"{who}: terminated (SIGTERM); {_interrupted(argv)}", file=sys.stderr)
        return 143
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        distributed.shutdown()   # after: torchrun's SIGTERM to a finished process must not raise in here


def _doctor_only(argv) -> int:
    parser = _Parser(prog="varprune doctor")
    parser.add_argument("doctor")
    parser.add_argument("--data-dir")
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        print(f"varprune: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return cmd_doctor(args)


if __name__ == "__main__":
    sys.exit(main())
