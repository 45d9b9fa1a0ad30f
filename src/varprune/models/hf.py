"""Transformer models through Hugging Face transformers: ``gpt2``, ``llama``, ``bert`` and ``hf:<dir>``.

Registered models, random initialisation from a small configuration
(transformers' own ``_init_weights``), every size an option named as the
configuration field it sets:

* ``gpt2`` (language-modeling): ``GPT2LMHeadModel``; default 4 layers, width
  128, 4 heads, MLP 512, output tied to the token embedding;
* ``llama`` (language-modeling): ``LlamaForCausalLM``; default 4 layers,
  width 128, 4 query and 4 key/value heads, SwiGLU MLP 384, untied output;
* ``bert`` (text-classification): ``BertForSequenceClassification``;
  default 4 layers, width 128, 4 heads, MLP 512, ``num_classes`` labels.

At vocabulary 256 (bytes) and 256 positions these hold 858,880 (gpt2),
918,656 (llama) and 875,906 (bert, 2 labels) parameters: a training step
of 16 x 256 tokens took 3.4 s (gpt2, llama) and 1.0 s (bert) on two busy CPU
cores. Dropout is the configuration's default (0.1 for GPT-2
and BERT, 0.0 for Llama), as in the published models and in one-shot pruning
studies; set it with the options (``resid_pdrop=0``...).

The data-dependent sizes are keywords of ``create_model`` (registry.TEXT_SIZES),
never options: ``vocab_size`` (the tokenizer's), ``max_positions`` (the
sequence length: GPT-2's and BERT's position tables, Llama's
``max_position_embeddings``; a decoder's context may be made longer than the
sequence length with the option ``n_positions``, gpt2, or
``max_position_embeddings``, llama), ``num_classes`` (labels of a classifier) and the
tokenizer's ``bos_token_id``/``eos_token_id``/``pad_token_id`` (a decoder used
as a classifier needs ``pad_token_id`` to find each sequence's last token).

``hf:<dir>`` loads a local Hugging Face model folder (config.json and
safetensors weights) with ``AutoModelForCausalLM`` for language modeling, or
``AutoModelForSequenceClassification`` with a new head of ``num_classes``
labels for text classification (``task=`` keyword; default: the task the
folder was saved for). Nothing is ever downloaded: every load passes
``local_files_only=True``, a name that is not a folder is refused with how to
make one. The models come back in train mode, in float32 unless ``dtype=``.
The folder's weight files are checked before transformers reads them and its
load report after (models/hf_files.py): pickle and GGUF are refused with how
to convert them, a damaged file, a missing weight or a non-finite value is one
line, and transformers' own warnings are collected, not printed.

Every integer is bounded before transformers is imported (:data:`BOUNDS`),
so ``n_layer=100000`` is one line, not a machine out of memory. On the meta
device (``with torch.device("meta")``) every model builds without memory, an
``hf:<dir>`` from its config.json alone. :func:`estimate_size` counts
parameters and bytes without building.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import torch
from torch import nn

from .hf_files import check_loaded, check_weight_files, clear_bad_token_ids, refuse_non_folder, transformers_quiet
from .registry import CAUSAL_TASKS, TEXT_TASKS, ModelError, check_int, register_model, register_prefix

LM, TC = TEXT_TASKS[:2]
HF_PREFIX = "hf:"

# option -> (low, high): sane upper bounds, about twice the largest published models
# (Llama-3.1-405B: 126 layers, width 16384, 128 heads, MLP 53248, vocabularies up to 262k)
BOUNDS = {
    "layers": (1, 256),
    "width": (1, 32768),
    "heads": (1, 1024),
    "mlp": (1, 131072),
    "vocab_size": (1, 1 << 20),
    "max_positions": (1, 1 << 20),
    "num_classes": (2, 65536),
}
HF_FOLDER_OPTIONS = {"dtype": "float32", "keep_head": False}
# load notes go to this logger at INFO: silent in library use unless the caller sets logging up; the command line
# prints each once (cli.py)
LOAD_NOTES = logging.getLogger("varprune.load_notes")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # "gpt2", "meta-llama/Llama-2-7b-hf"


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ModelError(
            "text models need Hugging Face transformers: pip install 'varprune[hf]' (or pip install transformers)"
        ) from None
    return transformers


# ------------------------------------------------------------------ option checks


def _check_float(name: str, value, low: float, high: float, high_open: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or value > high or (high_open and value == high):
        span = f"[{low}, {high})" if high_open else f"[{low}, {high}]"
        raise ModelError(f"{name} must be a number in {span}; got {value!r}")
    return float(value)


def _check_positive(name: str, value, high: float) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not 0 < value <= high:
        raise ModelError(f"{name} must be a number in (0, {high}]; got {value!r}")
    return float(value)


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ModelError(f"{name} must be true or false; got {value!r}")
    return value


def _check_activation(name: str, value) -> str:
    from transformers.activations import ACT2FN

    if not isinstance(value, str) or value not in ACT2FN:
        raise ModelError(f"{name} must be one of {', '.join(sorted(ACT2FN))}; got {value!r}")
    return value


def _check_multiple(width_name: str, width: int, heads_name: str, heads: int) -> None:
    if width % heads:
        raise ModelError(f"{width_name} ({width}) must be a multiple of {heads_name} ({heads})")


def _check_sizes(vocab_size, max_positions, num_classes, bos_token_id, eos_token_id, pad_token_id) -> dict:
    """The data-dependent sizes of a registered text model, checked; token ids as config fields."""
    check_int("vocab_size", vocab_size, *BOUNDS["vocab_size"])
    check_int("max_positions", max_positions, *BOUNDS["max_positions"])
    check_int("num_classes", num_classes, *BOUNDS["num_classes"])
    ids = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id}
    for key, value in ids.items():
        if value is not None:
            check_int(key, value, 0, vocab_size - 1)
    return ids


# ------------------------------------------------------------------ registered models

_DESCRIBE = "(transformers), random init; options: the config's fields"


@register_model("gpt2", f"GPT-2 decoder {_DESCRIBE} (n_layer=4, n_embd=128, n_head=4)", task=LM)
def gpt2(vocab_size=256, max_positions=256, num_classes=2, bos_token_id=None, eos_token_id=None, pad_token_id=None,
         n_layer=4, n_embd=128, n_head=4, n_inner=None, activation_function="gelu_new", resid_pdrop=0.1,
         embd_pdrop=0.1, attn_pdrop=0.1, layer_norm_epsilon=1e-5, initializer_range=0.02,
         tie_word_embeddings=True, n_positions=None) -> nn.Module:  # fmt: skip
    cfg = _gpt2_fields(**locals())
    return _build("GPT2Config", "GPT2LMHeadModel", cfg)


def _gpt2_fields(vocab_size, max_positions, num_classes, bos_token_id, eos_token_id, pad_token_id, **o) -> dict:
    ids = _check_sizes(vocab_size, max_positions, num_classes, bos_token_id, eos_token_id, pad_token_id)
    check_int("n_layer", o["n_layer"], *BOUNDS["layers"])
    check_int("n_embd", o["n_embd"], *BOUNDS["width"])
    check_int("n_head", o["n_head"], *BOUNDS["heads"])
    if o["n_inner"] is not None:
        check_int("n_inner", o["n_inner"], *BOUNDS["mlp"])
    _check_multiple("n_embd", o["n_embd"], "n_head", o["n_head"])
    for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
        _check_float(key, o[key], 0.0, 1.0, high_open=True)
    _check_positive("layer_norm_epsilon", o["layer_norm_epsilon"], 1.0)
    _check_positive("initializer_range", o["initializer_range"], 1.0)
    _check_bool("tie_word_embeddings", o["tie_word_embeddings"])
    _transformers()
    _check_activation("activation_function", o["activation_function"])
    return dict(o, vocab_size=vocab_size, n_positions=_context("n_positions", o["n_positions"], max_positions), **ids)


def _context(name: str, value, max_positions: int) -> int:
    """The positions a decoder is built for: the sequence length, or more (``value``): a model generates past
    the length it was trained on only when its context allows (GPT-2's learned table has a row per position)."""
    if value is None:
        return max_positions
    check_int(name, value, *BOUNDS["max_positions"])
    if value < max_positions:
        raise ModelError(f"{name} ({value}) must be at least the sequence length ({max_positions})")
    return value


@register_model("llama", f"Llama decoder {_DESCRIBE} (num_hidden_layers=4, hidden_size=128)", task=LM)
def llama(vocab_size=256, max_positions=256, num_classes=2, bos_token_id=None, eos_token_id=None, pad_token_id=None,
          num_hidden_layers=4, hidden_size=128, intermediate_size=384, num_attention_heads=4,
          num_key_value_heads=None, hidden_act="silu", attention_dropout=0.0, rms_norm_eps=1e-6, rope_theta=10000.0,
          initializer_range=0.02, tie_word_embeddings=False, max_position_embeddings=None) -> nn.Module:  # fmt: skip
    cfg = _llama_fields(**locals())
    return _build("LlamaConfig", "LlamaForCausalLM", cfg)


def _llama_fields(vocab_size, max_positions, num_classes, bos_token_id, eos_token_id, pad_token_id, **o) -> dict:
    ids = _check_sizes(vocab_size, max_positions, num_classes, bos_token_id, eos_token_id, pad_token_id)
    check_int("num_hidden_layers", o["num_hidden_layers"], *BOUNDS["layers"])
    check_int("hidden_size", o["hidden_size"], *BOUNDS["width"])
    check_int("intermediate_size", o["intermediate_size"], *BOUNDS["mlp"])
    check_int("num_attention_heads", o["num_attention_heads"], *BOUNDS["heads"])
    heads = o["num_attention_heads"]
    kv = heads if o["num_key_value_heads"] is None else o["num_key_value_heads"]
    check_int("num_key_value_heads", kv, *BOUNDS["heads"])
    _check_multiple("hidden_size", o["hidden_size"], "num_attention_heads", heads)
    _check_multiple("num_attention_heads", heads, "num_key_value_heads", kv)
    if (o["hidden_size"] // heads) % 2:
        raise ModelError(
            f"hidden_size / num_attention_heads ({o['hidden_size']} / {heads}) must be even (rotary embeddings)"
        )
    _check_float("attention_dropout", o["attention_dropout"], 0.0, 1.0, high_open=True)
    _check_positive("rms_norm_eps", o["rms_norm_eps"], 1.0)
    _check_positive("rope_theta", o["rope_theta"], 1e9)
    _check_positive("initializer_range", o["initializer_range"], 1.0)
    _check_bool("tie_word_embeddings", o["tie_word_embeddings"])
    _transformers()
    _check_activation("hidden_act", o["hidden_act"])
    rope = {"rope_type": "default", "rope_theta": float(o.pop("rope_theta"))}
    return (
        dict(
            o,
            num_key_value_heads=kv,
            vocab_size=vocab_size,
            max_position_embeddings=_context("max_position_embeddings", o["max_position_embeddings"], max_positions),
            rope_parameters=rope,
        )
        | ids
    )


@register_model("bert", f"BERT encoder classifier {_DESCRIBE} (num_hidden_layers=4, hidden_size=128)", task=TC)
def bert(vocab_size=256, max_positions=256, num_classes=2, bos_token_id=None, eos_token_id=None, pad_token_id=None,
         num_hidden_layers=4, hidden_size=128, intermediate_size=512, num_attention_heads=4, hidden_act="gelu",
         hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, classifier_dropout=None, layer_norm_eps=1e-12,
         initializer_range=0.02) -> nn.Module:  # fmt: skip
    cfg = _bert_fields(**locals())
    return _build("BertConfig", "BertForSequenceClassification", cfg)


def _bert_fields(vocab_size, max_positions, num_classes, bos_token_id, eos_token_id, pad_token_id, **o) -> dict:
    ids = _check_sizes(vocab_size, max_positions, num_classes, bos_token_id, eos_token_id, pad_token_id)
    check_int("num_hidden_layers", o["num_hidden_layers"], *BOUNDS["layers"])
    check_int("hidden_size", o["hidden_size"], *BOUNDS["width"])
    check_int("intermediate_size", o["intermediate_size"], *BOUNDS["mlp"])
    check_int("num_attention_heads", o["num_attention_heads"], *BOUNDS["heads"])
    _check_multiple("hidden_size", o["hidden_size"], "num_attention_heads", o["num_attention_heads"])
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
        _check_float(key, o[key], 0.0, 1.0, high_open=True)
    if o["classifier_dropout"] is not None:
        _check_float("classifier_dropout", o["classifier_dropout"], 0.0, 1.0, high_open=True)
    _check_positive("layer_norm_eps", o["layer_norm_eps"], 1.0)
    _check_positive("initializer_range", o["initializer_range"], 1.0)
    _transformers()
    _check_activation("hidden_act", o["hidden_act"])
    # BERT's embedding reserves pad_token_id as its padding row (default 0)
    ids["pad_token_id"] = 0 if ids["pad_token_id"] is None else ids["pad_token_id"]
    return dict(o, vocab_size=vocab_size, max_position_embeddings=max_positions, num_labels=num_classes) | ids


_FIELDS = {"gpt2": _gpt2_fields, "llama": _llama_fields, "bert": _bert_fields}


def _build(config_class: str, model_class: str, fields: dict) -> nn.Module:
    t = _transformers()
    config = getattr(t, config_class)(**fields)
    return _causal_loss_type(getattr(t, model_class)(config).train())


def _causal_loss_type(model: nn.Module) -> nn.Module:
    """Name the causal-LM loss of a model whose class name does not (``GPT2LMHeadModel``).

    transformers derives ``loss_type`` from the class name; without it the
    Trainer counts every label, not ``labels[..., 1:]``, when it normalises
    the loss by the number of tokens: the loss of GPT-2 is then ``sum / (B T)``
    instead of the mean over the ``B (T - 1)`` predicted tokens (and each
    forward warns that ``loss_type=None`` is unrecognised).
    """
    if getattr(model, "loss_type", "") is None and type(model).__name__.endswith(_CAUSAL_SUFFIXES):
        model.loss_type = "ForCausalLM"  # type: ignore[assignment]  # Module.__setattr__ is typed for tensors/modules
    return model


# ------------------------------------------------------------------ size estimate


def _count(name: str, f: dict) -> int:
    """Parameters of a registered text model from its checked config fields (tied weights once)."""
    v = f["vocab_size"]
    if name == "gpt2":
        d, n, inner = f["n_embd"], f["n_layer"], f["n_inner"] or 4 * f["n_embd"]
        block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * inner + inner) + (inner * d + d)
        head = 0 if f["tie_word_embeddings"] else v * d
        return v * d + f["n_positions"] * d + n * block + 2 * d + head
    if name == "llama":
        d, n, i = f["hidden_size"], f["num_hidden_layers"], f["intermediate_size"]
        hd = d // f["num_attention_heads"]
        attn = 2 * d * d + 2 * d * f["num_key_value_heads"] * hd
        head = 0 if f["tie_word_embeddings"] else v * d
        return v * d + n * (attn + 3 * d * i + 2 * d) + d + head
    d, n, i, c = f["hidden_size"], f["num_hidden_layers"], f["intermediate_size"], f["num_labels"]
    embeddings = (v + f["max_position_embeddings"] + 2) * d + 2 * d  # word, position, 2 token types, LayerNorm
    block = 4 * (d * d + d) + 2 * d + (d * i + i) + (i * d + d) + 2 * d
    return embeddings + n * block + (d * d + d) + (d * c + c)


def estimate_size(name: str, dtype: torch.dtype = torch.float32, num_classes: int = 2, **sizes_and_options) -> dict:
    """``{"parameters": n, "bytes": n * element size}`` of a text model, without building it.

    Takes what :func:`~varprune.models.create_model` takes (``vocab_size``,
    ``max_positions``, options; ``task`` for ``hf:<dir>``) and checks it the
    same way. Registered models are counted in closed form (no transformers
    import for the count itself beyond the option checks); an ``hf:<dir>`` is
    built on the meta device from its config.json (well under a second for a
    7B configuration, no memory). Tied weights count once; buffers (rotary
    frequencies, position ids) are not counted. Training needs more: gradients,
    optimizer state and activations are the engine's arithmetic.
    """
    from .registry import _MODELS, TEXT_SIZES, model_options

    element = torch.empty((), dtype=dtype).element_size()
    if name.startswith(HF_PREFIX):
        with torch.device("meta"):
            model = create_hf_folder_model(name, num_classes=num_classes, **sizes_and_options)
        n = sum(p.numel() for p in model.parameters())
        return {"parameters": n, "bytes": n * element}
    if name not in _FIELDS:
        raise ModelError(f"estimate_size counts the text models ({', '.join(_FIELDS)}, hf:<dir>), not {name!r}")
    known = model_options(name)
    unknown = sorted(set(sizes_and_options) - set(known) - set(TEXT_SIZES))
    if unknown:
        offer = ", ".join(f"{k}={v!r}" for k, v in known.items())
        raise ModelError(f"model {name!r} has no option {', '.join(unknown)}; its options: {offer}")
    import inspect

    defaults = {k: p.default for k, p in inspect.signature(_MODELS[name][0]).parameters.items()}
    fields = _FIELDS[name](**{**defaults, "num_classes": num_classes, **sizes_and_options})
    n = _count(name, fields)
    return {"parameters": n, "bytes": n * element}


# ------------------------------------------------------------------ hf:<dir>


def _folder(name: str) -> Path:
    text = name[len(HF_PREFIX) :] if name.startswith(HF_PREFIX) else name
    if not text:
        raise ModelError("empty hf: model: write hf:DIR, DIR a local Hugging Face model folder")
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    refuse_non_folder(path)
    if _HUB_ID.fullmatch(text) and not path.exists():
        raise ModelError(
            f"hf:{text}: no such local folder, and varprune loads only local Hugging Face model folders "
            f"(nothing is downloaded): make one with `hf download {text} --local-dir DIR` (huggingface_hub) "
            f"or model.save_pretrained(DIR) and tokenizer.save_pretrained(DIR), then use hf:DIR"
        )
    what = "not a folder" if path.exists() else "no such folder"
    raise ModelError(
        f"hf:{text}: {what}; varprune loads only local Hugging Face model folders (config.json, "
        f"model.safetensors, tokenizer files): write one with model.save_pretrained(DIR)"
    )


def _read_config(path: Path) -> dict:
    cfg = path / "config.json"
    if not cfg.is_file():
        check_weight_files(path)  # a GGUF or a pickle-only folder: say how to convert it
        raise ModelError(f"hf:{path}: no config.json there; it is not a Hugging Face model folder")
    try:
        data = json.loads(cfg.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ModelError(f"hf:{path}: config.json is not readable JSON ({str(e).splitlines()[0][:80]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise ModelError(f"hf:{path}: config.json names no model_type; it is not a transformers model configuration")
    return data


def _natural_task(data: dict) -> str:
    archs = data.get("architectures") or []
    if any(a.endswith(_CAUSAL_SUFFIXES) for a in archs) and not data.get("is_encoder_decoder"):
        return LM
    if archs or data.get("is_encoder_decoder"):
        return TC
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return LM if data["model_type"] in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else TC


def hf_folder_task(name: str) -> str:
    """The task an ``hf:<dir>`` folder was saved for (cheap: its config.json); language-modeling
    when that cannot be read (:func:`create_hf_folder_model` then says what is wrong)."""
    try:
        data = _read_config(_folder(name))
    except ModelError:
        return LM
    try:
        return _natural_task(data)
    except ImportError:
        return LM


def hf_folder_problem(name: str, task: str | None = None) -> str | None:
    """Why ``hf:<dir>`` cannot be built for ``task`` (one line), or None. Reads config.json, builds nothing."""
    try:
        _load_config(_folder(name), task)
    except ModelError as e:
        return str(e)
    return None


def _load_config(path: Path, task: str | None, notes: list[str] | None = None, given=frozenset()):
    """The folder's checked config and task; transformers' warnings go to ``notes`` (out-of-vocabulary token
    ids not in ``given`` are cleared and said there)."""
    data = _read_config(path)
    t = _transformers()
    if task is None:
        task = _natural_task(data)
    if task not in TEXT_TASKS:
        raise ModelError(f"hf:{path}: task must be one of {', '.join(TEXT_TASKS)}, not {task!r}")
    check_weight_files(path, task)
    notes = [] if notes is None else notes
    try:
        with transformers_quiet(notes):
            config = t.AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
        notes[:] = [n for n in notes if "_token_id must be" not in n]  # translated just below
        clear_bad_token_ids(config, set(given), notes)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(
            f"hf:{path}: transformers cannot read its config.json ({str(e).strip().splitlines()[0][:120]})"
        ) from None
    from transformers.models.auto import modeling_auto as ma

    kind = type(config).__name__
    archs = data.get("architectures") or []
    if task in CAUSAL_TASKS:
        causal = type(config) in ma.MODEL_FOR_CAUSAL_LM_MAPPING and not getattr(config, "is_encoder_decoder", False)
        if not causal or (archs and not any(a.endswith(_CAUSAL_SUFFIXES) for a in archs)):
            what = archs[0] if archs else kind
            raise ModelError(
                f"hf:{path} holds a {what}, not a causal language model; language modeling needs a "
                f"...ForCausalLM folder (a decoder such as GPT-2 or Llama)"
            )
    elif type(config) not in ma.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING:
        raise ModelError(f"hf:{path}: transformers has no sequence classifier for {kind} ({data['model_type']})")
    return config, task


def _max_positions(config) -> int | None:
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def create_hf_folder_model(
    name: str,
    num_classes: int = 2,
    task: str | None = None,
    vocab_size: int | None = None,
    max_positions: int | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    **options,
) -> nn.Module:
    """Load ``hf:<dir>`` (a local folder: config.json, model.safetensors) for ``task``.

    language-modeling: ``AutoModelForCausalLM``; a folder of another kind
    (an encoder, a seq2seq model) is refused. text-classification:
    ``AutoModelForSequenceClassification`` with ``num_labels=num_classes``
    and ``ignore_mismatched_sizes=True``: the body's weights are the folder's;
    the folder's own head (a causal LM's ``lm_head``, a masked LM's
    ``cls.*``) is dropped, and the classification head (``score``,
    ``classifier``; BERT's pooler too when the folder has none) starts from
    transformers' initialisation (normal, std ``initializer_range``, zero
    bias). A folder that is already a classifier of ``num_classes`` labels
    keeps its head only with ``keep_head=True`` (evaluating or pruning a
    fine-tuned classifier); by default it is replaced as well, since its labels
    need not be the dataset's.

    ``vocab_size`` / ``max_positions`` (the tokenizer's and the sequence
    length) must fit the folder's embedding tables; token ids given replace the
    config's. ``dtype``: ``"float32"`` (default, for training),
    ``"bfloat16"`` or ``"float16"``. Parameter names that did not come from the
    folder are in ``model.varprune_new_parameters``. Under a meta default
    device the model is built from config.json without reading the weights.
    """
    unknown = sorted(set(options) - set(HF_FOLDER_OPTIONS))
    if unknown:
        offer = ", ".join(f"{k}={v!r}" for k, v in HF_FOLDER_OPTIONS.items())
        raise ModelError(f"hf:<dir> models have no option {', '.join(unknown)}; their options: {offer}")
    dtype, keep_head = (options.get(k, v) for k, v in HF_FOLDER_OPTIONS.items())
    path = _folder(name)
    if dtype not in _DTYPES:
        raise ModelError(f"dtype must be one of {', '.join(_DTYPES)}; got {dtype!r}")
    _check_bool("keep_head", keep_head)
    ids = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id}
    notes: list[str] = []  # transformers' warnings, translated where they matter
    config, task = _load_config(path, task, notes, {k for k, v in ids.items() if v is not None})
    t = _transformers()
    if vocab_size is not None:
        check_int("vocab_size", vocab_size, 1)
        if vocab_size > config.vocab_size:
            raise ModelError(
                f"hf:{path}: the tokenizer has {vocab_size} tokens but the model's embedding only "
                f"{config.vocab_size} rows; use the folder's own tokenizer"
            )
    limit = _max_positions(config)
    if max_positions is not None and limit is not None and max_positions > limit:
        raise ModelError(  # max_positions is a command's --seq-len: name the flag, not only the argument
            f"hf:{path}: the model takes at most {limit} positions (its config.json); max_positions (--seq-len) is "
            f"{max_positions}: use --seq-len {limit} or less"
        )
    for key, value in ids.items():
        if value is not None:
            check_int(key, value, 0, config.vocab_size - 1)
            setattr(config, key, value)
    auto = t.AutoModelForCausalLM
    if task == TC:
        check_int("num_classes", num_classes, *BOUNDS["num_classes"])
        auto = t.AutoModelForSequenceClassification
        if keep_head and getattr(config, "num_labels", None) != num_classes:
            raise ModelError(
                f"hf:{path}: keep_head needs a classifier of {num_classes} labels; the folder's has {config.num_labels}"
            )
        config.num_labels = num_classes
    if torch.get_default_device().type == "meta":
        with transformers_quiet(notes):
            model = auto.from_config(config, dtype=_DTYPES[dtype])
        model.varprune_new_parameters = []
        return _causal_loss_type(model).train()
    try:
        with transformers_quiet(notes):
            model, info = auto.from_pretrained(
                str(path),
                config=config,
                local_files_only=True,
                use_safetensors=True,
                trust_remote_code=False,
                dtype=_DTYPES[dtype],
                output_loading_info=True,
                ignore_mismatched_sizes=True,  # no raise after a report: check_loaded reads it and refuses
            )
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise ModelError(f"hf:{path}: transformers could not load it ({' '.join(str(e).split())[:200]})") from None
    new = check_loaded(path, model, info, task, keep_head)
    if task == TC and not keep_head:
        new |= _new_head(model)
    model.varprune_new_parameters = sorted(new)
    # what transformers said and varprune did not translate: kept on the model, and logged at INFO (a command
    # prints each once as "note: hf:DIR: ..."; a library caller sees them only through logging)
    model.varprune_load_notes = [n for n in notes if "LOAD REPORT" not in n]
    for note in model.varprune_load_notes:
        LOAD_NOTES.info("hf:%s: %s", path, note)
    if task == LM:  # varprune's windows are never padded: transformers' guess from a pad id in them is noise
        for module in model.modules():
            if hasattr(module, "warn_if_padding_and_no_attention_mask"):
                module.warn_if_padding_and_no_attention_mask = _unpadded
    return _causal_loss_type(model).train()


def _unpadded(*args, **kwargs) -> None:
    return None


@torch.no_grad()
def _new_head(model) -> set[str]:
    """Re-initialise every parameter outside the base model (the classification head); return their names."""
    prefix = model.base_model_prefix + "."
    std = getattr(model.config, "initializer_range", 0.02)
    names: set[str] = set()
    for module_name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if not own or module_name.startswith(prefix):
            continue
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif hasattr(module, "reset_parameters"):
            module.reset_parameters()
        names.update(f"{module_name}.{leaf}" for leaf, _ in own)
    return names


register_prefix(
    HF_PREFIX,
    create=create_hf_folder_model,
    task=hf_folder_task,
    tasks=TEXT_TASKS,
    options=HF_FOLDER_OPTIONS,
    description=("dir", "a local Hugging Face model folder, its weights (needs transformers; nothing is downloaded)"),
)
