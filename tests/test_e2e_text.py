"""The language half end to end, through the CLI on real text (the BSD fortunes, Debian's `fortunes`): train a
tiny GPT-2, prune it with every pruner, export it as a Hugging Face folder, and check the perplexity varprune
reports against an independent float64 computation with transformers and tokenizers on the exported folder.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from helpers import cli, one_line_error
from text_helpers import tiny_gpt2_flags

pytestmark = pytest.mark.slow

FORTUNES = Path("/usr/share/games/fortunes/fortunes")
SEQ = 32
LM = [*tiny_gpt2_flags(n_embd=32, seq_len=SEQ, limit_train=64, limit_test=12, batch_size=8), "--quiet"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A `text` folder cut from the fortunes file: the independent check reads test.txt as it is."""
    if not FORTUNES.is_file():
        pytest.skip("Debian's fortunes package is not installed (make test installs it)")
    entries = [e.strip() for e in FORTUNES.read_text(encoding="utf-8").split("\n%\n") if e.strip()]
    folder = tmp_path_factory.mktemp("text")
    (folder / "train.txt").write_text("\n\n".join(entries[:400]) + "\n", encoding="utf-8")
    (folder / "test.txt").write_text("\n\n".join(entries[400:520]) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def lm_run(corpus, tmp_path_factory):
    from varprune.cli import main

    run = tmp_path_factory.mktemp("lm") / "run"
    assert main(["train", *LM, "--data-dir", str(corpus), "--out", str(run)]) == 0
    return run


def _independent_perplexity(folder: Path, test_text: str, windows: int) -> float:
    """transformers' model from the exported folder and tokenizers' tokenizer from it, in float64: the test text
    encoded whole, cut into non-overlapping windows of SEQ tokens, every window predicting its tokens 1..SEQ-1."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(test_text, add_special_tokens=False).ids
    x = torch.tensor(ids[: windows * SEQ], dtype=torch.long).view(windows, SEQ)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    with torch.no_grad():
        logits = model(input_ids=x).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    return math.exp(nll.item())


def test_a_text_run_keeps_its_tokenizer_and_resolved_settings(lm_run):
    cfg = json.loads((lm_run / "config.json").read_text())["train"]
    assert cfg["optimizer"] == "adamw" and cfg["grad_clip"] == 1.0 and cfg["lr"] == 1e-3  # resolved for text
    assert (lm_run / "tokenizer.json").is_file()
    last = [json.loads(line) for line in (lm_run / "metrics.jsonl").read_text().splitlines()][-1]
    # a 300-token vocabulary: an untrained model sits near 300; one epoch must have learned something
    assert 1 < last["test_perplexity"] < 300 and last["test_nll"] == pytest.approx(math.log(last["test_perplexity"]))


def test_every_pruner_and_the_exported_folder_agree_with_an_independent_perplexity(lm_run, corpus, capsys, tmp_path):
    rc, out, err = cli(
        capsys, "prune", lm_run, "--pruners", "magnitude,wanda,sparsegpt", "--sparsities", "0.5", "--patterns", "2:4",
        "--calib-samples", "16",
    )  # fmt: skip
    assert rc == 0, err
    doc = json.loads((lm_run / "prune.json").read_text())
    assert doc["metric"] == "perplexity" and doc["higher_is_better"] is False and doc["bn_retuning"] is False
    got = {(r["pruner"], r.get("pattern", r["sparsity"])): r for r in doc["results"]}
    assert set(got) == {(p, s) for p in ("magnitude", "wanda", "sparsegpt") for s in (0.5, "2:4")}
    assert all("perplexity_bnt" not in r for r in doc["results"])  # no BatchNorm: nothing re-tuned
    assert doc["calibration"]["samples"] == 16 and doc["calibration_seq_len"] == SEQ
    # SparseGPT updates the weights it keeps: at 50% it should not lose to magnitude pruning by much, and all
    # three must stay within reach of the dense model on this one-layer toy
    dense = doc["dense_perplexity"]
    for r in doc["results"]:
        assert dense * 0.5 < r["perplexity"] < dense * 20, r
    assert "| magnitude (layerwise) |" in out and "| wanda |" in out and "| sparsegpt |" in out

    for pruner in ("magnitude", "sparsegpt"):
        folder = tmp_path / f"hf-{pruner}"
        calib = ["--calib-samples", "16"] if pruner != "magnitude" else []  # refused where nothing calibrates
        rc, _, err = cli(
            capsys, "export", lm_run, "--sparsity", "0.5", "--pruner", pruner, *calib, "--format", "hf", "--out", folder
        )
        assert rc == 0, err
        weights = {k: v for k, v in _hf_weights(folder).items() if k.endswith("weight") and v.dim() == 2}
        zeros = sum(int((v == 0).sum()) for k, v in weights.items() if ".h." in k)
        total = sum(v.numel() for k, v in weights.items() if ".h." in k)
        assert zeros / total == pytest.approx(0.5, abs=0.02)  # the blocks' linear weights are half zero
        ours = got[(pruner, 0.5)]["perplexity"]
        theirs = _independent_perplexity(folder, (corpus / "test.txt").read_text(encoding="utf-8"), 12)
        assert ours == pytest.approx(theirs, rel=2e-4), (pruner, ours, theirs)


def _hf_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_evaluate_reads_an_exported_language_model(lm_run, corpus, capsys, tmp_path):
    out = tmp_path / "lm.safetensors"
    rc, _, err = cli(capsys, "export", lm_run, "--sparsity", "0.5", "--out", out)
    assert rc == 0, err
    rc, text, err = cli(capsys, "evaluate", out, "--data-dir", corpus, "--json")
    assert rc == 0, err
    metrics = json.loads(text.splitlines()[-1])
    assert metrics["metric"] == "perplexity" and metrics["perplexity"] > 1 and text.startswith("perplexity: ")


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--model", "gpt2", "--dataset", "fashion-mnist"], "gpt2"),
        (["--seq-len", "1"], "--seq-len"),
        (["--vocab-size", "3"], "--vocab-size"),
        (["--model", "mlp"], "mlp"),
        (["--model-arg", "n_embd=30", "--model-arg", "n_head=4"], "n_embd"),
    ],
)
def test_bad_text_settings_are_one_line(corpus, capsys, tmp_path, args, expected):
    base = [a for a in LM]
    for flag in ("--model", "--dataset"):  # the case's own value replaces the default's
        if flag in args:
            i = base.index(flag)
            del base[i : i + 2]
    rc, _, err = cli(capsys, "train", *base, *args, "--data-dir", corpus, "--out", tmp_path / "run")
    assert expected in one_line_error(rc, err)
    assert not (tmp_path / "run").exists()  # nothing written on bad input


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--pruners", "magnitude,obs"], "obs"),
        (["--pruners", "wanda", "--calib-samples", "0"], "--calib-samples"),
        (["--pruners", "sparsegpt", "--calib-seq-len", "1"], "--calib-seq-len"),
        (["--pruners", "wanda", "--calib-seq-len", str(2 * SEQ)], f"is more than the model's {SEQ} positions"),
    ],
)
def test_bad_pruner_settings_are_one_line(lm_run, capsys, args, expected):
    before = (lm_run / "prune.json").read_bytes() if (lm_run / "prune.json").exists() else None
    rc, _, err = cli(capsys, "prune", lm_run, "--sparsities", "0.5", *args)
    assert expected in one_line_error(rc, err)
    after = (lm_run / "prune.json").read_bytes() if (lm_run / "prune.json").exists() else None
    assert before == after


def test_calibration_from_a_local_jsonl_file(lm_run, corpus, capsys, tmp_path):
    """--calib-data: the windows come from the file (C4's layout: JSON lines with "text"), tokenized with the run's
    tokenizer; each is a contiguous slice of tokenizers' own encoding of one document (data/calibtext.py's unit
    tests check the protocol)."""
    from tokenizers import Tokenizer

    from varprune.engine.runconfig import load_run_config
    from varprune.engine.trained import load_trained

    docs = [" ".join(f"Calibration document {i}: the quick brown fox jumps over the lazy dog." for _ in range(4))
            for i in range(60)]  # fmt: skip
    calib = tmp_path / "c4-shard.jsonl"
    calib.write_text("".join(json.dumps({"text": d, "url": "x"}) + "\n" for d in docs), encoding="utf-8")
    t = load_trained(lm_run, load_run_config(lm_run), "cpu")
    windows = t.calibration(5, SEQ, str(calib))
    tok = Tokenizer.from_file(str(lm_run / "tokenizer.json"))
    encoded = [" " + " ".join(map(str, tok.encode(d, add_special_tokens=False).ids)) + " " for d in docs]
    assert len(windows) == 5
    for w in windows:
        window = " " + " ".join(map(str, w[0].tolist())) + " "
        assert w.shape == (1, SEQ) and any(window in ids for ids in encoded)
    assert not torch.equal(torch.cat(windows), torch.cat(t.calibration(5, SEQ)))  # not the training split's

    rc, _, err = cli(capsys, "prune", lm_run, "--pruners", "wanda", "--sparsities", "0.5", "--calib-samples", "8",
                     "--calib-data", calib)  # fmt: skip
    assert rc == 0, err
    doc = json.loads((lm_run / "prune.json").read_text())
    assert doc["calibration"]["data"]["path"] == str(calib) and len(doc["calibration"]["data"]["sha256"]) == 64
    assert doc["calibration"]["data"]["protocol"] == "documents"


@pytest.mark.parametrize(
    "name, content, args, expected",
    [
        ("c.jsonl", '{"text": "a b c"}\n', ["--pruners", "magnitude"], "does nothing with magnitude"),
        ("c.gz", "x", ["--pruners", "wanda"], "unpack a .gz first"),
        ("c.jsonl", '{"txt": "a"}\n', ["--pruners", "wanda"], 'line 1 has no string field "text"'),
        (None, None, ["--pruners", "sparsegpt"], "is not a file"),
    ],
)
def test_bad_calibration_files_are_one_line(lm_run, capsys, tmp_path, name, content, args, expected):
    path = tmp_path / (name or "missing.jsonl")
    if content is not None:
        path.write_text(content, encoding="utf-8")
    rc, _, err = cli(capsys, "prune", lm_run, "--sparsities", "0.5", *args, "--calib-data", path)
    assert expected in one_line_error(rc, err)


def test_analyze_a_language_model(lm_run, capsys, tmp_path):
    """The Hessian's double backward goes through attention (the fused kernels have no second derivative)."""
    rc, out, err = cli(capsys, "analyze", lm_run, "--out", tmp_path / "an")
    assert rc == 0, err
    entry = next(iter(json.loads((tmp_path / "an" / "analysis.json").read_text())["runs"].values()))
    assert math.isfinite(entry["hessian_top_eigenvalue"]) and entry["hessian_top_eigenvalue"] > 0
    assert set(entry["layer_sensitivity"]) == {n for n in entry["layer_variance"]}
    assert "no BatchNorm to re-tune" in out


@pytest.mark.parametrize("method", ["sam", "cram+", "hoyer", "var+sam"])
def test_every_kind_of_method_trains_a_language_model(corpus, capsys, tmp_path, method):
    """The perturbed optimizers (SAM, CrAM+), the other regularizers and the combinations on AdamW with clipping."""
    args = [a for a in LM]
    args[args.index("--limit-train") + 1] = "16"
    rc, _, err = cli(capsys, "train", *args, "--method", method, "--data-dir", corpus, "--out", tmp_path / "run")
    assert rc == 0, err
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert math.isfinite(last["loss"]) and math.isfinite(last["test_perplexity"])
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["method"] == method


def test_a_test_text_shorter_than_one_window_and_a_damaged_tokenizer_are_one_line(lm_run, capsys, tmp_path):
    short = tmp_path / "short"
    short.mkdir()
    (short / "train.txt").write_text("hello world, this is the training text. " * 200, encoding="utf-8")
    (short / "test.txt").write_text("tiny", encoding="utf-8")
    rc, _, err = cli(capsys, "train", *LM, "--data-dir", short, "--out", tmp_path / "run")
    assert "fewer than one window of seq_len 32" in one_line_error(rc, err) and not (tmp_path / "run").exists()

    import shutil

    copy = Path(shutil.copytree(lm_run, tmp_path / "copy"))
    (copy / "tokenizer.json").write_text('{"not": "a tokenizer"', encoding="utf-8")
    before = sorted(p.name for p in copy.iterdir())
    rc, _, err = cli(capsys, "prune", copy, "--sparsities", "0.5")
    assert "tokenizer.json is not a tokenizer.json" in one_line_error(rc, err)
    assert sorted(p.name for p in copy.iterdir()) == before  # nothing written
