"""A Hugging Face model folder measured and pruned as it is, without a run: ``--model hf:DIR --dataset D``.

The one seam for pretrained weights: :func:`load_pretrained` turns (folder, dataset, data folder, sequence
length, dtype, device) into a :class:`Pretrained`, the same kind of object :func:`~varprune.engine.trained.
load_trained` returns for a finished run (model, data, task, tokenizer), plus the folder's identity (its path,
its weights' sha256, its config.json, the tokenizer and the data used). The sweep, export, evaluate and
finetune take it as they take a run's, so a folder is measured and pruned exactly as a run's final weights are.

* The tokenizer is the folder's own ``tokenizer.json``; a language model's text is tokenized whole, without
  special tokens, and cut into non-overlapping windows of ``--seq-len`` tokens (the perplexity protocol of
  text runs). The calibration windows come from the training split with the same fixed seed as a run's, so
  ``prune`` and ``export`` of one folder prune from the same inputs.
* A causal LM folder (``...ForCausalLM``) serves language modeling; text classification needs a folder that is
  already a sequence classifier of the dataset's number of labels (its head is kept): a fresh head would measure
  chance. ``finetune`` is the exception: it trains the head, so any encoder or decoder folder will do.
* ``dtype``: how the weights are held (fp32, bf16, fp16); the calibrated pruners' statistics are float32
  whatever it is (numerics.calibration), and the loss is summed in float64.
* Before any weight is read, the memory the folder needs is estimated from its config.json (built on the meta
  device, models.hf.estimate_size): the weights, the dense copy the sweep restores from, and one evaluation
  batch; a folder that cannot fit is refused in one line. Nothing is ever downloaded, pickle weights are never
  loaded and ``trust_remote_code`` is never set (models.hf).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from varprune.data.base import DatasetError
from varprune.engine.config import TrainConfig
from varprune.engine.trained import Trained
from varprune.errors import RunError

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
EVAL_BATCH = 8  # windows (or examples) per evaluation batch: a 50k-token vocabulary's logits are large
_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def is_folder_model(name: object) -> bool:
    return isinstance(name, str) and name.startswith("hf:")


@dataclass
class Pretrained(Trained):
    """A model folder loaded for a dataset: what :class:`Trained` holds (``run`` is the folder), and
    ``identity``, what prune.json and an exported file record of it."""

    identity: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.run.name


def weights_digest(folder: Path) -> str:
    """sha256 of the folder's weights (storage.hf_folder.folder_weights_digest)."""
    from varprune.storage.hf_folder import folder_weights_digest

    return folder_weights_digest(folder)


def dtype_problem(dtype: str, device: torch.device) -> str | None:
    """``--dtype`` the device cannot compute in (a probe: one small matrix product), or None."""
    if dtype not in DTYPES:
        return f"--dtype {dtype}: choose one of {', '.join(DTYPES)}"
    if dtype == "fp32":
        return None
    if dtype == "bf16" and device.type == "cuda":
        try:
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # an older torch without the argument
            native = torch.cuda.is_bf16_supported()
        if not native:
            return f"--dtype bf16: {torch.cuda.get_device_name(device)} has no bfloat16 arithmetic; use --dtype fp16"
    try:
        a = torch.ones(4, 4, dtype=_TORCH_DTYPES[dtype], device=device)
        bool(torch.isfinite(a @ a).all())
    except (RuntimeError, TypeError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:100]
        return f"--dtype {dtype}: {device} cannot compute in it ({reason}); use --dtype fp32"
    return None


def pretrained_config(
    model: str,
    dataset: str,
    data_dir: str | None = None,
    seq_len: int | None = None,
    dtype: str = "fp32",
    device: str = "auto",
    batch_size: int = EVAL_BATCH,
    limit_test: int | None = None,
    keep_head: bool = True,
) -> TrainConfig:
    """The run configuration a folder is measured under: the folder as ``--model``, its dtype (and for a
    classifier, its own head) as model options, the data settings given; every training setting a default."""
    args: dict = {"dtype": DTYPES.get(dtype, dtype)}
    if keep_head:
        args["keep_head"] = True
    cfg = TrainConfig(
        model=model,
        dataset=dataset,
        data_dir=data_dir,
        model_args=args,
        batch_size=batch_size,
        limit_test=limit_test,
        device=device,
    )
    return cfg if seq_len is None else dataclasses.replace(cfg, seq_len=seq_len)


