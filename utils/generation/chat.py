"""Generation for the inference CLI: streamed replies with nanochat's calculator, chat sessions, batches.

mlx-lm does the decoding (stream_generate, BatchGenerator), the sampling (make_sampler,
make_logits_processors) and the KV cache (make_prompt_cache). Added here:
- the calculator round trip of nanochat's engine: generation stops at <|python_end|>, the
  expression is evaluated by mlx_grpo.generation.calculator, <|output_start|> result <|output_end|> are forced
  into the sequence and generation goes on from the same KV cache;
- KV-cache reuse across chat turns (only the part of a prompt the cache does not hold is processed);
- the chat history and the REPL commands (/clear, /system, /exit).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, TextIO

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, stream_generate
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import make_logits_processors, make_sampler
from mlx_lm.utils import common_prefix_len

from mlx_grpo.generation.calculator import evaluate_expression
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

    def make_sampler(self):
        return make_sampler(self.temperature, self.top_p, self.min_p, top_k=self.top_k)

    def make_logits_processors(self) -> list:
        penalty = None if self.repetition_penalty == 1.0 else self.repetition_penalty
        return make_logits_processors(repetition_penalty=penalty)


@dataclass
class ToolCall:
    expression: str
    result: Optional[str]  # None: not valid arithmetic, nothing was forced


@dataclass
class GenerationStats:
    """Totals over the mlx-lm calls of one reply (a calculator round trip makes several)."""

    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    generation_tokens: int = 0
    generation_seconds: float = 0.0
    peak_memory_gb: float = 0.0

    def add(self, response) -> None:
        """Fold in the last mlx-lm GenerationResponse of one stream_generate call."""
        self.prompt_tokens += response.prompt_tokens
        self.prompt_seconds += response.prompt_tokens / max(response.prompt_tps, 1e-9)
        self.generation_tokens += response.generation_tokens
        self.generation_seconds += response.generation_tokens / max(response.generation_tps, 1e-9)
        self.peak_memory_gb = max(self.peak_memory_gb, response.peak_memory)

    def describe(self) -> str:
        prompt_tps = self.prompt_tokens / max(self.prompt_seconds, 1e-9)
        generation_tps = self.generation_tokens / max(self.generation_seconds, 1e-9)
        return format_stats(self.prompt_tokens, prompt_tps, self.generation_tokens, generation_tps, self.peak_memory_gb)


def format_stats(prompt_tokens, prompt_tps, generation_tokens, generation_tps, peak_memory_gb) -> str:
    return (
        f"Prompt: {prompt_tokens} tokens, {prompt_tps:.3f} tokens-per-sec\n"
        f"Generation: {generation_tokens} tokens, {generation_tps:.3f} tokens-per-sec\n"
        f"Peak memory: {peak_memory_gb:.3f} GB"
    )


@dataclass
class Reply:
    """One generated answer. text == the tokenizer's decode of tokens (tool calls included)."""

    tokens: list = field(default_factory=list)  # sampled and forced ids, without the stop token
    text: str = ""
    finish_reason: Optional[str] = None  # "stop", "length" or "interrupted"
    tool_calls: list = field(default_factory=list)  # ToolCall, in order
    stats: GenerationStats = field(default_factory=GenerationStats)


# ---------------------------------------------------------------------------------------------
# nanochat's calculator tool


@dataclass
class Calculator:
    """<|python_start|> expr <|python_end|> -> forced <|output_start|> result <|output_end|>."""

    tokenizer: object  # the nanochat TiktokenTokenizerWrapper

    def __post_init__(self):
        tok = self.tokenizer
        self.python_start = tok.python_start_id
        self.python_end = tok.python_end_id
        self.output_start = tok.output_start_id
        self.output_end = tok.output_end_id

    def call(self, tokens: list) -> Optional[tuple]:
        """For `tokens` ending in <|python_end|>: (ToolCall, forced token ids or None), or None when
        that <|python_end|> closes no <|python_start|> block (nanochat's engine ignores it then)."""
        block_enders = (self.python_end, self.output_start, self.output_end)
        for i in range(len(tokens) - 2, -1, -1):
            if tokens[i] == self.python_start:
                break
            if tokens[i] in block_enders:
                return None
        else:
            return None
        expression = self.tokenizer.decode(tokens[i + 1 : -1])
        result = evaluate_expression(expression)
        forced = None
        if result is not None:
            forced = [self.output_start, *self.tokenizer.encode(result), self.output_end]
        return ToolCall(expression, result), forced


