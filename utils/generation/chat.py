"""Inference on the one generation engine (utils/generation/engine.py): replies as text, prompts, the chat REPL.

The engine decodes, samples (with mlx-lm's logits processors) and runs nanochat's calculator; added here:
- options and replies as inference sees them: text through the tokenizer's streaming detokenizer, the
  same pieces whether streamed or not, finish reasons (stop / length / interrupted), tool calls, stats;
- prompts: chat-templated or raw, and prompts files;
- the chat: history, a KV cache kept across turns (only the new part of the history is prefilled),
  and the REPL commands (/clear, /system, /exit); Ctrl-C stops one answer.
"""

from __future__ import annotations

import copy
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, TextIO

import mlx.core as mx
from mlx_lm.sample_utils import make_logits_processors

from mlx_grpo.generation.calculator import CalculatorTool
from mlx_grpo.generation.engine import Completion, ReusableCache, RolloutStats, generate_completions
from mlx_grpo.generation.sampling import make_rollout_sampler
from mlx_grpo.nanochat.tokenizer import nanochat_tokenizer


class InferenceError(ValueError):
    """Bad input to the inference tools; the message names the problem and the fix."""


# ---------------------------------------------------------------------------------------------
# Options and results


@dataclass
class GenerationOptions:
    """Sampling and length settings (temperature 0 is greedy; top_k 0 and min_p 0 are off)."""

    max_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    tools: bool = True  # nanochat's calculator; other models have no tool here

    def __post_init__(self):
        problems = []
        if self.max_tokens < 1:
            problems.append(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 <= self.min_p < 1:
            problems.append(f"min_p must be in [0, 1) (0 = off), got {self.min_p}")
        if self.repetition_penalty <= 0:
            problems.append(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if problems:
            raise InferenceError("; ".join(problems))

    def sampler(self):
        return make_rollout_sampler(self.temperature, self.top_p, self.top_k, self.min_p)

    def logits_processors(self) -> list:
        penalty = None if self.repetition_penalty == 1.0 else self.repetition_penalty
        return make_logits_processors(repetition_penalty=penalty)


@dataclass
class GenerationStats:
    """Totals over the engine calls of one reply or batch."""

    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    generation_tokens: int = 0
    generation_seconds: float = 0.0
    peak_memory_gb: float = 0.0

    def add(self, stats: RolloutStats) -> None:
        self.prompt_tokens += stats.prompt_tokens
        self.prompt_seconds += stats.prefill_seconds
        self.generation_tokens += stats.generated_tokens
        self.generation_seconds += stats.seconds - stats.prefill_seconds
        self.peak_memory_gb = max(self.peak_memory_gb, mx.get_peak_memory() / 1e9)

    def describe(self) -> str:
        prompt_tps = self.prompt_tokens / max(self.prompt_seconds, 1e-9)
        generation_tps = self.generation_tokens / max(self.generation_seconds, 1e-9)
        return (
            f"Prompt: {self.prompt_tokens} tokens, {prompt_tps:.3f} tokens-per-sec\n"
            f"Generation: {self.generation_tokens} tokens, {generation_tps:.3f} tokens-per-sec\n"
            f"Peak memory: {self.peak_memory_gb:.3f} GB"
        )


@dataclass
class Reply:
    """One generated answer. text == the tokenizer's decode of tokens (tool calls included)."""

    tokens: list = field(default_factory=list)  # sampled and forced ids, without the stop token
    text: str = ""
    finish_reason: Optional[str] = None  # "stop", "length" or "interrupted"
    tool_calls: list = field(default_factory=list)  # calculator.ToolCall, in order
    stats: GenerationStats = field(default_factory=GenerationStats)  # of the call (batch) that generated it


def calculator_for(tokenizer, options: GenerationOptions) -> Optional[CalculatorTool]:
    """The calculator when the model is a nanochat model and tools are on, else None."""
    inner = nanochat_tokenizer(tokenizer)
    return CalculatorTool.for_tokenizer(inner) if inner is not None and options.tools else None


# ---------------------------------------------------------------------------------------------
# Prompts


def raw_prompt_tokens(tokenizer, text: str) -> list:
    """`text` sent as is (no chat template), with a leading BOS when the tokenizer has one.

    Special-token strings in the text become special tokens, as HF tokenizers do; for nanochat
    that means e.g. "<|user_start|>" is its special token here (unlike in chat messages).
    """
    inner = nanochat_tokenizer(tokenizer)
    if inner is not None:
        ids = inner.encoding.encode(text, allowed_special="all")
        return ids if ids[:1] == [inner.bos_token_id] else [inner.bos_token_id] + ids
    # Same rule as mlx-lm's stream_generate for string prompts.
    add_bos = tokenizer.bos_token is None or not text.startswith(tokenizer.bos_token)
    return list(tokenizer.encode(text, add_special_tokens=add_bos))


def chat_prompt_tokens(tokenizer, messages: list) -> list:
    """The conversation rendered with the model's chat template, ready for the assistant's answer."""
    if not tokenizer.has_chat_template:
        raise InferenceError(
            "this model has no chat template (a base model?): use --prompt TEXT --raw to send text as is"
        )
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def build_prompt(tokenizer, text: str, *, system: Optional[str] = None, raw: bool = False) -> list:
    """Token ids for one prompt: chat-templated (with an optional system message) or raw."""
    if raw:
        if system is not None:
            raise InferenceError("--system needs the chat template; drop --raw or put the system text in the prompt")
        return raw_prompt_tokens(tokenizer, text)
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": text}
    ]
    return chat_prompt_tokens(tokenizer, messages)


def read_prompts_file(path) -> list:
    """Records with a "prompt" str: a .jsonl file (one JSON object a line, other fields kept) or
    any other file read as one prompt a line. Blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise InferenceError(f"prompts file {path} does not exist")
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            line = line.rstrip("\n").rstrip("\r")
            if not line.strip():
                continue
            if path.suffix != ".jsonl":
                records.append({"prompt": line})
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise InferenceError(f"{path} line {number} is not valid JSON ({e.msg}); a .jsonl prompts file "
                                     f"holds one object with a \"prompt\" field a line") from e
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise InferenceError(f"{path} line {number} has no \"prompt\" string field")
            records.append(record)
    if not records:
        raise InferenceError(f"prompts file {path} holds no prompts")
    return records


# ---------------------------------------------------------------------------------------------
# Generation


class TextPieces:
    """Generated tokens to text pieces through the tokenizer's streaming detokenizer: a character split over
    tokens comes out whole, and the pieces join to the same text however they are read."""

    def __init__(self, tokenizer):
        self.detokenizer = tokenizer.detokenizer

    def add(self, token: int) -> str:
        self.detokenizer.add_token(token)
        return self.detokenizer.last_segment

    def finish(self) -> str:
        self.detokenizer.finalize()
        return self.detokenizer.last_segment


def detokenize(tokenizer, tokens: list) -> str:
    """The text of generated tokens, exactly as TextPieces streams it."""
    pieces = TextPieces(tokenizer)
    return "".join([pieces.add(token) for token in tokens] + [pieces.finish()])


def reply_from(tokenizer, completion: Completion) -> Reply:
    """An engine completion as inference reports it."""
    return Reply(tokens=completion.content_tokens, text=detokenize(tokenizer, completion.content_tokens),
                 finish_reason="stop" if completion.stopped else "length", tool_calls=list(completion.calls))


def generate_replies(model, tokenizer, prompts: list, options: GenerationOptions, *, batch_size: int = 32,
                     on_token: Optional[Callable[[Completion], None]] = None,
                     cache: Optional[ReusableCache] = None):
    """Replies to `prompts` (token id lists), `batch_size` of them decoded together by the engine:
    (replies in prompt order, GenerationStats). on_token and cache go to generate_completions."""
    if not prompts or any(not p for p in prompts):
        raise InferenceError("generation needs a non-empty list of non-empty prompts")
    if batch_size < 1:
        raise InferenceError(f"batch size must be >= 1, got {batch_size}")
    calculator = calculator_for(tokenizer, options)
    sampler, processors = options.sampler(), options.logits_processors()
    replies, stats = [], GenerationStats()
    for start in range(0, len(prompts), batch_size):
        completions, batch_stats = generate_completions(
            model, prompts[start:start + batch_size], group_size=1, max_new_tokens=options.max_tokens,
            sampler=sampler, stop_token_ids=tokenizer.eos_token_ids, calculator=calculator,
            logits_processors=processors, on_token=on_token, cache=cache)
        replies += [reply_from(tokenizer, c) for c in completions]
        stats.add(batch_stats)
    for reply in replies:
        reply.stats = stats
    return replies, stats


class ReplyStream:
    """One reply, its text handed to `on_text` piece by piece as it is generated; `reply` holds the result.

        stream = ReplyStream(model, tokenizer, prompt_tokens, options)
        stream.run(on_text=lambda piece: print(piece, end="", flush=True))
        stream.reply.text  # == "".join(pieces)

    Pass a ReusableCache to keep the KV cache between calls (a chat). After Ctrl-C (KeyboardInterrupt) during
    run(), interrupted() gives the reply so far. With nanochat's calculator, tool calls and their results
    appear in the text as the special-token strings the model sees, e.g.
    "<|python_start|>6*7<|python_end|><|output_start|>42<|output_end|>".
    """

    def __init__(self, model, tokenizer, prompt: list, options: GenerationOptions,
                 cache: Optional[ReusableCache] = None):
        if not prompt:
            raise InferenceError("the prompt is empty")
        self.model = model
        self.tokenizer = tokenizer
        self.prompt = copy.copy(prompt) if isinstance(prompt, list) else list(prompt)  # keeps a VlmPrompt's images
        self.options = options
        self.cache = cache
        self.reply = Reply()
        self._completion = None  # the engine's, as it grows
        self._started = False

    def run(self, on_text: Optional[Callable[[str], None]] = None) -> Reply:
        if self._started:
            raise RuntimeError("a ReplyStream generates once; make a new one for another reply")
        self._started = True
        pieces = TextPieces(self.tokenizer)

        def on_token(completion):
            self._completion = completion
            if on_text is not None and not completion.stopped:  # a stop token ends the reply, it is no text
                piece = pieces.add(completion.tokens[-1])
                if piece:
                    on_text(piece)

        (self.reply,), _ = generate_replies(self.model, self.tokenizer, [self.prompt], self.options,
                                            on_token=on_token, cache=self.cache)
        piece = pieces.finish()
        if on_text is not None and piece:
            on_text(piece)
        return self.reply

    def interrupted(self) -> Reply:
        """The reply so far, marked as stopped by the user (Ctrl-C); the engine has reset the cache."""
        self.reply = reply_from(self.tokenizer, self._completion) if self._completion is not None else Reply()
        self.reply.finish_reason = "interrupted"
        return self.reply


def generate_reply(model, tokenizer, prompt: list, options: GenerationOptions,
                   cache: Optional[ReusableCache] = None) -> Reply:
    """The whole reply at once (see ReplyStream)."""
    return ReplyStream(model, tokenizer, prompt, options, cache).run()


# ---------------------------------------------------------------------------------------------
# Chat


def assistant_content(tokenizer, tokens: list):
    """A generated answer as chat-history content: for nanochat, parts (text / python /
    python_output) so that it renders back to the same special tokens; otherwise its text."""
    inner = nanochat_tokenizer(tokenizer)
    if inner is None:
        return detokenize(tokenizer, tokens)
    openers = {inner.python_start_id: ("python", inner.python_end_id),
               inner.output_start_id: ("python_output", inner.output_end_id)}
    parts, kind, closer, buffer = [], "text", None, []

    def flush():
        if kind != "text" or buffer:
            parts.append({"type": kind, "text": inner.decode(buffer)})

    for token in tokens:
        if kind == "text" and token in openers:
            flush()
            (kind, closer), buffer = openers[token], []
        elif kind != "text" and token == closer:
            flush()
            kind, closer, buffer = "text", None, []
        else:
            buffer.append(token)
    flush()  # an unfinished block (length limit, Ctrl-C) is kept and closed when rendered
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


class ChatSession:
    """A multi-turn conversation: history, optional system prompt, a KV cache kept across turns.

        session = ChatSession(model, tokenizer, GenerationOptions(), system="Be brief.")
        stream = session.reply_stream("Hi!")
        stream.run(on_text=lambda text: print(text, end=""))
        session.commit("Hi!", stream.reply)  # the exchange joins the history
        session.ask("And then?")           # the same without streaming
        session.clear()                    # forget the conversation (the system prompt stays)
    """

    def __init__(self, model, tokenizer, options: GenerationOptions, system: Optional[str] = None):
        if not tokenizer.has_chat_template:
            raise InferenceError(
                "this model has no chat template (a base model?), so it cannot chat: use --prompt TEXT --raw"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.options = options
        self.system = system
        self.messages = []  # user / assistant turns, without the system message
        self.cache = ReusableCache(model)

    def conversation(self, user_text: Optional[str] = None) -> list:
        system = [{"role": "system", "content": self.system}] if self.system else []
        user = [{"role": "user", "content": user_text}] if user_text is not None else []
        return system + self.messages + user

    def prompt_tokens(self, user_text: str) -> list:
        """What the model sees for the next answer: the history plus this user message."""
        return chat_prompt_tokens(self.tokenizer, self.conversation(user_text))

    def reply_stream(self, user_text: str) -> ReplyStream:
        """Generation of the answer to `user_text`; commit() it afterwards to extend the history."""
        return ReplyStream(self.model, self.tokenizer, self.prompt_tokens(user_text), self.options, self.cache)

    def commit(self, user_text: str, reply: Reply) -> None:
        """Add the exchange (also a partial answer stopped by Ctrl-C) to the history."""
        self.messages.append({"role": "user", "content": user_text})
        self.messages.append({"role": "assistant", "content": assistant_content(self.tokenizer, reply.tokens)})

    def ask(self, user_text: str) -> Reply:
        reply = generate_reply(self.model, self.tokenizer, self.prompt_tokens(user_text), self.options, self.cache)
        self.commit(user_text, reply)
        return reply

    def clear(self) -> None:
        self.messages = []

    def set_system(self, text: Optional[str]) -> None:
        self.system = text or None


CHAT_HELP = """Commands:
  /clear         forget the conversation (the system prompt stays)
  /system TEXT   set the system prompt; /system alone removes it
  /help          this help
  /exit          quit (also: /quit, exit, quit, Ctrl-D)
Ctrl-C stops the current answer."""

EXIT_WORDS = {"/exit", "/quit", "exit", "quit"}
EXIT = object()  # chat_command's answer for "leave the chat"


def chat_command(session: ChatSession, line: str):
    """Apply a REPL command: EXIT, the text to show, or None when `line` is a message for the model."""
    stripped = line.strip()
    if stripped in EXIT_WORDS:
        return EXIT
    if not stripped.startswith("/"):
        return None
    command, _, argument = stripped.partition(" ")
    if command == "/clear":
        session.clear()
        return "[conversation cleared]"
    if command == "/system":
        session.set_system(argument.strip())
        return f"[system prompt: {session.system}]" if session.system else "[system prompt removed]"
    if command == "/help":
        return CHAT_HELP
    return f"[unknown command {command}; /help lists the commands]"


def run_chat(session: ChatSession, *, read_line: Callable[[str], str] = input, out: TextIO = sys.stdout,
             err: TextIO = sys.stderr, prompt: str = ">>> ", show_prompt: bool = False,
             verbose: bool = False) -> None:
    """The REPL: read a line, run a command or stream the answer; until /exit or end of input."""

    def show(text):
        out.write(text)
        out.flush()

    while True:
        try:
            line = read_line(prompt)
        except EOFError:
            out.write("\n" if prompt else "")
            return
        except KeyboardInterrupt:
            out.write("\n[/exit or Ctrl-D quits]\n")
            continue
        result = chat_command(session, line)
        if result is EXIT:
            return
        if result is not None:
            out.write(result + "\n")
            continue
        if not line.strip():
            continue
        stream = session.reply_stream(line)
        if show_prompt:
            err.write(f"[prompt] {session.tokenizer.decode(stream.prompt)}\n")
            err.flush()
        try:
            stream.run(on_text=show)
        except KeyboardInterrupt:
            stream.interrupted()
            out.write(" [stopped]")
        session.commit(line, stream.reply)
        out.write("\n")
        out.flush()
        if verbose:
            err.write(stream.reply.stats.describe() + "\n")
            err.flush()
