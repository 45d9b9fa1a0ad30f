"""Issue 26, sections 1 and 4: a text run records the sha256 of the text it was trained on and of its tokenizer.json,
and every command that reads the run again refuses other text (unless --other-data, recorded) and an edited or
replaced tokenizer, in one line naming both digests, writing nothing. Sizes and labels: a window index too large
for memory, an epoch of absurdly many windows, and classification with one class are refused before any work.

One tiny GPT-2 run is trained per module (about a second); every damaged folder is made from a copy of it."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from helpers import cli, one_line_error, snapshot
from text_helpers import TRAIN_TEXT, WORDS, tiny_gpt2_flags

LM = [*tiny_gpt2_flags(limit_train=16, limit_test=4, batch_size=8), "--quiet"]
OTHER_TRAIN = "".join(
    f"pack my box with five dozen liquor jugs, sphinx of black quartz {i} judge my vow\n" for i in range(60)
)
OTHER_TEST = "how vexingly quick daft zebras jump; the five boxing wizards jump quickly. " * 4
SWEEP = ["--sparsities", "0.5", "--bnt-batches", "0"]


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def corpus(root: Path, train: str, test: str) -> Path:
    root.mkdir(parents=True)
    (root / "train.txt").write_text(train, encoding="utf-8")
    (root / "test.txt").write_text(test, encoding="utf-8")
    return root


def main(*args) -> int:
    from varprune.cli import main as run

    return run([str(a) for a in args])


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The good run, its data, an export of it, and three other folders: other text, the same train.txt with
    another test.txt, and the same text copied elsewhere (which is the run's data: the same bytes)."""
    root = tmp_path_factory.mktemp("identity")
    data = corpus(root / "data", TRAIN_TEXT, WORDS * 3)
    run = root / "run"
    assert main("train", *LM, "--data-dir", data, "--out", run) == 0
    export = root / "pruned.safetensors"
    assert main("export", run, "--sparsity", "0.5", "--bnt-batches", "0", "--out", export, "--device", "cpu") == 0
    return {
        "root": root,
        "data": data,
        "run": run,
        "export": export,
        "other": corpus(root / "other", OTHER_TRAIN, OTHER_TEST),
        "other_test": corpus(root / "other_test", TRAIN_TEXT, OTHER_TEST),
        "copy": Path(shutil.copytree(data, root / "copy")),
    }


def copy_run(made, tmp_path) -> Path:
    run = Path(shutil.copytree(made["run"], tmp_path / "run"))
    cfg = json.loads((run / "config.json").read_text())
    cfg["train"]["data_dir"] = str(made["data"])  # relative or not, the copy reads the same data
    (run / "config.json").write_text(json.dumps(cfg))
    return run


def test_training_records_the_digests_of_the_text_and_the_tokenizer(made):
    resolved = json.loads((made["run"] / "config.json").read_text())["resolved"]
    assert resolved["text_sha256"] == {s: sha(made["data"] / f"{s}.txt") for s in ("train", "test")}
    assert resolved["tokenizer"]["sha256"] == sha(made["run"] / "tokenizer.json")


# every command that reads a run with a --data-dir, and the file or folder it would write
COMMANDS = {
    "prune": lambda run, out: ["prune", run, *SWEEP, "--device", "cpu"],
    "export": lambda run, out: ["export", run, "--sparsity", "0.5", "--bnt-batches", "0", "--out", out / "x.st"],
    "export-hf": lambda run, out: ["export", run, "--sparsity", "0.5", "--format", "hf", "--out", out / "hf"],
    "finetune": lambda run, out: ["finetune", run, "--sparsity", "0.5", "--epochs", "1", "--out", out / "ft"],
    "analyze": lambda run, out: ["analyze", run, "--out", out / "an", "--no-sensitivity", "--hessian-iters", "1"],
}


def refused(capsys, folder: Path, args: list) -> str:
    before = snapshot(folder)
    line = one_line_error(*cli(capsys, *args)[::2])
    assert snapshot(folder) == before  # nothing written, nothing changed
    return line


@pytest.mark.parametrize("command", list(COMMANDS))
def test_other_text_is_refused_naming_both_digests(made, tmp_path, capsys, command):
    run = copy_run(made, tmp_path)
    line = refused(capsys, tmp_path, [*COMMANDS[command](run, tmp_path), "--data-dir", made["other"]])
    assert "other text" in line and "--other-data" in line and "train.txt" in line, line
    assert sha(made["other"] / "train.txt")[:12] in line and sha(made["data"] / "train.txt")[:12] in line, line


def test_the_same_train_text_with_another_test_text_is_refused(made, tmp_path, capsys):
    run = copy_run(made, tmp_path)
    line = refused(capsys, tmp_path, ["prune", run, *SWEEP, "--data-dir", made["other_test"]])
    assert "test.txt (test split)" in line, line
    assert sha(made["other_test"] / "test.txt")[:12] in line and sha(made["data"] / "test.txt")[:12] in line


