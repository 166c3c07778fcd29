"""nanochat tokenizer: restricted loading, chat format token for token, mlx-lm generation and streaming."""

import os
import pickle
from types import SimpleNamespace

import mlx.core as mx
import pytest
import tiktoken
from fixture_tokenizer import build_tiny_tokenizer
from mlx_lm.generate import BatchGenerator, batch_generate, generate, stream_generate
from mlx_lm.models.nanochat import Model, ModelArgs
from mlx_lm.tokenizer_utils import TokenizerWrapper

from mlx_grpo.nanochat.tokenizer import (
    NANOCHAT_SPECIAL_TOKENS,
    TiktokenTokenizerWrapper,
    UnsafePickleError,
    load_tiktoken_encoding,
    nanochat_tokenizer,
)

VOCAB = 512
MULTIBYTE = "é€日本 東京 ¥100 ü😀 Zoë\n"


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("nanochat_tokenizer")
    build_tiny_tokenizer(out, vocab_size=VOCAB)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    return TiktokenTokenizerWrapper.from_dir(tok_dir)


@pytest.fixture(scope="module")
def mlx_tok(tok):
    return tok.to_mlx_lm()


@pytest.fixture(scope="module")
def model(tok):
    mx.random.seed(0)
    args = ModelArgs(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=tok.vocab_size,
        intermediate_size=256,
    )
    m = Model(args)
    m.set_dtype(mx.float32)
    mx.eval(m.parameters())
    return m


# -- fixture and specials -----------------------------------------------------


def test_fixture_is_deterministic_and_nanochat_shaped(tmp_path, tok_dir):
    enc = build_tiny_tokenizer(tmp_path, vocab_size=VOCAB)
    assert (tmp_path / "tokenizer.pkl").read_bytes() == (tok_dir / "tokenizer.pkl").read_bytes()
    assert enc.name == "rustbpe" and enc.n_vocab == VOCAB
    assert [enc.encode_single_token(t) for t in NANOCHAT_SPECIAL_TOKENS] == list(range(VOCAB - 9, VOCAB))


def test_specials(tok):
    assert tok.vocab_size == len(tok) == VOCAB
    assert tok.special_token_ids == {t: VOCAB - 9 + i for i, t in enumerate(NANOCHAT_SPECIAL_TOKENS)}
    assert tok.bos_token_id == tok.encode_special("<|bos|>") == VOCAB - 9
    assert tok.eos_token_id == tok.assistant_end_id == tok.encode_special("<|assistant_end|>")
    assert tok.eos_token_ids == {tok.assistant_end_id, tok.bos_token_id}
    attrs = [tok.user_start_id, tok.user_end_id, tok.assistant_start_id, tok.python_start_id,
             tok.python_end_id, tok.output_start_id, tok.output_end_id]
    names = ["<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|python_start|>",
             "<|python_end|>", "<|output_start|>", "<|output_end|>"]
    assert attrs == [tok.encode_special(n) for n in names]
    assert tok.special_token_id("<|output_end|>") == tok.output_end_id == VOCAB - 1
    with pytest.raises(ValueError, match="not a nanochat special token"):
        tok.special_token_id("<|endoftext|>")


def test_encode_decode_round_trip(tok):
    for text in ["Natalia sold 48 clips in April.\n#### 72", MULTIBYTE, " leading space", "\x00nul", ""]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.decode(mx.array(ids, dtype=mx.int32)) == text
    # Special-token strings in text are plain text, as in nanochat.
    ids = tok.encode("<|bos|>hi<|assistant_end|>")
    assert not set(ids) & set(tok.special_token_ids.values())
    assert tok.decode(ids) == "<|bos|>hi<|assistant_end|>"
    assert tok.encode("hi", add_special_tokens=True) == [tok.bos_token_id] + tok.encode("hi")
    # Specials render as their strings, or vanish with skip_special_tokens.
    ids = [tok.bos_token_id] + tok.encode("hi") + [tok.assistant_end_id]
    assert tok.decode(ids) == "<|bos|>hi<|assistant_end|>"
    assert tok.decode(ids, skip_special_tokens=True) == "hi"
    with pytest.raises(ValueError, match="outside this tokenizer's vocab"):
        tok.decode([VOCAB])
    with pytest.raises(ValueError, match="takes a str"):
        tok.encode(["a list"])


