import json
import os

import pytest

from mlx_grpo.data.gsm8k import (
    PROMPT_FORMATS,
    XML_SYSTEM_PROMPT,
    DataError,
    Example,
    PromptSampler,
    build_messages,
    default_gsm8k_path,
    encode_prompt,
    epoch_order,
    gsm8k_reference_answer,
    gsm8k_sft_conversation,
    gsm8k_solution_to_nanochat_parts,
    load_gsm8k,
    num_steps,
)

ROWS = [
    {"question": "What is 2+3?", "answer": "2+3 = <<2+3=5>>5\n#### 5"},
    {"question": "Big?", "answer": "It is <<1000*2=2000>>2,000.\n#### 2,000"},
    {"question": "Negative?", "answer": "#### -4"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---- loading ------------------------------------------------------------------------------

def test_bundled_gsm8k():
    train_path, test_path = default_gsm8k_path("train"), default_gsm8k_path("test")
    assert train_path.is_file() and test_path.is_file()
    assert (train_path.parent / "LICENSE").is_file()
    train = load_gsm8k(dataset_path=str(train_path.parent), split="train")  # a folder
    assert len(train) == 7473
    assert [e.answer for e in train[:3]] == ["72", "10", "5"]
    assert train[0].question.startswith("Natalia sold clips to 48 of her friends")
    assert train[0].solution.endswith("#### 72")
    test = load_gsm8k(dataset_path=str(test_path), split="test")  # a file
    assert len(test) == 1319
    assert [e.answer for e in test[:2]] == ["18", "3"]


def test_tiny_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "tiny.jsonl", ROWS)
    examples = load_gsm8k(dataset_path=str(path))
    assert examples == [
        Example("What is 2+3?", "5", ROWS[0]["answer"]),
        Example("Big?", "2000", ROWS[1]["answer"]),  # commas removed
        Example("Negative?", "-4", ROWS[2]["answer"]),
    ]


def test_tiny_parquet_file_and_folder(tmp_path):
    import datasets

    datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "test.parquet"))
    from_file = load_gsm8k(dataset_path=str(tmp_path / "test.parquet"), split="test")
    from_folder = load_gsm8k(dataset_path=str(tmp_path), split="test")
    assert [e.answer for e in from_file] == ["5", "2000", "-4"]
    assert from_folder == from_file


def test_missing_field_error(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "solution": "#### 1"}])
    with pytest.raises(DataError, match=r"bad\.jsonl.*missing field.*'answer'"):
        load_gsm8k(dataset_path=str(path))


def test_row_without_final_answer(tmp_path):
    rows = [ROWS[0], {"question": "q", "answer": "no final answer here"}]
    path = write_jsonl(tmp_path / "nofinal.jsonl", rows)
    with pytest.raises(DataError, match=r"nofinal\.jsonl: line 2: .*####"):
        load_gsm8k(dataset_path=str(path))


