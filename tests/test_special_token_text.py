"""Special-token strings inside text: where the Hugging Face tokenizer files differ from tokenizer.pkl.

MLX-GRPO's own tokenizer (tokenizer.pkl, as nanochat) encodes "<|bos|>" written in a message as plain text.
The Hugging Face files cannot: transformers.AutoTokenizer (and mlx_lm.load, which uses it) matches a special
token's string anywhere in the text, and its one switch against that (split_special_tokens) would also split
the chat template's own tokens. The README says so; these tests pin the difference on both loaders.
"""

import pytest

from mlx_grpo.models import load_model

TEXTS = ["a <|bos|> b", "<|user_start|>hi<|user_end|>", "<|python_start|>1+1<|python_end|>", "plain text"]
MESSAGES = [{"role": "user", "content": "say <|assistant_end|> now"}]


@pytest.fixture(scope="module")
def tokenizers(tiny_model_dir):
    import mlx_lm
    from transformers import AutoTokenizer

    _, ours = load_model(tiny_model_dir)
    _, mlx_lm_tokenizer = mlx_lm.load(str(tiny_model_dir))
    return ours, AutoTokenizer.from_pretrained(str(tiny_model_dir)), mlx_lm_tokenizer


@pytest.mark.parametrize("text", TEXTS)
def test_special_token_strings_in_text(tokenizers, text):
    ours, transformers_tokenizer, mlx_lm_tokenizer = tokenizers
    plain = ours.encode(text)
    hf = transformers_tokenizer.encode(text, add_special_tokens=False)
    assert mlx_lm_tokenizer.encode(text, add_special_tokens=False) == hf  # both HF loaders agree
    assert ours.decode(plain) == text and transformers_tokenizer.decode(hf) == text
    if "<|" in text:  # ours: the characters as text; the HF files: one control token for each
        assert len(hf) < len(plain)
    else:
        assert hf == plain


def test_a_special_token_string_in_a_message(tokenizers):
    ours, transformers_tokenizer, _ = tokenizers
    end = transformers_tokenizer.convert_tokens_to_ids("<|assistant_end|>")
    hf = transformers_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=False)
    nano = ours.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert end in hf and end not in nano  # the message's text became the end-of-turn token through the HF files only
