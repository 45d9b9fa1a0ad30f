"""The checks of a configuration: ranges and names from the field declarations (engine.config), then the
rules that join fields (the model against the dataset's task, options a method does not read).

Every problem is a one-line message; ``validate`` raises them as one :class:`RunError`. Nothing is loaded or
written.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from varprune.engine.config import FIELDS, TrainConfig, Whole, _bad_types, _is_number, _type_problems, flag_of
from varprune.errors import RunError, short


def _range_problem(name: str, value) -> str | None:
    m = FIELDS[name].metadata
    if value is None or not _is_number(value) or (m["lo"] is None and m["hi"] is None):
        return None
    v = float(value)
    ok = math.isfinite(v)
    if ok and m["lo"] is not None:
        ok = v > m["lo"] if m["lo_open"] else v >= m["lo"]
    if ok and m["hi"] is not None:
        ok = v < m["hi"] if m["hi_open"] else v <= m["hi"]
    if ok:
        return None
    lo = "(" if m["lo_open"] else "["
    hi = ")" if m["hi_open"] else "]"
    bounds = f"{lo}{m['lo'] if m['lo'] is not None else '-inf'}, {m['hi'] if m['hi'] is not None else 'inf'}{hi}"
    return f"{flag_of(name)} must be in {bounds}, got {short(value)}"


def problems(cfg: TrainConfig, check_device: bool = True) -> list[str]:
    """Every problem with a configuration, as one-line messages (empty if fine).

    Types, ranges and names from the field declarations, then the rules that
    join fields. ``check_device`` also checks the device exists on this machine.
    Nothing is loaded or written.
    """
    values = cfg.to_dict()
    found = _type_problems(values)
    bad_type = set(_bad_types(values))
    failed = set(bad_type)
    for name, f in FIELDS.items():
        if name in bad_type:
            continue
        found += [p for p in [_range_problem(name, values[name])] if p]
        check = f.metadata["check"]
        if check is not None and values[name] is not None:
            msg = check(values[name])
            if msg:
                failed.add(name)
                found.append(msg if isinstance(msg, Whole) else f"{flag_of(name)} {msg}")
    if check_device and "device" not in failed:
        from varprune.device import resolve_device

        try:
            resolve_device(cfg.device)
        except ValueError as e:
            found.append(str(e))
    if cfg.var_lambda is not None and cfg.var_strength is not None:
        found.append("give --var-lambda or --var-strength, not both (the strength sets lambda = s / psi(w_init))")
    if not bad_type & {"dataset", "model"} and not found:
        found += _task_problems(cfg)
    return found


def _task_problems(cfg: TrainConfig) -> list[str]:
    """The model against the dataset's task, its options, and the --init file."""
    from varprune.data import dataset_info
    from varprune.models import list_models, model_options
    from varprune.models.libraries import library_problem
    from varprune.models.registry import model_tasks

    found = []
    want = dataset_info(cfg.dataset).task
    missing = library_problem(cfg.model, want in TEXT_TASKS)
    if missing:
        return [missing]
    if cfg.model.startswith("hf:"):
        from varprune.models.hf import hf_folder_problem

        problem = hf_folder_problem(cfg.model, want)
        if problem:
            return [problem]
    have = model_tasks(cfg.model)
    if want not in have:
        found.append(
            f"--model {cfg.model} is a {' or '.join(have)} model but --dataset {cfg.dataset} is a {want} task; "
            f"{want} models: {', '.join(list_models(want))}"
        )
    if cfg.model_args and not cfg.model.startswith(("timm:", "hf:")):
        known = model_options(cfg.model)
        unknown = sorted(set(cfg.model_args) - set(known))
        if unknown:
            offer = ", ".join(f"{k}={v!r}" for k, v in known.items()) or "none"
            found.append(
                f"--model-arg {', '.join(unknown)}: model {cfg.model} has no such option; its options: {offer}"
            )
    if cfg.init is not None and not Path(cfg.init).is_file():
        found.append(f"--init {short(cfg.init)} is not a file; give a local .safetensors or state-dict file")
    if cfg.init_exclude and cfg.init is None:
        found.append("--init-exclude needs --init")
    from varprune.engine.methods import METHODS

    if cfg.sam_local and METHODS[cfg.method].optimizer not in ("sam", "asam"):
        found.append(
            f"--sam-local applies to sam, asam and var+sam, not {cfg.method} (CrAM's mask and "
            f"CrAM+'s dense gradient must be the same on every process)"
        )
    if cfg.finetune_from is not None:
        if not cfg.finetune_from.startswith("hf:") and not (Path(cfg.finetune_from) / "model.safetensors").is_file():
            found.append(f"{cfg.finetune_from} has no model.safetensors to fine-tune; train it to the end first")
        if cfg.finetune_pattern == "unstructured" and cfg.finetune_sparsity is None:
            found.append("fine-tuning with an unstructured mask needs --sparsity")
    return found


