"""nanochat's tokenizer (a pickled tiktoken.Encoding) for MLX-GRPO and mlx-lm.

- load_tiktoken_encoding: reads tokenizer.pkl through a restricted unpickler.
- TiktokenTokenizerWrapper: the nanochat specials, plain-text encode/decode and nanochat's
  chat format, with the attributes mlx-lm's TokenizerWrapper and generate functions use.
- TiktokenTokenizerWrapper.to_mlx_lm(): an mlx_lm TokenizerWrapper for generate /
  stream_generate / batch_generate that stops at <|assistant_end|> or <|bos|>.
- nanochat_tokenizer: reach the nanochat wrapper from either form (None for HF tokenizers).
"""

from __future__ import annotations

import functools
import os
import pickle
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import tiktoken

# nanochat's special tokens, in the order they follow the BPE ranks.
NANOCHAT_SPECIAL_TOKENS = (
    "<|bos|>",
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|output_start|>",
    "<|output_end|>",
)

# nanochat's pre-tokenizer regex: GPT-4's, with numbers split into 1-2 digits (not 1-3).
NANOCHAT_SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)

TOKENIZER_FILENAME = "tokenizer.pkl"

# -----------------------------------------------------------------------------
# Restricted unpickling of tokenizer.pkl


class UnsafePickleError(pickle.UnpicklingError):
    """tokenizer.pkl referenced a global other than tiktoken.core.Encoding."""


# pickle.dump(Encoding) at protocol >= 3 (nanochat uses the default) references only this global;
# its state is a plain dict of str / bytes / int.
_ALLOWED_GLOBALS = {("tiktoken.core", "Encoding")}
_ENCODING_STATE_KEYS = {"name", "pat_str", "mergeable_ranks", "special_tokens"}


class _EncodingState:
    """Stands in for tiktoken.core.Encoding while unpickling, keeping its state as data.

    tiktoken's own __setstate__ would fetch a registry encoding (possibly over the network) when
    the state is a name, so the state is validated here before any tiktoken code sees it.
    """

    def __setstate__(self, state):
        self.state = state


class _TokenizerUnpickler(pickle.Unpickler):
    def __init__(self, file, path):
        super().__init__(file)
        self._path = path

    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return _EncodingState
        raise UnsafePickleError(
            f"refusing to unpickle global '{module}.{name}' from {self._path}: a nanochat "
            f"tokenizer.pkl may only reference tiktoken.core.Encoding; do not load this file"
        )

    def persistent_load(self, pid):
        raise UnsafePickleError(
            f"refusing persistent id {pid!r} in {self._path}: a nanochat tokenizer.pkl has none"
        )


def _check_encoding_state(state: Any, path) -> dict:
    if not isinstance(state, dict) or set(state) != _ENCODING_STATE_KEYS:
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(
            f"{path}: the pickled tiktoken.Encoding has state {got}, expected the keys "
            f"{sorted(_ENCODING_STATE_KEYS)}; re-save it with pickle.dump(encoding) (protocol >= 3)"
        )
    if not isinstance(state["name"], str) or not isinstance(state["pat_str"], str):
        raise ValueError(f"{path}: the pickled Encoding's name and pat_str must be strings")
    ranks, specials = state["mergeable_ranks"], state["special_tokens"]
    if not isinstance(ranks, dict) or not all(
        type(k) is bytes and type(v) is int for k, v in ranks.items()
    ):
        raise ValueError(f"{path}: mergeable_ranks must be a dict of bytes -> int")
    if not isinstance(specials, dict) or not all(
        type(k) is str and type(v) is int for k, v in specials.items()
    ):
        raise ValueError(f"{path}: special_tokens must be a dict of str -> int")
    return state