def test_hf_style_token_strings(tok):
    vocab = tok.get_vocab()
    assert len(vocab) == VOCAB
    for i in [0, 32, 255, 300, tok.bos_token_id, tok.output_end_id]:
        assert vocab[tok.convert_ids_to_tokens(i)] == i
    assert tok.convert_ids_to_tokens(ord(" ")) == "Ġ"
    assert tok.convert_tokens_to_ids("<|assistant_end|>") == tok.assistant_end_id
    assert tok.convert_tokens_to_ids("no such token") is None


# -- chat format --------------------------------------------------------------


def _expected(tok, pieces):
    """Hand-built ids: specials by name, every text piece encoded on its own."""
    ids = []
    for p in pieces:
        ids += [tok.encode_special(p)] if p in NANOCHAT_SPECIAL_TOKENS else tok.encode(p)
    return ids


CHAT_CASES = {
    "user_prompt": (
        [{"role": "user", "content": "What is 2+2?"}],
        True,
        ["<|bos|>", "<|user_start|>", "What is 2+2?", "<|user_end|>", "<|assistant_start|>"],
    ),
    "system_merged": (
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi é€"}],
        True,
        ["<|bos|>", "<|user_start|>", "Be brief.\n\nHi é€", "<|user_end|>", "<|assistant_start|>"],
    ),
    "multi_turn": (
        [
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi! 日本"},
            {"role": "user", "content": "Sum 3 and 4."},
            {"role": "assistant", "content": "7"},
        ],
        False,
        ["<|bos|>", "<|user_start|>", "Hello", "<|user_end|>", "<|assistant_start|>", "Hi! 日本",
         "<|assistant_end|>", "<|user_start|>", "Sum 3 and 4.", "<|user_end|>", "<|assistant_start|>",
         "7", "<|assistant_end|>"],
    ),
    "tool_parts": (
        [
            {"role": "system", "content": "You solve math."},
            {"role": "user", "content": "Weng earns 12 an hour for 50 minutes."},
            {"role": "assistant", "content": [
                {"type": "text", "text": "She earns "},
                {"type": "python", "text": "12/60*50"},
                {"type": "python_output", "text": "10.0"},
                {"type": "text", "text": " dollars.\n#### 10"},
            ]},
            {"role": "user", "content": "And for 2 hours?"},
        ],
        True,
        ["<|bos|>", "<|user_start|>", "You solve math.\n\nWeng earns 12 an hour for 50 minutes.",
         "<|user_end|>", "<|assistant_start|>", "She earns ", "<|python_start|>", "12/60*50",
         "<|python_end|>", "<|output_start|>", "10.0", "<|output_end|>", " dollars.\n#### 10",
         "<|assistant_end|>", "<|user_start|>", "And for 2 hours?", "<|user_end|>", "<|assistant_start|>"],
    ),
}


@pytest.mark.parametrize("case", sorted(CHAT_CASES))
def test_chat_template_token_for_token(tok, mlx_tok, case):
    messages, add_generation_prompt, pieces = CHAT_CASES[case]
    expected = _expected(tok, pieces)
    assert tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected
    assert tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False) == "".join(pieces)
    # Through mlx-lm's wrapper (it adds enable_thinking=False / return_dict=False).
    assert mlx_tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected


def test_chat_template_continue_final_message(tok):
    messages = [{"role": "user", "content": "Count"}, {"role": "assistant", "content": "1, 2,"}]
    expected = _expected(tok, ["<|bos|>", "<|user_start|>", "Count", "<|user_end|>", "<|assistant_start|>", "1, 2,"])
    assert tok.apply_chat_template(messages, continue_final_message=True) == expected