def test_bad_local_paths(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_gsm8k(dataset_path=str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="without train.jsonl or train.parquet"):
        load_gsm8k(dataset_path=str(tmp_path), split="train")
    (tmp_path / "data.csv").write_text("question,answer\n")
    with pytest.raises(DataError, match=r"\.jsonl, \.json or \.parquet"):
        load_gsm8k(dataset_path=str(tmp_path / "data.csv"))


def test_offline_hub_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as info:
        load_gsm8k(split="train")
    message = str(info.value)
    assert "\n" not in message
    assert "'openai/gsm8k'" in message and "dataset_path" in message
    assert "dataset_path = \"data/gsm8k\"" in message
    assert isinstance(info.value.__cause__, ConnectionError)
    assert isinstance(info.value, ValueError)


def test_hub_path_is_used_without_dataset_path(monkeypatch):
    import datasets

    calls = []

    def fake_load(name, config, split):
        calls.append((name, config, split))
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    examples = load_gsm8k("openai/gsm8k", "main", "", "test")
    assert calls == [("openai/gsm8k", "main", "test")]
    assert [e.answer for e in examples] == ["5", "2000", "-4"]


# ---- data order ---------------------------------------------------------------------------

def test_epoch_order_is_a_deterministic_permutation():
    a = epoch_order(50, seed=3, epoch=0)
    assert a == epoch_order(50, seed=3, epoch=0)
    assert sorted(a) == list(range(50))
    assert a != epoch_order(50, seed=3, epoch=1)
    assert a != epoch_order(50, seed=4, epoch=0)


def collect(sampler, n):
    batches = []
    while batch := sampler.next_batch(n):
        batches.append(batch)
    return batches


def test_sampler_crosses_epochs_without_dropping():
    sampler = PromptSampler(10, seed=1, shuffle=True, num_epochs=2)
    batches = collect(sampler, 4)
    assert [len(b) for b in batches] == [4, 4, 4, 4, 4]
    flat = [i for b in batches for i in b]
    assert flat == epoch_order(10, 1, 0) + epoch_order(10, 1, 1)
    assert len(batches) == num_steps(10, 4, 2) == sampler.num_steps(4)
    assert sampler.exhausted and sampler.next_batch(4) == []


def test_sampler_last_partial_batch_and_num_steps():
    sampler = PromptSampler(10, seed=0, shuffle=False, num_epochs=1)
    batches = collect(sampler, 3)
    assert batches == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert num_steps(10, 3, 1) == 4
    assert num_steps(10, 3, 3) == 10  # 30 examples / 3
    assert num_steps(10, 4, 3) == 8  # ceil(30 / 4)
    assert num_steps(7473, 16, 1, max_train_samples=500) == 32


def test_sampler_max_train_samples_uses_first_rows():
    sampler = PromptSampler(100, seed=5, max_train_samples=6)
    flat = [i for b in collect(sampler, 4) for i in b]
    assert sorted(flat) == list(range(6))
    assert PromptSampler(3, max_train_samples=10).size == 3  # more than exists: all of them


def test_sampler_resume_is_exact():
    full = PromptSampler(13, seed=7, num_epochs=3)
    expected = collect(full, 5)

    first = PromptSampler(13, seed=7, num_epochs=3)
    head = [first.next_batch(5) for _ in range(4)]  # stops mid-epoch
    state = json.loads(json.dumps(first.state_dict()))  # must survive a JSON round trip
    resumed = PromptSampler(13, seed=7, num_epochs=3)
    resumed.load_state_dict(state)
    assert resumed.consumed == first.consumed == 20
    assert head + collect(resumed, 5) == expected


def test_sampler_rejects_mismatched_state():
    state = PromptSampler(10, seed=1).state_dict()
    with pytest.raises(DataError, match="saved seed=1"):
        PromptSampler(10, seed=2).load_state_dict(state)
    with pytest.raises(DataError, match="num_examples"):
        PromptSampler(11, seed=1).load_state_dict(state)
    with pytest.raises(DataError, match="corrupt"):
        PromptSampler(10, seed=1).load_state_dict({**state, "position": 10})


def test_sampler_validation():
    with pytest.raises(DataError, match="empty"):
        PromptSampler(0)
    with pytest.raises(DataError, match="num_epochs"):
        PromptSampler(5, num_epochs=0)
    with pytest.raises(DataError, match="max_train_samples"):
        PromptSampler(5, max_train_samples=-1)
    with pytest.raises(DataError, match="batch size"):
        PromptSampler(5).next_batch(0)


# ---- prompts ------------------------------------------------------------------------------

def test_build_messages():
    assert build_messages("Q?", "nanochat") == [{"role": "user", "content": "Q?"}]
    assert build_messages("Q?", "nanochat", system_prompt="Be brief.") == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q?"}]
    assert build_messages("Q?", "xml") == [
        {"role": "system", "content": XML_SYSTEM_PROMPT}, {"role": "user", "content": "Q?"}]
    assert XML_SYSTEM_PROMPT == (
        "Respond in the following format:\n<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>")
    assert build_messages("Q?", "xml", system_prompt="Custom")[0] == {"role": "system", "content": "Custom"}
    assert PROMPT_FORMATS == ("nanochat", "xml")
    with pytest.raises(ValueError, match=r"unknown prompt_format 'chatml'.*'nanochat', 'xml'"):
        build_messages("Q?", "chatml")


class FakeTokenizer:
    """Stands in for nanochat's wrapper: only apply_chat_template, no chat_template attribute."""

    def __init__(self, result=None):
        self.calls = []
        self.result = result

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=False):
        self.calls.append((messages, add_generation_prompt, tokenize))
        if self.result is not None:
            return self.result
        return [1] + [len(m["content"]) for m in messages] + [2]


def test_encode_prompt_with_fake_tokenizer():
    tok = FakeTokenizer()
    messages = build_messages("What is 2+3?", "nanochat")
    assert encode_prompt(tok, messages) == [1, 12, 2]
    assert tok.calls == [(messages, True, True)]
    # transformers 5 can return a BatchEncoding-like mapping
    assert encode_prompt(FakeTokenizer(result={"input_ids": [5, 6]}), messages) == [5, 6]


