"""A model written as a Hugging Face folder: from_pretrained and AutoTokenizer read it back, exactly."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # a guard: nothing here may reach the network
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import json

import pytest
import torch
from safetensors import safe_open

from varprune.errors import CheckpointError
from varprune.models import create_model
from varprune.storage import hf_folder
from varprune.storage.hf_folder import HFFolderError, load_hf_folder, read_hf_metadata, save_hf_folder

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
transformers.logging.set_verbosity_error()

TEXT = ["the quick brown fox jumps over the lazy dog", "hello world, pruned weights are exact zeros"] * 20


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<pad>", "<unk>"], show_progress=False
    )
    tok.train_from_iterator(TEXT, trainer)
    return tok


def _gpt2(tok, **kw):
    torch.manual_seed(0)
    model = create_model(
        "gpt2", vocab_size=tok.get_vocab_size(), max_positions=32, n_layer=2, n_embd=32, n_head=2,
        eos_token_id=tok.token_to_id("<|endoftext|>"), pad_token_id=tok.token_to_id("<pad>"), **kw,
    )  # fmt: skip
    with torch.no_grad():  # "pruned": a block of exact zeros in a prunable weight
        model.transformer.h[0].mlp.c_fc.weight[:, :7] = 0
    return model.eval()


def test_round_trip_through_from_pretrained(tokenizer, tmp_path):
    model = _gpt2(tokenizer)
    out = save_hf_folder(model, tmp_path / "hf", tokenizer_json=tokenizer, metadata={"run": "r1", "sparsity": "0.5"})
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
    ]  # fmt: skip
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert type(loaded).__name__ == "GPT2LMHeadModel"
    ids = torch.tensor([tokenizer.encode(TEXT[1]).ids])
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert (loaded.transformer.h[0].mlp.c_fc.weight[:, :7] == 0).all()
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # tied again on load
    with safe_open(out / "model.safetensors", "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    assert meta["format"] == "pt" and meta["run"] == "r1" and len(meta["sha256"]) == 64
    assert "lm_head.weight" not in keys and "transformer.wte.weight" in keys  # stored once, as save_pretrained
    assert read_hf_metadata(out)["sparsity"] == "0.5"
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["eos_token_id"] == 0

    auto = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    for text in TEXT[:2] + ["unseen words: zebra!"]:
        assert auto(text)["input_ids"] == tokenizer.encode(text).ids
    assert (auto.eos_token, auto.pad_token, auto.unk_token) == ("<|endoftext|>", "<pad>", "<unk>")
    assert auto.model_max_length == 32


def test_llama_and_a_bert_classifier_round_trip(tokenizer, tmp_path):
    vocab = tokenizer.get_vocab_size()
    torch.manual_seed(0)
    llama = create_model("llama", vocab_size=vocab, max_positions=32, num_hidden_layers=2, hidden_size=32,
                         intermediate_size=48, num_attention_heads=2, num_key_value_heads=1).eval()  # fmt: skip
    out = save_hf_folder(llama, tmp_path / "llama", tokenizer_json=tokenizer.to_str())
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    ids = torch.randint(0, vocab, (2, 9))
    assert torch.equal(loaded(ids).logits, llama(ids).logits)

    bert = create_model("bert", num_classes=3, vocab_size=vocab, max_positions=32, num_hidden_layers=2,
                        hidden_size=32, intermediate_size=48, num_attention_heads=2).eval()  # fmt: skip
    out = save_hf_folder(
        bert, tmp_path / "bert", special_tokens={"cls_token": "<|endoftext|>"}, tokenizer_json=tokenizer
    )
    assert not (out / "generation_config.json").exists()  # transformers writes none for a classifier
    cls = transformers.AutoModelForSequenceClassification.from_pretrained(out, local_files_only=True)
    assert torch.equal(cls(ids).logits, bert(ids).logits) and cls.config.num_labels == 3
    assert transformers.AutoTokenizer.from_pretrained(out, local_files_only=True).cls_token == "<|endoftext|>"
    # and back through varprune's own loader: the head is the folder's when asked to keep it
    kept = load_hf_folder(out, num_classes=3, task="text-classification", keep_head=True).eval()
    assert torch.equal(kept(ids).logits, bert(ids).logits)


def test_bytes_are_deterministic(tokenizer, tmp_path):
    model = _gpt2(tokenizer)
    a = save_hf_folder(model, tmp_path / "a", tokenizer_json=tokenizer, metadata={"k": "v"})
    b = save_hf_folder(model, tmp_path / "b", tokenizer_json=tokenizer, metadata={"k": "v"})
    for name in sorted(p.name for p in a.iterdir()):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_an_existing_folder_is_never_replaced(tokenizer, tmp_path):
    model = _gpt2(tokenizer)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep")
    (tmp_path / "empty").mkdir()
    for name in ("taken", "empty"):
        with pytest.raises(HFFolderError, match=f"{name} exists; varprune does not replace a folder"):
            save_hf_folder(model, tmp_path / name)
    assert (tmp_path / "taken" / "mine.txt").read_text() == "keep" and not any((tmp_path / "empty").iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "taken"]  # no temporary left


def test_a_failed_save_leaves_nothing(tokenizer, tmp_path, monkeypatch):
    model = _gpt2(tokenizer)

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hf_folder.os, "rename", full_disk)
    with pytest.raises(OSError, match="No space left on device") as e:
        save_hf_folder(model, tmp_path / "out", tokenizer_json=tokenizer)
    assert e.value.filename == str(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temporary sibling


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(metadata={"format": "x"}), "metadata must map strings to strings, without format or sha256"),
        (dict(metadata={"n": 3}), "metadata must map strings to strings"),
        (dict(tokenizer_json="{not json"), "tokenizer_json is not a tokenizers JSON"),
        (dict(tokenizer_json=3), "tokenizer_json must be a tokenizers.Tokenizer, a path or the JSON text"),
        (dict(special_tokens={"cls_token": "<cls>"}), "special_tokens needs tokenizer_json"),
    ],
)
def test_bad_arguments_are_refused(tokenizer, tmp_path, kwargs, message):
    with pytest.raises(HFFolderError, match=message):
        save_hf_folder(_gpt2(tokenizer), tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_models_that_cannot_be_a_folder(tokenizer, tmp_path):
    with pytest.raises(HFFolderError, match="needs a transformers model, not a Linear"):
        save_hf_folder(torch.nn.Linear(2, 2), tmp_path / "a")
    with torch.device("meta"):
        meta = create_model("gpt2", vocab_size=50, n_layer=1)
    with pytest.raises(HFFolderError, match="on the meta device"):
        save_hf_folder(meta, tmp_path / "b")
    small = create_model("gpt2", vocab_size=50, n_layer=1)
    with pytest.raises(HFFolderError, match=r"the tokenizer has \d+ tokens but the model's embedding only 50 rows"):
        save_hf_folder(small, tmp_path / "c", tokenizer_json=tokenizer)
    path = tmp_path / "tok.json"
    tokenizer.save(str(path))
    assert save_hf_folder(_gpt2(tokenizer), tmp_path / "d", tokenizer_json=path).is_dir()  # a path works too


def test_a_changed_byte_is_caught(tokenizer, tmp_path):
    out = save_hf_folder(_gpt2(tokenizer), tmp_path / "hf")
    raw = bytearray((out / "model.safetensors").read_bytes())
    raw[-3] ^= 0x01
    (out / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="fails its sha256 check"):
        read_hf_metadata(out)
    with pytest.raises(CheckpointError, match="fails its sha256 check"):
        load_hf_folder(out)


def test_fp16_values_beyond_its_range_are_refused_not_made_inf(tokenizer, tmp_path):
    model = _gpt2(tokenizer)
    with torch.no_grad():
        model.transformer.h[1].mlp.c_proj.weight[0, 0] = 1e6
    with pytest.raises(HFFolderError, match=r"h.1.mlp.c_proj.weight holds values up to 1e\+06, beyond float16's"):
        save_hf_folder(model, tmp_path / "out", values="fp16")
    assert not (tmp_path / "out").exists()
    out = save_hf_folder(model, tmp_path / "bf16", values="bf16")  # bfloat16 has float32's range
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.get_tensor("transformer.h.1.mlp.c_proj.weight").dtype == torch.bfloat16
    with pytest.raises(HFFolderError, match="values must be one of fp32, fp16, bf16"):
        save_hf_folder(model, tmp_path / "x", values="int8")
