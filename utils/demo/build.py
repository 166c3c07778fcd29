"""Make the embedded demo: synthetic word problems, a tiny nanochat model, and its weak SFT start.

    python utils/demo/build.py            # rewrites demo/data and demo/model

Steps, each deterministic for a fixed --seed:
1. demo/data/{train,test}.jsonl: synthetic GSM8K-style problems (utils/demo/synthetic_math.py).
2. A BPE tokenizer trained on the training text the way nanochat trains its own (rustbpe with
   nanochat's split pattern, 256 byte tokens + merges, then the 9 specials), pickled as a
   tiktoken.Encoding.
3. A tiny nanochat-architecture model (mlx-lm's "nanochat"), nanochat-style init, trained briefly
   with supervised fine-tuning on chat-formatted problems: the assistant turn calls the
   calculator and copies its output. As in nanochat's SFT, the loss covers the assistant's tokens
   but not the user's or the forced tool outputs. Training stops early on purpose: the demo
   needs a weak start (clearly above zero, far from perfect) that GRPO can improve.
4. A nanochat checkpoint (model_{step:06d}.pt with nanochat's tensor names, bf16 wte and fp32
   rest, meta_{step:06d}.json, tokenizer.pkl) in a temporary folder, converted with
   mlx_grpo.nanochat.convert.convert_checkpoint (float32) into demo/model: the demo goes through the same
   path as a real nanochat model.

Results are bit-identical for the same seed on the same platform and MLX version; other BLAS
libraries or devices may round differently.
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from mlx_grpo import REPO_ROOT
from mlx_grpo.data.gsm8k import build_messages, encode_prompt, gsm8k_solution_to_nanochat_parts, load_gsm8k
from mlx_grpo.data.rewards import BUILTIN_REWARDS
from mlx_grpo.demo.synthetic_math import generate_problems, without_calculator, write_dataset
from mlx_grpo.nanochat.checkpoint import find_checkpoint
from mlx_grpo.nanochat.convert import convert_checkpoint, mlx_config
from mlx_grpo.nanochat.folder import build_model
from mlx_grpo.nanochat.tokenizer import TOKENIZER_FILENAME, TiktokenTokenizerWrapper, train_tokenizer


@dataclass
class DemoSettings:
    seed: int = 0
    num_train: int = 2000  # GRPO prompts (demo/data/train.jsonl)
    num_test: int = 200  # held-out problems (demo/data/test.jsonl)
    vocab_size: int = 512  # 256 bytes + merges + 9 specials
    depth: int = 2  # nanochat n_layer
    width: int = 64  # nanochat n_embd
    num_heads: int = 2  # head_dim = width / num_heads
    sequence_len: int = 256
    sft_examples: int = 20000  # fresh problems for the warm-up (not written out; none is a test question)
    direct_fraction: float = 0.65  # SFT answers written without the calculator (see without_calculator)
    sft_steps: int = 4000
    sft_batch_size: int = 32
    learning_rate: float = 3e-3
    warmup_steps: int = 20
    decay_fraction: float = 0.4  # final fraction of SFT steps with the LR decaying linearly to 0
    weight_decay: float = 0.0
    eval_max_new_tokens: int = 64


# --------------------------------------------------------------------------------------------
# Tokenizer


def tokenizer_texts(examples) -> list[str]:
    """What the model will read and write: questions and the text of each solution part."""
    texts = []
    for example in examples:
        texts.append(example.question)
        texts += [part["text"] for part in gsm8k_solution_to_nanochat_parts(example.solution)]
    return texts


# --------------------------------------------------------------------------------------------
# SFT data


def render_sft_example(tok: TiktokenTokenizerWrapper, question: str, solution: str) -> tuple[list[int], list[int]]:
    """(ids, mask) of one conversation; mask 1 on the tokens nanochat's SFT trains on.

    Those are the assistant's text and python calls and <|assistant_end|>; the user turn,
    <|assistant_start|> and the tool outputs (<|output_start|> ... <|output_end|>) get 0.
    """
    conversation = [{"role": "user", "content": question},
                    {"role": "assistant", "content": gsm8k_solution_to_nanochat_parts(solution)}]
    ids = tok.apply_chat_template(conversation)
    prompt_len = len(tok.apply_chat_template(conversation[:1], add_generation_prompt=True))
    mask, in_tool_output = [], False
    for position, token in enumerate(ids):
        in_tool_output = in_tool_output or token == tok.output_start_id
        mask.append(int(position >= prompt_len and not in_tool_output))
        if token == tok.output_end_id:
            in_tool_output = False
    return ids, mask


def sft_batches(rows: list[tuple[list[int], list[int]]], batch_size: int, num_steps: int, seed: int):
    """num_steps batches (inputs, targets, mask) drawn epoch by epoch in a seeded order.

    Rows are right-padded to a multiple of 16 tokens so mx.compile sees only a few shapes.
    """
    rng = np.random.default_rng(seed)
    order: list[int] = []
    for _ in range(num_steps):
        if len(order) < batch_size:
            order += rng.permutation(len(rows)).tolist()
        chosen, order = order[:batch_size], order[batch_size:]
        width = max(len(rows[i][0]) for i in chosen) - 1
        width = 16 * math.ceil(width / 16)
        inputs = np.zeros((batch_size, width), np.int32)
        targets = np.zeros((batch_size, width), np.int32)
        mask = np.zeros((batch_size, width), np.float32)
        for r, i in enumerate(chosen):
            ids, trained = rows[i]
            n = len(ids) - 1
            inputs[r, :n], targets[r, :n], mask[r, :n] = ids[:-1], ids[1:], trained[1:]
        yield mx.array(inputs), mx.array(targets), mx.array(mask)


# --------------------------------------------------------------------------------------------
# Model


def model_config_of(settings: DemoSettings, vocab_size: int) -> dict:
    """nanochat's model_config (what meta_*.json stores)."""
    return {
        "sequence_len": settings.sequence_len,
        "vocab_size": vocab_size,
        "n_layer": settings.depth,
        "n_head": settings.num_heads,
        "n_kv_head": settings.num_heads,
        "n_embd": settings.width,
    }