def test_a_copy_of_the_same_text_elsewhere_is_the_runs_text(made, tmp_path, capsys):
    run = copy_run(made, tmp_path)
    rc, _, err = cli(capsys, "prune", run, *SWEEP, "--data-dir", made["copy"])
    assert rc == 0, err
    assert "other_data" not in json.loads((run / "prune.json").read_text())


def test_evaluate_of_an_export_refuses_other_text(made, capsys):
    line = one_line_error(*cli(capsys, "evaluate", made["export"], "--data-dir", made["other"])[::2])
    assert "other text" in line and sha(made["other"] / "train.txt")[:12] in line, line
    rc, out, err = cli(capsys, "evaluate", made["export"])
    assert rc == 0 and "perplexity" in out and "--other-data" not in out, err


def test_resume_on_other_text_is_refused_without_an_escape(made, tmp_path, capsys):
    run = copy_run(made, tmp_path)
    line = refused(capsys, tmp_path, ["train", "--resume", run, "--data-dir", made["other"]])
    assert "other text" in line and "--other-data" not in line, line


def _replaced(run: Path) -> None:
    """Another text's tokenizer of the same vocabulary size, written over the run's."""
    from varprune.data import text
    from varprune.data.tokenizer import train_tokenizer

    original = json.loads((run / "config.json").read_text())["resolved"]["tokenizer"]["vocab_size"]
    tok = train_tokenizer(text.load("text", run.parent / "o"), original)
    assert tok.vocab_size == original  # the case the red team tried: same size, other tokens
    tok.save(run / "tokenizer.json")


def _swapped(run: Path) -> None:
    """Two vocabulary ids swapped: the same size and pieces, every model row now means another token."""
    doc = json.loads((run / "tokenizer.json").read_text())
    vocab = doc["model"]["vocab"]
    a, b = "e", "t"  # two of the byte alphabet, in every byte-level vocabulary
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (run / "tokenizer.json").write_text(json.dumps(doc, indent=2))


def _pre_tokenizer(run: Path) -> None:
    doc = json.loads((run / "tokenizer.json").read_text())
    doc["pre_tokenizer"]["add_prefix_space"] = not doc["pre_tokenizer"]["add_prefix_space"]
    (run / "tokenizer.json").write_text(json.dumps(doc, indent=2))


DAMAGES = {"replaced": _replaced, "ids swapped": _swapped, "pre-tokenizer changed": _pre_tokenizer}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_an_edited_or_replaced_tokenizer_is_refused(made, tmp_path, capsys, damage):
    corpus(tmp_path / "o", OTHER_TRAIN, OTHER_TEST)
    run = copy_run(made, tmp_path)
    recorded = sha(run / "tokenizer.json")
    DAMAGES[damage](run)
    line = refused(capsys, tmp_path, ["prune", run, *SWEEP, "--other-data"])  # --other-data does not excuse it
    assert f"{run / 'tokenizer.json'} is not the tokenizer" in line, line
    assert recorded[:12] in line and sha(run / "tokenizer.json")[:12] in line, line


def test_a_sweep_of_several_runs_refuses_before_pruning_any(made, tmp_path, capsys):
    good = copy_run(made, tmp_path)
    bad = Path(shutil.copytree(good, tmp_path / "bad"))
    _swapped(bad)
    line = refused(capsys, tmp_path, ["prune", good, bad, *SWEEP])  # good's prune.json is not written either
    assert f"{bad / 'tokenizer.json'} is not the tokenizer" in line, line


@pytest.mark.parametrize("command", ["export", "export-hf", "finetune", "analyze"])
def test_every_command_refuses_an_edited_tokenizer(made, tmp_path, capsys, command):
    run = copy_run(made, tmp_path)
    _swapped(run)
    line = refused(capsys, tmp_path, COMMANDS[command](run, tmp_path))
    assert "is not the tokenizer" in line, line


def test_other_data_measures_deliberately_and_says_so(made, tmp_path, capsys):
    run = copy_run(made, tmp_path)
    rc, out, err = cli(capsys, "prune", run, *SWEEP, "--data-dir", made["other"], "--other-data")
    assert rc == 0, err
    assert "--other-data: measuring" in out and sha(made["other"] / "test.txt")[:12] in out, out
    doc = json.loads((run / "prune.json").read_text())
    assert doc["other_data"]["text_sha256"] == {s: sha(made["other"] / f"{s}.txt") for s in ("train", "test")}
    assert doc["other_data"]["differs"] == ["train", "test"]
    # a later prune on the same folder without the flag does not reuse that result: it is refused
    line = one_line_error(*cli(capsys, "prune", run, *SWEEP, "--data-dir", made["other"])[::2])
    assert "other text" in line

    out_file = tmp_path / "other.safetensors"
    rc, out, err = cli(
        capsys, "export", run, "--sparsity", "0.5", "--bnt-batches", "0", "--data-dir", made["other"],
        "--other-data", "--out", out_file,
    )  # fmt: skip
    assert rc == 0 and "--other-data: measuring" in out, err
    from varprune.storage.pruned_format import read_pruned_metadata

    meta = read_pruned_metadata(out_file)
    assert json.loads(meta["other_data"])["differs"] == ["train", "test"]
    # the file still says which text the model was trained on: evaluate without --data-dir measures on that
    assert meta["dataset"]["text_sha256"]["test"] == sha(made["data"] / "test.txt")
    rc, out, err = cli(capsys, "evaluate", out_file, "--data-dir", made["other"], "--other-data", "--json")
    assert rc == 0 and "--other-data: measuring" in out, err
    assert json.loads(out.splitlines()[-1])["other_data"]["differs"] == ["train", "test"]


