"""Commonsense accuracy as LLM-Adapters measures it (`evaluate ... --commonsense DIR`): a tiny GPT-2 fine-tuned on
a handful of instruction records until it emits their answers, scored by varprune (batched, left-padded
generation) and by an independent loop here (one prompt at a time, no padding, no cache, transformers' model
from the exported folder, this file's own extraction); bad input exits 2 with one line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from tests.helpers import one_line_error

from varprune.cli import main
from varprune.tasks.generation import extract_answer

NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{}\n\n### Response:\n"
)
BOOLQ = [
    ("is fire hot", "true"),
    ("is ice hot", "false"),
    ("do fish swim", "true"),
    ("do rocks fly", "false"),
    ("is snow cold", "true"),
    ("is sugar sour", "false"),
]
WINO = [
    ("the cup fell because _ slipped", "option1"),
    ("the dog ran after _ quickly", "option2"),
    ("she paid since _ owed", "option2"),
    ("he lifted it as _ was light", "option1"),
]
# the rules as LLM-Adapters' commonsense_evaluate.py states them, written out again for the check
RULES = {
    "boolq": ["true", "false"],
    "piqa": ["solution1", "solution2"],
    "social_i_qa": [f"answer{i}" for i in range(1, 6)],
    "ARC-Easy": [f"answer{i}" for i in range(1, 6)],
    "ARC-Challenge": [f"answer{i}" for i in range(1, 6)],
    "openbookqa": [f"answer{i}" for i in range(1, 6)],
    "hellaswag": [f"ending{i}" for i in range(1, 5)],
    "winogrande": ["option1", "option2"],
}


def first_answer(task: str, text: str) -> str:
    """The earliest position at which one of the task's answers starts (the longest there), or ''."""
    hits = [(text.find(a), -len(a), a) for a in RULES[task] if a in text]
    return min(hits)[2] if hits else ""


@pytest.mark.parametrize(
    "task, text",
    [
        ("boolq", " the correct answer is false, not true"),
        ("boolq", "True or False"),
        ("piqa", "solution2 solution1"),
        ("social_i_qa", "answer is answer5"),
        ("ARC-Challenge", "answer12"),
        ("openbookqa", "nothing"),
        ("hellaswag", "ending4 or ending1"),
        ("hellaswag", "ending5"),
        ("winogrande", "xoption2option1"),
    ],
)
def test_extraction_is_the_first_match_of_the_task_rule(task, text):
    assert extract_answer(task, text) == first_answer(task, text)


def sets(root: Path) -> Path:
    (root / "boolq").mkdir(parents=True)
    (root / "winogrande").mkdir()
    (root / "notes").mkdir()  # no test.json: not a task, skipped
    boolq = [{"instruction": f"Question: {q}? Answer format: true/false", "answer": a} for q, a in BOOLQ]
    wino = [{"instruction": f"Fill: {q} Answer format: option1/option2", "answer": a} for q, a in WINO]
    (root / "boolq" / "test.json").write_text(json.dumps(boolq, indent=1))
    (root / "winogrande" / "test.json").write_text(json.dumps(wino, indent=1))
    return root


@pytest.fixture(scope="module")
def memorised(tmp_path_factory):
    """A tiny GPT-2 trained on the test records' instructions with 'the correct answer is X' as output."""
    root = tmp_path_factory.mktemp("cs")
    tasks = sets(root / "tasks")
    rows = [r for t in ("boolq", "winogrande") for r in json.loads((tasks / t / "test.json").read_text())]
    train = [{"instruction": r["instruction"], "output": f"the correct answer is {r['answer']}"} for r in rows]
    (root / "d").mkdir()
    for split in ("train", "test"):
        (root / "d" / f"{split}.json").write_text(json.dumps(train))
    run = root / "run"
    model = ["--model", "gpt2", "--model-arg", "n_layer=1", "--model-arg", "n_embd=64", "--model-arg", "n_head=2"]
    args = [*model, "--max-length", "128", "--vocab-size", "400", "--epochs", "20", "--batch-size", "4"]
    assert main(["train", "--dataset", "instructions", *args, "--lr", "0.01", "--device", "cpu", "--quiet",
                 "--data-dir", str(root / "d"), "--out", str(run)]) == 0  # fmt: skip
    folder = root / "hf"
    assert main(["export", str(run), "--sparsity", "0", "--format", "hf", "--out", str(folder)]) == 0
    return run, tasks, folder


def independent_accuracy(folder: Path, tasks: Path) -> dict:
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    eos = tok.token_to_id("<eos>")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    out = {}
    for task in ("boolq", "winogrande"):
        rows = json.loads((tasks / task / "test.json").read_text())
        right = 0
        for r in rows:
            ids = tok.encode(NO_INPUT.format(r["instruction"]), add_special_tokens=False).ids
            new: list[int] = []
            for _ in range(32):
                with torch.no_grad():
                    nxt = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
                if nxt == eos:
                    break
                new.append(nxt)
            right += first_answer(task, tok.decode(new, skip_special_tokens=True).strip()) == r["answer"]
        out[task] = right / len(rows)
    return out


@pytest.mark.slow  # about 10 s of training on a shared 2-core machine
def test_generation_accuracy_against_an_independent_loop(memorised, capsys):
    run, tasks, folder = memorised
    capsys.readouterr()
    assert main(["evaluate", str(run), "--commonsense", str(tasks), "--batch-size", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    expected = independent_accuracy(folder, tasks)
    assert {t: v["accuracy"] for t, v in result["tasks"].items()} == pytest.approx(expected, abs=1e-12)
    assert result["tasks"]["boolq"]["n"] == 6 and result["tasks"]["winogrande"]["n"] == 4
    assert result["average"] == pytest.approx(sum(expected.values()) / 2)
    assert result["average"] >= 0.75  # far from chance (0.5): the model emits the answers it was taught
    # the exported folder, read as a Hugging Face folder, answers the same
    assert main(["evaluate", f"hf:{folder}", "--commonsense", str(tasks), "--json"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["tasks"] == result["tasks"]


@pytest.mark.parametrize(
    "make, expect",
    [
        (lambda t: (t / "mmlu").mkdir() or (t / "mmlu" / "test.json").write_text("[]"), "'mmlu' is not a commonsense"),
        (
            lambda t: (t / "boolq" / "test.json").write_text(
                '[{"instruction": "q", "answer": "true"},\n {"instruction": "q"}]'
            ),
            "boolq/test.json record 2 (line 2) lacks the field 'answer'",
        ),
        (lambda t: (t / "winogrande" / "test.json").write_text("[{]"), "winogrande/test.json line 1 is not JSON"),
    ],
)
def test_bad_sets_exit_2_with_one_line(tmp_path, capsys, make, expect):
    run = tmp_path / "model.safetensors"
    run.write_bytes(b"never read: the test sets are checked first")
    tasks = sets(tmp_path / "tasks")
    make(tasks)
    capsys.readouterr()
    rc = main(["evaluate", str(run), "--commonsense", str(tasks)])
    line = one_line_error(rc, capsys.readouterr().err)
    assert expect in line, line
    assert re.search(r"test\.json", line)
