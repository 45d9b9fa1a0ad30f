"""``varprune evaluate``: measure an exported model on its run's test split; or, with ``--choices`` /
``--lm-eval``, the multiple-choice accuracy of a language model (a run at any pruning setting, an exported file
or model folder)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from varprune.commands import common as c
from varprune.errors import UsageError


def add_parser(sub, epilog: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "evaluate",
        help="measure an exported model on its run's test split, a language model's multiple-choice accuracy, or a "
        "causal LM's commonsense accuracy",
        description="FILE: an exported model, measured on its run's test split. With --choices or --lm-eval: "
        "the multiple-choice accuracy of a language model instead, which FILE may also be a run folder (its final "
        "weights, dense or pruned one-shot in memory with --sparsity or --pattern) or a model folder of "
        "`varprune export --format hf`. With --commonsense: generation accuracy on LLM-Adapters' tasks (FILE: an "
        "export, a run, or hf:DIR). hf:DIR with --dataset D: a Hugging Face model folder as it is, measured on D's "
        "test split (the dense model `prune --model hf:DIR` starts from).",
    )
    p.add_argument("file", metavar="FILE|hf:DIR", nargs="?")
    p.add_argument(
        "--model", metavar="hf:DIR", help="a model folder, as prune, export and finetune take it (the same as FILE)"
    )
    p.add_argument("--data-dir", help="dataset folder, if not the one the run was trained from")
    c.add_other_data_flag(p)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="also print the metrics as JSON")
    c.add_choices_flag(p, "instead of the test split's metrics")
    p.add_argument(
        "--lm-eval",
        metavar="TASK[,TASK...]",
        help="lm-eval-harness tasks (boolq,piqa,...; needs `pip install varprune[eval]`, and the network for the "
        "tasks' data) run on the model in memory, reported as --choices reports",
    )
    p.add_argument(
        "--lm-eval-include",
        metavar="DIR",
        help="a folder of lm-eval task YAMLs of your own, beside lm-eval's (its include_path)",
    )
    p.add_argument("--limit", type=int, help="--lm-eval: at most this many questions a task")
    p.add_argument("--sparsity", type=float, help="a RUN pruned one-shot at this unstructured sparsity first")
    p.add_argument("--pattern", default="unstructured", help="a RUN pruned one-shot to this N:M pattern first")
    c.add_scope_flag(p)
    p.add_argument("--pruner", default="magnitude", choices=("magnitude", "wanda", "sparsegpt"))
    c.add_calibration_flags(p)
    p.add_argument(
        "--commonsense",
        metavar="DIR",
        help="instead of the test split: accuracy on each DIR/<task>/test.json of LLM-Adapters' commonsense tasks "
        "(boolq, piqa, social_i_qa, hellaswag, winogrande, ARC-Easy, ARC-Challenge, openbookqa), answers "
        "generated greedily from the Alpaca prompt",
    )
    p.add_argument(
        "--batch-size", type=int, default=16, help="prompts generated together with --commonsense (default 16)"
    )
    c.add_folder_data_flags(p.add_argument_group("a model folder hf:DIR (engine/pretrained.py)"), batch=False)
    flags = {a.dest: (a.option_strings[0], a.default) for a in p._actions if a.option_strings and a.dest != "help"}
    p.set_defaults(func=run, flag_defaults=flags)
    return p


def run(args) -> int:
    from varprune.engine.export import evaluate_file

    _model_as_file(args)
    _unread_flags(args)
    if args.choices or args.lm_eval:
        return _accuracy(args)
    found = c.device_problem(args.device)
    if args.commonsense is not None:
        return _commonsense(args, found)
    if args.sparsity is not None or args.pattern != "unstructured":
        found.append("--sparsity and --pattern prune a run for --choices or --lm-eval; add one of them")
    folder = args.file.startswith("hf:")
    args.model = args.file if folder else None
    found += c.folder_problems(args, False, "evaluate")
    if not folder and not Path(args.file).is_file():
        if Path(args.file, "config.json").is_file() and not Path(args.file, ".varprune-run").exists():
            found.append(
                f"{args.file} is a folder; a model folder is measured as `varprune evaluate hf:{args.file} "
                "--dataset D --data-dir X`"
            )
        else:
            found.append(f"{args.file} is not a file; give a file written by `varprune export`, or hf:DIR --dataset D")
    if found:
        raise UsageError("; ".join(found))
    if folder:
        from varprune.engine.pretrained import evaluate_pretrained

        metrics = evaluate_pretrained(c.folder_config(args))
    else:
        metrics = evaluate_file(Path(args.file), args.data_dir, args.device, args.other_data)
    other = metrics.pop("other_data", None)
    if other is not None:
        from varprune.engine.identity import other_data_line

        print(other_data_line(args.file, other))
    from varprune.report.tables import METRICS, metric_info

    m = metrics.pop("metric")

    def shown(k, v):
        info = metric_info(k)
        return f"{k}: {info.fmt(v)}{'%' if info.percent else ''}"

    print(
        "  ".join(
            [shown(m, metrics[m])]
            + [shown(k, v) for k, v in metrics.items() if k != m and k in METRICS and isinstance(v, float)]
        )
    )
    if args.json:
        print(json.dumps(metrics | {"metric": m} | ({"other_data": other} if other is not None else {})))
    return 0


# what each way of evaluating reads; any other flag given would do nothing, so it is refused
_COMMON = {"file", "model", "device", "json"}
_PRUNE = {"sparsity", "pattern"}  # a run pruned first (--choices, --lm-eval); refused with their own line elsewhere
_READS = {
    "--choices/--lm-eval": _COMMON
    | _PRUNE
    | {"choices", "lm_eval", "lm_eval_include", "limit", "data_dir"}
    | {"commonsense"}  # refused with its own line: a separate measurement
    | {"scope", "pruner", "calib_samples", "calib_seq_len", "calib_data"},
    "--commonsense": _COMMON | {"commonsense", "batch_size"},
    "hf:DIR --dataset": _COMMON | _PRUNE | {"data_dir", "dataset", "seq_len", "dtype", "limit_test"},
    "an exported FILE": _COMMON | _PRUNE | {"data_dir", "other_data", "dataset", "seq_len"},
}
_PRUNED_BY = ("scope", "pruner", "calib_samples", "calib_seq_len", "calib_data")


def _unread_flags(args) -> None:
    """A flag this way of evaluating never reads is one line, before anything is loaded (a --sparsity beside
    --commonsense measured the dense model, a --dtype beside --choices the float32 one, without a word)."""
    if args.choices is not None or args.lm_eval is not None:
        mode = "--choices/--lm-eval"
    elif args.commonsense is not None:
        mode = "--commonsense"
    elif args.file.startswith("hf:"):
        mode = "hf:DIR --dataset"
    else:
        mode = "an exported FILE"
    given = {k: flag for k, (flag, default) in args.flag_defaults.items() if getattr(args, k) != default}
    unread = [flag for k, flag in given.items() if k not in _READS[mode]]
    if mode == "--choices/--lm-eval" and not _PRUNE & set(given):
        unread += [flag for k, flag in given.items() if k in _PRUNED_BY]
    if unread:
        raise UsageError(f"{', '.join(unread)} {'does' if len(unread) == 1 else 'do'} nothing with {mode}; drop it")


def _model_as_file(args) -> None:
    """``--model hf:DIR`` is FILE given as prune, export and finetune take a folder; one of the two, once."""
    if args.model is None:
        if args.file is None:
            raise UsageError("give what to evaluate: FILE (an export), a run folder, or hf:DIR (a model folder)")
        return
    if args.file is not None:
        raise UsageError(f"give {args.file} or --model {args.model}, not both")
    if not args.model.startswith("hf:"):
        raise UsageError(
            f"evaluate --model takes a model folder as hf:DIR, not {args.model}; an export or a run is given as FILE"
        )
    args.file = args.model


def _accuracy(args) -> int:
    """``evaluate PATH --choices ... --lm-eval ...``: one table (and with --json one object) of every task."""
    from varprune.engine.choices import choice_problem, score_choices
    from varprune.engine.lmsource import PruneSetting, open_language_model
    from varprune.engine.sweep import calibration_problems

    found = c.device_problem(args.device)
    specs = c.names(args.choices or "")
    tasks = c.names(args.lm_eval or "")
    if args.choices is not None and not specs:
        found.append("--choices names no file")
    if specs:
        problem = choice_problem(specs)
        if problem:
            found.append(problem)
    if args.lm_eval is not None and not tasks:
        found.append("--lm-eval names no task")
    if args.limit is not None and args.limit < 1:
        found.append(f"--limit must be a positive integer, got {args.limit}")
    if args.sparsity is not None and args.pattern != "unstructured":
        found.append("give --sparsity or --pattern, not both")
    elif args.sparsity is not None or args.pattern != "unstructured":
        found += calibration_problems((args.pruner,), c.calib_samples(args), args.calib_seq_len, args.calib_data)
    if args.commonsense is not None:
        found.append("--commonsense is a separate measurement: run it without --choices and --lm-eval")
    where = Path(args.file[3:] if args.file.startswith("hf:") else args.file)
    if not where.exists():
        found.append(
            f"{where} does not exist; give a run folder, a file of `varprune export`, a model folder or hf:DIR"
        )
    elif where.is_dir() and not args.file.startswith("hf:"):
        found += c.half_replaced([Path(args.file)])
    if tasks:
        from varprune.engine.lmeval import lm_eval_problem

        problem = lm_eval_problem(tasks, args.lm_eval_include)
        if problem:
            found.append(problem)
    if found:
        raise UsageError("; ".join(found))
    setting = PruneSetting(
        args.sparsity,
        args.pattern,
        args.pruner,
        args.scope,
        c.calib_samples(args),  # the flag's None is "not given": the default 128 then
        args.calib_seq_len,
        args.calib_data,
    )
    lm = open_language_model(args.file, args.device, setting, args.data_dir)
    result: dict = {"tasks": {}}
    if specs:
        result = score_choices(lm.model, lm.tokenizer, specs, lm.device, lm.positions, lm.amp)
    if tasks:
        from varprune.engine.lmeval import lm_eval_results

        more = lm_eval_results(lm, tasks, args.limit, args.lm_eval_include)
        twice = sorted(set(more["tasks"]) & set(result["tasks"]))
        if twice:
            raise UsageError(f"--choices and --lm-eval both name the task {twice[0]!r}; rename the file")
        result["tasks"].update(more["tasks"])
    result["mean"] = {
        k: sum(t[k] for t in result["tasks"].values()) / len(result["tasks"]) for k in ("acc", "acc_norm")
    }
    print(accuracy_table(result, lm.source, lm.setting))
    if args.json:
        print(json.dumps(result | {"source": lm.source, **({"pruned": lm.setting} if lm.setting else {})}))
    return 0


def accuracy_table(result: dict, source: str, setting: dict) -> str:
    """Markdown: each task's acc, acc_norm (%) and n, then their unweighted mean."""
    rows = [
        f"| {name} | {100 * t['acc']:.2f} | {100 * t['acc_norm']:.2f} | {t['n']} |"
        for name, t in result["tasks"].items()
    ]
    mean = result["mean"]
    rows.append(f"| mean | {100 * mean['acc']:.2f} | {100 * mean['acc_norm']:.2f} | |")
    where = source
    if setting:
        s = setting["setting"]
        shown = s if isinstance(s, str) else f"{100 * s:g}%"
        where += f", {setting['pruner']} {shown} (realised {100 * setting['realised_sparsity']:.2f}%)"
    return "\n".join([f"{where}:", "", "| task | acc (%) | acc_norm (%) | n |", "|---|---:|---:|---:|", *rows])


def _commonsense(args, found: list[str]) -> int:
    from varprune.data.commonsense import read_commonsense
    from varprune.engine.commonsense import commonsense_accuracy, format_commonsense, load_for_generation

    where = Path(args.file[3:] if args.file.startswith("hf:") else args.file)
    if not where.exists():
        found.append(f"{where} does not exist; give a file written by `varprune export`, a run folder or hf:DIR")
    if not 1 <= args.batch_size <= 4096:
        found.append(f"--batch-size must be in [1, 4096], got {args.batch_size}")
    if found:
        raise UsageError("; ".join(found))
    read_commonsense(args.commonsense)  # the test sets are checked before the model is loaded
    model, tokenizer, device, amp = load_for_generation(args.file, args.device)
    result = commonsense_accuracy(
        model, tokenizer, args.commonsense, device, amp, args.batch_size, log=None if args.json else print
    )
    print(format_commonsense(result))
    if args.json:
        print(json.dumps(result))
    return 0
