"""A task's split: its prompts (tokenized once, the ones that fit), answers and questions, and what is correct."""

from mlx_grpo.data.gsm8k import DataError
from mlx_grpo.data.rewards import BUILTIN_REWARDS


class PromptTask:
    """examples -> the prompts no longer than max_prompt_length; encode(example) makes one prompt and
    question_answer(example) its (question, answer); check names the BUILTIN_REWARDS function that grades."""

    def __init__(self, cfg, tokenizer, split, examples, encode, question_answer, check, length_note=""):
        self.tokenizer = tokenizer
        self.stop_token_ids = set(tokenizer.eos_token_ids)
        self.prompt_format = cfg.prompt_format
        prompts, kept = [], []
        for example in examples:
            prompt = encode(example)
            if len(prompt) <= cfg.max_prompt_length:
                prompts.append(prompt)
                kept.append(example)
        if len(kept) < len(examples):
            print(f"[data] {split}: skipped {len(examples) - len(kept)} prompts longer than "
                  f"max_prompt_length={cfg.max_prompt_length}{length_note}")
        if not kept:
            raise DataError(f"no {split} examples left (max_prompt_length={cfg.max_prompt_length}?)")
        self.examples, self.prompts = kept, prompts
        self.questions, self.answers = (list(column) for column in zip(*map(question_answer, kept)))
        self._check = BUILTIN_REWARDS[check]

    def text(self, completion):
        """The completion's text without its stop token."""
        return self.tokenizer.decode(completion.content_tokens)

    def is_correct(self, text, answer):
        return self._check([text], answer=[answer])[0] > 0
