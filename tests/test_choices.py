"""Multiple-choice accuracy (--choices): the files read strictly, the scoring against an independent float64
implementation of lm-eval-harness's loglikelihood definition, fortunes-endings, the public formats' conversion."""

from __future__ import annotations

import json
import random

import pytest
import torch

from varprune.data.choices import (
    FORMATS,
    ChoiceItem,
    ChoiceSet,
    convert_file,
    fortunes_endings,
    load_choice_sets,
    read_choices,
)
from varprune.data.tokenizer import train_tokenizer
from varprune.engine.choices import choice_results
from varprune.errors import DatasetError
from varprune.models import create_model

WORDS = tuple(
    [
        "the",
        "cat",
        "sat",
        "on",
        "a",
        "mat",
        "and",
        "dog",
        "ran",
        "far",
        "away",
        "while",
        "birds",
        "sang",
        "in",
        "green",
        "trees",
        "near",
        "old",
        "houses",
    ]
)


@pytest.fixture(scope="module")
def tok():
    rng = random.Random(0)
    return train_tokenizer([" ".join(rng.choices(WORDS, k=30)) for _ in range(100)], 300)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    m = create_model("gpt2", vocab_size=tok.vocab_size, max_positions=24, n_layer=1, n_embd=32, n_head=2)
    return m.eval()


def _reference(model, tok, sets, max_length):
    """lm-eval's definition written out independently: move the context's trailing whitespace to the
    continuation, encode both together, split at the context's token count, keep the last max_length + 1 tokens,
    sum the continuation's log-probabilities in float64 from the model's logits; acc/acc_norm by numpy-style
    first argmax of the sums and of the sums over the choice's length in characters."""
    out = {}
    for s in sets:
        acc = norm = 0
        for item in s.items:
            contexts = [item.context] * len(item.choices) if isinstance(item.context, str) else item.context
            lls = []
            for ctx, cont in zip(contexts, item.choices):
                stripped = ctx.rstrip()
                cont = ctx[len(stripped) :] + cont
                whole = tok.encode(stripped + cont)
                n = len(tok.encode(stripped))
                ids = whole[-(max_length + 1) :]
                k = len(whole) - n  # continuation tokens
                with torch.no_grad():
                    logits = model(torch.tensor([ids[:-1]])).logits[0].double()
                logp = torch.log_softmax(logits, -1)
                lls.append(sum(logp[len(ids) - 1 - k + j, ids[len(ids) - k + j]].item() for j in range(k)))
            best = max(range(len(lls)), key=lambda i: (lls[i], -i))
            normed = [ll / len(c) for ll, c in zip(lls, item.choices)]
            best_norm = max(range(len(lls)), key=lambda i: (normed[i], -i))
            acc += best == item.label
            norm += best_norm == item.label
        out[s.name] = {"acc": acc / len(s.items), "acc_norm": norm / len(s.items), "n": len(s.items), "lls": None}
    return out


def _random_set(name, seed, n, k=3, long=False):
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        ctx = " ".join(rng.choices(WORDS, k=rng.randint(1, 30 if long else 6))) + rng.choice(["", " ", "  "])
        choices = tuple(" ".join(rng.choices(WORDS, k=rng.randint(1, 4))) for _ in range(k))
        items.append(ChoiceItem(ctx, choices, rng.randrange(k)))
    return ChoiceSet(name, name, tuple(items))


def test_scores_match_lm_eval_definition(model, tok):
    sets = [_random_set("a", 1, 12), _random_set("b", 2, 9, k=2, long=True)]  # long: truncated to the positions
    wino = ChoiceSet("w", "w", (ChoiceItem(("the cat sat ", "a dog ran "), ("on a mat", "on a mat"), 1),))
    sets.append(wino)
    got = choice_results(model, tok, sets, 24, "cpu")
    want = _reference(model, tok, sets, 24)
    for name, w in want.items():
        assert got["tasks"][name]["n"] == w["n"]
        assert got["tasks"][name]["acc"] == pytest.approx(w["acc"])
        assert got["tasks"][name]["acc_norm"] == pytest.approx(w["acc_norm"])
    assert got["mean"]["acc"] == pytest.approx(sum(w["acc"] for w in want.values()) / 3)