def test_finetune_on_other_text_with_the_flag_records_it(made, tmp_path, capsys):
    run = copy_run(made, tmp_path)
    out = tmp_path / "ft"
    rc, _, err = cli(capsys, *COMMANDS["finetune"](run, tmp_path), "--data-dir", made["other"], "--other-data")
    assert rc == 0, err
    resolved = json.loads((out / "config.json").read_text())["resolved"]
    assert resolved["other_data"]["source"] == str(run) and resolved["other_data"]["differs"] == ["train", "test"]
    assert resolved["text_sha256"]["train"] == sha(made["other"] / "train.txt")  # what it was fine-tuned on


def test_a_run_of_older_varprune_without_digests_still_works(made, tmp_path, capsys):
    run = copy_run(made, tmp_path)
    cfg = json.loads((run / "config.json").read_text())
    del cfg["resolved"]["text_sha256"], cfg["resolved"]["tokenizer"]["sha256"]
    (run / "config.json").write_text(json.dumps(cfg))
    rc, _, err = cli(capsys, "prune", run, *SWEEP, "--data-dir", made["other"])
    assert rc == 0 and err == "", err


# ---------------------------------------------------------------- section 4: sizes and labels


@pytest.mark.parametrize("limit", ["1000000000000", "1000000000"])
def test_an_absurd_limit_train_is_refused_before_allocating(made, tmp_path, capsys, limit):
    args = list(LM)
    args[args.index("--limit-train") + 1] = limit
    line = one_line_error(*cli(capsys, "train", *args, "--data-dir", made["data"], "--out", tmp_path / "r")[::2])
    assert f"--limit-train {int(limit):,}" in line or "window index" in line, line
    assert "--limit-train" in line and not (tmp_path / "r").exists()


def test_the_window_index_counts_in_the_memory_estimate(made, tmp_path, capsys):
    """8 bytes a window, whatever the text: 10^12 windows cannot fit on any machine and are refused before the
    text is read (the early estimate), naming the window index and the flag."""
    args = list(LM)
    args[args.index("--limit-train") + 1] = "1000000000000"
    line = one_line_error(*cli(capsys, "train", *args, "--data-dir", made["data"], "--out", tmp_path / "r")[::2])
    assert f"window index {8e12 / 2**30:.1f} GiB" in line and "lower --limit-train" in line, line


def test_classification_with_one_label_is_refused(tmp_path):
    from text_helpers import one_line
    from varprune.data import text

    tmp_path.joinpath("d").mkdir()
    for split in ("train", "test"):
        rows = [{"text": f"example {i}", "label": "spam"} for i in range(8)]
        (tmp_path / "d" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    line = one_line(text.load, "text-classification", tmp_path / "d")
    assert "every example has the label 'spam'" in line and "two classes" in line, line


# ---------------------------------------------------------------- the data layer's digests


def test_text_digests_are_the_files_bytes_and_the_reader_records_them(tmp_path):
    from text_helpers import cls_corpus, lm_corpus
    from varprune.data import content_digest, text_digests

    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "train.txt").write_bytes(b"\xef\xbb\xbfbyte-order mark kept in the digest\n")
    lm = lm_corpus(tmp_path / "lm", train=(tmp_path / "lm" / "train.txt").read_text(encoding="utf-8"))
    files = {s: tmp_path / "lm" / f"{s}.txt" for s in ("train", "test")}
    assert text_digests(files) == {s: hashlib.sha256(p.read_bytes()).hexdigest() for s, p in files.items()}
    assert {s: split.sha256 for s, split in lm.splits.items()} == text_digests(files)
    cls = cls_corpus(tmp_path / "cls")
    assert cls.splits["test"].sha256 == sha(tmp_path / "cls" / "test.jsonl")
    # a split drawn from many files (fortunes): its entries and their classes, in order
    base = content_digest(["a", "b"], ["x", "y"])
    assert base == content_digest(["a", "b"], ["x", "y"])
    assert len({base, content_digest(["a", "b"], ["x", "x"]), content_digest(["b", "a"], ["y", "x"])}) == 3
    assert content_digest(["a", "b"]) == hashlib.sha256(json.dumps(["a", "b"]).encode()).hexdigest()
