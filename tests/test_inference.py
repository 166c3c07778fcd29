"""utils/inference.py and utils/generation/chat.py on the engine: the tiny nanochat model, a scripted one for tools."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import pytest
from mlx_lm.models.cache import KVCache

from mlx_grpo import inference
from mlx_grpo.generation.calculator import ToolCall
from mlx_grpo.generation.chat import (
    EXIT,
    ChatSession,
    GenerationOptions,
    InferenceError,
    ReplyStream,
    assistant_content,
    build_prompt,
    chat_command,
    generate_replies,
    generate_reply,
    raw_prompt_tokens,
    read_prompts_file,
    run_chat,
)
from mlx_grpo.generation.engine import ReusableCache, generate_completions
from mlx_grpo.generation.sampling import make_rollout_sampler
from mlx_grpo.models import load_model
from mlx_grpo.nanochat.tokenizer import nanochat_tokenizer
from mlx_grpo.training.checkpoint import MANIFEST_FILE, save_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]
GREEDY = ["--temperature", "0"]
MULTIBYTE_PROMPT = "Zoë paid 3 € at the café in 日本"


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(tiny_model_dir)


def greedy_reference(model, tokenizer, prompt, max_tokens):
    """Greedy decoding by hand: full forward pass, argmax, no KV cache, no mlx-lm generation code."""
    tokens, out = list(prompt), []
    for _ in range(max_tokens):
        token = int(mx.argmax(model(mx.array([tokens]))[0, -1]).item())
        if token in tokenizer.eos_token_ids:
            break
        out.append(token)
        tokens.append(token)
    return out


def chat_prompt(tokenizer, *messages):
    return nanochat_tokenizer(tokenizer).apply_chat_template(list(messages), add_generation_prompt=True)


def run_cli(argv, capsys):
    code = inference.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------------------------------------
# --prompt, --stream, --prompts-file on the tiny nanochat model


def test_prompt_greedy_equals_reference_decode(tiny_model_dir, loaded, capsys):
    model, tok = loaded
    code, out, _ = run_cli(["--model", str(tiny_model_dir), "--prompt", MULTIBYTE_PROMPT, "--max-tokens", "16", *GREEDY],
                           capsys)
    assert code == 0
    reference = greedy_reference(model, tok, chat_prompt(tok, {"role": "user", "content": MULTIBYTE_PROMPT}), 16)
    assert out == tok.decode(reference) + "\n"


def test_greedy_inference_rollouts_and_the_reference_decode_agree(loaded):
    """Inference and rollouts are the same engine: the same greedy tokens, and those of a plain full forward."""
    model, tok = loaded
    prompt = chat_prompt(tok, {"role": "user", "content": MULTIBYTE_PROMPT})
    reply = generate_reply(model, tok, prompt, GenerationOptions(max_tokens=20, temperature=0.0))
    (rollout,), _ = generate_completions(model, [prompt], group_size=1, max_new_tokens=20,
                                         sampler=make_rollout_sampler(0.0), stop_token_ids=tok.eos_token_ids)
    assert reply.tokens == rollout.content_tokens == greedy_reference(model, tok, prompt, 20)


def test_stream_prints_exactly_the_non_streamed_text(tiny_model_dir, loaded, capsys):
    model, tok = loaded
    args = ["--model", str(tiny_model_dir), "--prompt", MULTIBYTE_PROMPT, "--max-tokens", "24", *GREEDY]
    code_plain, plain, _ = run_cli(args, capsys)
    code_stream, streamed, _ = run_cli(args + ["--stream"], capsys)
    assert code_plain == code_stream == 0
    assert streamed == plain
    reference = greedy_reference(model, tok, chat_prompt(tok, {"role": "user", "content": MULTIBYTE_PROMPT}), 24)
    assert plain == tok.decode(reference) + "\n"


def test_system_and_raw_prompts(loaded):
    _, tok = loaded
    inner = nanochat_tokenizer(tok)
    with_system = build_prompt(tok, "hi", system="Be brief.")
    assert with_system == chat_prompt(tok, {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"})
    assert inner.decode(with_system).startswith("<|bos|><|user_start|>Be brief.\n\nhi<|user_end|>")
    raw = build_prompt(tok, "a<|user_start|>b", raw=True)
    assert raw[0] == inner.bos_token_id and inner.user_start_id in raw  # specials written out are specials in --raw
    assert raw_prompt_tokens(tok, "<|bos|>x") == [inner.bos_token_id, *inner.encode("x")]  # no second BOS
    with pytest.raises(InferenceError, match="--system"):
        build_prompt(tok, "hi", system="s", raw=True)


def test_seed_makes_sampling_reproducible(tiny_model_dir, capsys):
    args = ["--model", str(tiny_model_dir), "--prompt", "hello", "--max-tokens", "12", "--temperature", "1.0",
            "--top-k", "50", "--min-p", "0.01", "--repetition-penalty", "1.2"]
    first = run_cli(args + ["--seed", "7"], capsys)
    second = run_cli(args + ["--seed", "7"], capsys)
    assert first[0] == 0 and first[1] == second[1]


def test_prompts_file_batch_equals_one_by_one(tiny_model_dir, loaded, tmp_path, capsys):
    model, tok = loaded
    texts = ["hello", MULTIBYTE_PROMPT, "How many apples does Betty have?"]
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"id": i, "prompt": t}, ensure_ascii=False) + "\n"
                                    for i, t in enumerate(texts)), encoding="utf-8")
    output = tmp_path / "out" / "answers.jsonl"
    code, out, _ = run_cli(["--model", str(tiny_model_dir), "--prompts-file", str(prompts_file), "--output", str(output),
                            "--max-tokens", "10", "--verbose", *GREEDY], capsys)
    assert code == 0 and "wrote 3 completions" in out
    results = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in results] == [0, 1, 2] and [r["prompt"] for r in results] == texts
    options = GenerationOptions(max_tokens=10, temperature=0.0)
    for text, result in zip(texts, results):
        single = generate_reply(model, tok, build_prompt(tok, text), options)
        assert result["completion"] == single.text
        assert result["num_tokens"] == len(single.tokens) and result["finish_reason"] == single.finish_reason

    # A plain text file: one prompt a line, results printed.
    lines_file = tmp_path / "prompts.txt"
    lines_file.write_text("hello\n\n" + MULTIBYTE_PROMPT + "\n", encoding="utf-8")
    code, out, _ = run_cli(["--model", str(tiny_model_dir), "--prompts-file", str(lines_file), "--max-tokens", "10",
                            *GREEDY], capsys)
    assert code == 0
    assert f"=== [2/2] {MULTIBYTE_PROMPT}\n{results[1]['completion']}\n" in out


def test_prompts_file_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"question": "no prompt"}\n', encoding="utf-8")
    with pytest.raises(InferenceError, match="line 2"):
        read_prompts_file(bad)
    with pytest.raises(InferenceError, match="does not exist"):
        read_prompts_file(tmp_path / "missing.txt")


# ---------------------------------------------------------------------------------------------
# Chat


def test_chat_piped_subprocess_uses_history_and_clear(tiny_model_dir, loaded):
    model, tok = loaded
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    proc = subprocess.run(
        [sys.executable, "utils/inference.py", "--model", str(tiny_model_dir), "--chat", "--max-tokens", "6",
         "--show-prompt", *GREEDY],
        input="hello\nagain\n/clear\nhello\n/exit\nnot read\n".encode(), capture_output=True, cwd=REPO_ROOT,
        env=env, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    prompts = [line[len("[prompt] "):] for line in proc.stderr.decode().split("\n") if line.startswith("[prompt] ")]
    assert len(prompts) == 3

    # The same conversation through the module API gives the expected answers.
    options = GenerationOptions(max_tokens=6, temperature=0.0)
    first = generate_reply(model, tok, chat_prompt(tok, {"role": "user", "content": "hello"}), options)
    history = [{"role": "user", "content": "hello"},
               {"role": "assistant", "content": assistant_content(tok, first.tokens)}]
    second = generate_reply(model, tok, chat_prompt(tok, *history, {"role": "user", "content": "again"}), options)
    assert proc.stdout.decode() == f"{first.text}\n{second.text}\n[conversation cleared]\n{first.text}\n"

    # Turn 2's prompt holds turn 1; after /clear the prompt is turn 1's again.
    assert prompts[0] == "<|bos|><|user_start|>hello<|user_end|><|assistant_start|>"
    assert prompts[1] == prompts[0] + first.text + "<|assistant_end|><|user_start|>again<|user_end|><|assistant_start|>"
    assert prompts[2] == prompts[0]


def test_chat_session_history_clear_and_cache_reuse(loaded):
    model, tok = loaded
    options = GenerationOptions(max_tokens=8, temperature=0.0)
    session = ChatSession(model, tok, options, system="You are terse.")
    p1 = session.prompt_tokens("hello")
    r1 = session.ask("hello")
    p2 = session.prompt_tokens("and then?")
    assert p2[: len(p1)] == p1 and tok.decode(p2).count("hello") == 1
    assert r1.text in tok.decode(p2[len(p1):])
    r2 = session.ask("and then?")
    # The KV cache kept from turn 1 gives the same answer as a fresh one, processing fewer tokens.
    fresh = generate_reply(model, tok, p2, options)
    assert r2.tokens == fresh.tokens and r2.text == fresh.text
    assert r2.stats.prompt_tokens < len(p2)
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]

    session.clear()
    assert session.messages == [] and session.prompt_tokens("hello") == p1
    assert session.ask("hello").tokens == r1.tokens
    session.clear()
    session.set_system("")
    assert session.prompt_tokens("hi") == chat_prompt(tok, {"role": "user", "content": "hi"})


def test_repetition_penalty_sees_the_cached_history(loaded):
    """With the KV cache reused mlx-lm only feeds the new tokens; the penalty must still see the rest."""
    model, tok = loaded
    options = GenerationOptions(max_tokens=12, temperature=0.0, repetition_penalty=2.0)
    cache = ReusableCache(model)
    generate_reply(model, tok, build_prompt(tok, "hello hello"), options, cache)
    prompt = cache.tokens + nanochat_tokenizer(tok).encode(" more")  # extends what the cache holds
    reused = generate_reply(model, tok, prompt, options, cache)
    assert reused.stats.prompt_tokens < 5
    assert reused.tokens == generate_reply(model, tok, prompt, options).tokens


def test_chat_commands(loaded):
    model, tok = loaded
    session = ChatSession(model, tok, GenerationOptions(max_tokens=2))
    assert chat_command(session, "hello") is None
    for word in ("/exit", "/quit", "exit", " quit "):
        assert chat_command(session, word) is EXIT
    assert chat_command(session, "/system Be kind.") == "[system prompt: Be kind.]" and session.system == "Be kind."
    assert chat_command(session, "/system") == "[system prompt removed]" and session.system is None
    session.messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    assert chat_command(session, "/clear") == "[conversation cleared]" and session.messages == []
    assert "/clear" in chat_command(session, "/help")
    assert "unknown command /nope" in chat_command(session, "/nope")


class _StopOnFirstWrite:
    """A terminal where the user presses Ctrl-C while the first answer streams."""

    def __init__(self):
        self.parts, self.armed = [], True

    def write(self, text):
        if self.armed and text and not text.startswith("["):
            self.armed = False
            self.parts.append(text)
            raise KeyboardInterrupt
        self.parts.append(text)

    def flush(self):
        pass


def test_ctrl_c_stops_the_answer_not_the_chat(loaded):
    model, tok = loaded
    session = ChatSession(model, tok, GenerationOptions(max_tokens=8, temperature=0.0))
    lines = iter(["hello", "again"])

    def read_line(_prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    out = _StopOnFirstWrite()
    run_chat(session, read_line=read_line, out=out, prompt="")
    assert " [stopped]" in out.parts
    assert [m["content"] for m in session.messages if m["role"] == "user"] == ["hello", "again"]
    # After the interruption the cache was reset and the next answer is still exact.
    expected = generate_reply(model, tok, chat_prompt(tok, *session.messages[:3]), GenerationOptions(max_tokens=8, temperature=0.0))
    assert session.messages[3]["content"] == assistant_content(tok, expected.tokens)


# ---------------------------------------------------------------------------------------------
# Calculator tool use and multi-byte streaming, with a scripted model


class ScriptedModel(nn.Module):
    """Next token = table[current token] (a bigram lookup), with a real KV cache so the engine's mlx-lm
    decoder drives it exactly as a transformer."""

    def __init__(self, vocab_size, table):
        super().__init__()
        following = [0] * vocab_size
        for token, next_token in table.items():
            following[token] = next_token
        self._following = mx.array(following)
        self._vocab_size = vocab_size

    def make_cache(self):
        return [KVCache()]

    def __call__(self, inputs, cache=None):
        batch, length = inputs.shape
        if cache is not None:
            placeholder = mx.zeros((batch, 1, length, 1))
            cache[0].update_and_fetch(placeholder, placeholder)
        target = self._following[inputs][..., None]
        return mx.where(mx.arange(self._vocab_size) == target, 30.0, 0.0)


def _script(tok, steps):
    """A bigram table following `steps` (token ids) from the end of a chat prompt."""
    inner = nanochat_tokenizer(tok)
    table, previous = {}, inner.assistant_start_id
    for token in steps:
        assert previous not in table, "a scripted token may appear once"
        table[previous], previous = token, token
    return table


def _ids(tok, *pieces):
    """Token ids: special-token names by id, other strings one byte-token per byte."""
    inner = nanochat_tokenizer(tok)
    out = []
    for piece in pieces:
        if piece in inner.special_token_ids:
            out.append(inner.special_token_ids[piece])
        else:
            out += [inner.encoding.encode_single_token(bytes([b])) for b in piece.encode()]
    return out


def test_calculator_call_is_evaluated_and_forced(loaded):
    _, tok = loaded
    inner = nanochat_tokenizer(tok)
    steps = _ids(tok, "<|python_start|>", "6*7", "<|python_end|>", "9", "<|assistant_end|>")
    table = _script(tok, steps)
    table[inner.output_end_id] = _ids(tok, "!")[0]
    table[_ids(tok, "!")[0]] = inner.assistant_end_id
    model = ScriptedModel(inner.vocab_size, table)
    prompt = build_prompt(tok, "What is 6*7?")
    options = GenerationOptions(max_tokens=30, temperature=0.0)

    pieces = []
    reply = ReplyStream(model, tok, prompt, options).run(on_text=pieces.append)
    expected = "<|python_start|>6*7<|python_end|><|output_start|>42<|output_end|>!"
    assert "".join(pieces) == reply.text == expected == inner.decode(reply.tokens)
    assert reply.tool_calls == [ToolCall("6*7", "42")] and reply.finish_reason == "stop"
    assert assistant_content(tok, reply.tokens) == [
        {"type": "python", "text": "6*7"}, {"type": "python_output", "text": "42"}, {"type": "text", "text": "!"}]
    # The history form renders back to exactly the generated tokens.
    rendered = inner.apply_chat_template([{"role": "user", "content": "q"},
                                          {"role": "assistant", "content": assistant_content(tok, reply.tokens)}])
    assert rendered[-len(reply.tokens) - 1:] == reply.tokens + [inner.assistant_end_id]

    # Batched: a tool-using row next to a row that stops at once and a second tool-using row.
    stop_at_once = raw_prompt_tokens(tok, "x")
    table[_ids(tok, "x")[0]] = inner.assistant_end_id
    replies, _ = generate_replies(ScriptedModel(inner.vocab_size, table), tok, [prompt, stop_at_once, prompt], options)
    assert [r.text for r in replies] == [expected, "", expected]
    assert replies[0].tool_calls == [ToolCall("6*7", "42")] and replies[1].tool_calls == []

    # --no-tools: the model's own continuation after <|python_end|>.
    no_tools = GenerationOptions(max_tokens=30, temperature=0.0, tools=False)
    assert generate_reply(model, tok, prompt, no_tools).text == "<|python_start|>6*7<|python_end|>9"
    assert generate_replies(model, tok, [prompt], no_tools)[0][0].text == "<|python_start|>6*7<|python_end|>9"

    # The length limit counts forced tokens too.
    short = generate_reply(model, tok, prompt, GenerationOptions(max_tokens=7, temperature=0.0))
    assert len(short.tokens) == 7 and short.finish_reason == "length"


def test_invalid_calculator_expression_forces_nothing(loaded):
    _, tok = loaded
    inner = nanochat_tokenizer(tok)
    steps = _ids(tok, "<|python_start|>", "1/0", "<|python_end|>", "?", "<|assistant_end|>")
    model = ScriptedModel(inner.vocab_size, _script(tok, steps))
    prompt = build_prompt(tok, "divide")
    options = GenerationOptions(max_tokens=30, temperature=0.0)
    reply = generate_reply(model, tok, prompt, options)
    assert reply.text == "<|python_start|>1/0<|python_end|>?" and reply.tool_calls == [ToolCall("1/0", None)]
    batch, _ = generate_replies(model, tok, [prompt, prompt], options)
    assert [r.text for r in batch] == [reply.text] * 2 and batch[0].tool_calls == [ToolCall("1/0", None)]


def test_multibyte_characters_split_over_tokens_stream_exactly(loaded, monkeypatch, capsys):
    _, tok = loaded
    inner = nanochat_tokenizer(tok)
    text = "Zoë 日€5"  # 2- and 3-byte characters, one byte a token (no byte repeats: a bigram script)
    model = ScriptedModel(inner.vocab_size, _script(tok, _ids(tok, text, "<|assistant_end|>")))
    stream = ReplyStream(model, tok, build_prompt(tok, "hi"), GenerationOptions(max_tokens=40, temperature=0.0))
    pieces = []
    stream.run(on_text=pieces.append)
    assert "".join(pieces) == stream.reply.text == text == inner.decode(stream.reply.tokens)
    assert all("\ufffd" not in p for p in pieces)  # an unfinished character is held back, never shown
    assert 1 < len(pieces) < len(stream.reply.tokens)  # streamed as it goes; a character's bytes come out together
    # The batch (--prompts-file) path gives the same text, for each row.
    replies, _ = generate_replies(model, tok, [build_prompt(tok, "hi"), build_prompt(tok, "hello")],
                                  GenerationOptions(max_tokens=40, temperature=0.0))
    assert [r.text for r in replies] == [text, text]

    monkeypatch.setattr("mlx_grpo.models.load_model", lambda path: (model, tok))
    code, out, _ = run_cli(["--model", "scripted", "--prompt", "hi", "--stream", *GREEDY], capsys)
    assert code == 0 and out == text + "\n"


# ---------------------------------------------------------------------------------------------
# Model resolution, CLI errors


def _checkpoint(run_dir: Path, step: int, mtime: float, model_dir=None) -> Path:
    """A complete training checkpoint (saved as the trainer saves one), its manifest dated `mtime`."""

    def write_model_files(folder):
        if model_dir is None:
            (folder / "config.json").write_text("{}")
            return
        for f in Path(model_dir).iterdir():
            (folder / f.name).write_bytes(f.read_bytes())

    path = save_checkpoint(run_dir, step, optimizer=optim.Adam(1e-3), trainer_state={}, config={},
                           write_model_files=write_model_files)
    os.utime(path / MANIFEST_FILE, (mtime, mtime))
    return path


def test_default_model_is_the_newest_complete_checkpoint_at_any_depth(tmp_path):
    outputs = tmp_path / "outputs"
    with pytest.raises(InferenceError, match="pass --model"):
        inference.resolve_model(None, outputs)
    _checkpoint(outputs / "run_a", 10, mtime=1000)
    _checkpoint(outputs / "run_a", 20, mtime=2000)
    newest = _checkpoint(outputs / "run_b", 5, mtime=3000)
    shutil.copytree(newest, outputs / "run_b" / "checkpoints" / ".tmp-step_000030-123")  # a save in progress
    os.utime(outputs / "run_b" / "checkpoints" / ".tmp-step_000030-123" / MANIFEST_FILE, (4000, 4000))
    unfinished = outputs / "run_b" / "checkpoints" / "step_000040"  # killed before its manifest
    unfinished.mkdir()
    (unfinished / "config.json").write_text("{}")
    assert inference.resolve_model(None, outputs) == str(newest)
    # The demo's runs are one level deeper (outputs/demo/<run>/checkpoints/step_*).
    demo = _checkpoint(outputs / "demo" / "20250101-000000", 100, mtime=3500)
    assert inference.resolve_model(None, outputs) == str(demo)
    # A run folder: its checkpoint with the largest step.
    assert inference.resolve_model(str(outputs / "run_a"), outputs).endswith("step_000020")
    assert inference.resolve_model("mlx-community/some-model", outputs) == "mlx-community/some-model"
    (outputs / "run_c" / "checkpoints").mkdir(parents=True)
    with pytest.raises(InferenceError, match="no complete checkpoint"):
        inference.resolve_model(str(outputs / "run_c"), outputs)


def test_training_checkpoint_loads_by_default(tiny_model_dir, tmp_path, monkeypatch, capsys):
    _checkpoint(tmp_path / "outputs" / "demo" / "run1", 3, mtime=1000, model_dir=tiny_model_dir)
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["--prompt", "hello", "--max-tokens", "4", *GREEDY], capsys)
    assert code == 0 and "step_000003" in err
    code_direct, out_direct, _ = run_cli(["--model", str(tiny_model_dir), "--prompt", "hello", "--max-tokens", "4",
                                          *GREEDY], capsys)
    assert out == out_direct


def test_cli_errors(tiny_model_dir, tmp_path, capsys):
    code, _, err = run_cli(["--model", str(tiny_model_dir), "--prompt", "x", "--top-p", "0"], capsys)
    assert code == 1 and "top_p" in err
    code, _, err = run_cli(["--model", str(tmp_path / "nothing"), "--prompt", "x"], capsys)
    assert code == 1 and err.startswith("error: ")
    for bad in (["--chat", "--raw"], ["--prompt", "x", "--output", "o.jsonl"], ["--prompt", "x", "--raw", "--system", "s"],
                ["--prompts-file", "p.txt", "--stream"], ["--chat", "--prompt", "x"]):
        with pytest.raises(SystemExit) as exit_info:
            inference.parse_args(bad)
        assert exit_info.value.code == 2
    with pytest.raises(InferenceError, match="max_tokens"):
        GenerationOptions(max_tokens=0)