def test_batching_under_a_small_memory_bound_gives_the_same_scores(model, tok):
    from varprune.engine.choices import prefix_token
    from varprune.tasks.choices import encode_pair, loglikelihoods

    s = _random_set("a", 3, 10)
    reqs = [encode_pair(tok.encode, c, x, prefix_token(tok)) for i in s.items for c, x in i.requests()]
    big = loglikelihoods(model, reqs, 24, torch.device("cpu"))
    small = loglikelihoods(model, reqs, 24, torch.device("cpu"), logits_bytes=1)  # one sequence a batch
    assert big == pytest.approx(small, abs=1e-5)
    assert len(set(big)) > 1


def test_encode_pair_moves_trailing_whitespace(tok):
    from varprune.tasks.choices import encode_pair

    ctx, cont = encode_pair(tok.encode, "the cat ", "sat", None)
    assert ctx == tok.encode("the cat") and ctx + cont == tok.encode("the cat sat")
    with pytest.raises(ValueError, match="empty context"):
        encode_pair(tok.encode, "  ", "sat", None)
    assert encode_pair(tok.encode, "", "sat", 7) == ([7], tok.encode("sat"))


def _write(path, lines):
    path.write_text("".join(x + "\n" for x in lines))
    return path


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"context": "a", "choices": ["x", "y"], "label": 2}', "label 2 is outside the 2 choices"),
        ('{"context": "a", "choices": ["x"], "label": 0}', "two or more strings, got 1 choice"),
        ('{"context": "a", "choices": [], "label": 0}', "two or more strings, got 0 choice"),
        ('{"context": 3, "choices": ["x", "y"], "label": 0}', "'context' is a JSON number, not a string"),
        ('{"context": "a", "choices": ["x", null], "label": 0}', "choice 1 is a JSON null, not a string"),
        ('{"context": "a", "choices": ["x", ""], "label": 0}', "choice 1 is empty"),
        ('{"context": "a", "choices": ["x", "y"], "label": true}', "'label' is a JSON boolean"),
        ('{"context": "a", "choices": ["x", "y"]}', "lacks the field 'label'"),
        ('{"context": "a", "choices": ["x", "y"], "label": 0', "is not JSON"),
        ('["a"]', "is a JSON array, not an object"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    good = '{"context": "a", "choices": ["x", "y"], "label": 0}'
    path = _write(tmp_path / "t.jsonl", [good, "", line])
    with pytest.raises(DatasetError, match=message) as e:
        read_choices(path)
    assert f"{path} line 3" in str(e.value)


def test_an_empty_choices_file_is_not_called_a_split(tmp_path):
    """The empty-file line is every reader's (text splits, --choices, choices convert): it may not speak of a
    split's text where the file is a question file."""
    path = tmp_path / "q.jsonl"
    path.write_text("")
    with pytest.raises(DatasetError) as e:
        read_choices(path)
    assert str(e.value) == f"{path} is empty (0 bytes); fill it, or point at the file that holds the data"


def test_read_choices_and_duplicate_names(tmp_path):
    path = _write(tmp_path / "t.jsonl", ['{"context": "a", "choices": ["x", "y"], "label": 1}'])
    s = read_choices(path)
    assert s.name == "t" and s.items == (ChoiceItem("a", ("x", "y"), 1),)
    (tmp_path / "d").mkdir()
    _write(tmp_path / "d" / "t.jsonl", ['{"context": "a", "choices": ["x", "y"], "label": 1}'])
    with pytest.raises(DatasetError, match="twice"):
        load_choice_sets([str(path), str(tmp_path / "d" / "t.jsonl")])
    with pytest.raises(DatasetError, match="not a file"):
        load_choice_sets([str(tmp_path / "none.jsonl")])
    _write(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(DatasetError, match="holds no question"):
        read_choices(tmp_path / "empty.jsonl")


def _fortunes(tmp_path, n=40):
    rng = random.Random(5)
    entries = [" ".join(rng.choices(WORDS, k=rng.randint(2, 12))) + f" {i}." for i in range(n)]
    folder = tmp_path / "fortunes"
    folder.mkdir()
    (folder / "misc").write_text("\n%\n".join(entries) + "\n%\n")
    return folder


def test_fortunes_endings(tmp_path):
    from varprune.data.text import split_of

    folder = _fortunes(tmp_path, 200)
    s = fortunes_endings(folder)
    again = fortunes_endings(folder)
    assert s == again and s.name == "fortunes-endings"
    test = [e for e in (folder / "misc").read_text().split("\n%\n") if e.strip() and split_of(e.strip()) == "test"]
    long = [e.strip() for e in test if 4 <= len(e.split()) <= 32]
    assert len(s.items) == len(long) >= 4
    labels = set()
    for item, entry in zip(s.items, long):
        assert len(item.choices) == 4 and len(set(item.choices)) == 4
        assert item.context + item.choices[item.label] == entry
        assert entry.startswith(item.context) and item.context.endswith(" ")
        assert abs(len(item.context) - len(entry) / 2) <= max(len(w) for w in entry.split()) + 1
        labels.add(item.label)
    assert len(labels) > 1  # the true ending's place varies


# ----------------------------------------------------------------- conversion: hand-made rows in each format

ROWS = {
    "boolq": (
        {"passage": "Cats purr.", "question": "do cats purr", "label": 1},
        {"context": "Cats purr.\nQuestion: do cats purr?\nAnswer: ", "choices": ["no", "yes"], "label": 1},
    ),
    "piqa": (
        {"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Eat the lid.", "label": 0},
        {"context": "Question: Open a jar\nAnswer: ", "choices": ["Twist the lid.", "Eat the lid."], "label": 0},
    ),
    "siqa": (
        {
            "context": "Ann slept.",
            "question": "Why?",
            "answerA": "tired",
            "answerB": "hungry",
            "answerC": "sad",
            "label": "1",
        },
        {"context": "Q: Ann slept. Why?\nA: ", "choices": ["tired", "hungry", "sad"], "label": 0},
    ),
    "hellaswag": (
        {
            "activity_label": "Cooking",
            "ctx_a": "A man cuts onions.",
            "ctx_b": "he",
            "label": "2",
            "endings": ["cries [title] a lot.", "sings.", "puts  them in a pan.", "leaves."],
        },
        {
            "context": "Cooking: A man cuts onions. He ",
            "choices": ["cries. a lot.", "sings.", "puts them in a pan.", "leaves."],
            "label": 2,
        },
    ),
    "winogrande": (
        {
            "sentence": "The cup fell off the table because _ was wobbly.",
            "option1": "the cup",
            "option2": "the table",
            "answer": "2",
        },
        {
            "context": ["The cup fell off the table because the cup ", "The cup fell off the table because the table "],
            "choices": ["was wobbly.", "was wobbly."],
            "label": 1,
        },
    ),
    "arc": (
        {
            "question": "What is ice?",
            "choices": {"text": ["water", "fire", "air"], "label": ["A", "B", "C"]},
            "answerKey": "A",
        },
        {"context": "Question: What is ice?\nAnswer: ", "choices": ["water", "fire", "air"], "label": 0},
    ),
    "openbookqa": (
        {
            "question_stem": "The sun is a",
            "choices": {"text": ["star", "moon", "rock", "cloud"], "label": ["A", "B", "C", "D"]},
            "answerKey": "A ",
        },
        {"context": "The sun is a ", "choices": ["star", "moon", "rock", "cloud"], "label": 0},
    ),
}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_convert_each_format(tmp_path, fmt):
    row, want = ROWS[fmt]
    src = _write(tmp_path / "in.jsonl", [json.dumps(row)])
    n = convert_file(fmt, src, tmp_path / "out.jsonl")
    assert n == 1
    assert json.loads((tmp_path / "out.jsonl").read_text()) == want
    assert read_choices(tmp_path / "out.jsonl").items[0].label == want["label"]
    (tmp_path / "list.json").write_text(json.dumps([row, row]))  # a JSON list as well
    assert convert_file(fmt, tmp_path / "list.json", tmp_path / "out2.jsonl") == 2


def test_convert_refuses_rows_of_another_format(tmp_path):
    src = _write(tmp_path / "in.jsonl", [json.dumps(ROWS["piqa"][0]), json.dumps(ROWS["boolq"][0])])
    with pytest.raises(DatasetError, match=r"in.jsonl line 2 lacks the field 'goal' of a piqa row"):
        convert_file("piqa", src, tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()
    with pytest.raises(DatasetError, match="unknown format"):
        convert_file("mmlu", src, tmp_path / "out.jsonl")


# ----------------------------------------------------------------- cross-check with lm-eval-harness itself


def _toy_task(folder, sets, name="toy_mc"):
    """An lm-eval task of our own over local JSON lines: the questions of ``sets[0]`` (string contexts), the
    context's trailing space left to lm-eval's target_delimiter, as its own tasks do."""
    rows = [{"ctx": i.context.rstrip(), "opts": list(i.choices), "gold": i.label} for i in sets[0].items]
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'data.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{ctx}}'\ndoc_to_choice: '{{opts}}'\n"
        "doc_to_target: gold\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    return folder


@pytest.mark.slow  # lm-eval's import and task loading: about 30 s on 2 cores
def test_lm_eval_itself_agrees_and_runs_on_the_model_in_memory(tok, tmp_path, monkeypatch):
    """lm-eval's own HFLM on the same model and tokenizer (through transformers' fast tokenizer over the same
    tokenizers object) gives the acc and acc_norm that varprune computes; `--lm-eval` (varprune's LM wrapper
    through simple_evaluate) gives them too. The model is its own (the module's may have been changed by the
    tests before) with weights scaled up, so that no two choices' scores are within float noise of a tie (an
    untrained model's near-uniform scores made the argmax depend on summation order)."""
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'varprune[eval]')")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import PreTrainedTokenizerFast

    torch.manual_seed(0)
    model = create_model("gpt2", vocab_size=tok.vocab_size, max_positions=24, n_layer=1, n_embd=32, n_head=2).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4)
    rng = random.Random(7)
    items = []
    for _ in range(16):  # contexts that end in one space: lm-eval's delimiter, so the two files are the same
        ctx = " ".join(rng.choices(WORDS, k=rng.randint(2, 6))) + " "
        choices = tuple(" ".join(rng.choices(WORDS, k=rng.randint(1, 4))) for _ in range(3))
        items.append(ChoiceItem(ctx, choices, rng.randrange(3)))
    sets = [ChoiceSet("toy_mc", "toy", tuple(items))]
    ours = choice_results(model, tok, sets, 24, "cpu")["tasks"]["toy_mc"]
    folder = _toy_task(tmp_path, sets)
    manager = TaskManager(include_path=str(folder), include_defaults=False)  # only the test's task: fast
    from tokenizers import Tokenizer

    doc = json.loads(tok.tokenizer.to_str())
    doc["post_processor"] = None  # as `export --format hf` writes a language model's tokenizer: no <cls> added
    plain = Tokenizer.from_str(json.dumps(doc))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=plain, eos_token="<pad>", pad_token="<pad>")
    hflm = HFLM(pretrained=model, tokenizer=hf_tok, backend="causal", batch_size=4, max_length=24)
    found = simple_evaluate(model=hflm, tasks=["toy_mc"], task_manager=manager, bootstrap_iters=0)
    assert found is not None
    theirs = found["results"]["toy_mc"]
    assert theirs["acc,none"] == pytest.approx(ours["acc"])
    assert theirs["acc_norm,none"] == pytest.approx(ours["acc_norm"])


