"""A tiny nanochat-style tokenizer for tests: rustbpe training + a pickled tiktoken.Encoding.

Built the way nanochat's RustBPETokenizer.train_from_iterator / save do it, on a few KB of
generated text, so tests exercise the real tokenizer.pkl format without downloading anything.
"""

import os
import pickle

import tiktoken

from mlx_grpo.nanochat.tokenizer import TOKENIZER_FILENAME, train_tokenizer

_NAMES = ["Natalia", "Weng", "Betty", "Julie", "James", "Zoë", "José", "Hiro", "Amélie", "Kenji"]
_ITEMS = ["clips", "apples", "pages", "marbles", "cookies", "tickets", "pencils", "flowers", "stamps"]
_PLACES = ["school", "market", "garden", "library", "bakery", "station", "museum", "kitchen"]
_VERBS = ["bought", "found", "painted", "collected", "baked", "packed", "shared", "counted"]


def _training_text() -> list:
    """A few KB of GSM8K-like sentences with numbers, calculator annotations and multi-byte characters."""
    docs = []
    for k in range(60):
        name, item = _NAMES[k % len(_NAMES)], _ITEMS[k % len(_ITEMS)]
        place, verb = _PLACES[k % len(_PLACES)], _VERBS[(k // 2) % len(_VERBS)]
        a, b = 3 + (k * 7) % 90, 2 + (k * 13) % 70
        docs.append(
            f"{name} {verb} {a} {item} at the {place} and {b} more on Sunday. "
            f"How many {item} does {name} have now? "
            f"{a} + {b} = <<{a}+{b}={a + b}>>{a + b}\n#### {a + b}\n"
        )
        if k % 3 == 0:
            docs.append(f"Le café coûte {a} € et le thé {b} €; the résumé costs €{a * b}.\n")
        if k % 4 == 0:
            docs.append(f"日本 has {a} cities; 東京 is in 日本. Price: {b}€ or ¥{a * 100}.\n")
    return docs


def build_tiny_tokenizer(out_dir, vocab_size: int = 512) -> tiktoken.Encoding:
    """Train a tiny BPE like nanochat and pickle its tiktoken.Encoding to out_dir/tokenizer.pkl.

    vocab_size counts the 256 byte tokens, the merges and the 9 nanochat specials, which take
    the last 9 ids in nanochat's order. Deterministic: same arguments, same file.
    """
    encoding = train_tokenizer(_training_text(), vocab_size)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, TOKENIZER_FILENAME), "wb") as f:
        pickle.dump(encoding, f)
    return encoding