def _read_config(folder: Path) -> dict:
    try:
        data = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def pretrained_problems(cfg: TrainConfig, for_training: bool = False) -> list[str]:
    """Every problem with measuring ``cfg.model`` (an hf:DIR) on ``cfg.dataset``, found from config.json, the
    data folder's listing and a meta-device build: nothing large is read. ``for_training``: finetune, which
    trains a classifier's head, so a folder without one is fine."""
    from varprune.data import dataset_info
    from varprune.device import resolve_device
    from varprune.engine.checks import problems
    from varprune.engine.runs import data_problems
    from varprune.engine.textruns import is_text_task

    if not is_folder_model(cfg.model):
        return [f"--model {cfg.model}: prune, evaluate and export take a model folder as --model hf:DIR"]
    try:
        task = dataset_info(cfg.dataset).task
    except DatasetError:
        task = None  # an unknown dataset: problems() names it and the choices
    if task is not None and not is_text_task(task):
        return [
            f"--dataset {cfg.dataset} is a {task} dataset; a Hugging Face folder is a text model: give a text dataset"
        ]
    found = problems(dataclasses.replace(cfg, model_args={}))  # the folder's options are checked below
    if found or task is None:
        return found or [f"--dataset {cfg.dataset} is not a dataset varprune knows"]
    folder = Path(cfg.model[3:])
    dev = resolve_device(cfg.device)
    found += [p for p in [dtype_problem(_short(cfg.model_args.get("dtype", "float32")), dev)] if p]
    if task == "text-classification" and not for_training:
        archs = _read_config(folder).get("architectures")
        archs = archs if isinstance(archs, list) else []
        if not is_sequence_classifier(cfg.model):
            found.append(
                f"hf:{folder} is not a sequence classifier (architectures: {', '.join(map(str, archs)) or 'none'}): "
                f"measuring it on {cfg.dataset} would measure an untrained head; fine-tune it first "
                f"(`varprune finetune --model hf:{folder} --dataset {cfg.dataset} ...` or `varprune train --model "
                f"hf:{folder} ...`)"
            )
    found += data_problems(cfg)
    if not found:
        problem = memory_problem(cfg, task, dev)
        if problem:
            found.append(problem)
    return found


def is_sequence_classifier(model: str) -> bool:
    """Is the folder ``model`` (hf:DIR) a sequence classifier (its config.json's architectures say so)?"""
    archs = _read_config(Path(model[3:])).get("architectures")
    return isinstance(archs, list) and any(str(a).endswith("ForSequenceClassification") for a in archs)


def _short(dtype) -> str:
    return {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype))


def memory_problem(cfg: TrainConfig, task: str, device: torch.device) -> str | None:
    """Would the folder fit on ``device``? Its weights in their dtype (counted from config.json on the meta
    device), the dense copy a sweep restores from, and one evaluation batch's logits in float32."""
    from varprune.device import available_memory
    from varprune.engine.memory import FRACTION, gib
    from varprune.models.hf import estimate_size
    from varprune.models.registry import ModelError

    config = _read_config(Path(cfg.model[3:]))
    labels = config.get("num_labels") or len(config.get("id2label") or {}) or 2
    dtype = _short(cfg.model_args.get("dtype", "float32"))
    try:
        size = estimate_size(cfg.model, _TORCH_DTYPES[dtype], num_classes=max(int(labels), 2), task=task)
    except ModelError as e:
        return str(e)
    vocab = config.get("vocab_size")
    vocab = vocab if isinstance(vocab, int) and not isinstance(vocab, bool) else 0
    logits = 4 * cfg.batch_size * cfg.seq_len * (vocab if task in ("language-modeling", "instruction-tuning") else 0)
    need = 2 * size["bytes"] + logits
    free = available_memory(device)
    if free <= 0 or need <= FRACTION * free:
        return None
    return (
        f"{cfg.model} needs about {gib(need)} on {device} ({size['parameters']:,} parameters held twice in "
        f"{dtype}, and the logits of one batch) but {gib(free)} is free: use --dtype bf16, "
        f"a smaller --batch-size, or a larger machine"
    )


def load_pretrained(cfg: TrainConfig, data_cache: dict | None = None, for_training: bool = False) -> Pretrained:
    """The folder ``cfg.model`` and ``cfg.dataset`` loaded on ``cfg.device`` (checked by
    :func:`pretrained_problems` first: every problem is one RunError line)."""
    from varprune.data import load_tokenizer
    from varprune.device import resolve_amp, resolve_device
    from varprune.engine.runs import RunData, build_model
    from varprune.engine.textruns import load_text_data

    found = pretrained_problems(cfg, for_training)
    if found:
        raise RunError("; ".join(found))
    folder = Path(cfg.model[3:])
    dev = resolve_device(cfg.device)
    cfg = dataclasses.replace(cfg, device=str(dev))
    tokenizer = load_tokenizer(folder)  # a missing or broken tokenizer.json: one DatasetError line
    key = (cfg.dataset, cfg.data_dir, cfg.seq_len, cfg.batch_size, cfg.limit_test, str(tokenizer.source))
    cache = data_cache if data_cache is not None else {}
    if key not in cache:  # the training loop's loaders, but without the training run's memory check
        cache[key] = RunData(*load_text_data(cfg, dev, tokenizer=tokenizer))
    data = cache[key]
    model = build_model(cfg, data.info, dev, tokenizer=data.tokenizer).eval()
    identity = folder_identity(cfg, Path(tokenizer.source))
    return Pretrained(folder, cfg, model, data, dev, resolve_amp(cfg.amp, dev), identity=identity)


