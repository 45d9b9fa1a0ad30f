"""Instruction data (`--dataset instructions`): the records and their Alpaca prompts, the batches (the prompt
carries no loss, padding hidden), bad input, and end to end through the CLI: train with truncation counted,
prune with every pruner, export, and the response perplexity against an independent float64 computation from
the exported folder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.helpers import one_line_error as _one_line

from varprune.data.base import DatasetError
from varprune.data.instructions import load, read_instructions


def one_line_error(capsys, main, argv) -> str:
    rc = main(argv)
    return _one_line(rc, capsys.readouterr().err)


# the Alpaca prompts as tatsu-lab/stanford_alpaca writes them, spelled out independently of the package
WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
    "response that appropriately completes the request.\n\n### Instruction:\n{}\n\n### Input:\n{}\n\n### Response:\n"
)
NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{}\n\n### Response:\n"
)
WORDS = ["red", "green", "blue", "cat", "dog", "sun", "moon", "tree", "river", "stone", "bird", "fish"]


def records(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a, b = (WORDS[k] for k in rng.choice(len(WORDS), 2, replace=False))
        r = {
            "instruction": f"Join {a} and {b}.",
            "output": f"{a} {b} " * (12 if i % 8 == 7 else 1 + i % 4),
            "answer": "x",
        }
        if i % 3 == 0:
            r["input"] = f"{b} then {a}"
        out.append(r)
    return out


def expected_prompt(r: dict) -> str:
    return WITH_INPUT.format(r["instruction"], r["input"]) if r.get("input") else NO_INPUT.format(r["instruction"])


def write(folder: Path, train: list, test: list, as_list: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.json").write_text(json.dumps(train, indent=2))
    (folder / ("test.json" if as_list else "test.jsonl")).write_text(
        json.dumps(test, indent=1) if as_list else "".join(json.dumps(r) + "\n" for r in test)
    )
    return folder


def test_prompts_are_alpaca_character_for_character_in_either_file_form(tmp_path):
    rows = records(7) + [{"instruction": "Say hi.", "input": None, "output": "hi"}]
    (tmp_path / "a.json").write_text(json.dumps(rows, indent=2))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    for name in ("a.json", "b.jsonl"):
        prompts, responses, _ = read_instructions(tmp_path / name)
        assert prompts == [expected_prompt(r) for r in rows]
        assert responses == [r["output"] for r in rows]
    assert read_instructions(tmp_path / "b.jsonl")[2] == list(range(1, 9))
    assert read_instructions(tmp_path / "a.json")[2][:2] == [2, 8]  # each record's first line in the list


@pytest.mark.parametrize(
    "text, where",
    [
        ('[{"instruction": "a", "output": "b"},\n {"output": "b"}]', "record 2 (line 2)"),
        ('{"instruction": "a", "output": "b"}\n\n{"instruction": "a"}\n', "record 2 (line 3)"),
        ('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": 3}\n', "record 2 (line 2)"),
        ('{"instruction": "a", "output": "b"}\n{"instruction": "a", \n', "line 2 is not JSON"),
        ('[{"instruction": "a", "output": "b"}\n {"instruction": "c", "output": "d"}]', "line 2: expected ','"),
        ('["just text"]', "record 1 (line 1) is a JSON string"),
    ],
)
def test_bad_records_name_file_and_line(tmp_path, text, where):
    (tmp_path / "train.jsonl").write_text(text)
    (tmp_path / "test.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    with pytest.raises(DatasetError) as e:
        load("instructions", tmp_path)
    assert "\n" not in str(e.value) and f"train.jsonl {where}" in str(e.value), str(e.value)


def test_batches_mask_the_prompt_and_the_padding(tmp_path):
    from varprune.data.instructtokens import IGNORE_INDEX, InstructionLoader, encode_instructions
    from varprune.data.tokenizer import train_tokenizer

    rows = records(40)
    corpus = load("instructions", write(tmp_path, rows, rows[:5]))
    tok = train_tokenizer(corpus, 400)
    eos = tok.tokenizer.token_to_id("<eos>")
    assert tok.eos_id == eos == 2
    raw = [tok.tokenizer.encode(expected_prompt(r) + r["output"], add_special_tokens=False).ids + [eos] for r in rows]
    prompts = [len(tok.tokenizer.encode(expected_prompt(r), add_special_tokens=False).ids) for r in rows]
    cut = max(prompts) + 2  # the longest prompt keeps two response tokens; longer examples are cut
    enc = encode_instructions(tok, corpus.splits["train"], cut)
    assert enc.truncated == sum(len(ids) > cut for ids in raw) > 0
    loader = InstructionLoader(enc, 4, train=True, seed=3, window=3)
    seen = []
    for x, y in loader:
        ids, mask = x["input_ids"], x["attention_mask"]
        assert ids.shape == y.shape == mask.shape and mask[:, 0].all()
        for row in range(len(ids)):
            n = int(mask[row].sum())
            assert mask[row, :n].all() and not mask[row, n:].any()  # right padding, hidden
            i = next(k for k, r in enumerate(raw) if r[:n] == ids[row, :n].tolist() and k not in seen)
            seen.append(i)
            p = prompts[i]
            assert (y[row, :p] == IGNORE_INDEX).all() and (y[row, n:] == IGNORE_INDEX).all()
            assert y[row, p:n].tolist() == raw[i][p:n]
            assert n == min(len(raw[i]), cut)
    assert sorted(seen) == list(range(40))  # every example once an epoch
    # calibration inputs: whole training examples (prompt, response, EOS), distinct, unpadded, cut to seq_len
    from varprune.data.instructtokens import instruction_calibration

    whole = [c["input_ids"][0].tolist() for c in instruction_calibration(enc, 6, None, seed=0)]
    assert len({tuple(w) for w in whole}) == 6
    assert all(any(w == r[:cut] for r in raw) and prompts[raw.index(next(r for r in raw if w == r[:cut]))] < len(w)
               for w in whole)  # fmt: skip
    short = [c["input_ids"][0].tolist() for c in instruction_calibration(enc, 6, 20, seed=0)]
    assert short == [w[:20] for w in whole]
    widths = [int(x["attention_mask"].sum(1).max()) for x, _ in loader]
    padded = sum(int((1 - x["attention_mask"]).sum()) for x, _ in loader)
    assert len(widths) == 10 and padded < sum(widths) * 4 // 4  # sorted windows keep padding below one row a batch


def test_shares_and_loss_weights_give_the_one_process_gradient(tmp_path):
    """Under torchrun each process takes a contiguous share of every global batch and averages its loss over its
    own response tokens; weighted by loss_weight, the processes' mean gradient is one process's."""
    from varprune.data.instructtokens import InstructionLoader, encode_instructions
    from varprune.data.tokenizer import train_tokenizer
    from varprune.tasks import InstructionTuning

    corpus = load("instructions", write(tmp_path, records(30), records(3)))
    tok = train_tokenizer(corpus, 400)
    enc = encode_instructions(tok, corpus.splits["train"], 256)
    single = InstructionLoader(enc, 8, train=True, seed=1, window=2)
    shards = [InstructionLoader(enc, 8, train=True, seed=1, rank=r, world=2, window=2) for r in range(2)]
    one, many = list(single), [list(s) for s in shards]
    assert len(one) == len(many[0]) == len(many[1]) == 4
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(tok.vocab_size, 4, dtype=torch.float64, generator=g)
    head = torch.randn(4, tok.vocab_size, dtype=torch.float64, generator=g)
    task = InstructionTuning(0)

    def grad(x, y, weight=1.0):
        e = emb.clone().requires_grad_(True)
        (task.loss(e[x["input_ids"]] @ head, y) * weight).backward()
        return e.grad

    differs = False
    for step, (x, y) in enumerate(one):
        ids = [m[step][0]["input_ids"] for m in many]
        assert sum(len(i) for i in ids) == len(x["input_ids"])
        ddp = sum(grad(*m[step], s.loss_weight(step)) for m, s in zip(many, shards)) / 2
        torch.testing.assert_close(ddp, grad(x, y), rtol=1e-5, atol=1e-7)
        unweighted = sum(grad(*m[step]) for m in many) / 2
        differs |= not torch.allclose(unweighted, grad(x, y), rtol=1e-3)
    assert differs  # the weights matter: the shares hold different numbers of response tokens


SEQ = 64
TRAIN = [
    "--dataset",
    "instructions",
    "--model",
    "gpt2",
    "--model-arg",
    "n_layer=1",
    "--model-arg",
    "n_embd=32",
    "--model-arg",
    "n_head=2",
    "--max-length",
    str(SEQ),
    "--vocab-size",
    "400",
    "--epochs",
    "2",
    "--batch-size",
    "8",
    "--device",
    "cpu",
]


def test_prompt_longer_than_max_length_and_bad_records_exit_2_writing_nothing(tmp_path, capsys):
    from varprune.cli import main

    rows = records(12)
    long = dict(rows[0], instruction="word " * 200)
    data = write(tmp_path / "d", rows[:5] + [long] + rows[5:], rows[:4], as_list=False)
    out = tmp_path / "run"
    message = one_line_error(capsys, main, ["train", *TRAIN, "--data-dir", str(data), "--out", str(out)])
    assert "train.json record 6 (line " in message and "--max-length 64" in message
    assert not out.exists()
    (data / "test.jsonl").write_text('{"instruction": "a"}\n')
    data2 = write(tmp_path / "e", rows, rows[:2], as_list=False)
    (data2 / "test.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"output": "b"}\n')
    message = one_line_error(capsys, main, ["train", *TRAIN, "--data-dir", str(data2), "--out", str(out)])
    assert "test.jsonl record 2 (line 2) lacks the field 'instruction'" in message and not out.exists()


def _independent_perplexity(folder: Path, test: list[dict]) -> float:
    """transformers' model and tokenizers' tokenizer from the exported folder, in float64: each example is the
    prompt, the output and the folder's EOS, cut at SEQ tokens; the NLL of every token after the prompt."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    eos = json.loads((folder / "config.json").read_text())["eos_token_id"]
    assert tok.id_to_token(eos) == "<eos>"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    total, count = 0.0, 0
    for r in test:
        prompt = tok.encode(expected_prompt(r), add_special_tokens=False).ids
        ids = (tok.encode(expected_prompt(r) + r["output"], add_special_tokens=False).ids + [eos])[:SEQ]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        for t in range(len(prompt), len(ids)):
            total -= float(logp[t - 1, ids[t]])
            count += 1
    return math.exp(total / count)


