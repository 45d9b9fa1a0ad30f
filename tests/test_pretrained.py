"""A Hugging Face model folder measured and pruned as it is (``--model hf:DIR``, engine/pretrained.py): a tiny
random Llama (causal LM) and a tiny BERT sequence classifier written by save_pretrained, their perplexity and
accuracy held against an independent float64 computation from the folder's own files."""

import json
import math

import numpy as np
import pytest
import torch

from helpers import cli, one_line_error, snapshot
from text_helpers import TRAIN_TEXT, WORDS, cls_corpus, lm_corpus

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

SEQ = 16


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<pad>"],
        show_progress=False,
    )
    tok.train_from_iterator([TRAIN_TEXT], trainer)
    return tok


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """``llama``: a tiny random LlamaForCausalLM; ``bert``: a tiny BertForSequenceClassification of 3 labels; each
    with its tokenizer.json; ``lm`` and ``cls``: the corpora."""
    t = transformers
    root = tmp_path_factory.mktemp("pretrained")
    tok = _tokenizer()
    torch.manual_seed(0)
    llama = t.LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = t.LlamaForCausalLM(llama)
    with torch.no_grad():  # weights of a trained model's scale, so that pruning changes the perplexity visibly
        for p in model.parameters():
            p.mul_(8)
    model.save_pretrained(root / "llama")
    tok.save(str(root / "llama" / "tokenizer.json"))
    bert = t.BertConfig(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=tok.get_vocab_size(),
        num_labels=3,
        pad_token_id=0,
        max_position_embeddings=64,
    )
    t.BertForSequenceClassification(bert).save_pretrained(root / "bert")
    tok.save(str(root / "bert" / "tokenizer.json"))
    lm_corpus(root / "lm", test=WORDS * 6)
    cls_corpus(root / "cls")
    return root


def _perplexity64(model, ids: list[int], seq_len: int) -> float:
    """The documented protocol computed independently: the test text's ids cut into non-overlapping windows of
    ``seq_len`` (the last partial one dropped), exp of the mean next-token NLL over seq_len - 1 tokens a window."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) // seq_len * seq_len, seq_len):
            x = torch.tensor([ids[start : start + seq_len]])
            logits = model(input_ids=x).logits[0].double()
            nll = -torch.log_softmax(logits[:-1], -1).gather(1, x[0, 1:, None])
            total += float(nll.sum())
            count += seq_len - 1
    return math.exp(total / count)


def _llama64(folder):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64, local_files_only=True)
    return model.eval()


def _test_ids(folders):
    tok = tokenizers.Tokenizer.from_file(str(folders / "llama" / "tokenizer.json"))
    return tok.encode((folders / "lm" / "test.txt").read_text(), add_special_tokens=False).ids


def _magnitude_layerwise(model, sparsity: float) -> int:
    """Layer-wise magnitude pruning, written independently: in every attention and MLP projection (the Llama
    reference's prunable layers), the round(n * s) smallest |w| become 0, the earlier of two equal ones first."""
    pruned = 0
    for name, p in model.named_parameters():
        if ".layers." in name and name.endswith("_proj.weight"):
            flat = p.detach().reshape(-1).numpy()
            k = round(flat.size * sparsity)
            order = np.argsort(np.abs(flat), kind="stable")
            flat[order[:k]] = 0.0
            pruned += 1
    return pruned


def test_prune_a_causal_lm_folder_matches_an_independent_float64_computation(folders, tmp_path, capsys):
    out = tmp_path / "sweep"
    before = snapshot(folders / "llama")
    rc, stdout, err = cli(
        capsys,
        "prune",
        "--model",
        f"hf:{folders / 'llama'}",
        "--dataset",
        "text",
        "--data-dir",
        folders / "lm",
        "--seq-len",
        SEQ,
        "--pruners",
        "magnitude,wanda",
        "--sparsities",
        "0.5",
        "--patterns",
        "2:4",
        "--calib-samples",
        "4",
        "--device",
        "cpu",
        "--out",
        out,
    )
    assert rc == 0, err
    assert snapshot(folders / "llama") == before  # the folder is only read
    assert sorted(p.name for p in out.iterdir()) == ["prune.csv", "prune.json", "prune.png"]
    doc = json.loads((out / "prune.json").read_text())
    ids = _test_ids(folders)
    dense = _perplexity64(_llama64(folders / "llama"), ids, SEQ)
    assert doc["dense_perplexity"] == pytest.approx(dense, rel=1e-5)
    # the default scope of a causal LM is layer-wise (the references'), and the row and the table say so
    assert doc["scope"] == "layerwise" and "| magnitude (layerwise) |" in stdout
    row = next(r for r in doc["results"] if r["pruner"] == "magnitude" and r.get("pattern") is None)
    assert row["scope"] == "layerwise" and row["prune_s"] >= 0
    model = _llama64(folders / "llama")
    assert _magnitude_layerwise(model, 0.5) == 14
    pruned = _perplexity64(model, ids, SEQ)
    assert abs(pruned - dense) > 1e-3 * dense  # pruning changed it: the comparison below can fail
    assert row["perplexity"] == pytest.approx(pruned, rel=1e-5)
    # what the folder was: path, weights' sha256, config, tokenizer, data, dtype
    p = doc["pretrained"]
    from varprune.storage.files import file_digest

    assert p["weights_sha256"] == file_digest(folders / "llama" / "model.safetensors") == doc["weights_sha256"]
    assert p["config"]["model_type"] == "llama" and p["dtype"] == "fp32"
    assert p["tokenizer"]["path"].endswith("tokenizer.json") and p["data"]["dataset"] == "text"
    assert doc["seq_len"] == SEQ and doc["calibration"]["samples"] == 4
    # `report` reads the sweep folder as it reads a run's
    rc, stdout, err = cli(capsys, "report", out)
    assert rc == 0 and "magnitude" in stdout, err


def test_prune_folder_function_and_a_classifier_folder(folders, tmp_path):
    from varprune.engine.pretrained import prune_folder

    lines = []
    doc = prune_folder(
        folders / "bert",
        "text-classification",
        str(folders / "cls"),
        tmp_path / "sweep",
        seq_len=SEQ,
        sparsities=(0.5,),
        device="cpu",
        log=lines.append,
    )
    assert "dense_accuracy" in doc and doc["scope"] == "global"  # not a causal LM: global, CrAM's protocol
    # the dense accuracy, computed independently in float64 from the folder: each test text with the tokenizer's
    # special tokens, truncated to SEQ, one at a time (no padding)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        folders / "bert", dtype=torch.float64, local_files_only=True
    ).eval()
    tok = tokenizers.Tokenizer.from_file(str(folders / "bert" / "tokenizer.json"))
    tok.enable_truncation(SEQ)
    rows = [json.loads(line) for line in (folders / "cls" / "test.jsonl").read_text().splitlines()]
    classes = sorted({r["label"] for r in rows})
    with torch.no_grad():
        hits = [
            int(model(input_ids=torch.tensor([tok.encode(r["text"]).ids])).logits.argmax()) == classes.index(r["label"])
            for r in rows
        ]
    assert doc["dense_accuracy"] == pytest.approx(sum(hits) / len(hits))
    assert any("magnitude (global) 50%" in line for line in lines)


