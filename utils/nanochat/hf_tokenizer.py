"""Hugging Face tokenizer files for a nanochat tokenizer, so plain mlx_lm.load reads nanochat folders.

A nanochat folder's own tokenizer is tokenizer.pkl (a pickled tiktoken.Encoding), which MLX-GRPO
loads with a restricted unpickler (utils/nanochat/tokenizer.py). mlx-lm and transformers only read Hugging
Face files, so every converted folder and training checkpoint also gets:

- tokenizer.json: the same byte-level BPE (vocab and merges from the tiktoken ranks, via
  transformers' TikTokenConverter), nanochat's split regex and its 9 special tokens; encoding a
  string prepends <|bos|> when special tokens are asked for (as TiktokenTokenizerWrapper.encode).
- tokenizer_config.json: bos <|bos|>, eos <|assistant_end|>, and a Jinja chat template that renders
  nanochat's chat format exactly as TiktokenTokenizerWrapper.apply_chat_template does.
- generation_config.json: eos_token_id [<|assistant_end|>, <|bos|>], nanochat's two stop tokens;
  mlx_lm.load merges it into the model config and stops generation at either.

Limitation (any HF tokenizer has it): special-token strings typed inside text, e.g. a user message
containing "<|user_end|>", become special tokens here, while nanochat encodes them as plain text.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Union

import tiktoken

from mlx_grpo.nanochat.tokenizer import NANOCHAT_SPECIAL_TOKENS, TOKENIZER_FILENAME, load_tiktoken_encoding

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG_JSON = "tokenizer_config.json"
GENERATION_CONFIG_JSON = "generation_config.json"
HF_TOKENIZER_FILES = (TOKENIZER_JSON, TOKENIZER_CONFIG_JSON, GENERATION_CONFIG_JSON)

# Checked at every write (a change in transformers' converter must not go unnoticed): letters with
# and without a leading space, contractions, digit runs, punctuation runs, whitespace runs and
# newlines, multi-byte characters.
_PROBE_TEXT = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many in May.\n"
    "48/2 = <<48/2=24>>24 clips; 123456789 + 0.5 = $1,234.50!!\n\n#### 72\n"
    "It's we'll THEY'RE I'd don't  x   y\t\tz \r\n\r\n    def f(a, b):\n        return a**b  \n"
    "Zoë's café coûte 3 € — 東京 is in 日本 😀 ¥100 \u00a0 end   "
)

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|assistant_end|>"

# nanochat's chat format (see TiktokenTokenizerWrapper.apply_chat_template, which it must match):
# <|bos|>, user turns in <|user_start|>..<|user_end|>, assistant turns in
# <|assistant_start|>..<|assistant_end|> (content a str or text/python/python_output parts), a leading
# system message merged into the first user message as system + "\n\n" + user, strict alternation.
NANOCHAT_CHAT_TEMPLATE = (
    "{%- if not messages -%}"
    "{{- raise_exception('messages must be a non-empty list of {role, content} dicts') -}}"
    "{%- endif -%}"
    "{%- set ns = namespace(system=none, turns=messages) -%}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages | length < 2 or messages[1]['role'] != 'user' -%}"
    "{{- raise_exception('a system message must be followed by a user message (nanochat merges it into that message)') -}}"
    "{%- endif -%}"
    "{%- if messages[0]['content'] is not string -%}"
    "{{- raise_exception('the system message must have str content') -}}"
    "{%- endif -%}"
    "{%- set ns.system = messages[0]['content'] -%}"
    "{%- set ns.turns = messages[1:] -%}"
    "{%- endif -%}"
    "<|bos|>"
    "{%- for message in ns.turns -%}"
    "{%- set expected = 'user' if loop.index0 % 2 == 0 else 'assistant' -%}"
    "{%- if message['role'] != expected -%}"
    "{{- raise_exception('message role ' ~ message['role'] ~ ' where ' ~ expected ~ ' was expected: nanochat "
    "conversations alternate user/assistant, starting with user (only the first message may be a system message)') -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if message['content'] is not string -%}"
    "{{- raise_exception('user content must be a str') -}}"
    "{%- endif -%}"
    "<|user_start|>"
    "{%- if loop.first and ns.system is not none -%}{{- ns.system + '\\n\\n' -}}{%- endif -%}"
    "{{- message['content'] -}}"
    "<|user_end|>"
    "{%- else -%}"
    "<|assistant_start|>"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- elif part['type'] == 'python' -%}<|python_start|>{{- part['text'] -}}<|python_end|>"
    "{%- elif part['type'] == 'python_output' -%}<|output_start|>{{- part['text'] -}}<|output_end|>"
    "{%- else -%}{{- raise_exception('assistant content parts must have type text, python or python_output') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "<|assistant_end|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{%- if ns.turns[-1]['role'] != 'user' -%}"
    "{{- raise_exception('add_generation_prompt needs the conversation to end with a user message') -}}"
    "{%- endif -%}"
    "<|assistant_start|>"
    "{%- endif -%}"
)


def _check_nanochat_encoding(encoding: tiktoken.Encoding) -> dict:
    """The encoding's BPE ranks, after checking the layout the HF files can express exactly."""
    # tiktoken has no public accessor for the ranks or the pattern; transformers reads them the same way.
    ranks = encoding._mergeable_ranks
    missing = [t for t in NANOCHAT_SPECIAL_TOKENS if t not in encoding.special_tokens_set]
    if missing:
        raise ValueError(
            f"tokenizer {encoding.name!r} lacks nanochat's special tokens {missing}: "
            f"use the tokenizer.pkl shipped with the nanochat checkpoint"
        )
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(
            f"tokenizer {encoding.name!r} has BPE ranks that are not 0..{len(ranks) - 1}: "
            f"cannot write Hugging Face tokenizer files for it"
        )
    return ranks