def load_tiktoken_encoding(path: Union[str, os.PathLike]) -> tiktoken.Encoding:
    """Load a pickled tiktoken.Encoding (nanochat's tokenizer.pkl) without running pickled code.

    Any global other than tiktoken.core.Encoding raises UnsafePickleError naming it before
    anything is called.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no tokenizer file at {path}: pass the tokenizer.pkl shipped with the nanochat checkpoint"
        )
    with open(path, "rb") as f:
        obj = _TokenizerUnpickler(f, path).load()
    if not isinstance(obj, _EncodingState) or not hasattr(obj, "state"):
        raise ValueError(
            f"{path} holds a {type(obj).__name__}, not a pickled tiktoken.Encoding with state"
        )
    return tiktoken.Encoding(**_check_encoding_state(obj.state, path))


# -----------------------------------------------------------------------------
# The nanochat tokenizer


def train_tokenizer(texts: list[str], vocab_size: int):
    """A tiktoken.Encoding trained with rustbpe like nanochat's RustBPETokenizer.train_from_iterator.

    vocab_size counts the 256 byte tokens, the merges and the 9 specials (the last 9 ids).
    """
    import rustbpe  # only needed to train one (utils/demo/build.py, tests)

    ranks_size = vocab_size - len(NANOCHAT_SPECIAL_TOKENS)
    if ranks_size < 256:
        raise ValueError(f"vocab_size={vocab_size} is too small: it needs 256 byte tokens + 9 specials")
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(iter(texts), ranks_size, pattern=NANOCHAT_SPLIT_PATTERN)
    mergeable_ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
    if len(mergeable_ranks) != ranks_size:
        raise ValueError(
            f"the training text supports only {len(mergeable_ranks)} BPE ranks, not {ranks_size}: "
            f"lower vocab_size to at most {len(mergeable_ranks) + len(NANOCHAT_SPECIAL_TOKENS)}"
        )
    special_tokens = {name: ranks_size + i for i, name in enumerate(NANOCHAT_SPECIAL_TOKENS)}
    return tiktoken.Encoding(
        name="rustbpe",
        pat_str=trainer.get_pattern(),
        mergeable_ranks=mergeable_ranks,
        special_tokens=special_tokens,
    )


@functools.lru_cache(maxsize=1)
def _byte_to_unicode() -> dict:
    """GPT-2's byte -> printable character table, the token-string form HF byte-level BPE uses.

    Written out because transformers moves its copy between releases.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table, shift = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shift)
            shift += 1
    return table


def _as_id_list(ids) -> list:
    if hasattr(ids, "tolist"):  # mx.array / numpy
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    return [int(i) for i in ids]


