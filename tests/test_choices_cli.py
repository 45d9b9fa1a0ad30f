"""--choices end to end through the CLI: a tiny GPT-2 trained on a small text, swept and evaluated with a
multiple-choice file, checked against an independent float64 computation on the exported Hugging Face folder
(transformers and tokenizers, not varprune's loaders); the bad inputs of the feature are one line, exit 2,
nothing written."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tests.helpers import cli, one_line_error
from tests.test_choices import WORDS, _fortunes, _reference, _toy_task

from varprune.data.choices import read_choices

pytestmark = pytest.mark.slow

LM = [
    "--dataset", "text", "--model", "gpt2", "--model-arg", "n_layer=1", "--model-arg", "n_embd=32",
    "--model-arg", "n_head=2", "--seq-len", "32", "--vocab-size", "300", "--epochs", "1", "--batch-size", "8",
    "--limit-train", "64", "--limit-test", "12", "--device", "cpu", "--quiet",
]  # fmt: skip


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    from varprune.cli import main

    root = tmp_path_factory.mktemp("choices")
    rng = random.Random(0)
    (root / "data").mkdir()
    (root / "data" / "train.txt").write_text("\n".join(" ".join(rng.choices(WORDS, k=12)) for _ in range(400)))
    (root / "data" / "test.txt").write_text("\n".join(" ".join(rng.choices(WORDS, k=12)) for _ in range(60)))
    with (root / "q.jsonl").open("w") as f:
        for _ in range(24):
            ctx = " ".join(rng.choices(WORDS, k=rng.randint(1, 8))) + rng.choice(["", " "])
            choices = [" ".join(rng.choices(WORDS, k=rng.randint(1, 4))) for _ in range(3)]
            f.write(json.dumps({"context": ctx, "choices": choices, "label": rng.randrange(3)}) + "\n")
    assert main(["train", *LM, "--data-dir", str(root / "data"), "--out", str(root / "run")]) == 0
    return root


class _Encode:
    """tokenizers' own encoding of the exported folder's tokenizer.json, no special tokens."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids


def test_sweep_and_evaluate_agree_with_an_independent_computation(lm_run, capsys):
    from transformers import AutoModelForCausalLM

    run, q = lm_run / "run", lm_run / "q.jsonl"
    rc, out, err = cli(capsys, "prune", run, "--sparsities", "0.5", "--patterns", "2:4", "--choices", q)
    assert rc == 0, err
    assert "Multiple-choice accuracy" in out and "q (24 questions)" in out
    doc = json.loads((run / "prune.json").read_text())
    assert list(doc["choices"]) == ["q"] and len(doc["choices"]["q"]) == 64  # the questions' sha256
    row = doc["results"][0]
    assert row["sparsity"] == 0.5 and row["choices"]["tasks"]["q"]["n"] == 24
    assert "q_acc" in (run / "prune.csv").read_text().splitlines()[0]
    rc, out, err = cli(capsys, "export", run, "--sparsity", "0.5", "--format", "hf", "--out", lm_run / "hf")
    assert rc == 0, err
    model = AutoModelForCausalLM.from_pretrained(lm_run / "hf", torch_dtype="float32").eval()
    want = _reference(model, _Encode(lm_run / "hf" / "tokenizer.json"), [read_choices(q)], 32)["q"]
    for got in (row["choices"]["tasks"]["q"],):
        assert got["acc"] == pytest.approx(want["acc"]) and got["acc_norm"] == pytest.approx(want["acc_norm"])
    for source in ([run, "--sparsity", "0.5"], [lm_run / "hf"], [f"hf:{lm_run / 'hf'}"]):
        rc, out, err = cli(capsys, "evaluate", *source, "--choices", q, "--json")
        assert rc == 0, err
        got = json.loads(out.splitlines()[-1])
        assert got["tasks"]["q"] == {
            "acc": pytest.approx(want["acc"]),
            "acc_norm": pytest.approx(want["acc_norm"]),
            "n": 24,
        }
        assert got["mean"]["acc"] == pytest.approx(want["acc"])
    folder = lm_run / "folder"  # the exported folder pruned again without a run: its dense model is the 50% one
    args = ["--model", f"hf:{lm_run / 'hf'}", "--dataset", "text", "--data-dir", lm_run / "data", "--seq-len", "32"]
    rc, out, err = cli(capsys, "prune", *args, "--sparsities", "0.9", "--choices", q, "--out", folder)
    assert rc == 0, err
    dense = json.loads((folder / "prune.json").read_text())["dense_choices"]["tasks"]["q"]
    assert dense == {"acc": pytest.approx(want["acc"]), "acc_norm": pytest.approx(want["acc_norm"]), "n": 24}
    rc, out, err = cli(capsys, "prune", run, "--sparsities", "0.5", "--patterns", "2:4", "--choices", q)
    assert rc == 0 and "reusing" in out  # the same questions: the sweep is reused
    changed = lm_run / "q2" / "q.jsonl"
    changed.parent.mkdir()
    changed.write_text(q.read_text().replace('"label": 0', '"label": 1'))
    rc, out, err = cli(capsys, "prune", run, "--sparsities", "0.5", "--patterns", "2:4", "--choices", changed)
    assert rc == 0 and "reusing" not in out  # other questions: swept again


