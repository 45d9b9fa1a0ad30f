"""hf:DIR folders checked before and after transformers loads them: damaged copies of a good tiny folder."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # a guard: nothing here may reach the network
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import json
import logging
import shutil
import warnings

import pytest
import torch

from helpers import cli, one_line_error
from varprune.models import ModelError, create_model
from varprune.models.hf import hf_folder_problem

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

TINY = dict(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=24)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """Good folders written by save_pretrained: a GPT-2 (lm_head tied, stored once) and a Llama (untied)."""
    root = tmp_path_factory.mktemp("good")
    torch.manual_seed(0)
    t = transformers
    t.GPT2LMHeadModel(t.GPT2Config(**TINY, bos_token_id=None, eos_token_id=None)).save_pretrained(root / "gpt2")
    llama = t.LlamaConfig(
        num_hidden_layers=1, hidden_size=32, intermediate_size=48, num_attention_heads=2, vocab_size=100,
        max_position_embeddings=24, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    t.LlamaForCausalLM(llama).save_pretrained(root / "llama")
    return root


def _copy(good, name, tmp_path):
    return shutil.copytree(good / name, tmp_path / name)


def _weights(folder):
    return safetensors_torch.load_file(folder / "model.safetensors")


def _rewrite(folder, state):
    safetensors_torch.save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def _refused(folder, match, **kwargs) -> str:
    with pytest.raises(ModelError, match=match) as e:
        create_model(f"hf:{folder}", **kwargs)
    text = str(e.value)
    assert "\n" not in text, text
    return text


def test_the_good_folders_load_and_a_tied_head_is_not_missing(good):
    gpt2 = create_model(f"hf:{good / 'gpt2'}")
    assert "lm_head.weight" not in _weights(good / "gpt2")  # tied: stored once, under the embedding
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight and gpt2.varprune_new_parameters == []
    llama = create_model(f"hf:{good / 'llama'}")
    assert torch.equal(llama.lm_head.weight, _weights(good / "llama")["lm_head.weight"])


def test_an_index_naming_a_pickle_shard_is_refused_before_loading(good, tmp_path, monkeypatch):
    folder = _copy(good, "gpt2", tmp_path)
    state = _weights(folder)
    (folder / "model.safetensors").unlink()
    _rewrite_as = folder / "model-00001-of-00002.safetensors"
    names = sorted(state)
    safetensors_torch.save_file({k: state[k] for k in names[:5]}, _rewrite_as, metadata={"format": "pt"})
    (folder / "pytorch_model-00002-of-00002.bin").write_bytes(b"\x80\x04not a pickle anyone should read")
    weight_map = {k: _rewrite_as.name for k in names[:5]} | {k: "pytorch_model-00002-of-00002.bin" for k in names[5:]}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.load was reached")

    monkeypatch.setattr(torch, "load", no_pickle)
    text = _refused(folder, "names the shard 'pytorch_model-00002-of-00002.bin', which is not a safetensors file")
    assert "never pickle" in text and ".save_pretrained(" in text
    assert hf_folder_problem(f"hf:{folder}") == text  # the configuration check says it before any run starts


def test_an_index_naming_a_shard_outside_the_folder_or_absent_is_refused(good, tmp_path):
    folder = _copy(good, "gpt2", tmp_path)
    (folder / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"transformer.wte.weight": "../elsewhere.safetensors"}}))
    _refused(folder, "names the shard '../elsewhere.safetensors' outside the folder")
    index.write_text(json.dumps({"weight_map": {"transformer.wte.weight": "gone.safetensors"}}))
    _refused(folder, "names the shard gone.safetensors, which is not there")
    index.write_text("[1, 2]")
    _refused(folder, "has no weight_map")


@pytest.mark.parametrize("damage", ["truncated", "random", "empty", "padded"])
def test_a_damaged_safetensors_file_is_one_line(good, tmp_path, damage):
    folder = _copy(good, "gpt2", tmp_path)
    file = folder / "model.safetensors"
    raw = file.read_bytes()
    damaged = {
        "truncated": raw[: len(raw) - 100],
        "random": torch.randint(0, 256, (len(raw),), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
        .numpy()
        .tobytes(),
        "empty": b"",
        "padded": raw + b"\0" * 16,
    }[damage]
    file.write_bytes(damaged)
    text = _refused(folder, "model.safetensors is not a readable safetensors file")
    assert "copy the folder again" in text
    if damage == "truncated":
        assert "truncated" in text


def test_the_cli_refuses_a_truncated_folder_in_one_line_and_writes_nothing(good, tmp_path, capsys):
    folder = _copy(good, "gpt2", tmp_path)
    file = folder / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-7])
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.txt").write_text("some text to train on\n" * 50)
    (tmp_path / "data" / "test.txt").write_text("some text to test on\n" * 20)
    rc, _, err = cli(
        capsys, "train", "--model", f"hf:{folder}", "--dataset", "text", "--data-dir", tmp_path / "data",
        "--seq-len", "16", "--epochs", "1", "--out", tmp_path / "run",
    )  # fmt: skip
    assert "is not a readable safetensors file" in one_line_error(rc, err)
    assert not (tmp_path / "run").exists()


def test_a_missing_weight_is_refused_naming_it(good, tmp_path):
    folder = _copy(good, "llama", tmp_path)
    state = _weights(folder)
    del state["lm_head.weight"], state["model.layers.0.mlp.up_proj.weight"]
    _rewrite(folder, state)
    text = _refused(folder, "its weights lack lm_head.weight, model.layers.0.mlp.up_proj.weight")
    assert "initialise them randomly" in text
    # the same folder as a classifier: the head is new by design, but the body's up_proj is still missing
    _refused(folder, "lack model.layers.0.mlp.up_proj.weight", task="text-classification", pad_token_id=0)


def test_a_weight_of_another_shape_is_refused_naming_both_shapes(good, tmp_path):
    folder = _copy(good, "gpt2", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["n_positions"] = 30
    (folder / "config.json").write_text(json.dumps(config))
    _refused(folder, r"transformer.wpe.weight has shape \[24, 32\] in the folder but \[30, 32\] in its config.json")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(good, tmp_path, value):
    folder = _copy(good, "gpt2", tmp_path)
    state = _weights(folder)
    state["transformer.h.1.attn.c_proj.weight"][3, 4] = value
    _rewrite(folder, state)
    _refused(folder, r"transformer.h.1.attn.c_proj.weight holds non-finite values \(inf or nan\)")


def test_a_value_beyond_float16_is_named_with_the_dtype(good, tmp_path):
    folder = _copy(good, "gpt2", tmp_path)
    state = _weights(folder)
    state["transformer.h.0.mlp.c_fc.weight"][0, 0] = 1e6
    _rewrite(folder, state)
    assert create_model(f"hf:{folder}").transformer.h[0].mlp.c_fc.weight[0, 0] == 1e6  # float32 holds it
    message = r"c_fc.weight holds non-finite values \(inf or nan\) \(as float16: .*load in float32\)"
    _refused(folder, message, dtype="float16")


class _Record(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def printed():
    """What reaches transformers' own log handlers (which print to stderr), and Python warnings."""
    root = transformers.utils.logging.get_logger()
    record = _Record()
    root.addHandler(record)
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_warning()  # as a user has it (other test modules turn it down)
    transformers.utils.logging.warning_once.cache_clear()  # so that a warning given once is due again
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield record.messages, caught
    root.removeHandler(record)
    transformers.logging.set_verbosity(level)


