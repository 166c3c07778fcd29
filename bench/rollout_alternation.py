"""Rollout tok/s of several decode paths taking turns in one process, so that each sees the same machine state
(the rate of one path moves by +-10% between processes on the lent GPU). nanochat with random weights, 16 prompts
of 80-120 tokens x 16 rows x 256 new tokens, top-k 50, by default.

    python bench/rollout_alternation.py --paths portable,portable-fused     # the portable path's masked attention
    git worktree add /tmp/old 55dad8d
    python bench/rollout_alternation.py --paths portable,portable-compared --compare-tree /tmp/old
    python bench/rollout_alternation.py --paths kernel,kernel-compared --compare-tree /tmp/old

Paths: kernel (utils/cuda_kernels/decode.py, MLX's CUDA backend only); portable (MLX's ops only, what Metal runs;
on CUDA the masked attention is attention_by_gemm); portable-fused (the same with MLX's fused attention call for the
masked attention too, which on CUDA is MLX's unfused fallback); kernel-compared and portable-compared (those paths
of another checkout, --compare-tree: its utils/ imported under another package name, its decoders, kernels and
sampler). Each path rolls out once to compile, then `--rounds` times in turn.
"""

import argparse
import importlib
import pathlib
import shutil
import sys
import tempfile

import mlx.core as mx
import numpy as np
from model_families import VOCAB, build_model

from mlx_grpo import cuda_kernels
from mlx_grpo.generation.engine import generate_completions
from mlx_grpo.generation.sampling import make_rollout_sampler
from mlx_grpo.nanochat import decoder as nanochat_decoder

PATHS = ("kernel", "portable", "portable-fused", "kernel-compared", "portable-compared")
COMPARED = "mlx_grpo_compared"


def load_tree(checkout):
    """(generate_completions, make_rollout_sampler, cuda_kernels) of another checkout's utils/, copied to a
    temporary folder as the package mlx_grpo_compared (its imports renamed), so both versions run in one process."""
    source = pathlib.Path(checkout) / "utils"
    if not (source / "generation" / "engine.py").is_file():
        raise SystemExit(f"rollout_alternation.py: {checkout} has no utils/generation/engine.py; pass a checkout "
                         "of this repository (git worktree add DIR COMMIT)")
    root = pathlib.Path(tempfile.mkdtemp())
    shutil.copytree(source, root / COMPARED)
    for path in (root / COMPARED).rglob("*.py"):
        path.write_text(path.read_text().replace("mlx_grpo", COMPARED))
    sys.path.insert(0, str(root))
    for name in [m for m in sys.modules if m.split(".")[0] == COMPARED]:  # a tree loaded before
        del sys.modules[name]
    modules = [importlib.import_module(f"{COMPARED}.{name}")
               for name in ("generation.engine", "generation.sampling", "cuda_kernels")]
    return modules[0].generate_completions, modules[1].make_rollout_sampler, modules[2]


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--paths", default="kernel,portable,portable-fused", help=f"comma-separated, of {PATHS}")
    p.add_argument("--compare-tree", metavar="DIR", help="the checkout that the *-compared paths run")
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--vocab", type=int, default=VOCAB)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    paths = args.paths.split(",")
    if unknown := [name for name in paths if name not in PATHS]:
        raise SystemExit(f"rollout_alternation.py: unknown path {unknown[0]!r}; choose from {', '.join(PATHS)}")
    if any(name.startswith("kernel") for name in paths) and not cuda_kernels.runs_on_cuda_gpu():
        raise SystemExit("rollout_alternation.py: the kernel paths need MLX's CUDA backend; run the portable ones")
    needs_tree = [name for name in paths if name.endswith("-compared")]
    if needs_tree and not args.compare_tree:
        raise SystemExit(f"rollout_alternation.py: {needs_tree[0]} needs --compare-tree DIR (a checkout)")
    compared = load_tree(args.compare_tree) if needs_tree else None
    by_hand = nanochat_decoder.masked_attention_by_hand

    def take(name):
        """The rollout function and sampler of a path, with the switches its decoders read when made set: the
        kernels (and the sampling kernel) on or off, the masked attention's form."""
        kernels = name.startswith("kernel")
        cuda_kernels.set_enabled(kernels)
        nanochat_decoder.masked_attention_by_hand = (lambda: False) if name == "portable-fused" else by_hand
        if not name.endswith("-compared"):
            return generate_completions, sampler
        generate, make_sampler, compared_kernels = compared
        compared_kernels.set_enabled(kernels)
        return generate, make_sampler(1.0, top_k=50)

    model = build_model(args.depth, args.vocab)
    model.set_dtype(mx.bfloat16)
    rng = np.random.default_rng(0)
    lengths = rng.integers(80, 121, size=args.prompts)
    prompts = [rng.integers(0, min(args.vocab, 65_000), size=n).tolist() for n in lengths]
    sampler = make_rollout_sampler(1.0, top_k=50)
    tokens = args.prompts * args.group * args.new_tokens
    rates = {name: [] for name in paths}
    try:
        for round_ in range(args.rounds + 1):
            for name in paths:
                generate, rollout_sampler = take(name)
                stats = generate(model, prompts, group_size=args.group, max_new_tokens=args.new_tokens,
                                 sampler=rollout_sampler, stop_token_ids=set())[1]
                if round_ > 0:  # round 0 compiles
                    rates[name].append(tokens / stats.seconds)
                    print(f"round {round_} {name:<16} {rates[name][-1]:10,.0f} tok/s", flush=True)
    finally:
        take("kernel")  # the defaults back
    for name, values in rates.items():
        print(f"{name:<16} mean {sum(values) / len(values):10,.0f} tok/s over {len(values)} rollouts")
    return rates


if __name__ == "__main__":
    main()