def calculator_for(tokenizer, options: GenerationOptions) -> Optional[Calculator]:
    """The calculator when the model is a nanochat model and tools are on, else None."""
    inner = nanochat_tokenizer(tokenizer)
    return Calculator(inner) if inner is not None and options.tools else None


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
# KV cache reuse


class ReusableCache:
    """mlx-lm's prompt cache plus the tokens it holds, so that a prompt extending them (the next
    chat turn, the sequence after a forced tool output) is only processed from where it differs."""

    def __init__(self, model):
        self.model = model
        self.reset()

    def reset(self) -> None:
        self.cache = make_prompt_cache(self.model)
        self.tokens = []

    def prepare(self, prompt: list) -> list:
        """Trim the cache to its longest prefix shared with `prompt`, keeping at least one prompt
        token to feed (mlx-lm needs one); return the tokens still to process."""
        if self.tokens and not can_trim_prompt_cache(self.cache):
            self.reset()  # e.g. recurrent-state caches: start over
        keep = min(common_prefix_len(self.tokens, prompt), len(prompt) - 1)
        if keep < len(self.tokens):
            trim_prompt_cache(self.cache, len(self.tokens) - keep)
        self.tokens = list(prompt[:keep])
        return list(prompt[keep:])

    def record(self, sequence: list) -> None:
        """After generating: `sequence` is every token fed or generated; the cache holds a prefix."""
        if not can_trim_prompt_cache(self.cache):
            self.tokens = []  # cannot be reused; prepare() starts over
            return
        held = self.cache[0].offset
        if held > len(sequence):
            raise RuntimeError(f"KV cache holds {held} tokens but only {len(sequence)} were seen")
        self.tokens = list(sequence[:held])


def _with_history(processors: list, history: list) -> list:
    """Logits processors that also see `history`, the tokens already in the cache (mlx-lm only
    passes them the tokens of the current call; the repetition penalty needs the earlier ones)."""
    if not processors or not history:
        return processors
    prefix = mx.array(history)
    return [lambda tokens, logits, p=p: p(mx.concatenate([prefix, tokens.astype(prefix.dtype)]), logits)
            for p in processors]


# ---------------------------------------------------------------------------------------------
# Generation


class ReplyStream:
    """Iterate to generate one reply as text pieces; `reply` holds everything so far.

        stream = ReplyStream(model, tokenizer, prompt_tokens, options)
        for text in stream:
            print(text, end="", flush=True)
        stream.reply.text  # == "".join(pieces)

    Uses mlx-lm's stream_generate on a KV cache (pass a ReusableCache to keep it between calls).
    With nanochat's calculator, tool calls and their results appear in the text as the
    special-token strings the model sees, e.g. "<|python_start|>6*7<|python_end|><|output_start|>42<|output_end|>".
    """

    def __init__(self, model, tokenizer, prompt: list, options: GenerationOptions,
                 cache: Optional[ReusableCache] = None):
        if not prompt:
            raise InferenceError("the prompt is empty")
        self.model = model
        self.tokenizer = tokenizer
        self.prompt = list(prompt)
        self.options = options
        self.cache = cache if cache is not None else ReusableCache(model)
        self.reply = Reply()
        self._started = False

    def __iter__(self) -> Iterator[str]:
        if self._started:
            raise RuntimeError("a ReplyStream generates once; make a new one for another reply")
        self._started = True
        reply, options = self.reply, self.options
        calculator = calculator_for(self.tokenizer, options)
        sampler = options.make_sampler()
        sequence = list(self.prompt)  # everything the model has seen or produced
        while True:
            remaining = options.max_tokens - len(reply.tokens)
            feed = self.cache.prepare(sequence)
            processors = _with_history(options.make_logits_processors(), sequence[: len(sequence) - len(feed)])
            forced = None
            for response in stream_generate(
                self.model, self.tokenizer, feed, max_tokens=remaining, sampler=sampler,
                logits_processors=processors, prompt_cache=self.cache.cache,
            ):
                # Every response carries a new token, already fed to the model (the cache holds it).
                sequence.append(response.token)
                if response.finish_reason != "stop":  # a stop token ends the reply, not part of it
                    reply.tokens.append(response.token)
                reply.text += response.text
                if response.text:
                    yield response.text
                if response.finish_reason is not None:
                    reply.finish_reason = response.finish_reason
                    reply.stats.add(response)
                    break
                if calculator is not None and response.token == calculator.python_end:
                    call = calculator.call(reply.tokens)
                    if call is not None:
                        reply.tool_calls.append(call[0])
                        forced = call[1]
                    if forced:  # stop here; the forced tokens are fed as the next prompt
                        reply.stats.add(response)
                        break
            self.cache.record(sequence)
            if not forced:
                return
            forced = forced[: options.max_tokens - len(reply.tokens)]
            sequence += forced
            reply.tokens += forced
            text = self.tokenizer.decode(forced)
            reply.text += text
            yield text
            if len(reply.tokens) >= options.max_tokens:
                reply.finish_reason = "length"
                return

    def interrupted(self) -> Reply:
        """Mark the reply as stopped by the user (Ctrl-C); the cache is reset (its state is unknown)."""
        self.reply.finish_reason = "interrupted"
        self.cache.reset()
        return self.reply