def _uses(kind: str, method: str, optimizer: str) -> bool:
    """Does ``method`` on base ``optimizer`` read a field declared with ``uses=kind``?"""
    from varprune.engine.methods import METHODS

    m = METHODS.get(method)
    if m is None:
        return True  # an unknown method is reported by its own check
    return {
        "sgd": optimizer == "sgd",
        "var": "var" in m.regularizers,
        "l1": "l1" in m.regularizers,
        "hoyer": "hoyer" in m.regularizers,
        "perturbed": m.optimizer != "sgd",
        "reg+perturbed": bool(m.regularizers) and m.optimizer != "sgd",
        "cram": m.optimizer in ("cram", "cram+"),
        "sam": m.optimizer in ("sam", "asam"),
    }[kind]


def _users(kind: str, optimizer: str) -> str:
    from varprune.engine.methods import METHODS

    if kind == "sgd":
        return "--optimizer sgd"
    return "--method " + ", ".join(name for name in METHODS if _uses(kind, name, optimizer))


def unused_problems(given, methods: list[str], optimizer: str, scope: Scope | None = None) -> list[str]:
    """Flags given explicitly that none of ``methods`` (with base ``optimizer``) reads, or that do not apply to
    ``scope`` (the task, tokenizer: :data:`SCOPE_KINDS`): each would be written to config.json and change nothing,
    so it is refused, naming what it applies to. ``given``: field names."""
    found = []
    for name in given:
        kind = FIELDS[name].metadata.get("uses") if name in FIELDS else None
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if kinds[0] in SCOPE_KINDS:
            found += [p for p in [scope_problem(flag_of(name), kinds, scope)] if p]
            continue
        if kind is None or any(_uses(kind, m, optimizer) for m in methods):
            continue
        whose = (
            f"--optimizer {optimizer}"
            if kind == "sgd"
            else ("--method " if len(methods) == 1 else "--methods ") + ",".join(methods)
        )
        found.append(
            f"{flag_of(name)} does nothing with {whose}: it applies to {_users(kind, optimizer)}; "
            f"drop it or choose such a method"
        )
    return found


# ---------------------------------------------------------------- flags that apply to some runs only
# One rule for every flag that applies to some tasks, tokenizers or pruners only: a training field declares its
# kind with ``setting(uses=...)``, a command's own flag is listed in FLAG_USES; given where it does not apply, it
# is refused in one line naming why (the method-specific fields above are the same rule over methods).

TEXT_TASKS = ("language-modeling", "text-classification", "instruction-tuning")
CAUSAL = ("language-modeling", "instruction-tuning")  # a causal LM's text: windows, or instruction examples


