"""Tiny text runs through the CLI: tied weights stored once (and tied again on load), a finished run's
checkpoint dropped safely, `export --format hf --values fp16|bf16`, and an exported folder's context."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # a guard: nothing here may reach the network
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import json
from pathlib import Path

import pytest
import torch

from helpers import cli, one_line_error
from text_helpers import lm_corpus
from varprune.models import create_model
from varprune.storage.checkpoint import load_checkpoint, load_weights
from varprune.storage.init_weights import load_initial_weights

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

SEQ = 16
TINY = [
    "--dataset", "text", "--model", "gpt2", "--model-arg", "n_layer=1", "--model-arg", "n_embd=32",
    "--model-arg", "n_head=2", "--seq-len", str(SEQ), "--vocab-size", "300", "--epochs", "1", "--batch-size", "8",
    "--limit-train", "32", "--device", "cpu", "--quiet",
]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    lm_corpus(root)
    return root


def _train(root: Path, data: Path, *extra) -> tuple[Path, str]:
    from varprune.cli import main

    run = root / "run"
    assert main(["train", *TINY, *extra, "--data-dir", str(data), "--out", str(run)]) == 0
    return run


@pytest.fixture(scope="module")
def tied_run(tmp_path_factory, data):
    """A finished GPT-2 run (lm_head tied to the token embedding, as GPT-2 is)."""
    return _train(tmp_path_factory.mktemp("tied"), data)


def _header(path: Path) -> dict:
    raw = path.read_bytes()
    return json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])


def _model(vocab: int, **options):
    return create_model("gpt2", vocab_size=vocab, max_positions=SEQ, n_layer=1, n_embd=32, n_head=2, **options)


def test_a_tied_head_is_stored_once_and_tied_again_on_load(tied_run):
    weights = tied_run / "model.safetensors"
    header = _header(weights)
    assert "lm_head.weight" not in header and "transformer.wte.weight" in header
    assert json.loads(header["__metadata__"]["tied"]) == {"lm_head.weight": "transformer.wte.weight"}
    wte = header["transformer.wte.weight"]["shape"]
    tensor_bytes = sum(e["data_offsets"][1] - e["data_offsets"][0] for k, e in header.items() if k != "__metadata__")
    model = _model(wte[0])
    unique = sum(t.numel() * t.element_size() for k, t in model.state_dict().items() if k != "lm_head.weight")
    assert tensor_bytes == unique  # the embedding's bytes once, not twice

    load_weights(weights, model)
    assert model.lm_head.weight is model.transformer.wte.weight  # still one parameter
    stored = safetensors_torch.load_file(weights)
    assert torch.equal(model.lm_head.weight, stored["transformer.wte.weight"])
    for name, tensor in stored.items():
        assert torch.equal(model.state_dict()[name], tensor), name

    # the checkpoint stores it once too, and gives back one tensor for both names
    checkpoint = tied_run / "checkpoint.safetensors"
    assert not any("lm_head" in k for k in _header(checkpoint))
    state = load_checkpoint(checkpoint)["model"]
    assert state["lm_head.weight"] is state["transformer.wte.weight"]
    assert torch.equal(state["transformer.wte.weight"], stored["transformer.wte.weight"])

    # --init from a run's weights: the tied head is not "missing"
    fresh = _model(wte[0])
    report = load_initial_weights(fresh, weights)
    assert torch.equal(fresh.lm_head.weight, stored["transformer.wte.weight"]) and report.loaded


def test_an_untied_head_is_stored_as_before(tmp_path):
    from varprune.storage.checkpoint import save_weights

    model = _model(50, tie_word_embeddings=False)
    save_weights(tmp_path / "w.safetensors", model, {"model": "gpt2"})
    header = _header(tmp_path / "w.safetensors")
    assert "lm_head.weight" in header and "tied" not in header["__metadata__"]


def test_prune_and_export_work_without_the_checkpoint_and_resume_is_refused(tmp_path_factory, data, capsys):
    root = tmp_path_factory.mktemp("dropped")
    from varprune.cli import main

    run = root / "run"
    assert main(["train", *TINY, "--data-dir", str(data), "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"{run}/checkpoint.safetensors (" in out and "is needed only by `varprune train --resume`" in out
    (run / "checkpoint.safetensors").unlink()
    before = (run / "model.safetensors").read_bytes()
    rc, _, err = cli(capsys, "train", "--resume", run)
    assert "has finished (model.safetensors is there) and has no checkpoint.safetensors" in one_line_error(rc, err)
    assert (run / "model.safetensors").read_bytes() == before
    rc, out, err = cli(capsys, "prune", run, "--sparsities", "0.5")
    assert rc == 0, err
    rc, out, err = cli(capsys, "export", run, "--sparsity", "0.5", "--out", root / "pruned.safetensors")
    assert rc == 0, err


@pytest.mark.parametrize("values,dtype,code", [("fp16", torch.float16, "F16"), ("bf16", torch.bfloat16, "BF16")])
def test_export_hf_writes_the_values_dtype_it_is_asked_for(tied_run, tmp_path, capsys, values, dtype, code):
    full = tmp_path / "fp32"
    rc, out, err = cli(capsys, "export", tied_run, "--sparsity", "0.5", "--format", "hf", "--out", full)
    assert rc == 0, err
    assert "(float32 weights)" in out
    folder = tmp_path / values
    rc, out, err = cli(
        capsys, "export", tied_run, "--sparsity", "0.5", "--format", "hf", "--values", values, "--out", folder
    )
    assert rc == 0, err
    assert f"({str(dtype).split('.')[1]} weights)" in out and "measured in float32, before the weights" in out
    header = _header(folder / "model.safetensors")
    assert {e["dtype"] for k, e in header.items() if k != "__metadata__"} == {code}
    assert json.loads((folder / "config.json").read_text())["dtype"] == str(dtype).split(".")[1]
    reference = safetensors_torch.load_file(full / "model.safetensors")
    written = safetensors_torch.load_file(folder / "model.safetensors")
    assert set(written) == set(reference)
    for name, tensor in reference.items():
        assert torch.equal(written[name], tensor.to(dtype)), name  # the fp32 export, rounded once
    c_fc = written["transformer.h.0.mlp.c_fc.weight"]
    assert (c_fc == 0).float().mean() > 0.3  # the pruned zeros stay exact zeros

    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype="auto")
    assert loaded.dtype == dtype
    assert torch.equal(loaded.transformer.h[0].mlp.c_fc.weight, c_fc)
    ids = torch.randint(0, 100, (1, SEQ))
    assert torch.isfinite(loaded(ids).logits).all()


def test_a_gpt2_export_says_its_context_and_a_longer_one_generates_past_the_sequence_length(
    tied_run, tmp_path_factory, data, capsys
):
    short = tmp_path_factory.mktemp("short") / "hf"
    rc, out, err = cli(capsys, "export", tied_run, "--sparsity", "0.5", "--format", "hf", "--out", short)
    assert rc == 0, err
    assert f"context: {SEQ} positions" in out and f"generate() takes at most {SEQ} tokens" in out
    assert "--model-arg n_positions=N" in out

    root = tmp_path_factory.mktemp("long")
    run = _train(root, data, "--model-arg", "n_positions=64")
    capsys.readouterr()
    folder = root / "hf"
    rc, out, err = cli(capsys, "export", run, "--sparsity", "0.5", "--format", "hf", "--out", folder)
    assert rc == 0, err
    context = "context: 64 positions (config.json; model_max_length in tokenizer_config.json); varprune ran it"
    assert f"{context} on windows of {SEQ} tokens" in out
    assert "generate() takes at most" not in out
    assert json.loads((folder / "config.json").read_text())["n_positions"] == 64
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    assert tokenizer.model_max_length == 64
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    prompt = torch.tensor([tokenizer("the quick brown fox")["input_ids"]])
    generated = model.generate(prompt, max_new_tokens=3 * SEQ, do_sample=False, pad_token_id=0)
    assert generated.shape[1] == prompt.shape[1] + 3 * SEQ > SEQ


def test_an_hf_folder_run_keeps_the_folders_positions(tmp_path, data, capsys):
    """A model folder's own context (64 positions) survives a run at --seq-len 16 and its export."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    text = (data / "train.txt").read_text()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, initial_alphabet=alphabet, show_progress=False))
    source = tmp_path / "source"
    config = transformers.GPT2Config(
        n_layer=1, n_embd=32, n_head=2, vocab_size=tok.get_vocab_size(), n_positions=64, bos_token_id=None,
        eos_token_id=None,
    )  # fmt: skip
    transformers.GPT2LMHeadModel(config).save_pretrained(source)
    tok.save(str(source / "tokenizer.json"))
    run = tmp_path / "run"
    args = ["--dataset", "text", "--model", f"hf:{source}", "--seq-len", str(SEQ), "--epochs", "1"]
    rc, _, err = cli(capsys, "train", *args, "--batch-size", "8", "--limit-train", "16", "--data-dir", data,
                     "--device", "cpu", "--quiet", "--out", run)  # fmt: skip
    assert rc == 0, err
    folder = tmp_path / "hf"
    rc, out, err = cli(capsys, "export", run, "--sparsity", "0.5", "--format", "hf", "--out", folder)
    assert rc == 0, err
    assert "context: 64 positions" in out
    assert json.loads((folder / "tokenizer_config.json").read_text())["model_max_length"] == 64
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    out_ids = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=40, do_sample=False, pad_token_id=0)
    assert out_ids.shape[1] == 43


def test_the_compressed_export_of_a_tied_model_stores_the_head_once(tied_run, tmp_path, capsys):
    from varprune.storage.pruned_format import load_pruned, read_pruned_metadata

    out = tmp_path / "pruned.safetensors"
    rc, _, err = cli(capsys, "export", tied_run, "--sparsity", "0.5", "--out", out)
    assert rc == 0, err
    header = _header(out)
    assert "lm_head.weight" not in header and "transformer.wte.weight" in header
    meta = read_pruned_metadata(out)
    assert meta["format_version"] == 2 and meta["tied"] == {"lm_head.weight": "transformer.wte.weight"}
    model = load_pruned(out)
    assert model.lm_head.weight is model.transformer.wte.weight  # one parameter again
    stored = safetensors_torch.load_file(tied_run / "model.safetensors")
    assert torch.equal(model.transformer.wte.weight, stored["transformer.wte.weight"])  # not pruned: as trained
    rc, out_text, err = cli(capsys, "evaluate", out)
    assert rc == 0, err
    assert "perplexity" in out_text