def test_encode_prompt_with_nanochat_tokenizer():
    """The real nanochat wrapper on a byte-level vocabulary: [bos, user_start, q..., user_end, assistant_start]."""
    import tiktoken

    from mlx_grpo.nanochat.tokenizer import NANOCHAT_SPECIAL_TOKENS, TiktokenTokenizerWrapper

    specials = {t: 256 + i for i, t in enumerate(NANOCHAT_SPECIAL_TOKENS)}
    encoding = tiktoken.Encoding(name="bytes", pat_str=r"\S+|\s+",
                                 mergeable_ranks={bytes([i]): i for i in range(256)}, special_tokens=specials)
    tok = TiktokenTokenizerWrapper(encoding)
    bos, user_start, user_end, assistant_start = (specials[t] for t in NANOCHAT_SPECIAL_TOKENS[:4])
    assert encode_prompt(tok, build_messages("Hi?", "nanochat")) == [
        bos, user_start, *b"Hi?", user_end, assistant_start]
    # A system prompt is merged into the user turn as system + "\n\n" + question.
    assert encode_prompt(tok, build_messages("Hi?", "nanochat", system_prompt="S")) == [
        bos, user_start, *b"S\n\nHi?", user_end, assistant_start]


def test_encode_prompt_without_chat_template():
    hf_like = FakeTokenizer()
    hf_like.chat_template = None
    with pytest.raises(DataError, match="no chat template"):
        encode_prompt(hf_like, build_messages("Q", "xml"))
    wrapper_like = FakeTokenizer()
    wrapper_like.has_chat_template = False
    with pytest.raises(DataError, match="chat/instruct model"):
        encode_prompt(wrapper_like, build_messages("Q", "xml"))
    with pytest.raises(DataError, match="expected token ids"):
        encode_prompt(FakeTokenizer(result="<|bos|>text"), build_messages("Q", "xml"))


# ---- nanochat SFT parts -------------------------------------------------------------------

def test_solution_to_nanochat_parts_on_real_solution():
    example = load_gsm8k(dataset_path=str(default_gsm8k_path("train")))[0]
    parts = gsm8k_solution_to_nanochat_parts(example.solution)
    assert parts == [
        {"type": "text", "text": "Natalia sold 48/2 = "},
        {"type": "python", "text": "48/2"},
        {"type": "python_output", "text": "24"},
        {"type": "text", "text": "24 clips in May.\nNatalia sold 48+24 = "},
        {"type": "python", "text": "48+24"},
        {"type": "python_output", "text": "72"},
        {"type": "text", "text": "72 clips altogether in April and May.\n#### 72"},
    ]
    conversation = gsm8k_sft_conversation(example)
    assert conversation["messages"][0] == {"role": "user", "content": example.question}
    assert conversation["messages"][1] == {"role": "assistant", "content": parts}


def test_solution_parts_edge_cases():
    parts = gsm8k_solution_to_nanochat_parts("<<a=b=3>><<5>>\n#### 3")
    assert parts == [
        {"type": "python", "text": "a=b"},  # split at the last "="
        {"type": "python_output", "text": "3"},
        {"type": "python", "text": "5"},  # no "=": empty output
        {"type": "python_output", "text": ""},
        {"type": "text", "text": "\n#### 3"},
    ]


def test_malformed_jsonl_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"question": "q", "answer": "#### 1"}\n{not json\n')
    with pytest.raises(DataError, match=r"broken\.jsonl: line 2: invalid JSON"):
        load_gsm8k(dataset_path=str(path))


def test_local_jsonl_is_read_fresh(tmp_path):
    """An edit that keeps the size and the mtime is still read: local files never come from a cache."""
    path = tmp_path / "train.jsonl"
    path.write_text('{"question": "q", "answer": "#### 1"}\n')
    stat = path.stat()
    assert load_gsm8k(dataset_path=str(path))[0].answer == "1"
    path.write_text('{"question": "q", "answer": "#### 2"}\n')
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    assert load_gsm8k(dataset_path=str(path))[0].answer == "2"


def test_fractions_and_decimals_are_whole_answers():
    assert gsm8k_reference_answer("so #### 3/4") == "3/4"
    assert gsm8k_reference_answer("#### -1,000.5") == "-1000.5"
    assert gsm8k_reference_answer("#### 7/") == "7"  # a slash without a denominator is not part of it