@pytest.mark.parametrize(
    "messages, kwargs, match",
    [
        ([], {}, "non-empty list"),
        ([{"role": "assistant", "content": "hi"}], {}, "message 0 has role 'assistant' but 'user'"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], {}, "message 1 has role 'user'"),
        ([{"role": "system", "content": "s"}], {}, "system message must be followed by a user"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}], {}, "only the first message"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
         {"add_generation_prompt": True}, "end with a user message"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}],
         {}, "part 0"),
        ([{"role": "user", "content": [{"type": "text", "text": "a"}]}], {}, "user content must be a str"),
        ([{"role": "user", "content": "a"}], {"foo": 1}, r"unsupported keyword\(s\) \['foo'\]"),
        ([{"role": "user", "content": "a"}], {"tools": [{"name": "f"}]}, "calculator"),
        ([{"role": "user", "content": "a"}], {"enable_thinking": True}, "no thinking mode"),
    ],
)
def test_chat_template_errors(tok, messages, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tok.apply_chat_template(messages, **kwargs)


# -- restricted unpickling ----------------------------------------------------


class _RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _NamesRegistryEncoding:
    """Pickles as Encoding with a registry name as state: real tiktoken would fetch cl100k_base."""

    def __reduce__(self):
        return (tiktoken.core.Encoding, (), "cl100k_base")


def test_malicious_pickle_is_refused_before_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "tokenizer.pkl"
    path.write_bytes(pickle.dumps(_RunsShell(marker)))
    with pytest.raises(UnsafePickleError, match=rf"'{os.system.__module__}\.system'"):
        load_tiktoken_encoding(path)
    with pytest.raises(UnsafePickleError):
        TiktokenTokenizerWrapper.from_dir(tmp_path)
    assert not marker.exists()


def test_other_pickles_are_refused(tmp_path, tok):
    path = tmp_path / "tokenizer.pkl"
    path.write_bytes(pickle.dumps(SimpleNamespace(a=1)))
    with pytest.raises(UnsafePickleError, match=r"'types\.SimpleNamespace'"):
        load_tiktoken_encoding(path)
    # Old protocols reference helper globals; only protocol >= 3 (pickle's default) is accepted.
    path.write_bytes(pickle.dumps(tok.encoding, protocol=2))
    with pytest.raises(UnsafePickleError, match=r"'_codecs\.encode'"):
        load_tiktoken_encoding(path)
    path.write_bytes(pickle.dumps({"name": "x"}))
    with pytest.raises(ValueError, match="not a pickled tiktoken.Encoding"):
        load_tiktoken_encoding(path)
    path.write_bytes(pickle.dumps(_NamesRegistryEncoding()))
    with pytest.raises(ValueError, match="expected the keys"):
        load_tiktoken_encoding(path)
    with pytest.raises(FileNotFoundError, match="has no tokenizer.pkl"):
        TiktokenTokenizerWrapper.from_dir(tmp_path / "missing")


def test_non_nanochat_encoding_is_refused(tmp_path):
    enc = tiktoken.Encoding(name="bytes", pat_str=r"\S+|\s+",
                            mergeable_ranks={bytes([i]): i for i in range(256)}, special_tokens={})
    (tmp_path / "tokenizer.pkl").write_bytes(pickle.dumps(enc))
    assert load_tiktoken_encoding(tmp_path / "tokenizer.pkl").n_vocab == 256
    with pytest.raises(ValueError, match="lacks nanochat's special tokens"):
        TiktokenTokenizerWrapper.from_dir(tmp_path)


# -- mlx-lm wrapper and streaming -----------------------------------------------


def test_mlx_lm_wrapper(tok, mlx_tok):
    assert isinstance(mlx_tok, TokenizerWrapper)
    assert mlx_tok.eos_token_ids == {tok.assistant_end_id, tok.bos_token_id}
    assert mlx_tok.has_chat_template and not mlx_tok.has_thinking and not mlx_tok.has_tool_calling
    assert nanochat_tokenizer(mlx_tok) is tok and nanochat_tokenizer(tok) is tok
    assert mlx_tok.encode("x 1") == tok.encode("x 1") and len(mlx_tok) == VOCAB


def test_nanochat_tokenizer_is_none_for_hf_tokenizers():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()))
    assert nanochat_tokenizer(hf) is None
    assert nanochat_tokenizer(TokenizerWrapper(hf)) is None


def _stream(detokenizer, ids):
    """Feed ids one at a time; return the segments, each read after each token and after finalize."""
    detokenizer.reset()
    segments = []
    for i in ids:
        detokenizer.add_token(i)
        segments.append(detokenizer.last_segment)
    detokenizer.finalize()
    segments.append(detokenizer.last_segment)
    return segments