class TiktokenTokenizerWrapper:
    """nanochat's tokenizer: a tiktoken Encoding plus the nanochat specials and chat format.

    Token ids of the specials are attributes (bos_token_id, user_start_id, ..., output_end_id)
    and special_token_ids maps each special string to its id; special_token_id(name) (alias
    encode_special, nanochat's name) looks one up.
    encode() treats special-token strings in text as plain text, like nanochat.
    """

    # Rendering is done in Python by apply_chat_template, not by a Jinja template; this marker
    # makes "chat_template is not None" checks (mlx-lm, HF-style code) see a chat model.
    chat_template = "nanochat"
    clean_up_tokenization_spaces = False
    bos_token = "<|bos|>"
    eos_token = "<|assistant_end|>"

    def __init__(self, encoding: tiktoken.Encoding, name_or_path: str = ""):
        missing = [t for t in NANOCHAT_SPECIAL_TOKENS if t not in encoding.special_tokens_set]
        if missing:
            raise ValueError(
                f"tokenizer {encoding.name!r} lacks nanochat's special tokens {missing}: "
                f"use the tokenizer.pkl shipped with the nanochat checkpoint"
            )
        self.encoding = encoding
        self.name_or_path = str(name_or_path)
        self.special_token_ids = {
            t: encoding.encode_single_token(t) for t in NANOCHAT_SPECIAL_TOKENS
        }
        ids = self.special_token_ids
        self.bos_token_id = ids["<|bos|>"]
        self.user_start_id = ids["<|user_start|>"]
        self.user_end_id = ids["<|user_end|>"]
        self.assistant_start_id = ids["<|assistant_start|>"]
        self.assistant_end_id = ids["<|assistant_end|>"]
        self.python_start_id = ids["<|python_start|>"]
        self.python_end_id = ids["<|python_end|>"]
        self.output_start_id = ids["<|output_start|>"]
        self.output_end_id = ids["<|output_end|>"]
        self.eos_token_id = self.assistant_end_id
        # nanochat's engine stops a completion at either.
        self.eos_token_ids = {self.assistant_end_id, self.bos_token_id}
        self.vocab_size = encoding.n_vocab
        # All specials of the encoding, nanochat's or not, for skip_special_tokens.
        self._all_special_ids = {encoding.encode_single_token(t) for t in encoding.special_tokens_set}

    @classmethod
    def from_file(cls, path: Union[str, os.PathLike]) -> "TiktokenTokenizerWrapper":
        """Load from a tokenizer.pkl path (restricted unpickling)."""
        return cls(load_tiktoken_encoding(path), name_or_path=str(path))

    @classmethod
    def from_dir(cls, folder: Union[str, os.PathLike]) -> "TiktokenTokenizerWrapper":
        """Load folder/tokenizer.pkl (nanochat's tokenizer dir or a flat HF release folder)."""
        path = Path(folder) / TOKENIZER_FILENAME
        if not path.is_file():
            raise FileNotFoundError(
                f"{folder} has no {TOKENIZER_FILENAME}: point at the folder holding nanochat's "
                f"tokenizer.pkl (e.g. ~/.cache/nanochat/tokenizer or the downloaded checkpoint folder)"
            )
        return cls.from_file(path)

    def __repr__(self):
        name = self.name_or_path or self.encoding.name
        return f"TiktokenTokenizerWrapper({name!r}, vocab_size={self.vocab_size})"

    def __len__(self):
        return self.vocab_size

    # -- specials ------------------------------------------------------------

    def special_token_id(self, name: str) -> int:
        """Id of a nanochat special token given its string, e.g. "<|python_start|>"."""
        try:
            return self.special_token_ids[name]
        except KeyError:
            raise ValueError(
                f"{name!r} is not a nanochat special token; expected one of {list(NANOCHAT_SPECIAL_TOKENS)}"
            ) from None

    encode_special = special_token_id  # nanochat's name for it

    @property
    def all_special_ids(self) -> list:
        return sorted(self._all_special_ids)

    @property
    def all_special_tokens(self) -> list:
        return sorted(self.encoding.special_tokens_set, key=self.encoding.encode_single_token)

    # -- text <-> ids --------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list:
        """Token ids of plain text; special-token strings inside it stay plain text.

        add_special_tokens=True prepends <|bos|> (mlx-lm passes it for raw string prompts).
        """
        if not isinstance(text, str):
            raise ValueError(f"encode() takes a str, got {type(text).__name__}")
        ids = self.encoding.encode_ordinary(text)
        return [self.bos_token_id] + ids if add_special_tokens else ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of token ids; specials render as their strings unless skip_special_tokens.

        Bytes that are not valid UTF-8 (a sequence cut mid-character) become U+FFFD.
        """
        ids = _as_id_list(ids)
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside this tokenizer's vocab of {self.vocab_size}")
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._all_special_ids]
        return self.encoding.decode(ids, errors="replace")

    def batch_decode(self, sequences: Iterable, skip_special_tokens: bool = False) -> list:
        return [self.decode(s, skip_special_tokens=skip_special_tokens) for s in sequences]

    # -- HF-style token strings (mlx-lm's TokenizerWrapper probes the vocab) --

    @functools.cached_property
    def _id_to_token(self) -> list:
        byte_map = _byte_to_unicode()
        tokens = []
        for i in range(self.vocab_size):
            if i in self._all_special_ids:
                tokens.append(self.encoding.decode([i]))
            else:
                raw = self.encoding.decode_single_token_bytes(i)
                tokens.append("".join(byte_map[b] for b in raw))
        return tokens

    @functools.cached_property
    def _token_to_id(self) -> dict:
        return {t: i for i, t in enumerate(self._id_to_token)}

    def get_vocab(self) -> dict:
        """Token string -> id, with ordinary tokens in GPT-2 byte-level form (e.g. "Ġthe")."""
        return dict(self._token_to_id)

    @property
    def vocab(self) -> dict:
        return self.get_vocab()

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, int):
            return self._id_to_token[ids]
        return [self._id_to_token[i] for i in _as_id_list(ids)]

    def convert_tokens_to_ids(self, tokens):
        """Ids of token strings; None for a string that is not a token (as HF, for mlx-lm's checks)."""
        if isinstance(tokens, str):
            return self._token_to_id.get(tokens)
        return [self._token_to_id.get(t) for t in tokens]

    # -- chat format ---------------------------------------------------------

    def apply_chat_template(
        self,
        messages: Sequence[dict],
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        **kwargs,
    ) -> Union[list, str]:
        """Render a conversation in nanochat's format.

        <|bos|>, then <|user_start|> text <|user_end|> per user turn and
        <|assistant_start|> content <|assistant_end|> per assistant turn. A leading system message
        is merged into the first user message as system + "\\n\\n" + user; roles must alternate
        user/assistant. Assistant content is a str or a list of parts {"type", "text"} with type
        "text", "python" (<|python_start|> expr <|python_end|>) or "python_output"
        (<|output_start|> result <|output_end|>). add_generation_prompt=True (last turn a user
        turn) appends <|assistant_start|>; continue_final_message=True leaves the last assistant
        turn open (no <|assistant_end|>). tokenize=False returns the text with specials as strings.
        Also takes the HF/mlx-lm keywords enable_thinking (falsy), return_dict (False) and tools
        (None); any other keyword is an error.
        """
        continue_final_message = bool(kwargs.pop("continue_final_message", False))
        if kwargs.pop("enable_thinking", False):
            raise ValueError("enable_thinking=True: nanochat models have no thinking mode; leave it off")
        if kwargs.pop("return_dict", False):
            raise ValueError(
                "return_dict=True is not supported: apply_chat_template returns token ids (or text)"
            )
        if kwargs.pop("tools", None) is not None:
            raise ValueError(
                "tools=...: nanochat's only tool is its built-in calculator (python parts); pass tools=None"
            )
        if kwargs:
            raise ValueError(
                f"apply_chat_template got unsupported keyword(s) {sorted(kwargs)}; nanochat's format "
                f"takes add_generation_prompt, tokenize and continue_final_message"
            )
        if add_generation_prompt and continue_final_message:
            raise ValueError("use either add_generation_prompt or continue_final_message, not both")

        pieces = self._render_pieces(messages, add_generation_prompt, continue_final_message)
        if not tokenize:
            return "".join(text for _, text in pieces)
        ids = []
        for is_special, text in pieces:
            if is_special:
                ids.append(self.special_token_ids[text])
            else:
                ids.extend(self.encoding.encode_ordinary(text))
        return ids

    def _render_pieces(self, messages, add_generation_prompt, continue_final_message) -> list:
        """The conversation as (is_special, text) pieces; each text piece is encoded on its own."""
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
            raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {m!r:.80}")

        turns = [(i, m["role"], m["content"]) for i, m in enumerate(messages)]
        if turns[0][1] == "system":
            if len(turns) < 2 or turns[1][1] != "user":
                raise ValueError(
                    "a system message must be followed by a user message (nanochat merges it into that message)"
                )
            system, (i, _, user) = turns[0][2], turns[1]
            if not isinstance(system, str) or not isinstance(user, str):
                raise ValueError("the system message and the first user message must have str content")
            turns = [(i, "user", system + "\n\n" + user)] + turns[2:]

        pieces = [(True, "<|bos|>")]
        for n, (i, role, content) in enumerate(turns):
            expected = "user" if n % 2 == 0 else "assistant"
            if role != expected:
                where = "only the first message may be a system message" if role == "system" else (
                    "nanochat conversations alternate user/assistant, starting with user"
                )
                raise ValueError(f"message {i} has role {role!r} but {expected!r} was expected: {where}")
            if role == "user":
                if not isinstance(content, str):
                    raise ValueError(f"message {i}: user content must be a str, got {type(content).__name__}")
                pieces += [(True, "<|user_start|>"), (False, content), (True, "<|user_end|>")]
                continue
            pieces.append((True, "<|assistant_start|>"))
            pieces += self._assistant_pieces(i, content)
            is_last = n == len(turns) - 1
            if not (is_last and continue_final_message):
                pieces.append((True, "<|assistant_end|>"))

        last_role = turns[-1][1]
        if add_generation_prompt:
            if last_role != "user":
                raise ValueError(
                    "add_generation_prompt=True needs the conversation to end with a user message; it ends "
                    "with an assistant message (drop it, or pass continue_final_message=True to extend it)"
                )
            pieces.append((True, "<|assistant_start|>"))
        if continue_final_message and last_role != "assistant":
            raise ValueError(
                "continue_final_message=True needs the conversation to end with an assistant message"
            )
        return pieces

    @staticmethod
    def _assistant_pieces(i, content) -> list:
        if isinstance(content, str):
            return [(False, content)]
        if not isinstance(content, list):
            raise ValueError(
                f"message {i}: assistant content must be a str or a list of parts, got {type(content).__name__}"
            )
        wrappers = {
            "text": (),
            "python": ("<|python_start|>", "<|python_end|>"),
            "python_output": ("<|output_start|>", "<|output_end|>"),
        }
        pieces = []
        for j, part in enumerate(content):
            well_formed = isinstance(part, dict) and part.get("type") in wrappers
            if not well_formed or not isinstance(part.get("text"), str):
                raise ValueError(
                    f"message {i} part {j}: expected {{'type': 'text'|'python'|'python_output', 'text': str}}, "
                    f"got {part!r:.80}"
                )
            wrap = wrappers[part["type"]]
            if wrap:
                pieces += [(True, wrap[0]), (False, part["text"]), (True, wrap[1])]
            else:
                pieces.append((False, part["text"]))
        return pieces

    # -- mlx-lm --------------------------------------------------------------

    def to_mlx_lm(self):
        """An mlx_lm TokenizerWrapper around this tokenizer for generate / stream_generate /
        batch_generate: stops at <|assistant_end|> or <|bos|>, streams exact UTF-8 text, and keeps
        this wrapper reachable as `._tokenizer` (see nanochat_tokenizer)."""
        from mlx_lm.tokenizer_utils import NaiveStreamingDetokenizer, TokenizerWrapper

        # NaiveStreamingDetokenizer re-decodes the open line with decode() and holds back a trailing
        # U+FFFD, so it is exact for byte-level tokens; mlx-lm's BPEStreamingDetokenizer is not
        # (it drops a leading space of the first segment and mis-decodes byte 0x00).
        return TokenizerWrapper(
            self,
            detokenizer_class=NaiveStreamingDetokenizer,
            eos_token_ids=sorted(self.eos_token_ids),
        )


def nanochat_tokenizer(tok) -> Optional[TiktokenTokenizerWrapper]:
    """The nanochat tokenizer inside `tok` (itself, or an mlx-lm TokenizerWrapper's inner one);
    None for any other tokenizer (e.g. an HF tokenizer)."""
    if isinstance(tok, TiktokenTokenizerWrapper):
        return tok
    # mlx-lm's TokenizerWrapper keeps the wrapped tokenizer as _tokenizer.
    inner = getattr(tok, "_tokenizer", None)
    return inner if isinstance(inner, TiktokenTokenizerWrapper) else None