def test_transformers_warnings_are_translated_not_printed(tmp_path, printed):
    """GPT2Config's defaults put bos/eos at 50256: with 100 tokens transformers warns (once per process)."""
    folder = tmp_path / "defaults"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(**TINY)).save_pretrained(folder)
    messages, caught = printed
    assert any("bos_token_id must be" in m for m in messages)  # what transformers says unasked
    messages.clear()
    transformers.utils.logging.warning_once.cache_clear()
    level = transformers.logging.get_verbosity()
    model = create_model(f"hf:{folder}")
    assert messages == [] and caught == [], (messages, caught)
    assert transformers.logging.get_verbosity() == level
    assert model.config.bos_token_id is None and model.config.eos_token_id is None
    assert "config.json's bos_token_id 50256 is outside the vocabulary (0..99): not used" in model.varprune_load_notes
    kept = create_model(f"hf:{folder}", eos_token_id=7)  # a given id replaces the config's, and is kept
    assert kept.config.eos_token_id == 7 and kept.config.bos_token_id is None
    # the check alone (the configuration check of every command) prints nothing either
    transformers.utils.logging.warning_once.cache_clear()
    assert hf_folder_problem(f"hf:{folder}") is None
    assert messages == [] and caught == []


def test_the_padding_guess_is_silent_for_unpadded_language_model_windows(good, printed):
    model = create_model(f"hf:{good / 'gpt2'}", pad_token_id=5).eval()
    messages, _ = printed
    model(torch.tensor([[5, 6, 7, 5]]))  # the pad id at both ends: transformers would recommend a mask
    assert messages == []
    transformers.GPT2LMHeadModel(model.config).eval()(torch.tensor([[5, 6, 7, 5]]))
    assert any("attention_mask" in m for m in messages)  # the same input to transformers' own model warns