def folder_identity(cfg: TrainConfig, tokenizer: Path) -> dict:
    """What prune.json and an exported file record of the folder ``cfg.model`` measured on ``cfg``'s data (no
    weight is loaded): its path, the sha256 of its weights and of its tokenizer file, its config and dtype."""
    from varprune.engine.runs import data_fingerprint
    from varprune.storage.files import file_digest

    folder = Path(cfg.model[3:])
    return {
        "path": str(folder.resolve()),
        "weights_sha256": weights_digest(folder),
        "config": _read_config(folder),
        "dtype": _short(cfg.model_args.get("dtype", "float32")),
        "tokenizer": {"path": str(tokenizer), "sha256": file_digest(tokenizer)},
        "data": data_fingerprint(cfg),
    }


def finished_folder_sweep(cfg: TrainConfig, spec, out: Path) -> dict | None:
    """OUT/prune.json if ``prune --model`` made it from the folder as it is now (weights, tokenizer, config,
    dtype), on the same data and sequence length, with exactly these settings (engine.sweep.reusable_sweep,
    the rule a run's sweep is reused by)."""
    from varprune.data import dataset_info, load_tokenizer
    from varprune.engine.sweep import reusable_sweep

    if not (Path(out) / "prune.json").is_file():
        return None
    try:
        identity = folder_identity(cfg, Path(load_tokenizer(Path(cfg.model[3:])).source))
        spec = spec.for_task(dataset_info(cfg.dataset).task)
    except (OSError, ValueError):
        return None  # the sweep itself says what is wrong
    return reusable_sweep(Path(out), spec, {"pretrained": identity, "seq_len": cfg.seq_len})


# ---------------------------------------------------------------- prune --model hf:DIR --out OUT


def out_problems(out: Path, folder: Path) -> list[str]:
    """Where ``prune --model hf:DIR`` may write OUT/prune.{json,csv,png}: a new folder (its parent existing), or
    one that holds only what an earlier such sweep wrote; never the model folder, a run or anything else's."""
    out = Path(out)
    if (out.exists() and not out.is_dir()) or out.is_symlink():
        return [f"--out {out} is not a folder; give a folder for prune.json, prune.csv and prune.png"]
    if folder.is_dir() and out.exists() and out.resolve() == folder.resolve():
        return [f"--out {out} is the model folder itself; varprune does not write into it: give another folder"]
    if not out.exists():
        return [] if out.parent.is_dir() else [f"--out {out}: folder {out.parent} does not exist; create it first"]
    if (out / "config.json").exists() or (out / ".varprune-run").exists():
        return [f"--out {out} holds a run or a model (config.json); give a folder of its own for the sweep"]
    previous = out / "prune.json"
    if previous.exists():
        try:
            ours = isinstance(json.loads(previous.read_text()).get("pretrained"), dict)
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            return [f"--out {out} holds a prune.json that no `prune --model` wrote; give another folder"]
    return []


def prune_pretrained(p: Pretrained, spec, out: Path, log=print) -> dict:
    """Sweep the folder ``p`` exactly as a run's final weights are swept (engine.sweep.prune_sweep, the same
    calibration draw) and write OUT/prune.{json,csv,png}; return the document. prune.json is a run's, plus
    ``pretrained`` (the folder's identity) in place of the run's path."""
    from varprune.engine.sweep import LayerProgress, _choices_measure, _say, prune_sweep
    from varprune.report.results import write_sweep

    found = spec.problems() + out_problems(out, p.run)
    if found:
        raise RunError("; ".join(found))
    spec = spec.for_task(p.task.name)
    log(f"pruning {p.run} ({p.identity['dtype']}) on {p.cfg.dataset}")
    calibration = p.calibration(spec.calib_samples, spec.calib_seq_len, spec.calib_data) if spec.calibrated else None
    doc = prune_sweep(
        p.model,
        spec,
        p.task,
        p.data.test_loader,
        [],  # a transformer has no BatchNorm to re-tune
        amp=p.amp,
        progress=_say(log, p.task.primary, spec.scope or "global"),
        calibration=calibration,
        layers=LayerProgress(p.model, spec.exclude, log),
        measure=_choices_measure(spec, p),
    )
    doc.update(
        {
            "label": p.label,
            "weights_sha256": p.identity["weights_sha256"],
            "data": p.identity["data"],
            "pretrained": p.identity,
            "seq_len": p.cfg.seq_len,
        }
    )
    if spec.calibrated and p.is_text:
        doc["calibration_seq_len"] = spec.calib_seq_len or p.cfg.seq_len
    Path(out).mkdir(exist_ok=True)
    write_sweep(Path(out), doc, p.label)
    return doc