def init_nanochat_weights(model: nn.Module, seed: int) -> None:
    """nanochat's init: embeddings N(0, 1); linears N(0, 1/sqrt(fan_in) * min(1, sqrt(fan_out/fan_in)));
    lm_head and both output projections (attn.c_proj, mlp.c_proj) zero."""
    params = tree_flatten(model.parameters())
    keys = mx.random.split(mx.random.key(seed), len(params))
    new = {}
    for i, (name, weight) in enumerate(params):
        fan_out, fan_in = weight.shape
        if name == "transformer.wte.weight":
            std = 1.0
        elif name == "lm_head.weight" or name.endswith("c_proj.weight"):
            std = 0.0
        else:
            std = min(1.0, math.sqrt(fan_out / fan_in)) / math.sqrt(fan_in)
        new[name] = mx.random.normal(weight.shape, key=keys[i]) * std
    model.load_weights(list(new.items()))
    mx.eval(model.parameters())


def round_embedding_to_bf16(model: nn.Module) -> None:
    """nanochat stores wte in bf16: round it now so the model evaluated is the model written."""
    wte = model.transformer.wte
    wte.weight = wte.weight.astype(mx.bfloat16).astype(mx.float32)
    mx.eval(wte.weight)


def sft(model, rows, settings: DemoSettings, log=partial(print, flush=True), on_eval=None, eval_every: int = 0):
    """Masked next-token cross-entropy with AdamW: linear warmup, constant, linear decay to 0."""

    def loss_fn(model, inputs, targets, mask):
        logits = model(inputs)
        losses = nn.losses.cross_entropy(logits, targets, reduction="none")
        return (losses * mask).sum() / mask.sum()

    # nanochat-like schedule: linear warmup, constant, then linear decay to 0 over the last part.
    peak, warmup = settings.learning_rate, max(settings.warmup_steps, 1)
    decay_start = settings.sft_steps * (1 - settings.decay_fraction)

    def schedule(step):
        up = mx.minimum(1.0, (step + 1) / warmup)
        down = mx.clip((settings.sft_steps - step) / max(settings.sft_steps - decay_start, 1), 0.0, 1.0)
        return peak * mx.minimum(up, down)

    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=settings.weight_decay)
    loss_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state]

    # mx.compile needs the model and optimizer state as explicit inputs/outputs to update them.
    @partial(mx.compile, inputs=state, outputs=state)
    def step(inputs, targets, mask):
        loss, grads = loss_and_grad(model, inputs, targets, mask)
        optimizer.update(model, grads)
        return loss

    start, smoothed = time.perf_counter(), None
    batches = sft_batches(rows, settings.sft_batch_size, settings.sft_steps, settings.seed)
    for i, (inputs, targets, mask) in enumerate(batches, start=1):
        loss = step(inputs, targets, mask)
        mx.eval(state, loss)
        smoothed = float(loss) if smoothed is None else 0.9 * smoothed + 0.1 * float(loss)
        if i % 250 == 0 or i == settings.sft_steps:
            log(f"[sft] step {i}/{settings.sft_steps} loss {smoothed:.3f} ({time.perf_counter() - start:.0f}s)")
        if on_eval is not None and eval_every and i % eval_every == 0 and i < settings.sft_steps:
            on_eval(i)


# --------------------------------------------------------------------------------------------
# Evaluation (greedy, calculator on, as the trainer evaluates)


