"""Issue 26, section 3: a flag that does not apply to the run's task, tokenizer or pruner is refused in one line
naming why, exit 2, nothing written (engine.checks: Scope, SCOPE_KINDS, FLAG_USES: the one rule); and a text whose
byte-level BPE stops short of --vocab-size says so and records both sizes."""

import json

import pytest

from helpers import TINY, cli, one_line_error, snapshot, train_tiny
from text_helpers import lm_corpus, tiny_gpt2_flags
from varprune.engine.checks import Scope, flag_problems, scope_problem
from varprune.engine.config import TrainConfig

TEXT = tiny_gpt2_flags()


@pytest.fixture(scope="module")
def image_run(tmp_path_factory, fmnist_dir):
    return train_tiny(tmp_path_factory.mktemp("img") / "run", fmnist_dir)


@pytest.mark.parametrize(
    ("flags", "flag", "why"),
    [
        (["--seq-len", "64"], "--seq-len", "applies to text datasets"),
        (["--vocab-size", "500"], "--vocab-size", "applies to text datasets"),
    ],
)
def test_train_on_images_refuses_the_text_flags(capsys, tmp_path, fmnist_dir, flags, flag, why):
    out = tmp_path / "run"
    line = one_line_error(*cli(capsys, "train", *TINY, "--data-dir", fmnist_dir, *flags, "--out", out)[::2])
    assert line.startswith(f"varprune: error: {flag} does nothing on --dataset fashion-mnist") and why in line, line
    assert not out.exists()


def test_train_on_text_refuses_image_size(capsys, tmp_path):
    corpus = tmp_path / "text"
    lm_corpus(corpus)
    out = tmp_path / "run"
    rc, _, err = cli(capsys, "train", *TEXT, "--image-size", "32", "--data-dir", corpus, "--out", out)
    line = one_line_error(rc, err)
    assert "--image-size does nothing on --dataset text" in line and "applies to image datasets" in line, line
    assert not out.exists()


@pytest.mark.parametrize(
    ("command", "flags", "words"),
    [
        ("prune", ["--pruners", "magnitude", "--calib-samples", "8"], "--calib-samples does nothing with magnitude"),
        ("prune", ["--pruners", "magnitude", "--calib-seq-len", "8"], "--calib-seq-len does nothing with magnitude"),
        ("prune", ["--pruners", "wanda", "--calib-seq-len", "8"], "--calib-seq-len does nothing on"),
        ("export", ["--sparsity", "0.5", "--calib-samples", "8"], "--calib-samples does nothing with magnitude"),
        ("export", ["--sparsity", "0.5", "--calib-seq-len", "8"], "--calib-seq-len does nothing with magnitude"),
        ("export", ["--sparsity", "0.5", "--pruner", "wanda", "--calib-seq-len", "8"], "--calib-seq-len does nothing"),
    ],
)
def test_calibration_flags_where_no_calibration_happens_are_refused(capsys, tmp_path, image_run, command, flags, words):
    before = snapshot(image_run)
    extra = ["--sparsities", "0.5"] if command == "prune" else ["--out", tmp_path / "e.safetensors"]
    line = one_line_error(*cli(capsys, command, image_run, *extra, *flags)[::2])
    assert words in line and "drop it" in line, line
    assert snapshot(image_run) == before and not (tmp_path / "e.safetensors").exists()


def test_the_calibration_flags_of_a_calibrated_pruner_are_taken(capsys, image_run):
    rc, _, err = cli(capsys, "prune", image_run, "--sparsities", "0.5", "--pruners", "wanda", "--calib-samples", "8")
    assert rc == 0, err
    assert json.loads((image_run / "prune.json").read_text())["calibration"]["samples"] == 8