def build_hf_tokenizer(encoding: tiktoken.Encoding):
    """A `tokenizers.Tokenizer` that gives the same ids as `encoding` (nanochat's tiktoken Encoding).

    Plain text encodes like encoding.encode_ordinary; the nanochat specials keep their ids and are
    matched in text as special tokens; add_special_tokens=True prepends <|bos|>.
    """
    from tokenizers import AddedToken, decoders, processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = _check_nanochat_encoding(encoding)
    special_tokens = encoding._special_tokens

    class _EncodingConverter(TikTokenConverter):
        # TikTokenConverter reads ranks from a .tiktoken file; hand it the in-memory ranks instead
        # (tiktoken's file reader caches by path, so a temp file could come back stale).
        def load_tiktoken_bpe(self, _unused):
            return ranks

    tokenizer = _EncodingConverter(pattern=encoding._pat_str).converted()
    # Added in id order, each takes the next id: the ranks are 0..n-1, so they land on tiktoken's ids
    # (checked below). normalized=False: matched in raw text, as the chat template's output needs.
    tokenizer.add_special_tokens(
        [AddedToken(t, normalized=False, special=True) for t in sorted(special_tokens, key=special_tokens.get)]
    )
    # A Sequence around ByteLevel decodes the same, but keeps mlx-lm from picking its
    # BPEStreamingDetokenizer, which drops a leading space and mis-decodes byte 0x00; mlx-lm then
    # uses its exact NaiveStreamingDetokenizer, as TiktokenTokenizerWrapper.to_mlx_lm() does.
    tokenizer.decoder = decoders.Sequence([decoders.ByteLevel()])
    bos_id = special_tokens[BOS_TOKEN]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN}:0 $A:0",
        pair=f"{BOS_TOKEN}:0 $A:0 {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )

    wrong = {t: (tokenizer.token_to_id(t), i) for t, i in special_tokens.items() if tokenizer.token_to_id(t) != i}
    if wrong or tokenizer.get_vocab_size(with_added_tokens=True) != encoding.n_vocab:
        raise ValueError(
            f"tokenizer {encoding.name!r}: special token ids do not follow the BPE ranks "
            f"({wrong or 'vocab size differs'}); cannot write Hugging Face tokenizer files for it"
        )
    return tokenizer


def tokenizer_config() -> dict:
    """tokenizer_config.json content: class, bos/eos, nanochat's chat template.

    <|bos|> is prepended by tokenizer.json's post-processor; transformers 5 ignores an
    add_bos_token flag when there is a tokenizer.json.
    """
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "clean_up_tokenization_spaces": False,
        "chat_template": NANOCHAT_CHAT_TEMPLATE,
    }


def generation_config(encoding: tiktoken.Encoding) -> dict:
    """generation_config.json content: nanochat stops at <|assistant_end|> or <|bos|>."""
    specials = encoding._special_tokens
    return {
        "bos_token_id": specials[BOS_TOKEN],
        "eos_token_id": [specials[EOS_TOKEN], specials[BOS_TOKEN]],
    }


def hf_tokenizer_files(encoding: tiktoken.Encoding) -> dict:
    """File name -> text of the Hugging Face tokenizer files for `encoding`; nothing is written.

    Raises ValueError when the files cannot reproduce the encoding's ids.
    """
    tokenizer = build_hf_tokenizer(encoding)
    got = tokenizer.encode(_PROBE_TEXT, add_special_tokens=False).ids
    if got != encoding.encode_ordinary(_PROBE_TEXT):
        raise ValueError(
            f"the Hugging Face tokenizer built for {encoding.name!r} gives other ids than tiktoken; "
            f"check the installed tokenizers/transformers versions"
        )

    def as_json(content: dict) -> str:
        return json.dumps(content, indent=2, ensure_ascii=False) + "\n"

    return {
        TOKENIZER_JSON: tokenizer.to_str(pretty=True),
        TOKENIZER_CONFIG_JSON: as_json(tokenizer_config()),
        GENERATION_CONFIG_JSON: as_json(generation_config(encoding)),
    }


def write_hf_tokenizer_files(folder: Union[str, os.PathLike], files: dict) -> list:
    """Write hf_tokenizer_files(...) output into `folder` (overwriting); returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
        paths.append(folder / name)
    return paths


def main(argv=None) -> None:
    """Add the Hugging Face tokenizer files to nanochat folders that only have tokenizer.pkl
    (converted before MLX-GRPO wrote them): python -m mlx_grpo.nanochat.hf_tokenizer FOLDER..."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("folders", nargs="+", help="converted nanochat folders (holding tokenizer.pkl)")
    for folder in parser.parse_args(argv).folders:
        encoding = load_tiktoken_encoding(Path(folder) / TOKENIZER_FILENAME)
        paths = write_hf_tokenizer_files(folder, hf_tokenizer_files(encoding))
        print(f"wrote {', '.join(p.name for p in paths)} to {folder}")


if __name__ == "__main__":
    main()
