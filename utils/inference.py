"""Chat with, prompt, or batch-prompt a model: converted nanochat folders, training checkpoints, mlx-lm models.

    python utils/inference.py                                  # chat with the newest checkpoint under outputs/
    python utils/inference.py --model models/nanochat-d32-mlx --chat
    python utils/inference.py --model outputs/run1/checkpoints/step_000100 --prompt "What is 12*7?" --stream
    python utils/inference.py --model mlx-community/Qwen2.5-1.5B-Instruct-4bit --prompt "Hi" --system "Be brief."
    python utils/inference.py --model models/nanochat-d32-mlx --prompts-file questions.jsonl --output answers.jsonl
    python utils/inference.py --model models/Qwen2-VL-2B-Instruct-mlx --image cat.png --prompt "What is this?"

Chat commands: /clear, /system TEXT, /help, /exit (also quit, exit, Ctrl-D); Ctrl-C stops an answer.
nanochat models use their calculator: a call <|python_start|>expr<|python_end|> is evaluated
(safe arithmetic only) and <|output_start|>result<|output_end|> is forced into the answer, as
nanochat's engine does; both show in the text. --no-tools turns it off.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

DEFAULT_OUTPUTS_DIR = "outputs"
MODEL_HELP = (
    "pass --model PATH: a converted nanochat folder (python convert_nanochat.py ... --output models/NAME), "
    "a training checkpoint (outputs/<run>/checkpoints/step_NNNNNN) or run folder (outputs/<run>), "
    "or an mlx-lm model folder / Hugging Face id (e.g. mlx-community/Qwen2.5-1.5B-Instruct-4bit)"
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python utils/inference.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="model folder, training checkpoint or run folder, or hub id "
                        f"(default: the newest checkpoint at any depth under {DEFAULT_OUTPUTS_DIR}/); a LoRA "
                        "checkpoint (adapter_config.json) loads its base from the recorded model_name")
    parser.add_argument("--adapter-path", help="LoRA/DoRA adapters (adapters.safetensors + adapter_config.json, "
                        "e.g. a LoRA training checkpoint) applied to --model as the base")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--chat", action="store_true", help="multi-turn chat in the terminal (the default mode)")
    mode.add_argument("--prompt", help="answer one prompt (chat template applied unless --raw)")
    mode.add_argument("--prompts-file", help="answer every prompt of a file, generated together in batches of "
                      "--batch-size: a .jsonl file with a \"prompt\" field a line, or any other file with one "
                      "prompt a line")
    parser.add_argument("--image", action="append", default=[], metavar="PATH",
                        help="an image for a vision-language model (repeatable): with --prompt and --chat it goes "
                             "with the (first) message; with --prompts-file with every prompt of the file that "
                             "names no image or images of its own")
    parser.add_argument("--raw", action="store_true", help="send --prompt / --prompts-file text as is, "
                        "without the chat template (special-token strings in it become special tokens)")
    parser.add_argument("--system", help="system prompt (chat template only)")
    parser.add_argument("--output", help="with --prompts-file: write the results to this .jsonl file")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="with --prompts-file: most prompts generated at once (default: 32)")
    parser.add_argument("--max-tokens", type=int, default=512, help="most tokens per answer (default: 512)")
    parser.add_argument("--temperature", "--temp", type=float, default=0.7, help="0 = greedy (default: 0.7)")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling, 1 = off (default: 0.95)")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens, 0 = off (default)")
    parser.add_argument("--min-p", type=float, default=0.0, help="min-p sampling, 0 = off (default)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off (default: 1.0)")
    parser.add_argument("--seed", type=int, help="random seed for sampling")
    parser.add_argument("--no-tools", action="store_true", help="nanochat models: do not run calculator calls")
    parser.add_argument("--stream", action="store_true", help="with --prompt: print the answer as it is generated "
                        "(chat always streams)")
    parser.add_argument("--verbose", action="store_true",
                        help="print prompt and generation tokens-per-sec and peak memory (to stderr)")
    parser.add_argument("--show-prompt", action="store_true",
                        help="print every prompt as the model sees it, special tokens included (to stderr)")
    args = parser.parse_args(argv)

    prompt_mode = args.prompt is not None or args.prompts_file is not None
    if args.raw and not prompt_mode:
        parser.error("--raw applies to --prompt and --prompts-file (chat always uses the chat template)")
    if args.raw and args.system is not None:
        parser.error("--system needs the chat template; drop --raw or put the system text in the prompt")
    if args.output is not None and args.prompts_file is None:
        parser.error("--output applies to --prompts-file")
    if args.stream and args.prompts_file is not None:
        parser.error("--stream applies to --prompt and --chat; --prompts-file generates a batch")
    return args


# ---------------------------------------------------------------------------------------------
# Which model


def resolve_model(model: str | None, outputs_dir: str | os.PathLike = DEFAULT_OUTPUTS_DIR) -> str:
    """--model as a path or hub id for load_model: a run folder (holding checkpoints/) becomes its
    complete checkpoint with the largest step; no --model, the newest complete checkpoint at any depth
    under outputs_dir (the demo's runs are in outputs/demo/<run>/)."""
    from mlx_grpo.generation.chat import InferenceError
    from mlx_grpo.training.checkpoint import CHECKPOINTS_DIRNAME, find_latest_checkpoint, newest_checkpoint

    if model is None:
        newest = newest_checkpoint(outputs_dir)
        if newest is None:
            raise InferenceError(f"no --model given and no complete checkpoint under {outputs_dir}/; {MODEL_HELP}")
        return str(newest)
    path = Path(model).expanduser()
    if (path / CHECKPOINTS_DIRNAME).is_dir() and not (path / "config.json").is_file():
        latest = find_latest_checkpoint(path)
        if latest is None:
            raise InferenceError(f"run folder {path} has no complete checkpoint in {CHECKPOINTS_DIRNAME}/ yet; "
                                 f"{MODEL_HELP}")
        return str(latest)
    return model


# ---------------------------------------------------------------------------------------------
# Modes


def _print_stats(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _build_prompt(model, tokenizer, text, args, images):
    from mlx_grpo.generation.chat import build_prompt

    if hasattr(model, "processor"):  # a vision-language model (utils/vlm/)
        from mlx_grpo.vlm.model import build_vlm_prompt

        return build_vlm_prompt(model, text, images, system=args.system, raw=args.raw)
    return build_prompt(tokenizer, text, system=args.system, raw=args.raw)


def record_images(record: dict, base: Path, default: list) -> list:
    """A prompts-file record's "image" (a path) or "images" (a list), relative to the file's folder; else default."""
    from mlx_grpo.vlm import VlmError

    images = record.get("images", record.get("image"))
    if images is None:
        return default
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise VlmError(f"a prompts-file record's image/images must be a path or a list of paths, got {images!r}")
    return [str(Path(i) if Path(i).is_absolute() else base / i) for i in images]


def run_prompt(model, tokenizer, args, options) -> None:
    from mlx_grpo.generation.chat import ReplyStream

    prompt = _build_prompt(model, tokenizer, args.prompt, args, args.image)
    if args.show_prompt:
        print(f"[prompt] {tokenizer.decode(prompt)}", file=sys.stderr, flush=True)
    stream = ReplyStream(model, tokenizer, prompt, options)
    reply = stream.run(on_text=(lambda text: print(text, end="", flush=True)) if args.stream else None)
    print("" if args.stream else reply.text, flush=True)
    if args.verbose:
        _print_stats(reply.stats.describe())


def run_prompts_file(model, tokenizer, args, options) -> None:
    from mlx_grpo.generation.chat import generate_replies, read_prompts_file

    records = read_prompts_file(args.prompts_file)
    base = Path(args.prompts_file).parent
    prompts = [_build_prompt(model, tokenizer, r["prompt"], args, record_images(r, base, args.image) if
                             hasattr(model, "processor") else []) for r in records]
    if args.show_prompt:
        for i, prompt in enumerate(prompts, start=1):
            print(f"[prompt {i}] {tokenizer.decode(prompt)}", file=sys.stderr)
    replies, stats = generate_replies(model, tokenizer, prompts, options, batch_size=args.batch_size)
    results = [
        {**record, "completion": reply.text, "finish_reason": reply.finish_reason, "num_tokens": len(reply.tokens),
         "tool_calls": [{"expression": c.expression, "result": c.result} for c in reply.tool_calls]}
        for record, reply in zip(records, replies)
    ]
    if args.output is not None:
        output = Path(args.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        with open(output, "w", encoding="utf-8") as f:
            for result in results:
                f.write(json.dumps(result, ensure_ascii=False) + "\n")
        print(f"wrote {len(results)} completions to {output}")
    else:
        for i, result in enumerate(results, start=1):
            print(f"=== [{i}/{len(results)}] {result['prompt']}\n{result['completion']}\n", flush=True)
    if args.verbose:
        _print_stats(stats.describe())


def run_chat_mode(model, tokenizer, args, options, model_name: str) -> None:
    from mlx_grpo.generation.chat import ChatSession, run_chat

    if hasattr(model, "processor"):  # a vision-language model
        from mlx_grpo.vlm.chat import VlmChatSession

        session = VlmChatSession(model, tokenizer, options, images=args.image, system=args.system)
    else:
        session = ChatSession(model, tokenizer, options, system=args.system)
    interactive = sys.stdin.isatty()
    if interactive:
        tools = " Calculator on." if model_uses_calculator(tokenizer, options) else ""
        print(f"Chatting with {model_name}.{tools} /help lists the commands; /exit or Ctrl-D quits, "
              f"Ctrl-C stops an answer.")
    run_chat(session, prompt=">>> " if interactive else "", show_prompt=args.show_prompt, verbose=args.verbose)


def model_uses_calculator(tokenizer, options) -> bool:
    from mlx_grpo.generation.chat import calculator_for

    return calculator_for(tokenizer, options) is not None


def main(argv=None) -> int:
    args = parse_args(argv)
    # Imported after argument parsing so that --help answers at once (mlx-lm imports transformers).
    import mlx.core as mx

    from mlx_grpo.generation.chat import GenerationOptions, InferenceError
    from mlx_grpo.models import ModelLoadError, is_adapter_folder, load_model
    from mlx_grpo.nanochat.checkpoint import NanochatCheckpointError
    from mlx_grpo.training.checkpoint import CheckpointError
    from mlx_grpo.training.lora import load_adapted_model
    from mlx_grpo.vlm import VlmError

    try:
        options = GenerationOptions(
            max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
            min_p=args.min_p, repetition_penalty=args.repetition_penalty, tools=not args.no_tools,
        )
        model_name = resolve_model(args.model)
        if args.model is None:
            print(f"[model] {model_name} (newest checkpoint; --model picks another)", file=sys.stderr)
        if args.adapter_path is not None or is_adapter_folder(model_name):  # base + LoRA adapters
            model, tokenizer = load_adapted_model(model_name, args.adapter_path)
        else:  # a vision-language model loads through mlx-vlm (utils/vlm/)
            model, tokenizer = load_model(model_name)
        if args.image and not hasattr(model, "processor"):
            raise VlmError(f"--image needs a vision-language model (a config.json with a vision_config); "
                           f"{model_name} is a text model")
        if args.seed is not None:
            mx.random.seed(args.seed)
        if args.prompt is not None:
            run_prompt(model, tokenizer, args, options)
        elif args.prompts_file is not None:
            run_prompts_file(model, tokenizer, args, options)
        else:
            run_chat_mode(model, tokenizer, args, options, model_name)
    except (InferenceError, ModelLoadError, NanochatCheckpointError, CheckpointError, VlmError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    try:
        import mlx_grpo  # noqa: F401  (the tool's imports are inside main())
    except ModuleNotFoundError:  # run from a checkout that was never installed
        sys.exit("error: the package mlx_grpo is not installed in this Python: run pip install -e . in the checkout")
    sys.exit(main())
