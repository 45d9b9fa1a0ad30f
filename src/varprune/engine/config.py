"""The run configuration: every field declared once, with its flag, default, help and range.

``TrainConfig`` is the single source of truth. The command-line flags
(``add_flags``), the JSON reader (``TrainConfig.from_dict``) and the checks
(``engine.checks.problems``) are all derived from the field declarations below, so adding a
setting means adding one ``setting(...)`` line.

A run's ``config.json`` holds ``{"train": asdict(config), "resolved": {...}}``:
every default written out, plus what was resolved on the machine (device,
precision, dataset shape and classes, versions, the command line); ``engine.runconfig`` reads it back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

from varprune.errors import RunError, short

# settings that say where or how things are computed, not what: a run may be resumed with others (--fsdp and
# --grad-checkpoint change only memory and float rounding: the checkpoint is whole either way)
LOCATION_KEYS = ("device", "data_dir", "download", "fsdp", "grad_checkpoint")
# VAR's default is a relative strength, lambda = s / psi(w_init): the best lambda moves about 100x between
# models, s = 1 sits within a few x of every model's best in the strength study (README).
DEFAULT_VAR_STRENGTH = 1.0
# the default batches: images as the reference measurement; text as the LM demo (engine.lmdemo), where a batch of
# 256 windows would leave a small text a few optimizer steps an epoch
IMAGE_BATCH_SIZE, TEXT_BATCH_SIZE = 256, 32


def setting(
    default,
    help: str,
    *,
    lo=None,
    hi=None,
    lo_open=False,
    hi_open=False,
    check: Callable | None = None,
    flag: bool = True,
    metavar: str | None = None,
    uses: str | tuple[str, ...] | None = None,
    name: str | None = None,
    aliases: tuple[str, ...] = (),
):
    """Declare one configuration field.

    ``lo``/``hi`` bound numbers (``*_open`` excludes the bound); ``check(value)``
    returns an error message or None for anything ranges cannot say (names); ``aliases`` are further flags of
    the same field (``--max-length`` for ``--seq-len``).
    Finite bounds are what turn ``--lr 3.5e38`` into one clear line instead of
    an overflow deep inside torch. ``uses`` names what the field applies to (a kind of method, or of task and
    tokenizer: engine.checks); given explicitly where it does not apply, the flag is refused. ``name``: the flag's
    name where it is not the field's (a repeatable flag is named in the singular: ``--model-arg``).
    """
    meta = dict(
        help=help,
        lo=lo,
        hi=hi,
        lo_open=lo_open,
        hi_open=hi_open,
        check=check,
        flag=flag,
        metavar=metavar,
        uses=uses,
        name=name,
        aliases=tuple(aliases),
    )
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


class Whole(str):
    """A check's message that is a whole sentence naming the value itself ("unknown model 'x' ..."); any other
    message a check returns is about the field and gets the flag's name in front."""


def _one_of(names: Callable[[], list[str]], what: str, allow_prefix: tuple[str, ...] = ()):
    def check(value):
        if value in names() or any(value.startswith(p) for p in allow_prefix):
            return None
        return Whole(f"unknown {what} {short(value)} (choose from {', '.join(names())})")

    return check


def _datasets():
    from varprune.data import list_datasets

    return list_datasets()


def _models():
    from varprune.models import list_models

    return list_models()


def _methods():
    from varprune.engine.methods import METHODS

    return list(METHODS)


def _is_text(dataset) -> bool:
    from varprune.data import DATASETS

    info = DATASETS.get(dataset) if isinstance(dataset, str) else None
    return info is not None and info.task in ("language-modeling", "text-classification", "instruction-tuning")


def _device_check(value):
    if value == "auto":
        return None
    import torch

    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        return Whole(f"unknown device {short(value)}; use auto, cpu, cuda or cuda:N")
    if device.type not in ("cpu", "cuda"):
        return Whole(f"device {short(value)} is not supported; use auto, cpu, cuda or cuda:N")
    return None


def _sparsity_list(values):
    if values is None:
        return None
    if not values or any(not 0 <= s < 1 for s in values):
        return f"must be non-empty values in [0, 1), got {short(values)}"
    if len(set(values)) != len(values):
        return f"must be unique, got {short(values)}"
    return None