def prune_folder(
    folder,
    dataset: str,
    data_dir: str | None,
    out,
    seq_len: int | None = None,
    pruners=("magnitude",),
    sparsities=(0.5,),
    patterns=(),
    dtype: str = "fp32",
    device: str = "auto",
    batch_size: int = EVAL_BATCH,
    limit_test: int | None = None,
    scope: str | None = None,
    exclude=(),
    calib_samples: int = 128,
    calib_seq_len: int | None = None,
    calib_data: str | None = None,
    choices=(),
    reuse: bool = True,
    log=print,
) -> dict:
    """``varprune prune --model hf:FOLDER --dataset DATASET --out OUT`` as a function: the dense folder measured
    and pruned at every setting (as a run's final weights are), OUT/prune.{json,csv,png} written; returns the
    prune.json document. ``folder``: a path, or ``"hf:PATH"``; ``choices``: ``--choices`` files (or
    ``fortunes-endings``) measured beside the metric; ``reuse``: an OUT/prune.json of the same folder, data and
    settings is returned as it is (:func:`finished_folder_sweep`; ``--force`` is reuse=False). Every problem is
    one :class:`RunError` line, raised before any weight is read and before anything is written."""
    from varprune.engine.sweep import SweepSpec

    name = str(folder)
    model = name if name.startswith("hf:") else f"hf:{name}"
    cfg = pretrained_config(model, dataset, data_dir, seq_len, dtype, device, batch_size, limit_test)
    spec = SweepSpec(
        sparsities=tuple(sparsities),
        patterns=tuple(patterns),
        pruners=tuple(pruners),
        scope=scope,
        exclude=tuple(exclude),
        calib_samples=calib_samples,
        calib_seq_len=calib_seq_len,
        calib_data=calib_data,
        choices=tuple(choices),
    )
    found = spec.problems() + pretrained_problems(cfg) + out_problems(Path(out), Path(model[3:]))
    if found:
        raise RunError("; ".join(found))
    return sweep_folder(cfg, spec, Path(out), reuse, log)


def sweep_folder(cfg: TrainConfig, spec, out: Path, reuse: bool = True, log=print) -> dict:
    """:func:`prune_pretrained` of the folder ``cfg.model``, unless ``reuse`` and OUT already holds that sweep."""
    done = finished_folder_sweep(cfg, spec, out) if reuse else None
    if done is not None:
        log(f"reusing {out / 'prune.json'} (same folder, data and settings; --force sweeps again)")
        return done
    return prune_pretrained(load_pretrained(cfg), spec, out, log=log)


def export_pretrained(
    cfg: TrainConfig,
    out: Path,
    mask,
    values: str = "fp32",
    format: str = "varprune",
    evaluate: bool = True,
    overwrite: bool = False,
    log=print,
) -> dict:
    """``export --model hf:DIR``: the folder pruned at ``mask`` (an engine.export.Mask) from the same calibration
    windows as ``prune --model hf:DIR`` draws, and written as export writes a run's (its metadata naming the
    folder and its weights' sha256 in place of the run)."""
    from varprune.engine.export import export_loaded, output_problems

    found = pretrained_problems(cfg) + output_problems(Path(out), format, overwrite, cfg.model)
    if found:
        raise RunError("; ".join(found))
    p = load_pretrained(cfg)
    source = {
        "source_model": cfg.model,
        "source_weights_sha256": p.identity["weights_sha256"],
        "pretrained": json.dumps({k: v for k, v in p.identity.items() if k != "config"}, sort_keys=True),
    }
    digests = getattr(p.data.data, "digests", None)  # the text measured on, which evaluate checks --data-dir by
    trained_on = {"text_sha256": dict(digests)} if digests else {}
    dense = p.run / "model.safetensors"
    return export_loaded(p, Path(out), source, mask, values, 0, 2, format, evaluate, log, trained_on, dense)


def evaluate_pretrained(cfg: TrainConfig) -> dict:
    """``evaluate hf:DIR --dataset D``: the dense folder's metrics on the dataset's test split, as the sweep
    measures its dense model (prune.json's ``dense_<metric>``); with ``metric``, the primary one's name."""
    p = load_pretrained(cfg)
    return p.task.evaluate(p.model, p.data.test_loader, p.amp) | {"metric": p.task.primary}
