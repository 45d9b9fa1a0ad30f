"""A Hugging Face model folder measured and pruned as it is (``--model hf:DIR``, engine/pretrained.py): a tiny
random Llama (causal LM) and a tiny BERT sequence classifier written by save_pretrained, their perplexity and
accuracy held against an independent float64 computation from the folder's own files."""

import json
import math

import numpy as np
import pytest
import torch

from helpers import cli, one_line_error, snapshot
from text_helpers import WORDS, cls_corpus, lm_corpus, tiny_llama_folder, tiny_tokenizer

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

SEQ = 16


_tokenizer = tiny_tokenizer


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """``llama``: a tiny random LlamaForCausalLM; ``bert``: a tiny BertForSequenceClassification of 3 labels; each
    with its tokenizer.json; ``lm`` and ``cls``: the corpora."""
    t = transformers
    root = tmp_path_factory.mktemp("pretrained")
    tok = _tokenizer()
    # weights of a trained model's scale, so that pruning changes the perplexity visibly
    tiny_llama_folder(root / "llama", tie=False, tok=tok, scale=3)
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


LM_ARGS = ["--dataset", "text", "--seq-len", SEQ, "--device", "cpu"]
CALIB = ["--calib-samples", "4"]


@pytest.fixture(scope="module")
def lm_sweep(folders, tmp_path_factory):
    """``prune --model hf:llama`` by magnitude and Wanda at 50% and 2:4: (out folder, stdout, the folder's files
    before)."""
    from varprune.cli import main

    out = tmp_path_factory.mktemp("sweep") / "sweep"
    before = snapshot(folders / "llama")
    model = f"hf:{folders / 'llama'}"
    args = ["prune", "--model", model, *LM_ARGS, *CALIB, "--data-dir", folders / "lm", "--pruners", "magnitude,wanda"]
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main([str(a) for a in [*args, "--sparsities", "0.5", "--patterns", "2:4", "--out", out]])
    assert rc == 0
    return out, buf.getvalue(), before


def test_prune_a_causal_lm_folder_matches_an_independent_float64_computation(folders, lm_sweep, tmp_path, capsys):
    out, stdout, before = lm_sweep
    assert snapshot(folders / "llama") == before  # the folder is only read
    assert sorted(p.name for p in out.iterdir()) == ["prune.csv", "prune.json", "prune.png"]
    doc = json.loads((out / "prune.json").read_text())
    ids = _test_ids(folders)
    dense = _perplexity64(_llama64(folders / "llama"), ids, SEQ)
    assert doc["dense_perplexity"] == pytest.approx(dense, rel=1e-5)
    # the default scope of a causal LM is layer-wise (the references'), and the row and the table say so
    assert doc["scope"] == "layerwise" and "| magnitude (layerwise) |" in stdout
    # progress, not a terminal: a line per block of the model as a calibrated pruner goes, and each setting's time
    for block in (1, 2):
        assert f"  wanda 2:4: block {block}/2 pruned, " in stdout
    assert "  magnitude (layerwise) 50%: perplexity" in stdout and "; pruned in " in stdout
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
    rc, stdout, err = cli(capsys, "report", out, out, "--html", tmp_path / "page.html")
    assert rc == 0 and "| magnitude (layerwise) |" in stdout, err
    assert "llama" in (tmp_path / "page.html").read_text()


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
            ["--model", "hf:LLAMA", "--dataset", "text", "--data-dir", "LM", "--out", "OUT", "--other-data"],
            "--other-data applies to a RUN: a model folder is measured on the --dataset given",
        ),
        (
            ["--model", "hf:LLAMA", "--dataset", "text", "--data-dir", "LM", "--out", "OUT", "--seq-len", "65"],
            "max_positions (--seq-len) is 65: use --seq-len 64 or less",
        ),
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