def test_the_rule_itself():
    lm = Scope(("language-modeling",), ("magnitude",), True, "x")
    img = Scope(("classification",), ("wanda",), None, "y")
    assert scope_problem("--seq-len", ("text",), lm) is None
    assert "applies to text" in scope_problem("--seq-len", ("text",), img)
    assert "applies to image" in scope_problem("--image-size", ("image",), lm)
    assert "no calibration happens" in scope_problem("--calib-samples", ("calibrated",), lm)
    assert scope_problem("--calib-samples", ("calibrated",), img) is None
    # prune takes several runs: a flag applies when it applies to one of them
    both = Scope(("classification", "language-modeling"), ("wanda",), None, "z")
    assert flag_problems({"--calib-seq-len": 8, "--calib-samples": None}, both) == []
    assert len(flag_problems({"--calib-seq-len": 8, "--calib-data": "c.txt"}, img)) == 2
    # not known: not judged
    assert scope_problem("--seq-len", ("text",), Scope()) is None
    # a hf:DIR model brings its tokenizer: --vocab-size does nothing there
    hf = Scope(("language-modeling",), None, False)
    assert "byte-level BPE" in scope_problem("--vocab-size", ("text", "bpe"), hf)


def test_text_runs_default_to_a_batch_that_fits_text():
    assert TrainConfig(dataset="text").batch_size == 32
    assert TrainConfig(dataset="fashion-mnist").batch_size == 256
    assert TrainConfig(dataset="text", batch_size=8).batch_size == 8


def test_a_vocabulary_that_stops_short_is_said_and_both_sizes_recorded(capsys, tmp_path):
    corpus = tmp_path / "text"
    lm_corpus(corpus)
    out = tmp_path / "run"
    args = [a if a != "300" else "50000" for a in TEXT]
    rc, text, err = cli(capsys, "train", *args, "--method", "var", "--data-dir", corpus, "--out", out)
    assert rc == 0, err
    tok = json.loads((out / "config.json").read_text())["resolved"]["tokenizer"]
    assert tok["requested_vocab_size"] == 50000 and tok["vocab_size"] < 50000
    assert f"the tokenizer has {tok['vocab_size']:,} tokens, not the 50,000 of --vocab-size" in text
    # the schedule in steps, the warning for a short epoch, the loss with its VAR term labelled
    steps = json.loads((out / "config.json").read_text())["resolved"]["steps_per_epoch"]
    assert f"schedule: {steps} optimizer steps an epoch (batch 32)" in text and "warm-up" in text
    assert f"warning: an epoch is only {steps} optimizer step" in text
    metrics = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    shown = f"loss {metrics['loss']:.4f} (task {metrics['loss'] - metrics['var_term']:.4f} + var "
    assert shown in text, text


def test_finetune_and_study_refuse_them_too(capsys, tmp_path, image_run, fmnist_dir):
    before = snapshot(image_run)
    out = tmp_path / "ft"
    line = one_line_error(
        *cli(capsys, "finetune", image_run, "--sparsity", "0.5", "--seq-len", "64", "--out", out)[::2]
    )
    assert "--seq-len does nothing on --dataset fashion-mnist" in line and not out.exists()
    line = one_line_error(
        *cli(capsys, "finetune", image_run, "--sparsity", "0.5", "--calib-samples", "8", "--out", out)[::2]
    )
    assert "--calib-samples does nothing with magnitude" in line and not out.exists()
    assert snapshot(image_run) == before
    study = ["study", "--out", tmp_path / "s", *TINY, "--data-dir", fmnist_dir, "--methods", "sgd", "--seeds", "0"]
    line = one_line_error(*cli(capsys, *study, "--pruners", "magnitude", "--calib-samples", "8")[::2])
    assert "--calib-samples does nothing with magnitude" in line
    line = one_line_error(*cli(capsys, *study, "--vocab-size", "500")[::2])
    assert "--vocab-size does nothing on --dataset fashion-mnist" in line
    assert not (tmp_path / "s").exists()


def test_the_sweeps_api_refuses_calibration_settings_without_a_calibrated_pruner():
    from varprune.engine.sweep import SweepSpec

    found = SweepSpec(pruners=("magnitude",), calib_data="c.txt", calib_seq_len=8).problems()
    assert any(p.startswith("--calib-data does nothing with magnitude") for p in found), found
    assert any(p.startswith("--calib-seq-len does nothing with magnitude") for p in found), found
    assert not any("does nothing" in p for p in SweepSpec(pruners=("magnitude", "wanda"), calib_seq_len=8).problems())
