"""Issue 26, section 7: what a newcomer met on a fresh clone (one flag name everywhere, doctor saying what a
missing package disables, a missing library refused before anything runs, --list-weights, load_pruned's build=,
an export larger than the dense file, the demo's and study's progress)."""

import sys
from importlib import metadata

import pytest

from helpers import cli, one_line_error
from varprune.cli import build_parser


def _help(command: str) -> str:
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    return sub.choices[command].format_help()


@pytest.mark.parametrize("command", ["train", "study", "tune"])
def test_one_name_for_the_model_option_flag(command):
    text = _help(command)
    assert "--model-arg KEY=VALUE" in text and "--model-args" not in text
    # 0.2's spelling still parses (hidden), into the same field
    required = {"train": [], "study": ["--out", "s"], "tune": ["--out", "t", "--sparsity", "0.5"]}[command]
    args = build_parser().parse_args([command, *required, "--model-args", "width=8", "--model-arg", "depth=2"])
    assert args.model_args == [("width", 8), ("depth", 2)]


def test_doctor_says_what_a_missing_package_disables(monkeypatch):
    from varprune.commands.doctor import report

    real = metadata.version

    def version(name):
        if name in ("transformers", "timm"):
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(metadata, "version", version)
    lines = report().splitlines()
    hf = next(line for line in lines if line.startswith("transformers:"))
    assert "not installed" in hf and "language models" in hf and "varprune[hf]" in hf, hf
    timm = next(line for line in lines if line.startswith("timm:"))
    assert "--model timm:NAME" in timm and "varprune[timm]" in timm, timm
    torch_line = next(line for line in lines if line.startswith("numpy:"))
    assert "without it" not in torch_line


def test_demo_lm_without_transformers_fails_in_one_line_before_training(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed: import fails
    out = tmp_path / "demo"
    line = one_line_error(*cli(capsys, "demo", "--task", "lm", "--size", "tiny", "--out", out)[::2])
    assert "needs Hugging Face transformers" in line and "pip install 'varprune[hf]'" in line, line
    assert not out.exists()
    line = one_line_error(*cli(capsys, "train", "--dataset", "text", "--model", "gpt2", "--out", tmp_path / "r")[::2])
    assert "--model gpt2 needs Hugging Face transformers" in line and not (tmp_path / "r").exists()


def test_load_pruned_of_an_unregistered_model_names_build(tmp_path):
    import torch

    from varprune import load_pruned, prune_magnitude, save_pruned
    from varprune.storage.pruned_format import PrunedFormatError

    def my_net():
        torch.manual_seed(1)
        return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))

    model = my_net()
    masks = prune_magnitude(model, 0.5)
    path = tmp_path / "mine.safetensors"
    save_pruned(path, model, masks, {"model": "my_net", "model_args": {}})
    with pytest.raises(PrunedFormatError) as e:
        load_pruned(path)
    assert "'my_net', which is not registered here: pass build=" in str(e.value) and "\n" not in str(e.value)
    loaded = load_pruned(path, build=my_net)  # what the message says works
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k


def test_an_export_no_smaller_than_the_dense_file_says_so(capsys, tmp_path):
    from test_flag_scope import TEXT
    from text_helpers import lm_corpus

    corpus = tmp_path / "text"
    lm_corpus(corpus)
    run = tmp_path / "run"
    assert cli(capsys, "train", *TEXT, "--quiet", "--data-dir", corpus, "--out", run)[0] == 0
    out = tmp_path / "e.safetensors"
    rc, text, err = cli(capsys, "export", run, "--sparsity", "0.1", "--out", out)
    assert rc == 0, err
    size, dense = out.stat().st_size, (run / "model.safetensors").stat().st_size
    assert size > dense  # a tiny model at 10%: the tokenizer in the metadata outweighs what pruning saves
    assert f"is not smaller than the dense model.safetensors ({size:,} against {dense:,} bytes)" in text, text
    out2 = tmp_path / "e2.safetensors"
    rc, text, err = cli(capsys, "export", run, "--sparsity", "0.99", "--values", "fp16", "--out", out2)
    assert rc == 0, err
    assert (out2.stat().st_size < dense) == ("not smaller" not in text), text


def test_list_weights_lists_every_parameter_with_its_reason_tied_ones_too(capsys, tmp_path):
    from test_flag_scope import TEXT
    from text_helpers import lm_corpus
    from varprune.models import create_model

    corpus = tmp_path / "text"
    lm_corpus(corpus)
    run = tmp_path / "run"
    assert cli(capsys, "train", *TEXT, "--quiet", "--data-dir", corpus, "--out", run)[0] == 0
    rc, out, err = cli(capsys, "prune", run, "--list-weights")
    assert rc == 0, err
    rows = {line.split()[0]: line for line in out.strip().splitlines()}
    model = create_model("gpt2", vocab_size=300, max_positions=16, n_layer=1, n_embd=16, n_head=2)
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    assert list(rows) == names
    assert rows["transformer.h.0.ln_1.bias"].endswith("not pruned: one-dimensional (bias, norm or scale; only "
                                                      "matrices and kernels are pruned)")  # fmt: skip
    assert rows["transformer.wte.weight"].endswith("not pruned: embedding")
    assert rows["lm_head.weight"].endswith("tied to transformer.wte.weight (decided there)")
    assert rows["transformer.h.0.attn.c_attn.weight"].endswith("prunable")


def test_progress_across_steps_estimates_the_time_left_from_the_steps_that_did_work():
    from varprune.engine.progress import Progress, Step, duration

    now = [0.0]
    lines = []
    steps = [Step("training a", "train", 10), Step("training b", "train", 20), Step("pruning 2 runs", "prune", 2)]
    p = Progress("demo", steps, lines.append, clock=lambda: now[0])
    p.begin(0)
    now[0] = 5.0  # a finished run, reused: it teaches no price
    p.end(0, reused=True)
    p.begin(1)
    now[0] = 105.0  # 20 epochs in 100 s: 5 s an epoch
    p.end(1)
    p.begin(2)  # pruning has not run yet: priced at every kind's 5 s per unit, 2 units
    assert lines == [
        "[demo 1/3] training a (0 s so far, estimating the time left)",
        "[demo 2/3] training b (5 s so far, estimating the time left)",
        "[demo 3/3] pruning 2 runs (1 min 45 s so far, about 10 s left)",
    ]
    assert (duration(59.4), duration(61), duration(3725)) == ("59 s", "1 min 01 s", "1 h 02 min")