def test_a_folder_sweep_is_reused_by_the_rule_a_run_sweep_is(folders, lm_sweep, tmp_path, capsys):
    """The same folder, data and settings: OUT/prune.json returned as it is, nothing rewritten; --force, or another
    sequence length (which the run rule never needed: a run's is fixed), sweeps again."""
    import shutil

    out = tmp_path / "sweep"
    shutil.copytree(lm_sweep[0], out)
    args = ["prune", "--model", f"hf:{folders / 'llama'}", *LM_ARGS, *CALIB, "--data-dir", folders / "lm"]
    args += ["--pruners", "magnitude,wanda", "--sparsities", "0.5", "--patterns", "2:4", "--out", out]
    before = snapshot(out)
    rc, stdout, err = cli(capsys, *args)
    assert rc == 0 and f"reusing {out / 'prune.json'}" in stdout and "| magnitude (layerwise) |" in stdout, err
    assert snapshot(out) == before
    rc, stdout, err = cli(capsys, *args, "--force")
    assert rc == 0 and "reusing" not in stdout and "block 1/2 pruned" in stdout, err
    shorter = [str(SEQ // 2) if a == SEQ else a for a in args]
    rc, stdout, err = cli(capsys, *shorter)
    assert rc == 0 and "reusing" not in stdout, err
    assert json.loads((out / "prune.json").read_text())["seq_len"] == SEQ // 2


def _row(doc, pruner, setting):
    return next(r for r in doc["results"] if (r["pruner"], r.get("pattern", r["sparsity"])) == (pruner, setting))


def test_export_of_a_folder_equals_its_prune_json(folders, lm_sweep, tmp_path, capsys):
    """export draws the same calibration windows as prune: the exported Wanda model's perplexity, computed
    independently from the written folder in float64, is prune.json's; evaluate gives the dense and the pruned
    file's perplexities as prune.json has them."""
    doc = json.loads((lm_sweep[0] / "prune.json").read_text())
    model, data = f"hf:{folders / 'llama'}", ["--data-dir", folders / "lm"]
    rc, stdout, err = cli(
        capsys, "export", "--model", model, *LM_ARGS, *CALIB, *data, "--pruner", "wanda", "--sparsity", "0.5",
        "--format", "hf", "--out", tmp_path / "wanda",
    )  # fmt: skip
    assert rc == 0, err
    assert "measuring the pruned model on the test split" in stdout and "--no-eval skips" in stdout
    exported = _llama64(tmp_path / "wanda")
    ppl = _perplexity64(exported, _test_ids(folders), SEQ)
    row = _row(doc, "wanda", 0.5)
    assert abs(ppl - doc["dense_perplexity"]) > 1e-4 * ppl  # the export is pruned: the check below can fail
    assert row["perplexity"] == pytest.approx(ppl, rel=1e-5)
    from varprune.storage.hf_folder import read_hf_metadata

    meta = read_hf_metadata(tmp_path / "wanda")
    assert meta["varprune_source_model"] == model and meta["varprune_source_weights_sha256"] == doc["weights_sha256"]

    rc, stdout, err = cli(
        capsys, "export", "--model", model, *LM_ARGS, *data, "--pattern", "2:4", "--no-eval",
        "--out", tmp_path / "nm.safetensors",
    )  # fmt: skip
    assert rc == 0, err
    assert "measuring" not in stdout and "not measured (--no-eval)" in stdout
    rc, stdout, err = cli(capsys, "evaluate", tmp_path / "nm.safetensors", "--device", "cpu", "--json")
    assert rc == 0, err
    got = json.loads(stdout.splitlines()[-1])
    assert got["perplexity"] == pytest.approx(_row(doc, "magnitude", "2:4")["perplexity"], rel=1e-6)
    rc, stdout, err = cli(
        capsys, "evaluate", model, "--dataset", "text", "--seq-len", SEQ, *data, "--device", "cpu", "--json"
    )
    assert rc == 0, err
    assert json.loads(stdout.splitlines()[-1])["perplexity"] == pytest.approx(doc["dense_perplexity"], rel=1e-9)


def test_finetune_a_folder_keeps_the_mask_of_its_own_weights(folders, tmp_path, capsys):
    from safetensors.torch import load_file

    out = tmp_path / "ft"
    rc, _, err = cli(
        capsys, "finetune", "--model", f"hf:{folders / 'llama'}", "--dataset", "text", "--data-dir", folders / "lm",
        "--seq-len", SEQ, "--sparsity", "0.5", "--epochs", "1", "--limit-train", "16", "--batch-size", "8",
        "--optimizer", "adamw", "--lr", "1e-3", "--device", "cpu", "--quiet", "--out", out,
    )  # fmt: skip
    assert rc == 0, err
    dense = _llama64(folders / "llama")
    _magnitude_layerwise(dense, 0.5)  # the mask a causal LM gets by default: layer-wise magnitude
    tuned = load_file(out / "model.safetensors")
    changed = 0
    for name, p in dense.named_parameters():
        if ".layers." in name and name.endswith("_proj.weight"):
            t = tuned[name]
            assert torch.equal(t == 0, p == 0), name  # the pruned weights stay exactly zero, no other is zero
            changed += int(not torch.equal(t.double(), p))
    assert changed > 0  # and the kept ones were trained


def test_a_folder_that_does_not_fit_memory_is_refused_before_its_weights_are_read(folders, tmp_path, capsys):
    big = tmp_path / "big"
    big.mkdir()
    config = json.loads((folders / "llama" / "config.json").read_text())
    config.update(hidden_size=16384, intermediate_size=65536, num_hidden_layers=400, num_attention_heads=128)
    (big / "config.json").write_text(json.dumps(config))
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, big / "model.safetensors")  # a sound file, not this model's: never loaded
    (big / "tokenizer.json").write_text((folders / "llama" / "tokenizer.json").read_text())
    rc, _, err = cli(
        capsys, "prune", "--model", f"hf:{big}", "--dataset", "text", "--data-dir", folders / "lm",
        "--sparsities", "0.5", "--device", "cpu", "--out", tmp_path / "out",
    )  # fmt: skip
    line = one_line_error(rc, err)
    assert "needs about" in line and "parameters" in line and "is free" in line
    assert not (tmp_path / "out").exists()


def test_bf16_weights_measure_close_to_fp32(folders, tmp_path):
    from varprune.engine.pretrained import prune_folder

    docs = {
        dtype: prune_folder(
            folders / "llama",
            "text",
            str(folders / "lm"),
            tmp_path / dtype,
            seq_len=SEQ,
            pruners=("wanda",),
            sparsities=(0.5,),
            dtype=dtype,
            device="cpu",
            calib_samples=4,
            log=lambda *a: None,
        )
        for dtype in ("fp32", "bf16")
    }
    assert docs["bf16"]["pretrained"]["dtype"] == "bf16"
    fp32, bf16 = (docs[d]["results"][0]["perplexity"] for d in ("fp32", "bf16"))
    assert fp32 != bf16 and bf16 == pytest.approx(fp32, rel=0.05)


@pytest.mark.parametrize("command", ["export", "finetune"])
def test_a_run_and_a_folder_together_are_refused(folders, tmp_path, capsys, command):
    extra = ["--sparsity", "0.5", "--out", tmp_path / "out"]
    rc, _, err = cli(capsys, command, tmp_path, "--model", f"hf:{folders / 'llama'}", "--dataset", "text", *extra)
    assert "give a RUN or --model hf:" in one_line_error(rc, err) and not (tmp_path / "out").exists()


def test_a_classifier_folder_is_refused_for_language_modeling(folders, tmp_path, capsys):
    rc, _, err = cli(
        capsys, "prune", "--model", f"hf:{folders / 'bert'}", "--dataset", "text", "--data-dir", folders / "lm",
        "--sparsities", "0.5", "--device", "cpu", "--out", tmp_path / "out",
    )  # fmt: skip
    line = one_line_error(rc, err)
    assert "BertForSequenceClassification, not a causal language model" in line and not (tmp_path / "out").exists()


def test_layer_progress_is_a_bar_on_a_terminal_and_lines_otherwise(folders, capsys):
    from varprune.engine.sweep import LayerProgress
    from varprune.numerics.weights import prunable_weights

    model = _llama64(folders / "llama")
    names = [n for n, _ in prunable_weights(model)]
    for tty in (True, False):
        lines = []
        progress = LayerProgress(model, log=lines.append, tty=tty)
        assert progress("magnitude", 0.5) is None  # magnitude prunes every layer at once
        each = progress("sparsegpt", "2:4")
        for name in names:
            each(name)
        each(None)
        err = capsys.readouterr().err
        if tty:
            assert lines == [] and f"  sparsegpt 2:4:   0%|          | 0/{len(names)}" in err and "layer/s" in err
        else:
            assert [line.split(",")[0] for line in lines] == [f"  sparsegpt 2:4: block {b}/2 pruned" for b in (1, 2)]
            assert err == ""


def test_other_commands_send_a_model_folder_to_model_too(folders, tmp_path, capsys):
    llama = folders / "llama"
    rc, _, err = cli(capsys, "export", llama, "--sparsity", "0.5", "--out", tmp_path / "x.safetensors")
    assert f"--model hf:{llama}" in one_line_error(rc, err) and not (tmp_path / "x.safetensors").exists()
    rc, _, err = cli(capsys, "evaluate", llama)
    assert f"varprune evaluate hf:{llama} --dataset D" in one_line_error(rc, err)
    rc, _, err = cli(capsys, "evaluate", f"hf:{llama}")
    assert one_line_error(rc, err).endswith(
        f"hf:{llama} needs --dataset (the text dataset to measure it on) and usually --data-dir"
    )


def test_evaluate_takes_a_model_folder_as_model_too(folders, capsys):
    """prune, export and finetune take --model hf:DIR; evaluate takes it as FILE and as --model, the same."""
    bert, data = f"hf:{folders / 'bert'}", ["--dataset", "text-classification", "--data-dir", folders / "cls"]
    measured = [cli(capsys, "evaluate", *given, *data, "--seq-len", SEQ, "--device", "cpu") for given in
                ([bert], ["--model", bert])]  # fmt: skip
    assert measured[0][0] == 0 and "accuracy: " in measured[0][1] and measured[1] == measured[0]
    rc, _, err = cli(capsys, "evaluate", folders / "x.safetensors", "--model", bert, *data)
    assert f"give {folders / 'x.safetensors'} or --model {bert}, not both" in one_line_error(rc, err)
    rc, _, err = cli(capsys, "evaluate", "--model", "gpt2", *data)
    assert "evaluate --model takes a model folder as hf:DIR, not gpt2" in one_line_error(rc, err)
    rc, _, err = cli(capsys, "evaluate")
    assert "give what to evaluate" in one_line_error(rc, err)


def test_choices_take_a_model_folder_as_hf_dir_as_the_other_flags_do(folders, tmp_path, capsys):
    """`evaluate hf:DIR --choices Q` (the spelling --dataset and --commonsense take) scores the folder as the bare
    DIR does; it said 'hf:DIR does not exist'."""
    q = tmp_path / "q.jsonl"
    rows = [{"context": "the quick", "choices": [" brown", " lazy"], "label": 0},
            {"context": "the lazy", "choices": [" dog", " fox", " and"], "label": 1}]  # fmt: skip
    q.write_text("".join(json.dumps(r) + "\n" for r in rows))
    llama = folders / "llama"
    scored = [cli(capsys, "evaluate", *given, "--choices", q, "--device", "cpu", "--json")
              for given in ([llama], [f"hf:{llama}"], ["--model", f"hf:{llama}"])]  # fmt: skip
    tasks = [json.loads(out.splitlines()[-1])["tasks"] for _, out, _ in scored]
    assert [rc for rc, _, _ in scored] == [0, 0, 0] and tasks[0]["q"]["n"] == 2
    assert tasks[1] == tasks[0] and tasks[2] == tasks[0]
    rc, _, err = cli(capsys, "evaluate", llama, "--choices", q, "--sparsity", "0.5", "--device", "cpu")
    line = one_line_error(rc, err)  # a dense folder is not "an exported model, already pruned"
    assert "not a model folder such as" in line and f"varprune export --model hf:{llama}" in line


def test_prune_a_folder_with_choices_scores_them(folders, tmp_path, capsys):
    """prune --model hf:DIR --choices Q recorded Q's sha256 in prune.json but scored nothing: now the dense and every
    pruned row carry their accuracy, the dense one as evaluate hf:DIR --choices Q measures it."""
    q = tmp_path / "q.jsonl"
    rows = [{"context": "the quick", "choices": [" brown", " lazy"], "label": 0},
            {"context": "the lazy", "choices": [" dog", " fox", " and"], "label": 1}]  # fmt: skip
    q.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model, out = f"hf:{folders / 'llama'}", tmp_path / "out"
    args = ["--model", model, *LM_ARGS, "--data-dir", folders / "lm", "--sparsities", "0.5", "--out", out]
    rc, stdout, err = cli(capsys, "prune", *args, "--choices", q)
    assert rc == 0 and "Multiple-choice accuracy" in stdout, err
    doc = json.loads((out / "prune.json").read_text())
    assert doc["results"][0]["choices"]["tasks"]["q"]["n"] == 2
    rc, stdout, err = cli(capsys, "evaluate", model, "--choices", q, "--device", "cpu", "--json")
    scored = json.loads(stdout.splitlines()[-1])
    assert doc["dense_choices"]["tasks"] == scored["tasks"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--commonsense", "CS", "--sparsity", "0.5"], "--sparsity does nothing with --commonsense; drop it"),
        (["--choices", "Q", "--dtype", "bf16", "--seq-len", "8"], "--seq-len, --dtype do nothing with --choices"),
        (["--choices", "Q", "--pruner", "wanda"], "--pruner does nothing with --choices/--lm-eval"),
        (["--dataset", "text", "--pruner", "wanda", "--limit", "3"], "--limit, --pruner do nothing with hf:DIR"),
    ],
)
def test_evaluate_refuses_flags_its_way_of_evaluating_never_reads(folders, tmp_path, capsys, args, message):
    """evaluate measures in four ways; a flag the chosen one never reads was accepted and did nothing (a --sparsity
    beside --commonsense measured the dense model)."""
    names = {"CS": tmp_path, "Q": tmp_path / "q.jsonl"}
    rc, _, err = cli(capsys, "evaluate", f"hf:{folders / 'llama'}", *[names.get(a, a) for a in args])
    assert message in one_line_error(rc, err)


def test_prune_folder_refuses_in_one_line_before_writing(folders, tmp_path):
    from varprune.engine.pretrained import prune_folder
    from varprune.errors import RunError

    with pytest.raises(RunError) as e:
        prune_folder(
            folders / "llama", "text", str(folders / "lm"), tmp_path / "out", pruners=("wanda", "nope"), dtype="fp64"
        )
    message = str(e.value)
    assert "\n" not in message and "--dtype fp64: choose one of fp32, bf16, fp16" in message and "nope" in message
    assert not (tmp_path / "out").exists()
