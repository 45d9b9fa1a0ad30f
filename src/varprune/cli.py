"""Command line: ``varprune train | prune | report | demo``.

Bad input exits with code 2 and one line on stderr naming the problem and the
fix; a run whose loss stops being finite exits with code 3.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .checkpoint import CheckpointError
from .data import DatasetError, list_datasets
from .methods import method_help
from .models import describe_models
from .pruning import SCOPES
from .train import NonFiniteError, RunError

EXIT_USAGE, EXIT_NONFINITE = 2, 3


class UsageError(ValueError):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not a usage dump
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _sparsities(text: str) -> list[float]:
    values = _floats(text)
    bad = [v for v in values if not 0 <= v < 1]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"sparsities must be in [0, 1), got {text!r}")
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"sparsities must be unique, got {text!r}")
    return values


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _model_lines() -> str:
    return "\n".join(f"  {k:<9} {v}" for k, v in describe_models().items())


# ----------------------------------------------------------------- train

TRAIN_FLAGS = {  # flag -> (TrainConfig field, type, help)
    "--dataset": ("dataset", str, f"one of {', '.join(list_datasets())} (default fashion-mnist)"),
    "--model": ("model", str, "a registered model, see below (default resnet18)"),
    "--method": ("method", str, "training method, see below (default sgd)"),
    "--epochs": ("epochs", int, "training epochs (default 15)"),
    "--batch-size": ("batch_size", int, "batch size (default 256)"),
    "--lr": ("lr", float, "peak learning rate of warm-up + cosine (default 0.1)"),
    "--momentum": ("momentum", float, "SGD nesterov momentum (default 0.9)"),
    "--weight-decay": ("weight_decay", float, "weight decay (default 5e-4)"),
    "--warmup-epochs": ("warmup_epochs", float, "linear warm-up length (default 1)"),
    "--var-lambda": ("var_lambda", float, "VAR strength lambda (default 1e-6)"),
    "--var-r": ("var_r", float, "VAR smoothing r in sqrt(w^2 + r) (default 1e-8)"),
    "--var-eps": ("var_eps", float, "VAR eps in 1 / (Var + eps) (default 1e-8)"),
    "--l1-alpha": ("l1_alpha", float, "l1 strength (default 1e-5)"),
    "--hoyer-alpha": ("hoyer_alpha", float, "Hoyer-square strength (default 1e-6)"),
    "--rho": ("rho", float, "perturbation radius of SAM-type methods (default: per method)"),
    "--cram-sparsities": ("cram_sparsities", _floats, "CrAM sparsities drawn per step (default 0.3,...,0.9)"),
    "--seed": ("seed", int, "random seed; on CPU the same seed gives a bitwise identical run (default 0)"),
    "--data-dir": ("data_dir", str, "dataset folder in torchvision's layout"),
    "--limit-train": ("limit_train", int, "train on a fixed subset of N examples"),
    "--limit-test": ("limit_test", int, "test on a fixed subset of N examples"),
    "--device": ("device", str, "auto, cpu, cuda or cuda:N (default auto)"),
    "--amp": ("amp", str, "auto (bf16 on GPU, fp32 on CPU), bf16 or none"),
}


def _add_train_flags(p: argparse.ArgumentParser, exclude=()) -> None:
    for flag, (_, kind, text) in TRAIN_FLAGS.items():
        if flag not in exclude:
            p.add_argument(flag, type=kind, help=text, default=argparse.SUPPRESS)
    p.add_argument("--download", action="store_true", default=argparse.SUPPRESS,
                   help="download the dataset with torchvision if it is missing (off by default)")
    p.add_argument("--channels-last", action="store_true", default=argparse.SUPPRESS,
                   help="channels_last memory format")
    p.add_argument("--compile", action="store_true", default=argparse.SUPPRESS, help="torch.compile the model")
    p.add_argument("--no-augment", dest="augment", action="store_false", default=argparse.SUPPRESS,
                   help="no random crop and flip")


def _config_from_args(args, **overrides):
    from .train import TrainConfig
    fields = {spec[0] for spec in TRAIN_FLAGS.values()} | {"download", "channels_last", "compile", "augment"}
    given = {k: v for k, v in vars(args).items() if k in fields}
    given.update(overrides)
    return TrainConfig(**given)


def cmd_train(args) -> int:
    from .train import load_run_config, train
    if args.resume:
        given = [f for f, (name, _, _) in TRAIN_FLAGS.items() if hasattr(args, name)]
        given += ["--out"] * bool(args.out) + ["--overwrite"] * bool(args.overwrite)
        if given:
            raise UsageError(f"--resume takes its configuration from RUN/config.json; drop {', '.join(given)}")
        run = Path(args.resume)
        train(load_run_config(run), run, resume=True, progress=not args.quiet)
        return 0
    if not args.out:
        raise UsageError("train needs --out RUN_DIR (or --resume RUN_DIR)")
    train(_config_from_args(args), args.out, overwrite=args.overwrite, progress=not args.quiet)
    print(f"wrote {args.out}/model.safetensors; next: varprune prune {args.out}")
    return 0


# ----------------------------------------------------------------- prune

def run_label(run: Path, cfg) -> str:
    if cfg.method in ("var", "var+sam", "var+cram+"):
        return f"{cfg.method} λ={cfg.var_lambda:g}"
    return cfg.method


def check_runs(runs: list[Path], data_dir=None) -> tuple[list, list[str]]:
    """Every run folder's configuration, and every problem with them (nothing is loaded)."""
    from .train import WEIGHTS, data_problems, load_run_config
    configs, problems = [], []
    for run in runs:
        try:
            cfg = load_run_config(run)
        except RunError as e:
            configs.append(None)
            problems.append(str(e))
            continue
        configs.append(cfg)
        if not (run / WEIGHTS).is_file():
            problems.append(f"{run} has no {WEIGHTS}: training did not finish; `varprune train --resume {run}`")
        if data_dir is not None:
            cfg.data_dir = data_dir
        problems += [p for p in data_problems(cfg) if p not in problems]
    return configs, problems