# ----------------------------------------------------------------- results files with choices


def _doc_with_choices():
    def c(acc, norm):
        return {"tasks": {"q": {"acc": acc, "acc_norm": norm, "n": 20}}, "mean": {"acc": acc, "acc_norm": norm}}

    return {
        "metric": "perplexity",
        "higher_is_better": False,
        "dense_perplexity": 10.0,
        "bn_retuning": False,
        "dense_choices": c(0.5, 0.55),
        "results": [
            {
                "pruner": "magnitude",
                "sparsity": 0.5,
                "realised_sparsity": 0.5,
                "perplexity": 11.0,
                "choices": c(0.4, 0.45),
            },
            {
                "pruner": "magnitude",
                "sparsity": 0.9,
                "realised_sparsity": 0.9,
                "perplexity": 30.0,
                "choices": c(0.3, 0.25),
            },
        ],
    }


def test_prune_json_with_choices_is_checked_on_reading(tmp_path):
    from varprune.errors import RunError
    from varprune.report.results import read_prune_json

    doc = _doc_with_choices()
    (tmp_path / "prune.json").write_text(json.dumps(doc))
    assert read_prune_json(tmp_path)["results"][1]["choices"]["mean"]["acc"] == 0.3
    for edit, message in [
        (lambda d: d["results"][0]["choices"]["tasks"]["q"].update(acc=1.5), r"results\[0\].choices: q: acc"),
        (lambda d: d["dense_choices"]["tasks"]["q"].update(n=0), "dense_choices: q: n is 0"),
        (lambda d: d["results"][1].pop("choices"), r"results\[1\].choices: not an object"),
        (lambda d: d["results"][1]["choices"].update(tasks={"other": d["dense_choices"]["tasks"]["q"]}), "not the "),
        (lambda d: d.pop("dense_choices"), "dense_choices is missing"),
    ]:
        bad = json.loads(json.dumps(doc))
        edit(bad)
        (tmp_path / "prune.json").write_text(json.dumps(bad))
        with pytest.raises(RunError, match=message):
            read_prune_json(tmp_path)