@dataclass
class TrainConfig:
    """Everything that defines a training run; written to ``config.json``."""

    dataset: str = setting("fashion-mnist", "dataset, see `varprune doctor`", check=_one_of(_datasets, "dataset"))
    model: str = setting(
        "resnet18",
        "a registered model (see below), timm:NAME, or hf:DIR (a local Hugging Face model folder; nothing is "
        "downloaded)",
        check=_one_of(_models, "model", ("timm:", "hf:")),
    )
    model_args: dict = setting(
        {},
        "a model option, KEY=VALUE, repeatable (e.g. --model-arg width=32 for unet)",
        metavar="KEY=VALUE",
        name="--model-arg",
    )
    init: str | None = setting(
        None,
        "initial weights: a local safetensors file or PyTorch state dict "
        "(loaded with weights_only=True); nothing is downloaded",
        metavar="FILE",
    )
    init_exclude: list[str] | None = setting(
        None,
        "comma-separated parameter patterns not taken from --init (e.g. 'fc.*' for a classifier head of another size)",
    )
    image_size: int | None = setting(
        None,
        "resize images to this size, once when loading (default: the dataset's own; imagefolder: 32)",
        lo=8,
        hi=4096,
        uses="image",
    )
    method: str = setting("sgd", "training method, see below", check=_one_of(_methods, "method"))
    epochs: int = setting(15, "training epochs", lo=1, hi=100_000)
    batch_size: int = setting(  # None until __post_init__ resolves it
        None,
        "batch size (default 256 for images; 32 for text, the LM demo's: a small text still gives an epoch of "
        "several optimizer steps); under torchrun the global batch, split across the processes, so a run computes "
        "the same steps with any number of processes, except that a last partial batch leaving some process fewer than "
        "2 examples is dropped (with one process: a last batch of 1)",
        lo=1,
        hi=1 << 20,
    )
    optimizer: str = setting(  # None until __post_init__ resolves it
        None,
        "base optimizer: sgd (nesterov momentum) or adamw (default: sgd for images, adamw for text, as each is "
        "trained); the SAM-type methods wrap it",
        check=_one_of(lambda: ["sgd", "adamw"], "optimizer"),
    )
    lr: float | None = setting(
        None, "peak learning rate of warm-up + cosine (default 0.1 for sgd, 1e-3 for adamw)", lo=0, lo_open=True, hi=10
    )
    momentum: float = setting(0.9, "SGD momentum (nesterov)", lo=0, hi=1, hi_open=True, uses="sgd")
    nesterov: bool = setting(True, "Nesterov momentum for SGD", flag=False)
    weight_decay: float | None = setting(
        None, "weight decay (default 5e-4 for sgd; 0.05 for adamw, decoupled)", lo=0, hi=1
    )
    warmup_epochs: float = setting(1.0, "linear warm-up length in epochs", lo=0, hi=100_000)
    var_lambda: float | None = setting(
        None, "VAR strength lambda, absolute (instead of --var-strength)", lo=0, hi=1e6, uses="var"
    )
    var_strength: float | None = setting(
        None,
        "VAR relative strength s: lambda = s / psi(initial weights) "
        f"(default {DEFAULT_VAR_STRENGTH:g} unless --var-lambda is given; "
        "README: the strength study)",
        lo=0,
        lo_open=True,
        hi=1e6,
        uses="var",
    )
    var_r: float = setting(1e-8, "VAR smoothing r in sqrt(w^2 + r)", lo=0, lo_open=True, hi=1, uses="var")
    var_eps: float = setting(1e-8, "VAR eps in 1 / (Var + eps)", lo=0, lo_open=True, hi=1, uses="var")
    l1_alpha: float = setting(1e-5, "l1 strength", lo=0, hi=1, uses="l1")
    hoyer_alpha: float = setting(
        1e-6,
        "Hoyer-square strength; DeepHoyer's own examples use far larger values "
        "with their pruning schedule: tune it for one-shot pruning",
        lo=0,
        hi=10,
        uses="hoyer",
    )
    reg_in_every_pass: bool = setting(
        False,
        "for var+sam / var+cram+: add the regularizer's gradient at every "
        "(perturbed) pass, as before 0.2; default: once, at w, to the final gradient, "
        "so lambda means the same as for var",
        uses="reg+perturbed",
    )
    rho: float | None = setting(
        None,
        "perturbation radius of SAM-type methods (default: per method)",
        lo=0,
        lo_open=True,
        hi=10,
        uses="perturbed",
    )
    cram_sparsities: list[float] | None = setting(
        None, "CrAM sparsities drawn per step (default 0.3,...,0.9)", check=_sparsity_list, uses="cram"
    )
    seed: int = setting(
        0, "random seed; on CPU the same seed gives a bitwise identical run", lo=0, hi=2**63, hi_open=True
    )
    data_dir: str | None = setting(None, "dataset folder (torchvision's layout for the classification sets)")
    download: bool = setting(False, "download the dataset with torchvision if it is missing (off by default)")
    limit_train: int | None = setting(
        None, "train on a fixed subset of N examples (slices for segmentation)", lo=2, hi=2**40
    )
    limit_test: int | None = setting(
        None, "test on a fixed subset of N examples (slices for segmentation)", lo=1, hi=2**40
    )
    # `varprune tune`: measure on a validation split carved from the training examples (data.validation_indices,
    # fixed seed) instead of the test split, which is then never read; --limit-train/--limit-test apply after
    validation_fraction: float | None = setting(
        None, "fraction of the training examples held out for validation", lo=0, lo_open=True, hi=0.5, flag=False
    )
    device: str = setting("auto", "auto, cpu, cuda or cuda:N", check=_device_check)
    amp: str = setting(
        "auto",
        "auto (bf16 on GPU, fp32 on CPU), bf16 or none",
        check=_one_of(lambda: ["auto", "bf16", "none"], "--amp"),
    )
    channels_last: bool = setting(False, "channels_last memory format")
    compile: bool = setting(False, "torch.compile the model")
    augment: bool = setting(True, "random crop and flip (applied to image and mask alike)")
    grad_clip: float | None = setting(
        None,
        "clip the gradient's global norm to this before each step, 0 for none (default: 1.0 for text models, as "
        "transformers are trained; none for images)",
        lo=0,
        hi=1e6,
    )
    # text (language modeling, text classification, instruction tuning)
    seq_len: int = setting(
        128,
        "text: tokens per window (language modeling), per example (classification) or at most per example "
        "(instructions: longer ones are cut on the right and counted in the log)",
        lo=2,
        hi=1 << 16,
        uses="text",
        aliases=("--max-length",),
    )
    vocab_size: int = setting(
        4096,
        "text: vocabulary of the byte-level BPE trained on the training split (a --model hf:DIR brings its own "
        "tokenizer)",
        lo=259,
        hi=1 << 20,
        uses=("text", "bpe"),
    )
    # data parallel (torchrun); no effect in one process
    sync_bn: bool = setting(
        False,
        "under torchrun: BatchNorm statistics over the global batch (SyncBatchNorm), "
        "as one process computes them; default: each process normalises its share",
    )
    sam_local: bool = setting(
        False,
        "under torchrun, for sam, asam, var+sam: perturb with each process's own "
        "gradient, as the SAM paper does (m-sharpness, m = the per-process batch); default: "
        "the global gradient, so results do not depend on the number of processes",
    )
    fsdp: bool = setting(
        False,
        "under torchrun: shard weights, gradients and optimizer state over the processes (FSDP2 fully_shard of "
        "every block and the root; bf16 weights with fp32 gradient reduction on GPUs); the run folder holds the "
        "whole model, as without it",
    )
    grad_checkpoint: bool = setting(
        False, "activation checkpointing: each block's activations recomputed in the backward (transformers models)"
    )
    # masked fine-tuning (`varprune finetune`): start from a run's final weights, pruned one-shot, mask fixed
    finetune_from: str | None = setting(None, "run folder whose final weights are pruned and fine-tuned", flag=False)
    finetune_sparsity: float | None = setting(None, "sparsity of the fixed mask", lo=0, hi=1, hi_open=True, flag=False)
    finetune_pattern: str = setting("unstructured", "unstructured or N:M", flag=False)
    finetune_scope: str = setting(
        "global",
        "global or layerwise",
        flag=False,
        check=lambda v: None if v in ("global", "layerwise") else f"must be global or layerwise, got {short(v)}",
    )
    finetune_pruner: str = setting(
        "magnitude",
        "the one-shot pruner of the fixed mask: magnitude, wanda or sparsegpt",
        flag=False,
        check=_one_of(lambda: ["magnitude", "wanda", "sparsegpt"], "pruner"),
    )
    finetune_calib_samples: int = setting(
        128, "calibration inputs of wanda and sparsegpt", lo=1, hi=1 << 20, flag=False
    )
    finetune_calib_seq_len: int | None = setting(
        None, "tokens per calibration window (default: --seq-len)", lo=2, hi=1 << 16, flag=False
    )
    finetune_calib_data: str | None = setting(None, "calibration text file (default: the training split)", flag=False)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """A configuration from JSON; wrong keys or types are one :class:`RunError` naming them all."""
        if not isinstance(d, dict):
            raise RunError(f"a configuration must be a JSON object, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in d.items() if k != "extra"}  # `extra` was an unused field of 0.1
        unknown = sorted(map(str, set(values) - names))
        problems = [f"unknown keys {short(unknown)}; is it from another varprune version?"] if unknown else []
        problems += _type_problems(values)
        if problems:
            raise RunError("config " + "; ".join(problems))
        for f in dataclasses.fields(cls):  # JSON writes 1.0 as 1: floats become floats again
            if values.get(f.name) is not None:
                if _kinds(f)[0] == "float":
                    values[f.name] = float(values[f.name])
                elif _kinds(f)[0] == "list[float]":
                    values[f.name] = [float(v) for v in values[f.name]]
        return cls(**values)

    def __post_init__(self):
        # defaults that depend on the task and the base optimizer: written out resolved, so config.json says what ran
        text = _is_text(self.dataset)
        if self.optimizer is None:
            self.optimizer = "adamw" if text else "sgd"
        if self.grad_clip is None:
            self.grad_clip = 1.0 if text else 0.0
        if self.batch_size is None:
            self.batch_size = TEXT_BATCH_SIZE if text else IMAGE_BATCH_SIZE
        adamw = self.optimizer == "adamw"
        if self.lr is None:
            self.lr = 1e-3 if adamw else 0.1
        if self.weight_decay is None:
            self.weight_decay = 0.05 if adamw else 5e-4
        if self.var_lambda is None and self.var_strength is None:
            self.var_strength = DEFAULT_VAR_STRENGTH

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def same_run(self, other: TrainConfig) -> bool:
        """Would both configurations compute the same run (locations aside)?"""
        a, b = self.to_dict(), other.to_dict()
        return all(a[k] == b[k] for k in a if k not in LOCATION_KEYS)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _kinds(f) -> list[str]:
    return [k.strip() for k in f.type.split("|")]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        float(v)
    except OverflowError:  # an int beyond float range
        return False
    return True


_TYPE_CHECKS = {
    "int": _is_int,
    "float": _is_number,
    "bool": lambda v: isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "dict": lambda v: (
        isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, (bool, int, float, str)) for k, x in v.items())
    ),
    "list[str]": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "list[float]": lambda v: isinstance(v, list) and all(map(_is_number, v)),
    "None": lambda v: v is None,
}


def _bad_types(values: dict) -> list[str]:
    """The fields whose value has none of the field's types."""
    return [n for n, f in FIELDS.items() if n in values and not any(_TYPE_CHECKS[k](values[n]) for k in _kinds(f))]


def _type_problems(values: dict) -> list[str]:
    return [f"{n} must be {' or '.join(_kinds(FIELDS[n]))}, got {short(values[n])}" for n in _bad_types(values)]


def flag_of(name: str) -> str:
    """The command-line flag of field ``name``: its declared ``name``, else the field's name with dashes."""
    declared = FIELDS[name].metadata.get("name") if name in FIELDS else None
    return declared or "--" + name.replace("_", "-")