def test_convert_then_evaluate_and_fortunes_endings(lm_run, capsys, tmp_path, monkeypatch):
    rows = [{"goal": f"Open {w}", "sol1": "Twist the lid.", "sol2": f"Eat the {w}.", "label": i % 2}
            for i, w in enumerate(WORDS[:6])]  # fmt: skip
    (tmp_path / "piqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, out, err = cli(capsys, "choices", "convert", "--format", "piqa", tmp_path / "piqa.jsonl", tmp_path / "p.jsonl")
    assert rc == 0 and "6 questions" in out, err
    monkeypatch.setenv("VARPRUNE_FORTUNES", str(_fortunes(tmp_path, 200)))
    rc, out, err = cli(
        capsys, "evaluate", lm_run / "run", "--choices", f"{tmp_path / 'p.jsonl'},fortunes-endings", "--json"
    )
    assert rc == 0, err
    got = json.loads(out.splitlines()[-1])
    assert got["tasks"]["p"]["n"] == 6 and got["tasks"]["fortunes-endings"]["n"] > 4
    assert got["mean"]["acc"] == pytest.approx((got["tasks"]["p"]["acc"] + got["tasks"]["fortunes-endings"]["acc"]) / 2)


GOOD = '{"context": "a ", "choices": ["x", "y"], "label": 0}'


@pytest.mark.parametrize(
    "line, expected",
    [
        ('{"context": "a ", "choices": ["x", "y"], "label": 5}', "line 2: label 5 is outside the 2 choices"),
        ('{"context": "a ", "choices": ["x"], "label": 0}', "line 2: 'choices' must be a list of two or more"),
        ('{"context": ["a"], "choices": ["x", "y"], "label": 0}', "line 2: a list 'context' must hold one string"),
        ('{"context": "a ", "choices": ["x", 3], "label": 0}', "line 2: choice 1 is a JSON number, not a string"),
        ("context,choices,label", "line 2 is not JSON"),
    ],
)
def test_bad_choices_files_are_one_line_and_nothing_is_written(lm_run, capsys, tmp_path, line, expected):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(GOOD + "\n" + line + "\n")
    before = (lm_run / "run" / "prune.json").read_bytes() if (lm_run / "run" / "prune.json").exists() else None
    for args in (["prune", lm_run / "run", "--sparsities", "0.5"], ["evaluate", lm_run / "run"]):
        rc, _, err = cli(capsys, *args, "--choices", bad)
        message = one_line_error(rc, err)
        assert f"{bad} {expected}" in message
    after = (lm_run / "run" / "prune.json").read_bytes() if (lm_run / "run" / "prune.json").exists() else None
    assert before == after


def test_a_run_pruned_by_wanda_before_scoring_takes_the_default_calibration(lm_run, capsys):
    """Without --calib-samples evaluate --choices --pruner wanda said '--calib-samples must be an integer in [1,
    1048576], got None'; it draws the default 128, as prune and export do."""
    args = ["evaluate", lm_run / "run", "--choices", lm_run / "q.jsonl", "--sparsity", "0.5", "--pruner", "wanda"]
    rc, out, err = cli(capsys, *args, "--json")
    assert rc == 0, err
    assert json.loads(out.splitlines()[-1])["pruned"]["pruner"] == "wanda"


def test_bad_conversions_are_one_line(capsys, tmp_path):
    src = tmp_path / "rows.jsonl"
    src.write_text(json.dumps({"goal": "g", "sol1": "a", "sol2": "b", "label": 0}) + "\n" + '{"goal": "g"}\n')
    rc, _, err = cli(capsys, "choices", "convert", "--format", "piqa", src, tmp_path / "out.jsonl")
    assert f"{src} line 2 lacks the field 'sol1' of a piqa row" in one_line_error(rc, err)
    assert not (tmp_path / "out.jsonl").exists()
    rc, _, err = cli(capsys, "choices", "convert", "--format", "mmlu", src, tmp_path / "out.jsonl")
    assert "mmlu" in one_line_error(rc, err) and not (tmp_path / "out.jsonl").exists()
    (tmp_path / "mine.txt").write_text("not mine\n")
    rc, _, err = cli(capsys, "choices", "convert", "--format", "piqa", src, tmp_path / "mine.txt")
    assert "mine.txt" in one_line_error(rc, err) and (tmp_path / "mine.txt").read_text() == "not mine\n"


def test_lm_eval_runs_a_local_task_on_the_run_in_memory(lm_run, capsys, tmp_path, monkeypatch):
    """--lm-eval through simple_evaluate and varprune's lm-eval model, on a task of the test's own (a YAML over
    local JSON lines holding the --choices file's questions): the same acc, acc_norm and n as --choices."""
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'varprune[eval]')")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    q = lm_run / "q.jsonl"
    items = read_choices(q)
    easy = [i for i in items.items if i.context.endswith(" ")]  # lm-eval's delimiter: one space
    from varprune.data.choices import ChoiceSet

    (tmp_path / "e.jsonl").write_text(
        "".join(json.dumps({"context": i.context, "choices": i.choices, "label": i.label}) + "\n" for i in easy)
    )
    _toy_task(tmp_path, [ChoiceSet("e", "e", tuple(easy))])
    args = ["evaluate", lm_run / "run", "--sparsity", "0.5", "--choices", tmp_path / "e.jsonl", "--json"]
    rc, out, err = cli(capsys, *args, "--lm-eval", "toy_mc", "--lm-eval-include", tmp_path)
    assert rc == 0, err
    got = json.loads(out.splitlines()[-1])["tasks"]
    assert got["toy_mc"] == {"acc": pytest.approx(got["e"]["acc"]), "acc_norm": pytest.approx(got["e"]["acc_norm"]),
                             "n": len(easy)}  # fmt: skip
    rc, _, err = cli(capsys, *args, "--lm-eval", "no_such_task", "--lm-eval-include", tmp_path)
    assert "no_such_task: not an lm-eval task" in one_line_error(rc, err)


