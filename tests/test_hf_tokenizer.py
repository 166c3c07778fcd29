"""Hugging Face tokenizer files of nanochat folders: tiktoken's ids, nanochat's chat rendering, and
plain mlx_lm.load / mlx_lm.generate giving what load_model gives."""

import json
import random
import shutil
from pathlib import Path

import pytest
import regex
import tiktoken
from fixture_tokenizer import _training_text

from mlx_grpo.nanochat.hf_tokenizer import (
    GENERATION_CONFIG_JSON,
    HF_TOKENIZER_FILES,
    NANOCHAT_CHAT_TEMPLATE,
    TOKENIZER_CONFIG_JSON,
    TOKENIZER_JSON,
    hf_tokenizer_files,
    main,
    write_hf_tokenizer_files,
)
from mlx_grpo.nanochat.tokenizer import (
    NANOCHAT_SPECIAL_TOKENS,
    NANOCHAT_SPLIT_PATTERN,
    TiktokenTokenizerWrapper,
    _byte_to_unicode,
    load_tiktoken_encoding,
    nanochat_tokenizer,
    train_tokenizer,
)

GSM8K = Path(__file__).resolve().parents[1] / "data" / "gsm8k"

EDGE_TEXTS = [
    "",
    " ",
    "   ",
    "\n",
    "\n\n\n",
    "\r\n\r\n",
    "a  \n\n  b",
    "x\t\t y",
    "foo   ",
    "x  \t\n",
    ".\r\n\r\nx",
    "\n \n  x",
    "hi!!!\n\n",
    "!!!?? \n",
    " ?!",
    "it's IT'S We'LL they'd I'M",
    "'s'S'll'",
    "12345678901234567890",
    "3.14159 1,000,000 -42 +7",
    "Zoë's café coûte 3 € — résumé",
    "日本語のテキスト 東京",
    "😀😀 ok 👍🏽",
    "a\u00a0b \u3000 x\u2003y",
    "e\u0301 combining",
    "    def f(a, b):\n        return a**b\n",
    "<<48/2=24>>24\n#### 72",
    "<|bos|> looks special but is plain text here",
]


def _gsm8k_lines(split: str) -> list:
    texts = []
    with open(GSM8K / f"{split}.jsonl", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            texts += [row["question"], row["answer"]]
    return texts


def _fuzz_texts(n: int, seed: int = 0) -> list:
    """Random strings over small alphabets of letters, digits, punctuation, whitespace, multi-byte."""
    rng = random.Random(seed)
    chars = list("=-_*#.+/ \n\t\r0123456789abAB'\"()<>|!?,") + ["é", "日", "😀", "\u00a0", "\u0301", "ß"]
    texts = [c * k for c in chars for k in (1, 2, 3, 5, 17)]
    for _ in range(n):
        alphabet = rng.sample(chars, rng.randint(1, 6))
        texts.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))))
    return texts


def _corpus() -> list:
    texts = _training_text() + EDGE_TEXTS + _gsm8k_lines("test") + _fuzz_texts(2000)
    return [t for t in texts if "<|" not in t]  # special strings are specials in HF, plain in nanochat


def _gsm8k_trained_encoding() -> tiktoken.Encoding:
    """A 4096-token nanochat-style tokenizer trained on GSM8K train: many more merges than the fixture."""
    return train_tokenizer(_gsm8k_lines("train"), 4096)


@pytest.fixture(scope="module")
def encodings(tiny_model_dir):
    return {
        "tiny": load_tiktoken_encoding(tiny_model_dir / "tokenizer.pkl"),
        "gsm8k-4096": _gsm8k_trained_encoding(),
    }


@pytest.fixture(scope="module", params=["tiny", "gsm8k-4096"])
def encoding(request, encodings):
    return encodings[request.param]