def _weights_digest(path: Path) -> str:
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def finished_sweep(run: Path, sparsities, scope, exclude, bnt_batches, bnt_batch_size) -> dict | None:
    """RUN/prune.json if it was made from RUN's current weights with exactly these settings."""
    from .train import WEIGHTS
    try:
        doc = json.loads((run / "prune.json").read_text())
        same = ([r["sparsity"] for r in doc["results"]] == list(sparsities) and doc["scope"] == scope
                and list(doc["exclude"]) == list(exclude) and doc["bnt_batches"] == bnt_batches
                and doc["bnt_batch_size"] == bnt_batch_size
                and doc["weights_sha256"] == _weights_digest(run / WEIGHTS))
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None
    return doc if same else None


def prune_runs(runs: list[Path], sparsities, scope="global", exclude=(), bnt_batches=20, bnt_batch_size=500,
               data_dir=None, device="auto", log=print, reuse=False) -> list[tuple[str, dict]]:
    """Sweep every run; write RUN/prune.{json,csv,png}; return (label, document) pairs.

    Only RUN/prune.* are written; the run's weights and checkpoint are read, never
    modified. ``reuse``: a run whose prune.json was made from its current weights
    with the same settings is not swept again (an interrupted sweep resumes).
    """
    import torch

    from .checkpoint import load_weights
    from .device import resolve_amp, resolve_device
    from .evaluate import bnt_batches as make_bnt
    from .evaluate import prune_sweep
    from .report import write_sweep
    from .train import WEIGHTS, build_model, load_data

    dev = resolve_device(device)
    configs, problems = check_runs(runs, data_dir)   # every folder checked before any work
    if problems:
        raise RunError("; ".join(problems))
    cache, out = {}, []
    labels = [run_label(r, c) for r, c in zip(runs, configs)]
    if len(set(labels)) < len(labels):
        labels = [str(r) for r in runs]
    for run, cfg, label in zip(runs, configs, labels):
        done = finished_sweep(run, sparsities, scope, exclude, bnt_batches, bnt_batch_size) if reuse else None
        if done is not None:
            log(f"reusing {run / 'prune.json'} (same weights and settings; --force sweeps again)")
            done["label"] = label
            out.append((label, done))
            continue
        cfg.device = str(dev)
        key = (cfg.dataset, cfg.data_dir, cfg.limit_train, cfg.limit_test)
        if key not in cache:
            cache[key] = load_data(cfg, dev)
        _, train_loader, test_loader = cache[key]
        model = build_model(cfg, dev)
        digest = _weights_digest(run / WEIGHTS)
        load_weights(run / WEIGHTS, model, expect={"model": cfg.model, "dataset": cfg.dataset})
        g = torch.Generator().manual_seed(0)
        pick = torch.randperm(len(train_loader.images), generator=g)[: bnt_batches * bnt_batch_size]
        bnt = make_bnt(train_loader.images[pick.to(train_loader.images.device)], bnt_batches, bnt_batch_size,
                       train_loader.normalize)
        log(f"pruning {run} ({label})")
        doc = prune_sweep(model, sparsities, test_loader, bnt, scope, exclude, resolve_amp(cfg.amp, dev),
                          progress=lambda s, a, b: log(f"  {100 * s:g}%: {100 * b:.2f}% with BNT, {100 * a:.2f}% without"))
        doc.update({"run": str(run), "label": label, "bnt_batches": bnt_batches, "bnt_batch_size": bnt_batch_size,
                    "weights_sha256": digest})
        write_sweep(run, doc, label)
        out.append((label, doc))
    return out