def generate_reply(model, tokenizer, prompt: list, options: GenerationOptions,
                   cache: Optional[ReusableCache] = None) -> Reply:
    """The whole reply at once (see ReplyStream)."""
    stream = ReplyStream(model, tokenizer, prompt, options, cache)
    for _ in stream:
        pass
    return stream.reply


def detokenize(tokenizer, tokens: list) -> str:
    """Text of generated tokens through the tokenizer's streaming detokenizer, so a batch result
    reads exactly as the same tokens streamed."""
    detokenizer = tokenizer.detokenizer
    for token in tokens:
        detokenizer.add_token(token)
    detokenizer.finalize()
    return detokenizer.text


def generate_batch(model, tokenizer, prompts: list, options: GenerationOptions, *, batch_size: int = 32):
    """All prompts generated together with mlx-lm's BatchGenerator: (replies in prompt order, BatchStats).

    With nanochat's calculator a row stops at <|python_end|>, and is inserted again with its
    KV cache and the forced tool output as its next prompt, while the other rows go on.
    """
    if not prompts or any(not p for p in prompts):
        raise InferenceError("generate_batch needs a non-empty list of non-empty prompts")
    if batch_size < 1:
        raise InferenceError(f"batch size must be >= 1, got {batch_size}")
    calculator = calculator_for(tokenizer, options)
    eos = set(tokenizer.eos_token_ids)
    stops = sorted(eos | ({calculator.python_end} if calculator else set()))
    generator = BatchGenerator(
        model, max_tokens=options.max_tokens, stop_tokens=[[t] for t in stops],
        sampler=options.make_sampler(), logits_processors=options.make_logits_processors(),
        completion_batch_size=batch_size, prefill_batch_size=min(8, batch_size),
    )
    replies = [Reply() for _ in prompts]
    owner = dict(zip(generator.insert([list(p) for p in prompts]), range(len(prompts))))
    try:
        with generator.stats() as stats:
            while responses := generator.next_generated():
                for r in responses:
                    reply = replies[owner[r.uid]]
                    if r.finish_reason == "stop" and r.token in eos:
                        reply.finish_reason = "stop"
                        continue
                    reply.tokens.append(r.token)
                    if r.finish_reason is None:
                        continue
                    if r.finish_reason == "length":
                        reply.finish_reason = "length"
                        continue
                    # Stopped at <|python_end|>: run the tool, then put the row back in.
                    remaining = options.max_tokens - len(reply.tokens)
                    if remaining <= 0:
                        reply.finish_reason = "length"
                        continue
                    call = calculator.call(reply.tokens)
                    forced = None
                    if call is not None:
                        reply.tool_calls.append(call[0])
                        forced = call[1]
                    cache, seen = r.prompt_cache, list(r.all_tokens)  # both include <|python_end|>
                    if forced:
                        forced = forced[:remaining]
                        reply.tokens += forced
                        remaining -= len(forced)
                        feed = forced
                    else:
                        # Nothing to force: step back one token so the model is fed <|python_end|> again.
                        trim_prompt_cache(cache, 1)
                        seen, feed = seen[:-1], seen[-1:]
                    if remaining <= 0:
                        reply.finish_reason = "length"
                        continue
                    (uid,) = generator.insert([feed], max_tokens=[remaining], caches=[cache], all_tokens=[seen])
                    owner[uid] = owner[r.uid]
    finally:
        generator.close()
    for reply in replies:
        reply.text = detokenize(tokenizer, reply.tokens)
    return replies, stats


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
        for text in stream: print(text, end="")
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
            for text in stream:
                out.write(text)
                out.flush()
        except KeyboardInterrupt:
            stream.interrupted()
            out.write(" [stopped]")
        session.commit(line, stream.reply)
        out.write("\n")
        out.flush()
        if verbose:
            err.write(stream.reply.stats.describe() + "\n")
            err.flush()