@pytest.fixture(scope="module")
def hf_tokenizer(encoding):
    """The tokenizers.Tokenizer read back from the tokenizer.json text that gets written."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(hf_tokenizer_files(encoding)[TOKENIZER_JSON])


@pytest.fixture(scope="module")
def hf_folder(encoding, tmp_path_factory):
    """A folder holding only the HF tokenizer files (what AutoTokenizer / mlx-lm read)."""
    folder = tmp_path_factory.mktemp("hf_tokenizer")
    write_hf_tokenizer_files(folder, hf_tokenizer_files(encoding))
    return folder


# -- ids ----------------------------------------------------------------------


def test_tokenizer_json_gives_tiktoken_ids(encoding, hf_tokenizer):
    texts = _corpus()
    want = encoding.encode_ordinary_batch(texts)
    got = [e.ids for e in hf_tokenizer.encode_batch(texts, add_special_tokens=False)]
    mismatched = [texts[i] for i in range(len(texts)) if want[i] != got[i]]
    assert not mismatched, f"{len(mismatched)} texts differ, e.g. {mismatched[:3]!r}"


def test_split_pattern_with_possessive_quantifiers_pre_tokenizes_like_regex(hf_tokenizer):
    # tokenizers' regex engine (Oniguruma) must split exactly as tiktoken's pattern, ?+ and ++ included.
    byte_map = _byte_to_unicode()
    pattern = regex.compile(NANOCHAT_SPLIT_PATTERN)
    for text in _corpus():
        want = ["".join(byte_map[b] for b in piece.encode()) for piece in pattern.findall(text)]
        got = [piece for piece, _ in hf_tokenizer.pre_tokenizer.pre_tokenize_str(text)]
        assert got == want, text


def test_special_tokens_and_bos(encoding, hf_tokenizer):
    for name in NANOCHAT_SPECIAL_TOKENS:
        assert hf_tokenizer.token_to_id(name) == encoding.encode_single_token(name)
    bos = encoding.encode_single_token("<|bos|>")
    assert hf_tokenizer.encode("How many?").ids == [bos] + encoding.encode_ordinary("How many?")
    assert hf_tokenizer.get_vocab_size(with_added_tokens=True) == encoding.n_vocab


def test_decode_equals_tiktoken(encoding, hf_tokenizer):
    rng = random.Random(1)
    wrapper = TiktokenTokenizerWrapper(encoding)
    for _ in range(300):
        ids = [rng.randrange(encoding.n_vocab) for _ in range(rng.randint(1, 12))]
        assert hf_tokenizer.decode(ids, skip_special_tokens=False) == wrapper.decode(ids), ids


# -- chat template ------------------------------------------------------------

CONVERSATIONS = [
    [{"role": "user", "content": "Natalia sold clips to 48 of her friends. How many?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "user", "content": "  leading and trailing spaces  "},
        {"role": "assistant", "content": "\nIt is 4.\n"},
        {"role": "user", "content": "Zoë's café: 東京 😀\n\n"},
    ],
    [
        {"role": "system", "content": ""},
        {"role": "user", "content": ""},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "and again?"},
    ],
    [
        {"role": "user", "content": "Weng earns $12 an hour for 50 minutes."},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Per minute: "},
                {"type": "python", "text": "12/60"},
                {"type": "python_output", "text": "0.2"},
                {"type": "text", "text": ", so 50 minutes is $10.\n#### 10"},
            ],
        },
    ],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_template_matches_nanochat_rendering(encoding, hf_folder, messages):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(hf_folder)
    ours = TiktokenTokenizerWrapper(encoding)
    last_is_user = messages[-1]["role"] == "user"
    kwargs = {"add_generation_prompt": True} if last_is_user else {}
    want = ours.apply_chat_template(messages, **kwargs)
    assert hf.apply_chat_template(messages, return_dict=False, **kwargs) == want
    assert hf.apply_chat_template(messages, tokenize=False, **kwargs) == ours.apply_chat_template(
        messages, tokenize=False, **kwargs
    )
    if not last_is_user and isinstance(messages[-1]["content"], str):
        open_turn = ours.apply_chat_template(messages, continue_final_message=True)
        assert hf.apply_chat_template(messages, continue_final_message=True, return_dict=False) == open_turn


@pytest.mark.parametrize(
    "messages, kwargs",
    [
        ([{"role": "assistant", "content": "hi"}], {}),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], {}),
        ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}], {}),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}], {}),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], {"add_generation_prompt": True}),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "text": ""}]}], {}),
    ],
)
def test_chat_template_refuses_what_nanochat_refuses(encodings, tmp_path, messages, kwargs):
    import jinja2
    from transformers import AutoTokenizer

    encoding = encodings["tiny"]
    write_hf_tokenizer_files(tmp_path, hf_tokenizer_files(encoding))
    with pytest.raises(ValueError):
        TiktokenTokenizerWrapper(encoding).apply_chat_template(messages, **kwargs)
    with pytest.raises(jinja2.TemplateError):
        AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(messages, return_dict=False, **kwargs)


# -- folders and mlx-lm -------------------------------------------------------


def test_converted_folder_has_hf_files(tiny_model_dir):
    for name in HF_TOKENIZER_FILES:
        assert (tiny_model_dir / name).is_file(), name
    config = json.loads((tiny_model_dir / TOKENIZER_CONFIG_JSON).read_text())
    assert (config["bos_token"], config["eos_token"]) == ("<|bos|>", "<|assistant_end|>")
    assert config["chat_template"] == NANOCHAT_CHAT_TEMPLATE
    ours = TiktokenTokenizerWrapper.from_dir(tiny_model_dir)
    generation = json.loads((tiny_model_dir / GENERATION_CONFIG_JSON).read_text())
    assert generation["eos_token_id"] == [ours.assistant_end_id, ours.bos_token_id]


def test_mlx_lm_load_and_generate_match_load_model(tiny_model_dir):
    import mlx_lm
    from mlx_lm.tokenizer_utils import NaiveStreamingDetokenizer

    from mlx_grpo.models import load_model

    model, tokenizer = mlx_lm.load(str(tiny_model_dir))
    our_model, our_tokenizer = load_model(tiny_model_dir)
    # load_model keeps using tokenizer.pkl; mlx_lm.load uses the HF files.
    assert nanochat_tokenizer(our_tokenizer) is not None and nanochat_tokenizer(tokenizer) is None
    assert tokenizer.eos_token_ids == our_tokenizer.eos_token_ids
    assert isinstance(tokenizer.detokenizer, NaiveStreamingDetokenizer)

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How many clips did Natalia sell?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == our_tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert mlx_lm.generate(model, tokenizer, prompt, max_tokens=24) == mlx_lm.generate(
        our_model, our_tokenizer, prompt, max_tokens=24
    )
    # A raw string prompt gets <|bos|> prepended on both paths.
    text = "Natalia sold 48 clips"
    assert tokenizer.encode(text) == our_tokenizer.encode(text, add_special_tokens=True)
    assert mlx_lm.generate(model, tokenizer, text, max_tokens=16) == mlx_lm.generate(
        our_model, our_tokenizer, text, max_tokens=16
    )


def test_training_checkpoint_loads_in_mlx_lm(tiny_model_dir, tmp_path):
    import mlx_lm

    from mlx_grpo.models import load_model, save_model_folder

    model, tokenizer = load_model(tiny_model_dir)
    out = save_model_folder(tmp_path / "step_000001", model, tokenizer, tiny_model_dir)
    for name in HF_TOKENIZER_FILES:
        assert (out / name).read_text() == (tiny_model_dir / name).read_text(), name
    _, hf_tokenizer = mlx_lm.load(str(out))
    assert hf_tokenizer.encode("12 clips") == tokenizer.encode("12 clips", add_special_tokens=True)


def test_cli_adds_files_to_a_folder_without_them(tiny_model_dir, tmp_path, capsys):
    shutil.copy(tiny_model_dir / "tokenizer.pkl", tmp_path)
    main([str(tmp_path)])
    assert "wrote tokenizer.json" in capsys.readouterr().out
    for name in HF_TOKENIZER_FILES:
        assert (tmp_path / name).read_text() == (tiny_model_dir / name).read_text(), name


# -- refusals -----------------------------------------------------------------


def test_refuses_encoding_without_nanochat_specials(encodings):
    enc = encodings["tiny"]
    ranks = enc._mergeable_ranks
    plain = tiktoken.Encoding(name="plain", pat_str=enc._pat_str, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": len(ranks)})
    with pytest.raises(ValueError, match="lacks nanochat's special tokens"):
        hf_tokenizer_files(plain)


def test_refuses_specials_that_do_not_follow_the_ranks(encodings):
    enc = encodings["tiny"]
    ranks = enc._mergeable_ranks
    specials = {t: len(ranks) + 10 + i for i, t in enumerate(NANOCHAT_SPECIAL_TOKENS)}
    gapped = tiktoken.Encoding(name="gapped", pat_str=enc._pat_str, mergeable_ranks=ranks, special_tokens=specials)
    with pytest.raises(ValueError, match="special token ids do not follow"):
        hf_tokenizer_files(gapped)