@dataclass(frozen=True)
class Scope:
    """What a command works on, as far as a flag's relevance goes. ``tasks``: the runs' tasks (prune takes
    several runs: a flag applies when it applies to one of them); ``pruners``: the pruners that will run;
    ``own_tokenizer``: a text run trains its byte-level BPE here (not a --model hf:DIR's, not a fine-tune's
    source run's); ``subject``: the runs or dataset in words, for the message. None: not known, not judged."""

    tasks: tuple[str, ...] | None = None
    pruners: tuple[str, ...] | None = None
    own_tokenizer: bool | None = None
    subject: str = ""

    @classmethod
    def of_config(cls, cfg: TrainConfig, pruners: tuple[str, ...] | None = None) -> Scope:
        from varprune.data import DATASETS

        info = DATASETS.get(cfg.dataset)
        if info is None:  # an unknown dataset is reported by its own check
            return cls(pruners=pruners)
        text = info.task in TEXT_TASKS
        own = text and not cfg.model.startswith("hf:") and cfg.finetune_from is None
        return cls((info.task,), pruners, own, f"--dataset {cfg.dataset} (a {info.task} task)")

    @classmethod
    def of_runs(cls, configs, runs, pruners: tuple[str, ...] | None = None) -> Scope:
        from varprune.data import DATASETS

        infos = [DATASETS.get(c.dataset) for c in configs]
        tasks = tuple(i.task for i in infos if i is not None)
        named = ", ".join(f"{r} (a {i.task} run)" for r, i in zip(runs, infos) if i is not None)
        return cls(tasks, pruners, None, named)


def _calibrated(pruners) -> bool:
    from varprune.numerics.pruners import CALIBRATED

    return any(p in CALIBRATED for p in pruners)


# kind -> (does it apply to the scope? None: not known; what it applies to, in words; the scope's side, in words)
SCOPE_KINDS: dict[str, tuple[Callable[[Scope], bool | None], str, Callable[[Scope], str]]] = {
    "image": (
        lambda s: None if s.tasks is None else any(t not in TEXT_TASKS for t in s.tasks),
        "image datasets",
        lambda s: s.subject,
    ),
    "text": (
        lambda s: None if s.tasks is None else any(t in TEXT_TASKS for t in s.tasks),
        "text datasets (language modeling, text classification, instructions)",
        lambda s: s.subject,
    ),
    "lm": (
        lambda s: None if s.tasks is None else any(t in CAUSAL for t in s.tasks),
        "language-model and instruction runs (image and classification runs calibrate on their training split)",
        lambda s: s.subject,
    ),
    "bpe": (
        lambda s: s.own_tokenizer,
        "text runs that train their own byte-level BPE (a --model hf:DIR brings its tokenizer, a fine-tune keeps "
        "its source run's)",
        lambda s: "here (this run's tokenizer is not trained on its text)",
    ),
    "calibrated": (
        lambda s: None if s.pruners is None else _calibrated(s.pruners),
        "the calibrated pruners, wanda and sparsegpt",
        lambda s: f"with {', '.join(s.pruners or ())} pruning (no calibration happens)",
    ),
}
# a command's own flags (not training fields) that apply to some runs only: every kind listed must apply
FLAG_USES = {
    "--calib-samples": ("calibrated",),
    "--calib-seq-len": ("calibrated", "text"),
    "--calib-data": ("calibrated", "lm"),
}


def scope_problem(flag: str, kinds: tuple[str, ...], scope: Scope | None) -> str | None:
    """The one-line refusal of ``flag`` if one of its ``kinds`` does not apply to ``scope``, else None."""
    for kind in kinds:
        applies, what, here = SCOPE_KINDS[kind]
        if scope is not None and applies(scope) is False:
            side = here(scope)
            side = side if side.startswith(("with", "here")) else f"on {side}"
            return f"{flag} does nothing {side}; it applies to {what}: drop it"
    return None


def flag_problems(given: dict[str, object], scope: Scope) -> list[str]:
    """The command flags of :data:`FLAG_USES` given (``given``: flag -> value, None when not given) that do not
    apply to ``scope``."""
    return [
        p
        for flag, value in given.items()
        if value is not None
        for p in [scope_problem(flag, FLAG_USES[flag], scope)]
        if p
    ]


def validate(cfg: TrainConfig, check_device: bool = True) -> None:
    found = problems(cfg, check_device)
    if found:
        raise RunError("; ".join(found))
