"""Text models through transformers: registry, sizes, bounds, the meta device, and hf:DIR local folders only."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # a guard: nothing here may reach the network
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import json
import subprocess
import sys
import time

import pytest
import torch

from varprune.models import (
    TEXT_TASKS,
    ModelError,
    create_model,
    describe_models,
    hf,
    list_models,
    model_options,
    model_task,
    model_tasks,
)
from varprune.models.hf import estimate_size, hf_folder_problem
from varprune.numerics.weights import classify_parameters, prunable_weights

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

TINY = {
    "gpt2": dict(n_layer=2, n_embd=32, n_head=2),
    "llama": dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2),
    "bert": dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2),
}
SIZES = dict(vocab_size=100, max_positions=24)


def test_importing_varprune_imports_neither_transformers_nor_lightning():
    code = (
        "import sys, varprune, varprune.models, varprune.integrations, varprune.storage.hf_folder\n"
        "varprune.create_model, varprune.VarRegularizer\n"
        "bad = [m for m in ('transformers', 'lightning', 'pytorch_lightning') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_registry_knows_the_text_tasks():
    assert list_models("language-modeling") == ["gpt2", "llama"]
    assert list_models("text-classification") == ["bert"]
    assert model_task("gpt2") == "language-modeling" and model_task("bert") == "text-classification"
    # a causal LM serves instruction tuning as it is
    assert model_tasks("gpt2") == ("language-modeling", "instruction-tuning") == model_tasks("llama")
    assert list_models("instruction-tuning") == ["gpt2", "llama"] and model_tasks("resnet20") == ("classification",)
    assert model_tasks("hf:anything") == TEXT_TASKS
    assert "hf:<dir>" in describe_models() and "hf:<dir>" in describe_models("text-classification")
    assert "hf:<dir>" not in describe_models("classification") and "gpt2" not in describe_models("classification")
    # options are the config's fields, never the data-dependent sizes
    for name in ("gpt2", "llama", "bert"):
        assert not set(model_options(name)) & {"vocab_size", "max_positions", "num_classes", "pad_token_id"}
    assert model_options("gpt2")["n_layer"] == 4 and model_options("llama")["hidden_size"] == 128
    assert model_options("hf:x") == {"dtype": "float32", "keep_head": False}


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_builds_runs_and_has_prunable_weights(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, **SIZES, **TINY[name])
    assert model.training
    ids = torch.randint(0, 100, (2, 24))
    positional = model(ids).logits  # input_ids positionally
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    logits = model(**batch).logits  # or a dict of tensors
    want = (2, 3) if name == "bert" else (2, 24, 100)
    assert positional.shape == logits.shape == want
    classes = classify_parameters(model)
    assert prunable_weights(model) and all(v != "prunable" for k, v in classes.items() if "embed" in k or "wte" in k)
    if name == "gpt2":  # the tied output layer is the embedding, not prunable
        assert model.lm_head.weight is model.transformer.wte.weight
        assert model.loss_type == "ForCausalLM"  # the Trainer counts labels[..., 1:] (see _causal_loss_type)


@pytest.mark.parametrize(
    "name,options",
    [
        ("gpt2", {}),
        ("gpt2", dict(n_inner=50, tie_word_embeddings=False)),
        ("llama", {}),
        ("llama", dict(num_key_value_heads=1, tie_word_embeddings=True)),
        ("bert", {}),
    ],
)
def test_estimate_counts_what_is_built(name, options):
    kw = {**SIZES, **TINY[name], **options}
    with torch.device("meta"):
        model = create_model(name, num_classes=5, **kw)
    assert next(model.parameters()).device.type == "meta"
    built = sum(p.numel() for p in model.parameters())
    assert estimate_size(name, num_classes=5, **kw) == {"parameters": built, "bytes": 4 * built}
    # varprune lists the weights on meta: the same names as the model built in memory
    real = create_model(name, num_classes=5, **kw)
    assert [n for n, _ in prunable_weights(model)] == [n for n, _ in prunable_weights(real)]
    assert estimate_size(name, dtype=torch.bfloat16, num_classes=5, **kw)["bytes"] == 2 * built


def test_default_sizes_for_a_two_core_demo():
    counts = {n: estimate_size(n, num_classes=2)["parameters"] for n in ("gpt2", "llama", "bert")}
    assert counts == {"gpt2": 858_880, "llama": 918_656, "bert": 875_906}
    with torch.device("meta"):
        assert sum(p.numel() for p in create_model("bert", num_classes=2).parameters()) == 875_906
    cfg = create_model("gpt2", n_layer=1).config  # dropout: the published configuration's
    assert (cfg.resid_pdrop, cfg.embd_pdrop, cfg.attn_pdrop) == (0.1, 0.1, 0.1)


@pytest.mark.parametrize(
    "name,options,message",
    [
        ("gpt2", dict(n_layer=100000), r"n_layer must be an integer in 1\.\.256"),
        ("gpt2", dict(n_embd=10**9), r"n_embd must be an integer in 1\.\.32768"),
        ("gpt2", dict(n_embd=30, n_head=4), r"n_embd \(30\) must be a multiple of n_head \(4\)"),
        ("gpt2", dict(resid_pdrop=1.0), r"resid_pdrop must be a number in \[0.0, 1.0\)"),
        ("gpt2", dict(activation_function="nope"), "activation_function must be one of"),
        ("gpt2", dict(tie_word_embeddings="yes"), "tie_word_embeddings must be true or false"),
        ("gpt2", dict(n_layers=2), "model 'gpt2' has no option n_layers; its options: n_layer=4"),
        ("gpt2", dict(vocab_size=0), r"vocab_size must be an integer in 1\.\.1048576"),
        ("gpt2", dict(vocab_size=10, eos_token_id=10), r"eos_token_id must be an integer in 0\.\.9"),
        ("llama", dict(num_attention_heads=4, num_key_value_heads=3), r"num_attention_heads \(4\) must be a multiple"),
        ("llama", dict(hidden_size=12, num_attention_heads=4), "must be even"),
        ("llama", dict(intermediate_size=10**7), r"intermediate_size must be an integer in 1\.\.131072"),
        ("llama", dict(rope_theta=-1.0), r"rope_theta must be a number in \(0, "),
        ("bert", dict(num_hidden_layers=0), r"num_hidden_layers must be an integer in 1\.\.256"),
        ("gpt2", dict(max_positions=32, n_positions=16), r"n_positions \(16\) must be at least the sequence length"),
        ("llama", dict(max_positions=32, max_position_embeddings=0), "max_position_embeddings must be an integer"),
        ("bert", dict(hidden_size=100, num_attention_heads=3), r"hidden_size \(100\) must be a multiple"),
    ],
)
def test_bad_options_are_refused_before_building(name, options, message, monkeypatch):
    def build(*args):
        raise AssertionError("built a model with a bad option")

    monkeypatch.setattr(hf, "_build", build)
    start = time.perf_counter()
    with pytest.raises(ModelError, match=message):
        create_model(name, **options)
    with pytest.raises(ModelError, match=message):
        estimate_size(name, **options)
    assert time.perf_counter() - start < 5


def test_text_classifier_needs_two_labels():
    with pytest.raises(ModelError, match=r"num_classes must be an integer in 2\.\.65536"):
        create_model("bert", num_classes=1)


def test_image_models_unchanged():
    model = create_model("mlp", 1, 10, 16, width=8)
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 10)
    with pytest.raises(ModelError, match="has no option vocab_size"):
        create_model("mlp", 1, 10, 16, vocab_size=100)


# ------------------------------------------------------------------ hf:DIR


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Local folders written by save_pretrained: a causal LM, a masked LM, a classifier, and broken ones."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    t = transformers
    gcfg = dict(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=24, bos_token_id=None, eos_token_id=None)
    t.GPT2LMHeadModel(t.GPT2Config(**gcfg)).save_pretrained(root / "gpt2")
    t.GPT2ForSequenceClassification(t.GPT2Config(**gcfg, num_labels=3, pad_token_id=0)).save_pretrained(root / "cls")
    bcfg = t.BertConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=100
    )
    t.BertForMaskedLM(bcfg).save_pretrained(root / "bert")
    (root / "noweights").mkdir()
    (root / "noweights" / "config.json").write_text((root / "gpt2" / "config.json").read_text())
    (root / "broken").mkdir()
    (root / "broken" / "config.json").write_text('{"model_type": ')
    (root / "pickle").mkdir()
    (root / "pickle" / "config.json").write_text((root / "gpt2" / "config.json").read_text())
    (root / "pickle" / "pytorch_model.bin").write_bytes(b"not read")
    return root


def test_hf_folder_loads_as_a_causal_lm(folders, capfd):
    level = transformers.logging.get_verbosity()
    model = create_model(f"hf:{folders / 'gpt2'}")
    assert "Loading weights" not in capfd.readouterr().err  # no progress bar of transformers' own
    assert transformers.logging.get_verbosity() == level and transformers.utils.logging.is_progress_bar_enabled()
    reference = transformers.AutoModelForCausalLM.from_pretrained(folders / "gpt2", local_files_only=True)
    assert type(model).__name__ == "GPT2LMHeadModel" and model.training and model.varprune_new_parameters == []
    ids = torch.randint(0, 100, (2, 8))
    model.eval()
    assert torch.equal(model(ids).logits, reference(ids).logits)
    assert model_task(f"hf:{folders / 'gpt2'}") == "language-modeling"
    assert model_task(f"hf:{folders / 'bert'}") == "text-classification"


def test_hf_folder_as_a_classifier_gets_a_new_head(folders):
    torch.manual_seed(1)
    model = create_model(f"hf:{folders / 'gpt2'}", num_classes=4, task="text-classification", pad_token_id=0)
    assert type(model).__name__ == "GPT2ForSequenceClassification" and model.score.weight.shape == (4, 32)
    assert model.varprune_new_parameters == ["score.weight"]
    lm = create_model(f"hf:{folders / 'gpt2'}")
    assert torch.equal(model.transformer.h[0].attn.c_attn.weight, lm.transformer.h[0].attn.c_attn.weight)
    assert model(torch.randint(1, 100, (2, 8))).logits.shape == (2, 4)

    bert = create_model(f"hf:{folders / 'bert'}", num_classes=2)  # a masked LM: its task by default
    assert type(bert).__name__ == "BertForSequenceClassification"
    assert (
        "classifier.weight" in bert.varprune_new_parameters
        and "bert.pooler.dense.weight" in bert.varprune_new_parameters
    )


def test_a_classifier_folder_keeps_its_head_only_when_asked(folders):
    name = f"hf:{folders / 'cls'}"
    saved = transformers.AutoModelForSequenceClassification.from_pretrained(folders / "cls", local_files_only=True)
    kept = create_model(name, num_classes=3, task="text-classification", keep_head=True)
    assert torch.equal(kept.score.weight, saved.score.weight) and kept.varprune_new_parameters == []
    torch.manual_seed(2)
    new = create_model(name, num_classes=3, task="text-classification")
    assert not torch.equal(new.score.weight, saved.score.weight) and new.varprune_new_parameters == ["score.weight"]
    assert abs(new.score.weight.std().item() - 0.02) < 0.01  # transformers' initialisation, std initializer_range
    with pytest.raises(ModelError, match="keep_head needs a classifier of 4 labels; the folder's has 3"):
        create_model(name, num_classes=4, task="text-classification", keep_head=True)


def test_hf_folder_on_the_meta_device(folders):
    with torch.device("meta"):
        model = create_model(f"hf:{folders / 'gpt2'}")
        cls = create_model(f"hf:{folders / 'bert'}", num_classes=3, task="text-classification")
    assert {p.device.type for p in model.parameters()} == {"meta"} and cls.classifier.weight.shape == (3, 32)
    assert estimate_size(f"hf:{folders / 'gpt2'}")["parameters"] == sum(p.numel() for p in model.parameters())


def _one_line(e) -> str:
    text = str(e.value)
    assert "\n" not in text, text
    return text


@pytest.mark.parametrize("hub_id", ["gpt2", "meta-llama/Llama-2-7b-hf"])
def test_hub_ids_are_refused_in_one_line(hub_id, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError) as e:
        create_model(f"hf:{hub_id}")
    text = _one_line(e)
    assert "only local" in text and f"hf download {hub_id} --local-dir DIR" in text and "save_pretrained" in text
    assert hf_folder_problem(f"hf:{hub_id}") == text


@pytest.mark.parametrize(
    "folder,kwargs,message",
    [
        ("missing", {}, "no such folder; varprune loads only local"),
        ("noweights", {}, "no model.safetensors weights there"),
        ("broken", {}, "config.json is not readable JSON"),
        ("pickle", {}, "only pytorch_model.*bin weights"),
        ("bert", dict(task="language-modeling"), "holds a BertForMaskedLM, not a causal language model"),
        ("gpt2", dict(vocab_size=101), "the tokenizer has 101 tokens but the model's embedding only 100 rows"),
        ("gpt2", dict(max_positions=25), "the model takes at most 24 positions"),
        ("gpt2", dict(task="translation"), "task must be one of language-modeling, text-classification"),
        ("gpt2", dict(dtype="float64"), "dtype must be one of float32, bfloat16, float16"),
        ("gpt2", dict(revision="main"), r"no option revision; their options: dtype='float32', keep_head=False"),
    ],
)
def test_bad_folders_are_one_line(folders, folder, kwargs, message):
    with pytest.raises(ModelError, match=message) as e:
        create_model(f"hf:{folders / folder}", **kwargs)
    _one_line(e)


def test_bfloat16_and_token_ids(folders):
    model = create_model(f"hf:{folders / 'gpt2'}", dtype="bfloat16", eos_token_id=5, vocab_size=100)
    assert model.dtype == torch.bfloat16 and model.config.eos_token_id == 5
    assert json.loads((folders / "gpt2" / "config.json").read_text())["eos_token_id"] is None  # the folder untouched