def test_choices_on_a_run_that_is_no_language_model_is_one_line(capsys, tmp_path, lm_run):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(
        json.dumps({"train": {"model": "mlp", "dataset": "fashion-mnist"}, "resolved": {"task": "classification"}})
    )
    (run / ".varprune-run").write_text("{}\n")
    (run / "model.safetensors").write_bytes(b"")
    for command in ("prune", "evaluate"):
        rc, _, err = cli(capsys, command, run, "--choices", lm_run / "q.jsonl")
        assert "is a classification run" in one_line_error(rc, err)  # before any other problem is looked for
    assert sorted(p.name for p in run.iterdir()) == [".varprune-run", "config.json", "model.safetensors"]
    rc, _, err = cli(capsys, "evaluate", lm_run / "run", "--choices", lm_run / "q.jsonl", "--commonsense", tmp_path)
    assert "--commonsense is a separate measurement" in one_line_error(rc, err)


def test_study_reports_the_choices(lm_run, capsys, tmp_path):
    train = [a for a in LM if a not in ("--quiet",)]
    args = ["study", "--out", tmp_path / "s", "--methods", "sgd", "--seeds", "0", "--no-analysis", "--quiet"]
    rc, _, err = cli(capsys, *args, *train, "--data-dir", lm_run / "data", "--sparsities", "0.5",
                       "--choices", lm_run / "q.jsonl")  # fmt: skip
    assert rc == 0, err
    summary = json.loads((tmp_path / "s" / "report.json").read_text())
    assert summary["study"]["choices"] == ["q"]
    run = json.loads((tmp_path / "s" / "runs" / "sgd-s0" / "prune.json").read_text())
    cell = summary["methods"]["sgd"]["sparsities"]["0.5"]["choices"]
    assert cell["per_seed"] == [run["results"][0]["choices"]["mean"]["acc"]]
    assert "Multiple-choice accuracy (acc, %, the unweighted mean over q)" in (tmp_path / "s" / "report.md").read_text()