def cmd_prune(args) -> int:
    from .report import sweep_plot, sweep_table
    runs = [Path(r) for r in args.runs]
    problems = [] if args.bnt_batches >= 0 and args.bnt_batch_size > 0 else [
        "--bnt-batches must be >= 0 and --bnt-batch-size > 0"]
    if len(set(map(str, runs))) != len(runs):
        problems.append("a RUN is named twice")
    problems += check_runs(runs, args.data_dir)[1]
    if problems:  # every problem at once, before any work
        raise UsageError("; ".join(problems))
    rows = prune_runs(runs, args.sparsities, args.scope, _names(args.exclude or ""), args.bnt_batches,
                      args.bnt_batch_size, args.data_dir, args.device, reuse=not args.force)
    print(sweep_table(rows))
    if args.plot or len(runs) > 1:
        plot = Path(args.plot) if args.plot else Path("prune_comparison.png")
        sweep_plot(rows, plot)
        print(f"plot: {plot}")
    return 0


def cmd_report(args) -> int:
    from .report import sweep_plot, sweep_table
    rows = []
    for run in map(Path, args.runs):
        path = run / "prune.json"
        try:
            doc = json.loads(path.read_text())
            label = doc.get("label", str(run))
            _ = [(r["sparsity"], r["accuracy"], r["accuracy_bnt"]) for r in doc["results"]], doc["dense_accuracy"]
        except FileNotFoundError:
            raise RunError(f"{path} not found: run `varprune prune {run}` first") from None
        except (OSError, ValueError, KeyError, TypeError):
            raise RunError(f"{path} is not a varprune prune.json; rerun `varprune prune {run}`") from None
        rows.append((label, doc))
    print(sweep_table(rows))
    if args.plot:
        sweep_plot(rows, args.plot)
        print(f"plot: {args.plot}")
    return 0


def cmd_study(args) -> int:
    from .study import run_study
    if args.bnt_batches < 0 or args.bnt_batch_size <= 0:
        raise UsageError("--bnt-batches must be >= 0 and --bnt-batch-size > 0")
    seeds = []
    for v in _names(args.seeds):
        try:
            seeds.append(int(v))
        except ValueError:
            raise UsageError(f"--seeds takes comma-separated integers, got {args.seeds!r}") from None
    run_study(Path(args.out), _config_from_args(args), _names(args.methods), seeds, args.sparsities, args.scope,
              args.bnt_batches, args.bnt_batch_size, progress=not args.quiet)
    return 0


def cmd_doctor(args) -> int:
    from .doctor import report
    print(report(args.data_dir), end="")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo
    run_demo(Path(args.out), size=args.size, data_dir=args.data_dir, progress=not args.quiet)
    return 0