@pytest.mark.parametrize(
    "args, message",
    [
        (["RUNDIR", "--model", "hf:LLAMA", "--dataset", "text"], "give a RUN or --model hf:"),
        (["--model", "hf:LLAMA", "--out", "OUT"], "needs --dataset"),
        (["--model", "LLAMA", "--dataset", "text", "--out", "OUT"], "give a local Hugging Face model folder as hf:DIR"),
        (["--model", "hf:LLAMA", "--dataset", "text", "--data-dir", "LM"], "needs --out"),
        (
            ["--model", "hf:LLAMA", "--dataset", "text-classification", "--data-dir", "CLS", "--out", "OUT"],
            "is not a sequence classifier",
        ),
        (
            ["--model", "hf:LLAMA", "--dataset", "fashion-mnist", "--out", "OUT"],
            "a Hugging Face folder is a text model",
        ),
        (["--model", "hf:LLAMA", "--dataset", "text", "--data-dir", "LM", "--out", "LLAMA"], "is the model folder"),
        (
            ["--model", "hf:LLAMA", "--dataset", "text", "--data-dir", "LM", "--out", "OUT", "--calib-samples", "4"],
            "--calib-samples does nothing with magnitude pruning",
        ),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(folders, tmp_path, capsys, args, message):
    names = {"LLAMA": folders / "llama", "LM": folders / "lm", "CLS": folders / "cls", "OUT": tmp_path / "out"}
    names["RUNDIR"] = tmp_path
    args = [str(names.get(a, a)).replace("hf:LLAMA", f"hf:{folders / 'llama'}") for a in args]
    before = snapshot(folders)
    rc, _, err = cli(capsys, "prune", *args, "--sparsities", "0.5", "--device", "cpu")
    assert message in one_line_error(rc, err)
    assert snapshot(folders) == before and not (tmp_path / "out").exists()


def test_a_model_folder_given_as_a_run_is_sent_to_model(folders, capsys):
    rc, _, err = cli(capsys, "prune", f"hf:{folders / 'llama'}")
    line = one_line_error(rc, err)
    assert "names a model folder, not a run" in line and "--model hf:" in line and "train --out" not in line
    rc, _, err = cli(capsys, "prune", folders / "llama")
    line = one_line_error(rc, err)
    assert "is a Hugging Face model folder, not a run" in line and f"--model hf:{folders / 'llama'}" in line
