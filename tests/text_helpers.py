"""What the text tests share: a small training text, tiny corpora written to a folder, one-line errors."""

import json
from pathlib import Path

import pytest

from varprune.data import text
from varprune.data.base import DatasetError
from varprune.data.tokenizer import TextTokenizer

WORDS = (
    "the quick brown fox jumps over the lazy dog while a pruned network keeps its accuracy and "
    "the tokenizer learns merges from the training text only; numbers 1234 and 56789 stay digits. "
)
TRAIN_TEXT = "".join(f"{WORDS} line {i}\n" for i in range(40))
# texts that test encoding in pieces: WikiText's look, odd whitespace, and '.\n' (one pre-token in Llama 3)
PIECES_SAMPLES = [
    TRAIN_TEXT,
    TRAIN_TEXT.replace("\n", ".\n"),
    " = Valkyria = \n \n Senjō no Valkyria 3 : <unk> ( 戦場のヴァルキュリア3 , lit @-@ 3 ) ,  "
    "\n\n\tx  \n  y\u00a0z it's 'll  \x1c w\u2028 v   \n" * 20,
]


def tiny_gpt2_flags(
    n_embd: int = 16, seq_len: int = 16, limit_train: int = 32, limit_test: int = 8, batch_size: int | None = None
) -> list[str]:
    """`varprune train` flags for a one-block GPT-2 on a `text` folder (--data-dir and --out to add): a run of about
    a second, the base the text tests vary."""
    flags = ["--dataset", "text", "--model", "gpt2", "--model-arg", "n_layer=1", "--model-arg", f"n_embd={n_embd}"]
    flags += ["--model-arg", "n_head=2", "--seq-len", str(seq_len), "--vocab-size", "300", "--epochs", "1"]
    flags += ["--batch-size", str(batch_size)] if batch_size else []
    return flags + ["--limit-train", str(limit_train), "--limit-test", str(limit_test), "--device", "cpu"]


def one_line(call, *args, **kwargs) -> str:
    with pytest.raises(DatasetError) as e:
        call(*args, **kwargs)
    assert "\n" not in str(e.value), str(e.value)
    return str(e.value)


def lm_corpus(root: Path, train=TRAIN_TEXT, test=None, valid=None):
    root.mkdir(parents=True, exist_ok=True)
    (root / "train.txt").write_text(train)
    (root / "test.txt").write_text(test if test is not None else WORDS * 3)
    if valid is not None:
        (root / "valid.txt").write_text(valid)
    return text.load("text", root)


def cls_corpus(root: Path, n=30):
    root.mkdir(parents=True, exist_ok=True)
    rows = [{"text": f"{i}" + " word" * (i % 40), "label": ["a", "b", "c"][i % 3]} for i in range(n)]  # distinct
    for split in ("train", "test"):
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return text.load("text-classification", root)


def llama3_style_tokenizer():
    """A byte-level BPE with Llama 3's splitting pattern, under which '.\\n' is one pre-token: pieces may not
    be cut before a newline."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    pattern = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
        r"|\s+(?!\S)|\s+"
    )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator([TRAIN_TEXT.replace("\n", ".\n")], trainer)
    return TextTokenizer(tok, None, "llama-3 style")


def tiny_tokenizer(vocab_size: int = 300):
    """A byte-level BPE trained on TRAIN_TEXT (tokenizers), with a <pad> token: a model folder's tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<pad>"],
        show_progress=False,
    )
    tok.train_from_iterator([TRAIN_TEXT], trainer)
    return tok


def tiny_llama_folder(folder, tie: bool, tok=None, seed: int = 0, scale: float = 8.0):
    """A tiny random LlamaForCausalLM (2 blocks, width 32) saved with save_pretrained into ``folder`` with
    ``tok``'s tokenizer.json; its weights scaled to a trained model's size, so pruning moves the perplexity."""
    import torch
    import transformers

    tok = tok or tiny_tokenizer()
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    model.save_pretrained(folder)
    tok.save(str(Path(folder) / "tokenizer.json"))
    return model