def test_csv_table_and_plot_carry_the_choices(tmp_path):
    import csv

    from varprune.report.figures import sweep_plot
    from varprune.report.tables import sweep_csv, sweep_table

    doc = _doc_with_choices()
    rows = list(csv.DictReader(sweep_csv(doc).splitlines()))
    assert [float(r["q_acc"]) for r in rows] == [0.4, 0.3]
    assert [float(r["choices_acc_norm"]) for r in rows] == [0.45, 0.25]
    table = sweep_table([("run", doc)])
    assert "| run | 50.00 / 55.00 | 40.00 / 45.00 | 30.00 / 25.00 |" in table and "q (20 questions)" in table
    sweep_plot([("run", doc)], tmp_path / "p.png")
    plain = json.loads(json.dumps(doc))
    for r in plain["results"]:
        r.pop("choices")
    plain.pop("dense_choices")
    sweep_plot([("run", plain)], tmp_path / "q.png")
    from PIL import Image

    assert Image.open(tmp_path / "p.png").size[1] > 1.5 * Image.open(tmp_path / "q.png").size[1]  # a second panel
    assert "Multiple-choice" not in sweep_table([("run", plain)]) and "choices_acc" not in sweep_csv(plain)


def test_study_summary_and_table_carry_the_choices():
    from varprune.report.summary import summarize
    from varprune.report.tables import study_table

    docs = {}
    for m, shift in (("sgd", 0.0), ("var", 0.1)):
        for seed in (0, 1, 2):
            d = _doc_with_choices()
            for c in [d["dense_choices"]] + [r["choices"] for r in d["results"]]:
                c["mean"]["acc"] = round(c["mean"]["acc"] + shift + 0.01 * seed, 6)
            docs[(m, seed)] = d
    spec = {"methods": ["sgd", "var"], "seeds": [0, 1, 2], "sparsities": [0.5, 0.9], "patterns": [],
            "choices": ["q"], "scope": "global", "bnt_batches": 0, "bnt_batch_size": 2,
            "train": {"model": "gpt2", "dataset": "text", "epochs": 1}}  # fmt: skip
    summary = summarize(spec, docs, {"sgd": 1.0, "var": 1.0})
    var = summary["methods"]["var"]
    assert var["choices_dense"]["acc"][0] == pytest.approx(0.61)
    assert var["sparsities"]["0.9"]["choices"]["per_seed"] == pytest.approx([0.4, 0.41, 0.42])
    assert var["sparsities"]["0.9"]["choices"]["ci95"][0] < 0.41 < var["sparsities"]["0.9"]["choices"]["ci95"][1]
    table = study_table(summary)
    assert "Multiple-choice accuracy (acc, %, the unweighted mean over q)" in table
    assert "| var | 61.00 [" in table and "| sgd | 51.00 [" in table