def test_pickle_only_and_gguf_folders_say_how_to_convert(good, tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copy(good / "gpt2" / "config.json", folder)
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    text = _refused(folder, "only pytorch_model.*bin weights .pickle., which varprune never loads")
    assert f"from transformers import AutoModelForCausalLM as M; M.from_pretrained('{folder}')" in text
    assert f".save_pretrained('{folder}')" in text

    gguf = tmp_path / "model-Q4_1.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00")
    _refused(gguf, f"is a GGUF file, not a Hugging Face model folder; .*`varprune convert-gguf {gguf} DIR`")
    only = tmp_path / "only-gguf"
    only.mkdir()
    shutil.copy(gguf, only)
    _refused(only, f"holds a GGUF file \\(model-Q4_1.gguf\\).*`varprune convert-gguf {only / gguf.name} DIR`")
    shutil.copy(good / "gpt2" / "config.json", only)  # with a config.json beside it: the same advice
    _refused(only, "holds a GGUF file")


def test_a_command_prints_each_load_note_once_and_library_use_prints_nothing(tmp_path, capsys):
    """config.json's out-of-vocabulary bos/eos (GPT2Config's 50256) are load notes: a command prints each once,
    one line on stderr; create_model alone prints nothing (the notes stay on the model)."""
    from text_helpers import llama3_style_tokenizer, lm_corpus

    tok = llama3_style_tokenizer()
    folder = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**TINY, "vocab_size": tok.vocab_size})).save_pretrained(
        folder
    )
    tok.tokenizer.save(str(folder / "tokenizer.json"))
    lm_corpus(tmp_path / "lm")
    capsys.readouterr()
    model = create_model(f"hf:{folder}")
    assert len(model.varprune_load_notes) == 2 and capsys.readouterr() == ("", "")
    args = ["evaluate", f"hf:{folder}", "--dataset", "text", "--data-dir", tmp_path / "lm", "--seq-len", "16"]
    rc, out, err = cli(capsys, *args, "--device", "cpu")
    assert rc == 0 and "perplexity" in out
    notes = [line for line in err.splitlines() if line.startswith("varprune: note: ")]
    vocab = tok.vocab_size - 1
    assert notes == [
        f"varprune: note: hf:{folder}: config.json's {key}_token_id 50256 is outside the vocabulary (0..{vocab}): "
        "not used"
        for key in ("bos", "eos")
    ], err