def test_streaming_detokenizer_multibyte(tok, mlx_tok):
    enc = tok.encoding
    one_byte_per_token = [enc.encode_single_token(bytes([b])) for b in "é€日本 ü😀".encode()]
    text_ids = tok.encode(MULTIBYTE * 2)
    # The trained vocab does cut characters: some tokens are not valid UTF-8 on their own.
    assert any(_invalid_utf8(enc.decode_single_token_bytes(i)) for i in text_ids)
    with_specials = [tok.assistant_start_id] + text_ids + [tok.python_start_id] + tok.encode("12/3") + [tok.python_end_id]
    leading_space_and_nul = tok.encode(" 5 apples\x00 and ") + one_byte_per_token
    for ids in [one_byte_per_token, text_ids, with_specials, leading_space_and_nul]:
        segments = _stream(mlx_tok.detokenizer, ids)
        assert not any("\ufffd" in s for s in segments), segments
        assert "".join(segments) == tok.decode(ids)


def _invalid_utf8(raw):
    try:
        raw.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def _prompt(tok, question):
    return tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)


def _generated_ids(responses):
    """Token ids stream_generate produced; the final response repeats the stop token, which is not text."""
    ids = [r.token for r in responses]
    return ids[:-1] if responses[-1].finish_reason == "stop" else ids


def _force(tok, prompt_len, forced):
    """A logits processor that makes greedy decoding emit `forced` (the prompt is prompt_len tokens)."""
    def processor(tokens, logits):
        step = min(tokens.size - prompt_len, len(forced) - 1)
        mask = mx.arange(logits.shape[-1]) == forced[step]
        return mx.where(mask, mx.zeros_like(logits), mx.full(logits.shape, -mx.inf, dtype=logits.dtype))
    return processor


def test_generate_and_stream_generate(tok, mlx_tok, model):
    prompt = _prompt(tok, "Natalia sold 48 clips. How many?")
    responses = list(stream_generate(model, mlx_tok, prompt, max_tokens=12))
    ids = _generated_ids(responses)
    assert ids and not set(ids) & tok.eos_token_ids
    assert "".join(r.text for r in responses) == tok.decode(ids)
    assert generate(model, mlx_tok, prompt, max_tokens=12) == tok.decode(ids)
    # A string prompt gets <|bos|> prepended, like nanochat.
    assert list(stream_generate(model, mlx_tok, "Hi", max_tokens=2))[-1].prompt_tokens == 1 + len(tok.encode("Hi"))


@pytest.mark.parametrize("stop", ["<|assistant_end|>", "<|bos|>"])
def test_stream_generate_multibyte_and_stop(tok, mlx_tok, model, stop):
    prompt = _prompt(tok, "Say it.")
    forced_ids = tok.encode(MULTIBYTE) + [tok.encode_special(stop)]
    responses = list(stream_generate(model, mlx_tok, prompt, max_tokens=64,
                                     logits_processors=[_force(tok, len(prompt), forced_ids)]))
    assert responses[-1].finish_reason == "stop"
    assert _generated_ids(responses) == forced_ids[:-1]
    assert not any("\ufffd" in r.text for r in responses)
    assert "".join(r.text for r in responses) == MULTIBYTE


def test_batch_generate(tok, mlx_tok, model):
    prompts = [_prompt(tok, "What is 3 + 4?"), _prompt(tok, "Zoë has 12 stamps and buys 30 more. How many now?")]
    out = batch_generate(model, mlx_tok, prompts, max_tokens=10, return_token_ids=True)
    for prompt, text, ids in zip(prompts, out.texts, out.token_ids):
        assert text == tok.decode(ids) and not set(ids) & tok.eos_token_ids
        # Greedy batch decoding matches one-at-a-time decoding.
        assert ids == _generated_ids(list(stream_generate(model, mlx_tok, prompt, max_tokens=10)))
    # BatchGenerator rows stop at either nanochat stop token (per-row processors force the text).
    forced = [tok.encode("é€ 日本") + [tok.assistant_end_id], tok.encode("#### 7") + [tok.bos_token_id]]
    gen = BatchGenerator(model, stop_tokens=[[t] for t in mlx_tok.eos_token_ids])
    uids = gen.insert(prompts, [32, 32], logits_processors=[[_force(tok, len(p), f)] for p, f in zip(prompts, forced)])
    tokens, finish = {uid: [] for uid in uids}, {}
    while responses := gen.next_generated():
        for r in responses:
            tokens[r.uid].append(r.token)
            if r.finish_reason is not None:
                finish[r.uid] = r.finish_reason
    gen.close()
    assert [finish[u] for u in uids] == ["stop", "stop"]
    assert [tokens[u] for u in uids] == forced
    assert [tok.decode(tokens[u][:-1]) for u in uids] == ["é€ 日本", "#### 7"]