def greedy_accuracy(model, tok: TiktokenTokenizerWrapper, examples, max_new_tokens: int) -> float:
    from mlx_grpo.generation.calculator import CalculatorTool
    from mlx_grpo.training.evaluation import evaluate

    calculator = CalculatorTool.for_tokenizer(tok)
    prompts = [encode_prompt(tok, build_messages(e.question, "nanochat")) for e in examples]
    check = BUILTIN_REWARDS["gsm8k"]
    result = evaluate(
        model, prompts, [e.answer for e in examples],
        decode=lambda c: tok.decode(c.tokens),
        is_correct=lambda text, answer: check([text], answer=[answer])[0] > 0,
        stop_token_ids=tok.eos_token_ids, max_new_tokens=max_new_tokens, calculator=calculator,
    )
    return result.accuracy


# --------------------------------------------------------------------------------------------
# nanochat checkpoint + conversion


def write_nanochat_checkpoint(folder: Path, model: nn.Module, model_config: dict, encoding, step: int,
                              extra_meta: dict) -> Path:
    """model_{step:06d}.pt (nanochat tensor names, bf16 wte, fp32 rest), meta_{step:06d}.json, tokenizer.pkl."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, weight in tree_flatten(model.parameters()):
        tensor = torch.from_numpy(np.array(weight.astype(mx.float32)))
        state[name] = tensor.to(torch.bfloat16) if name == "transformer.wte.weight" else tensor
    torch.save(state, folder / f"model_{step:06d}.pt")
    meta = {"step": step, "model_config": model_config, **extra_meta}
    (folder / f"meta_{step:06d}.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    with open(folder / TOKENIZER_FILENAME, "wb") as f:
        pickle.dump(encoding, f)
    return folder


# --------------------------------------------------------------------------------------------


def make_demo(out_dir: Path, settings: DemoSettings, eval_every: int = 0, log=partial(print, flush=True)) -> dict:
    """Write out_dir/data and out_dir/model; return a summary (SFT accuracy, sizes, seconds)."""
    start = time.perf_counter()
    mx.random.seed(settings.seed)
    data_dir, model_dir = out_dir / "data", out_dir / "model"
    train, _ = write_dataset(data_dir, settings.num_train, settings.num_test, settings.seed)
    test = load_gsm8k(dataset_path=str(data_dir), split="test")  # read back the way the trainer reads it
    log(f"[data] {len(train)} train / {len(test)} test problems in {data_dir}")

    # Many fresh problems rather than epochs over a few: the model must learn to copy numbers, not memorize.
    sft_examples = generate_problems(settings.sft_examples, seed=settings.seed + 1000,
                                     exclude_questions={e.question for e in test})
    encoding = train_tokenizer(tokenizer_texts(sft_examples), settings.vocab_size)
    tok = TiktokenTokenizerWrapper(encoding, name_or_path="demo")
    direct = np.random.default_rng(settings.seed).random(len(sft_examples)) < settings.direct_fraction
    rows = [render_sft_example(tok, p.question, without_calculator(p.solution) if d else p.solution)
            for p, d in zip(sft_examples, direct)]
    log(f"[tokenizer] vocab {tok.vocab_size}; SFT rows {len(rows)}, "
        f"mean length {np.mean([len(r[0]) for r in rows]):.0f} tokens")

    model_config = model_config_of(settings, tok.vocab_size)
    model = build_model(mlx_config(model_config))
    init_nanochat_weights(model, settings.seed)
    num_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    log(f"[model] depth {settings.depth}, width {settings.width}, {num_params:,} params")

    def on_eval(step):
        acc = greedy_accuracy(model, tok, test, settings.eval_max_new_tokens)
        log(f"[sft] step {step}: held-out greedy accuracy {acc:.1%}")

    sft(model, rows, settings, log=log, on_eval=on_eval, eval_every=eval_every)
    round_embedding_to_bf16(model)

    with tempfile.TemporaryDirectory() as tmp:
        ckpt_dir = write_nanochat_checkpoint(
            Path(tmp) / "demo_sft", model, model_config, encoding, settings.sft_steps,
            {"source": "utils/demo/build.py", "settings": asdict(settings)},
        )
        summary = convert_checkpoint(find_checkpoint(ckpt_dir, source="utils/demo/build.py"),
                                     model_dir, dtype="float32", overwrite=True)
    log(f"[convert] {summary.describe()}")

    from mlx_grpo.models import load_model

    converted, _ = load_model(model_dir)
    accuracy = greedy_accuracy(converted, tok, test, settings.eval_max_new_tokens)
    log(f"[done] held-out greedy accuracy of {model_dir}: {accuracy:.1%} ({time.perf_counter() - start:.0f}s)")
    return {"accuracy": accuracy, "num_params": num_params, "size_bytes": summary.size_bytes,
            "seconds": time.perf_counter() - start}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Make the demo data and model (demo/ by default).")
    parser.add_argument("--out", default=str(REPO_ROOT / "demo"), help="folder for data/ and model/")
    parser.add_argument("--eval-every", type=int, default=0, help="also evaluate every N SFT steps (slower)")
    for name, value in asdict(DemoSettings()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    settings = DemoSettings(**{k: getattr(args, k) for k in asdict(DemoSettings())})
    make_demo(Path(args.out), settings, eval_every=args.eval_every)


if __name__ == "__main__":
    main()
