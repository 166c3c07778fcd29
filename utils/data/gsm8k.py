"""GSM8K loading, resumable data order, and prompt building.

- load_gsm8k: rows from a local .jsonl/.parquet (or a folder with {split}.jsonl/.parquet), else
  from the Hugging Face hub; the reference answer is the number after "####" (nanochat's regex).
- PromptSampler: a deterministic, resumable order over example indices, one permutation per
  (seed, epoch). Batches run across epoch boundaries so that no example is dropped.
- build_messages / encode_prompt: the "nanochat" and "xml" prompt formats, rendered with the
  tokenizer's own chat template.
- gsm8k_solution_to_nanochat_parts: a solution's <<expr=result>> annotations as nanochat
  calculator-tool parts (for SFT conversations).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from numbers import Integral
from pathlib import Path

import numpy as np

from mlx_grpo import REPO_ROOT

# nanochat's / OpenAI's GSM8K regex, and a fraction's "/denominator" ("#### 3/4" is 3/4, not 3).
GSM8K_ANSWER_RE = re.compile(r"#### (\-?[0-9\.\,]+(?:/[0-9\.\,]*[0-9])?)")

XML_SYSTEM_PROMPT = (
    "Respond in the following format:\n<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>"
)
PROMPT_FORMATS = ("nanochat", "xml")


class DataError(ValueError):
    """The data set cannot be found, read, or has the wrong fields/format."""


@dataclass(frozen=True)
class Example:
    question: str
    answer: str  # reference number after "####", commas removed, e.g. "72"
    solution: str  # the full "answer" text of the row (worked solution ending in "#### 72")


# --------------------------------------------------------------------------------------------
# Loading


BUNDLED_GSM8K = "data/gsm8k"  # relative to the checkout: openai/gsm8k "main" as train.jsonl and test.jsonl


def default_gsm8k_path(split: str) -> Path:
    """The bundled copy of openai/gsm8k "main": <repo>/data/gsm8k/{split}.jsonl."""
    return REPO_ROOT / BUNDLED_GSM8K / f"{split}.jsonl"


def gsm8k_reference_answer(solution: str) -> str | None:
    """The number after "#### " in a GSM8K solution, commas removed; None if there is none."""
    match = GSM8K_ANSWER_RE.search(solution)
    if match is None:
        return None
    return match.group(1).strip().replace(",", "")


def _local_data_file(dataset_path: str, split: str) -> Path:
    path = Path(dataset_path).expanduser()
    if path.is_dir():
        for suffix in (".jsonl", ".parquet"):
            candidate = path / f"{split}{suffix}"
            if candidate.is_file():
                return candidate
        raise DataError(
            f"dataset_path {str(path)!r} is a folder without {split}.jsonl or {split}.parquet: "
            f"add that file or point dataset_path at a file"
        )
    if not path.is_file():
        raise DataError(
            f"dataset_path {str(path)!r} does not exist: fix the path (the bundled GSM8K: {REPO_ROOT / BUNDLED_GSM8K})"
        )
    if path.suffix not in (".jsonl", ".json", ".parquet"):
        raise DataError(f"dataset_path {str(path)!r} must be a .jsonl, .json or .parquet file")
    return path


def _examples_from_table(table, source: str) -> list[Example]:
    missing = [name for name in ("question", "answer") if name not in table.column_names]
    if missing:
        raise DataError(
            f"{source}: missing field(s) {missing} (found {table.column_names}); "
            f"rows need 'question' and 'answer' (solution ending in '#### N')"
        )
    rows = [{"question": q, "answer": a} for q, a in zip(table["question"], table["answer"])]
    return _examples_from_rows(rows, source, [f"row {i}" for i in range(1, len(rows) + 1)])


def _examples_from_rows(rows: list, source: str, where: list[str]) -> list[Example]:
    """Examples from row dicts; where[i] names row i in errors ("line 7" of a jsonl, "row 7" of a table)."""
    examples = []
    for row, at in zip(rows, where):
        if not isinstance(row, dict):
            raise DataError(f"{source}: {at}: expected an object with 'question' and 'answer', got "
                            f"{type(row).__name__}")
        missing = [name for name in ("question", "answer") if name not in row]
        if missing:
            raise DataError(f"{source}: {at}: missing field(s) {missing} (found {sorted(row)}); "
                            f"rows need 'question' and 'answer' (solution ending in '#### N')")
        question, solution = row["question"], row["answer"]
        if not isinstance(question, str) or not isinstance(solution, str):
            raise DataError(f"{source}: {at}: 'question' and 'answer' must be strings")
        reference = gsm8k_reference_answer(solution)
        if reference is None:
            raise DataError(f"{source}: {at}: 'answer' has no '#### <number>' final answer: {solution[-60:]!r}")
        examples.append(Example(question=question, answer=reference, solution=solution))
    if not examples:
        raise DataError(f"{source}: no rows: the file is empty; rows are JSON objects with 'question' and 'answer'")
    return examples


def _read_jsonl(path: Path) -> tuple[list, list[str]]:
    """(rows, "line N" of each) of a JSON-lines file; blank lines are skipped."""
    rows, where = [], []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: line {number} is not UTF-8 (byte {raw[e.start]:#04x} at column "
                                f"{e.start + 1}): save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {number}: invalid JSON ({e.msg}, column {e.colno}): each line must "
                                f"be one JSON object with 'question' and 'answer'") from None
            where.append(f"line {number}")
    return rows, where


def _read_local(path: Path) -> list[Example]:
    """A local file read as it is now (never from a cache: an edited file is read again)."""
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"could not read {path} as parquet ({' '.join(str(e).split())[:200]}): "
                            f"write it again, or give a .jsonl file") from None
        rows = table.to_pylist()
        return _examples_from_rows(rows, str(path), [f"row {i}" for i in range(1, len(rows) + 1)])
    if path.suffix == ".json" and path.read_bytes().lstrip()[:1] == b"[":  # one JSON array of rows
        try:
            rows = json.loads(path.read_text(encoding="utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: not a valid UTF-8 JSON array of rows ({e}): fix the file") from None
        return _examples_from_rows(rows, str(path), [f"row {i}" for i in range(1, len(rows) + 1)])
    rows, where = _read_jsonl(path)
    return _examples_from_rows(rows, str(path), where)


def check_data_files(cfg, eval_only: bool = False) -> None:
    """Before anything loads: the local files of the splits a run reads exist and parse, and training and
    evaluation do not read the same file or rows (the run would report accuracy on its own training data)."""
    if not cfg.dataset_path:  # the hub: the split names are all there is to compare before a download
        if not eval_only and cfg.train_split == cfg.eval_split:
            raise DataError(f"train_split and eval_split are both {cfg.eval_split!r} of {cfg.dataset}: the run "
                            f"would evaluate on the questions it trains on; set eval_split to a held-out split")
        return
    eval_file = _local_data_file(cfg.dataset_path, cfg.eval_split)
    eval_questions = [e.question for e in _read_local(eval_file)]
    if eval_only:
        return
    train_file = _local_data_file(cfg.dataset_path, cfg.train_split)
    if train_file.resolve() == eval_file.resolve():
        raise DataError(f"dataset_path {cfg.dataset_path!r} gives train_split {cfg.train_split!r} and eval_split "
                        f"{cfg.eval_split!r} the same file {train_file}: the run would evaluate on the questions it "
                        f"trains on; set dataset_path to a folder holding {cfg.train_split}.jsonl and "
                        f"{cfg.eval_split}.jsonl (the bundled one: dataset_path = \"{BUNDLED_GSM8K}\")")
    check_held_out([e.question for e in _read_local(train_file)], eval_questions)


def check_held_out(train_questions: list[str], eval_questions: list[str]) -> int:
    """How many eval questions are training questions too; all of them (the same rows) is an error."""
    seen = set(train_questions)
    shared = sum(q in seen for q in eval_questions)
    if eval_questions and shared == len(eval_questions):
        raise DataError(f"all {shared} eval questions are training questions too: the train and eval splits hold "
                        f"the same rows; give eval_split (or dataset_path) held-out questions")
    return shared


def load_gsm8k(
    dataset: str = "openai/gsm8k",
    dataset_config: str = "main",
    dataset_path: str = "",
    split: str = "train",
) -> list[Example]:
    """Load GSM8K-style rows (question, answer) as Examples, in file order.

    dataset_path (a .jsonl/.json/.parquet file, or a folder holding {split}.jsonl or
    {split}.parquet) wins over the hub; row numbers in errors are 1-based (= .jsonl line numbers).
    """
    if dataset_path:
        return _read_local(_local_data_file(dataset_path, split))
    import datasets  # heavy import, only needed here

    try:
        table = datasets.load_dataset(dataset, dataset_config or None, split=split)
    except (OSError, ValueError) as e:  # offline (ConnectionError), not found (DatasetNotFoundError), no split
        raise DataError(
            f"could not load {dataset!r} (config {dataset_config!r}, split {split!r}) from the "
            f"Hugging Face hub ({type(e).__name__}: {' '.join(str(e).split())[:160]}); offline, use the bundled "
            f"copy: dataset_path = \"{BUNDLED_GSM8K}\" (a folder with train.jsonl and test.jsonl)"
        ) from e
    return _examples_from_table(table, f"{dataset} ({dataset_config}, {split})")


# --------------------------------------------------------------------------------------------
# Data order


def epoch_order(num_examples: int, seed: int, epoch: int) -> list[int]:
    """A permutation of range(num_examples), fixed by (seed, epoch) on every platform."""
    if seed < 0 or epoch < 0:
        raise DataError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
    return np.random.default_rng([seed, epoch]).permutation(num_examples).tolist()


def _used_examples(num_examples: int, max_train_samples: int) -> int:
    if num_examples <= 0:
        raise DataError("the training set is empty")
    if max_train_samples < 0:
        raise DataError(f"max_train_samples must be >= 0 (0 = all), got {max_train_samples}")
    # Asking for more than exists uses all of them.
    return num_examples if max_train_samples == 0 else min(num_examples, max_train_samples)


def num_steps(num_examples: int, batch_size: int, num_epochs: int, max_train_samples: int = 0) -> int:
    """Exact number of PromptSampler.next_batch(batch_size) calls that return examples.

    Batches run across epoch boundaries, so it is ceil(used * num_epochs / batch_size); only the
    very last batch can be short.
    """
    if batch_size < 1 or num_epochs < 1:
        raise DataError(f"batch_size and num_epochs must be >= 1, got {batch_size} and {num_epochs}")
    return math.ceil(_used_examples(num_examples, max_train_samples) * num_epochs / batch_size)


class PromptSampler:
    """Resumable order over example indices for num_epochs epochs.

    Uses the first max_train_samples examples of the file order (0 = all), shuffled per epoch
    with epoch_order(size, seed, epoch) when shuffle is on. next_batch(n) returns n indices;
    when an epoch has fewer than n left, it takes the remainder and continues into the next
    epoch's order (so no example is dropped; a batch can then hold the same example twice when
    the data set is small). After num_epochs the last batch can be short, then [] is returned.
    state_dict() / load_state_dict() save and restore the position exactly.
    """

    def __init__(self, num_examples: int, seed: int = 0, shuffle: bool = True, num_epochs: int = 1,
                 max_train_samples: int = 0):
        if num_epochs < 1:
            raise DataError(f"num_epochs must be >= 1, got {num_epochs}")
        if seed < 0:
            raise DataError(f"seed must be >= 0, got {seed}")
        self.size = _used_examples(num_examples, max_train_samples)
        self.seed = seed
        self.shuffle = shuffle
        self.num_epochs = num_epochs
        self.epoch = 0
        self.position = 0  # index into the current epoch's order

    def epoch_order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        return _cached_epoch_order(self.size, self.seed, epoch)

    @property
    def exhausted(self) -> bool:
        return self.epoch >= self.num_epochs

    @property
    def consumed(self) -> int:
        """Examples handed out so far, over all epochs."""
        return self.epoch * self.size + self.position

    def num_steps(self, batch_size: int) -> int:
        """Total next_batch(batch_size) calls that return examples, from the start of the run."""
        return num_steps(self.size, batch_size, self.num_epochs)

    def next_batch(self, n: int) -> list[int]:
        if n < 1:
            raise DataError(f"batch size must be >= 1, got {n}")
        batch: list[int] = []
        while len(batch) < n and not self.exhausted:
            order = self.epoch_order(self.epoch)
            take = order[self.position:self.position + n - len(batch)]
            batch.extend(take)
            self.position += len(take)
            if self.position == self.size:
                self.epoch, self.position = self.epoch + 1, 0
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "shuffle": self.shuffle, "num_examples": self.size}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore a saved position; the data (size), seed and shuffle must match the saved run.

        num_epochs may differ (e.g. to train longer after resuming).
        """
        for key, current in (("seed", self.seed), ("shuffle", self.shuffle), ("num_examples", self.size)):
            if state[key] != current:
                raise DataError(
                    f"cannot resume the data order: saved {key}={state[key]!r} but this run has {current!r}; "
                    f"use the same data set, max_train_samples, seed and shuffle as the saved run"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.size:
            raise DataError(f"corrupt sampler state: epoch={epoch}, position={position} for {self.size} examples")
        self.epoch, self.position = epoch, position


@lru_cache(maxsize=4)
def _cached_epoch_order(size: int, seed: int, epoch: int) -> list[int]:
    return epoch_order(size, seed, epoch)


# --------------------------------------------------------------------------------------------
# Prompts


def build_messages(question: str, prompt_format: str, system_prompt: str | None = None) -> list[dict]:
    """Chat messages for one question.

    "nanochat": [user] (a system_prompt becomes a leading system message; nanochat's chat
    template merges it into the first user turn). "xml": [system (system_prompt, or the
    original XML_SYSTEM_PROMPT when empty), user].
    """
    if prompt_format == "nanochat":
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        return messages + [{"role": "user", "content": question}]
    if prompt_format == "xml":
        return [{"role": "system", "content": system_prompt or XML_SYSTEM_PROMPT},
                {"role": "user", "content": question}]
    raise DataError(f"unknown prompt_format {prompt_format!r}: expected one of {list(PROMPT_FORMATS)}")


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Prompt token ids from the tokenizer's chat template, ending with the assistant-turn opener.

    Works with nanochat's tokenizer wrapper, mlx-lm's TokenizerWrapper and HF tokenizers.
    """
    # mlx-lm's wrapper says has_chat_template; a bare HF tokenizer has chat_template (None if unset).
    if hasattr(tokenizer, "has_chat_template"):
        has_template = bool(tokenizer.has_chat_template)
    else:
        has_template = getattr(tokenizer, "chat_template", "") is not None
    if not has_template:
        raise DataError(
            "the tokenizer has no chat template, so prompts cannot be built: use a chat/instruct "
            "model (or a nanochat checkpoint), or give the tokenizer a chat template"
        )
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, Mapping):  # transformers 5 may return a BatchEncoding
        ids = ids["input_ids"]
    ids = list(ids)
    if not ids or not all(isinstance(i, Integral) for i in ids):
        got = type(ids[0]).__name__ if ids else "nothing"
        raise DataError(f"apply_chat_template returned {got}, expected token ids")
    return [int(i) for i in ids]


# --------------------------------------------------------------------------------------------
# nanochat SFT conversations


def gsm8k_solution_to_nanochat_parts(solution: str) -> list[dict]:
    """A GSM8K solution as nanochat assistant parts, as nanochat's tasks/gsm8k.py builds them.

    Each "<<expr=result>>" becomes {"type": "python", "text": expr} followed by
    {"type": "python_output", "text": result} (split at the last "="; without "=" the result is
    ""); the text around them becomes {"type": "text"} parts, ending with the "#### N" text.
    Empty text parts (between adjacent annotations) are left out: they render to nothing.
    """
    parts = []
    for piece in re.split(r"(<<[^>]+>>)", solution):
        if piece.startswith("<<") and piece.endswith(">>"):
            inner = piece[2:-2]
            expr, result = inner.rsplit("=", 1) if "=" in inner else (inner, "")
            parts.append({"type": "python", "text": expr})
            parts.append({"type": "python_output", "text": result})
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


def gsm8k_sft_conversation(example: Example) -> dict:
    """{"messages": [user question, assistant parts]} in nanochat's conversation format."""
    return {"messages": [
        {"role": "user", "content": example.question},
        {"role": "assistant", "content": gsm8k_solution_to_nanochat_parts(example.solution)},
    ]}