def test_train_prune_export_and_response_perplexity_against_float64(tmp_path, capsys):
    from varprune.cli import main

    train, test = records(64, seed=1), records(10, seed=2)
    data = write(tmp_path / "d", train, test)
    run = tmp_path / "run"
    assert main(["train", *TRAIN, "--method", "var", "--data-dir", str(data), "--out", str(run)]) == 0
    log = capsys.readouterr()
    # the log counts the examples cut at --max-length, as an independent encoding counts them
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(run / "tokenizer.json"))
    cut = sum(len(tok.encode(expected_prompt(r) + r["output"], add_special_tokens=False).ids) + 1 > SEQ for r in train)
    assert 0 < cut < len(train) and f"train {cut} of {len(train)}" in log.out + log.err
    resolved = json.loads((run / "config.json").read_text())["resolved"]
    assert resolved["truncated_examples"]["train"] == cut

    assert main(["prune", str(run), "--sparsities", "0.5", "--pruners", "magnitude,wanda,sparsegpt",
                 "--calib-samples", "8"]) == 0  # fmt: skip
    prune = json.loads((run / "prune.json").read_text())
    assert prune["metric"] == "perplexity" and {r["pruner"] for r in prune["results"]} == {
        "magnitude",
        "wanda",
        "sparsegpt",
    }
    exported, folder = tmp_path / "model.safetensors", tmp_path / "hf"
    flags = ["--sparsity", "0.5", "--pruner", "wanda", "--calib-samples", "8"]
    assert main(["export", str(run), *flags, "--out", str(exported)]) == 0
    assert main(["export", str(run), *flags, "--format", "hf", "--out", str(folder)]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(exported), "--json"]) == 0
    measured = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    wanda = next(r for r in prune["results"] if r["pruner"] == "wanda")
    assert measured["perplexity"] == pytest.approx(wanda["perplexity"], rel=1e-6)
    assert measured["perplexity"] == pytest.approx(_independent_perplexity(folder, test), rel=1e-4)
    # masked fine-tuning of the pruned model keeps its zeros and reports the response perplexity
    ft = tmp_path / "ft"
    assert main(["finetune", str(run), "--out", str(ft), *flags, "--epochs", "1", "--quiet"]) == 0
    from safetensors.torch import load_file

    weights = load_file(ft / "model.safetensors")
    zeros = sum(
        int((weights[k] == 0).sum()) for k in weights if ".h.0." in k and k.endswith("weight") and "ln" not in k
    )
    total = sum(weights[k].numel() for k in weights if ".h.0." in k and k.endswith("weight") and "ln" not in k)
    assert zeros / total == pytest.approx(0.5, abs=0.01)
    assert "test_perplexity" in json.loads((ft / "metrics.jsonl").read_text().splitlines()[-1])


@pytest.mark.slow
def test_killed_after_an_epoch_resumes_to_the_same_weights_and_metrics(tmp_path):
    from safetensors.torch import load_file
    from tests.test_reliability import kill_when_paused

    from varprune.cli import main

    data = write(tmp_path / "d", records(40, seed=3), records(8, seed=4))
    args = [*TRAIN, "--epochs", "3", "--data-dir", str(data), "--quiet"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main(["train", *args, "--out", str(ref)]) == 0
    kill_when_paused(["train", *args, "--out", run], "after:checkpoint.safetensors:1", tmp_path)
    assert not (run / "model.safetensors").exists()
    assert main(["train", "--resume", str(run)]) == 0
    a, b = load_file(run / "model.safetensors"), load_file(ref / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def metrics(folder):
        lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in m.items() if k != "epoch_time_s"} for m in lines]

    assert metrics(run) == metrics(ref) and len(metrics(ref)) == 3