# ----------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="varprune", description="Train networks that survive one-shot magnitude pruning.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("train", help="train one run", formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train a model with or without VAR into a run folder.",
                       epilog=f"methods:\n{method_help()}\n\nmodels:\n{_model_lines()}")
    p.add_argument("--out", help="run folder to create")
    p.add_argument("--resume", metavar="RUN", help="continue RUN from its last complete epoch")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing run in --out (and the prune results made from its weights); "
                        "without it an existing run is never touched")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_train_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("prune", help="one-shot pruning sweep of trained runs",
                       description="Prune every RUN's final weights one-shot at each sparsity, with and without "
                                   "BN re-tuning, into RUN/prune.{json,csv,png}. Weights and checkpoints are "
                                   "only read.")
    p.add_argument("runs", nargs="+", metavar="RUN")
    p.add_argument("--sparsities", type=_sparsities, default=[0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99])
    p.add_argument("--scope", choices=SCOPES, default="global")
    p.add_argument("--exclude", help="comma-separated parameter names or patterns not to prune; "
                                     "'first' and 'last' name the stem and the classifier")
    p.add_argument("--bnt-batches", type=int, default=20, help="BN re-tuning batches (default 20; 0 = none)")
    p.add_argument("--bnt-batch-size", type=int, default=500, help="BN re-tuning batch size (default 500)")
    p.add_argument("--data-dir", help="dataset folder, if not the one the run was trained from")
    p.add_argument("--device", default="auto")
    p.add_argument("--plot", help="combined plot of all runs (default prune_comparison.png for several runs)")
    p.add_argument("--force", action="store_true",
                   help="sweep every run again; by default a run whose prune.json was made from its current "
                        "weights with the same sparsities, scope, exclusions and BNT settings is reused, so an "
                        "interrupted sweep over several runs continues where it stopped")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("study", help="train and prune several methods x seeds, one report",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train every (method, seed), prune each, and write report.md, report.json and "
                                   "report.png in --out. Finished runs are reused, interrupted ones resumed.",
                       epilog=f"methods:\n{method_help()}\n\nmodels:\n{_model_lines()}")
    p.add_argument("--out", required=True, help="study folder")
    p.add_argument("--methods", default="sgd,var", help="comma-separated methods (default sgd,var)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    p.add_argument("--sparsities", type=_sparsities, default=[0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99])
    p.add_argument("--scope", choices=SCOPES, default="global")
    p.add_argument("--bnt-batches", type=int, default=20)
    p.add_argument("--bnt-batch-size", type=int, default=500)
    p.add_argument("--quiet", action="store_true")
    _add_train_flags(p, exclude=("--method", "--seed"))
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("report", help="table and plot from existing prune.json files")
    p.add_argument("runs", nargs="+", metavar="RUN")
    p.add_argument("--plot", help="write a combined plot here")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("doctor", help="print the environment (versions, devices, datasets) for bug reports",
                       description="Print versions, the devices torch sees and where each dataset was looked "
                                   "for and found. Reads no dataset file; paste the output into bug reports.")
    p.add_argument("--data-dir", help="look for the datasets here instead of their default folders")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("demo", help="SGD against VAR on Fashion-MNIST, sized to this machine")
    p.add_argument("--out", default="runs/demo", help="folder for the demo's runs (default runs/demo)")
    p.add_argument("--size", choices=("auto", "cpu", "gpu", "tiny"), default="auto",
                   help="auto: the GPU setup on a GPU, the CPU setup otherwise; tiny: a smoke test")
    p.add_argument("--data-dir", help="Fashion-MNIST folder (default: the Debian package's)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return args.func(args)
    except (UsageError, RunError, DatasetError, CheckpointError) as e:
        print(f"varprune: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ValueError as e:  # library-level validation (unknown names, bad ranges)
        print(f"varprune: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except NonFiniteError as e:
        print(f"varprune: error: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    except OSError as e:  # the disk or the file system, not the input: still one line, no traceback
        print(f"varprune: error: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("varprune: interrupted; completed epochs are kept (--resume continues)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
