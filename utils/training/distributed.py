"""Data-parallel training over MLX's own distributed layer (mx.distributed, started by mlx.launch).

    mlx.launch -n 2 python mlx-grpo.py --config X                       # 2 processes on this machine
    mlx.launch --hostfile hosts.json --backend ring python mlx-grpo.py  # Macs over Ethernet/Thunderbolt
    mlx.launch -n 8 --backend nccl python mlx-grpo.py                   # 8 NVIDIA GPUs of one Linux host

How N processes compute exactly the update of one process on the same global batch:
- Every process walks the same global data order (PromptSampler with cfg.seed) and takes a
  contiguous share of each step's prompts (shard), so a prompt's whole group stays on one process.
- Rollouts are sampled with seed + rank, so the processes sample different completions.
- The loss normalizers (num_sequences_total, num_tokens_total, num_micro_batches) are summed over
  the processes, so each process's micro-batch losses are terms of the ONE global batch loss.
  The gradients (and loss and stats) are then SUMMED, not averaged, across processes: the sum of
  every micro-batch's gradient is the gradient of the batch loss, exactly as in one process
  (averaging would divide the step by N). Only the order of the float additions differs.
- scale_rewards="batch" gathers every reward and takes the std of the whole batch, the same
  computation as one process. Groups never straddle processes, so "group" and "none" are local.
- After the sum every process holds the same gradients and takes the same optimizer step.
- bnpo averages per-micro-batch token means: it equals the one-process loss when each process's
  completions split into the same micro-batches (its share is a multiple of micro_batch_size).

A plain `python mlx-grpo.py` builds World() of size 1: no backend is started, and every method
returns its input untouched.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_map

from mlx_grpo.config import ConfigError
from mlx_grpo.training.checkpoint import CheckpointError, capture_rng_state, restore_rng_state
from mlx_grpo.training.loss import (
    ADVANTAGE_STD_EPS,
    advantages_from_stats,
    batch_reward_std,
    group_advantages,
    group_reward_stats,
    normalized_reward_sum,
)

BACKENDS = ("ring", "mpi", "nccl", "jaccl")
# Gradients travel in buckets of about this many bytes: few large messages, bounded extra memory.
BUCKET_BYTES = 64 * 1024 * 1024


class DistributedError(RuntimeError):
    """The distributed backend could not start, or the processes disagree."""


# ----------------------------------------------------------------------------------------------
# Starting


def launcher_backend(env=None) -> str | None:
    """The backend the launcher set up, read from the variables it exports; None for a plain run.

    mlx.launch sets MLX_RANK with MLX_HOSTFILE (ring), NCCL_HOST_IP/NCCL_PORT (nccl) or
    MLX_JACCL_COORDINATOR (jaccl); mpirun sets OMPI_COMM_WORLD_SIZE (Open MPI) or PMI_SIZE (MPICH).
    """
    env = os.environ if env is None else env
    if "NCCL_HOST_IP" in env and "MLX_RANK" in env:
        return "nccl"
    if "MLX_JACCL_COORDINATOR" in env and "MLX_RANK" in env:
        return "jaccl"
    if "MLX_HOSTFILE" in env and "MLX_RANK" in env:
        # mlx.launch -n 1 writes an empty hostfile: one process, nothing to connect.
        hostfile = Path(env["MLX_HOSTFILE"])
        return "ring" if hostfile.is_file() and hostfile.read_text().strip() else None
    if "OMPI_COMM_WORLD_SIZE" in env or "PMI_SIZE" in env:
        return "mpi"
    return None


def init_world(backend: str | None = None) -> "World":
    """The process group this run belongs to: World() for a plain run, else the launcher's backend.

    The backend is the one mlx.launch / mpirun set up (launcher_backend), started strictly: a
    launched process that cannot join its group stops with an error instead of training alone.
    """
    backend = backend or launcher_backend()
    if backend is None:
        return World()
    if backend not in BACKENDS:
        raise DistributedError(f"unknown distributed backend {backend!r}; valid: {', '.join(BACKENDS)}")
    try:
        group = mx.distributed.init(strict=True, backend=backend)
    except RuntimeError as error:
        raise DistributedError(f"could not start the {backend} backend ({error}); start the run with "
                               f"mlx.launch (see README: several machines)") from error
    return World(group)


def quiet_unless_main(world: "World") -> None:
    """Only rank 0 prints: the other processes' stdout goes to /dev/null (errors still show on stderr)."""
    if not world.is_main:
        sys.stdout = open(os.devnull, "w")


# ----------------------------------------------------------------------------------------------
# The process group and its collective operations


@dataclass
class World:
    """This process's place in a data-parallel run. group None: a plain one-process run."""

    group: Any = None  # mx.distributed.Group
    rank: int = field(init=False)
    size: int = field(init=False)

    def __post_init__(self):
        self.rank = 0 if self.group is None else self.group.rank()
        self.size = 1 if self.group is None else self.group.size()

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints and writes files."""
        return self.rank == 0

    def shard_bounds(self, num_items: int) -> tuple[int, int]:
        """[start, stop) of this rank's contiguous share; shares differ by at most one item."""
        base, extra = divmod(num_items, self.size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (1 if self.rank < extra else 0)

    def shard(self, items: list) -> list:
        """This rank's contiguous share of `items` (all of them in one process)."""
        if self.size == 1:
            return items
        start, stop = self.shard_bounds(len(items))
        return items[start:stop]

    def sum_tree(self, tree):
        """The tree (of mx.arrays, e.g. gradients) summed over all processes; same structure back.

        Arrays travel concatenated in buckets of one dtype (fewer, larger messages, like
        mlx.nn.average_gradients, which divides by N: our losses are already globally normalised).
        """
        if self.size == 1:
            return tree
        leaves = [value for _, value in tree_flatten(tree)]
        summed = [None] * len(leaves)
        for bucket in _buckets(leaves, BUCKET_BYTES):
            flat = mx.concatenate([leaves[i].reshape(-1) for i in bucket])
            total = mx.distributed.all_sum(flat, group=self.group)
            offsets = np.cumsum([leaves[i].size for i in bucket])[:-1].tolist()
            parts = mx.split(total, offsets) if offsets else [total]
            for i, part in zip(bucket, parts):
                summed[i] = part.reshape(leaves[i].shape)
            mx.eval([summed[i] for i in bucket])  # frees this bucket's concatenated copy
        remaining = iter(summed)
        return tree_map(lambda _: next(remaining), tree)

    def sum_values(self, values: dict) -> dict:
        """{name: number} summed over processes (float32: exact for whole numbers below 2**24)."""
        if self.size == 1:
            return values
        totals = mx.distributed.all_sum(mx.array([float(v) for v in values.values()], dtype=mx.float32),
                                        group=self.group).tolist()
        return dict(zip(values, totals))

    def all_true(self, flag: bool) -> bool:
        """True when `flag` is True on every process (so all of them take the same branch)."""
        if self.size == 1:
            return bool(flag)
        failures = mx.distributed.all_sum(mx.array([0 if flag else 1], dtype=mx.int32), group=self.group)
        return failures.item() == 0

    def gather_arrays(self, values: np.ndarray) -> list[np.ndarray]:
        """Every process's 1-D array (lengths may differ), in rank order."""
        values = np.asarray(values).reshape(-1)
        if self.size == 1:
            return [values]
        lengths = mx.distributed.all_gather(mx.array([values.size], dtype=mx.int32), group=self.group).tolist()
        padded = np.zeros((1, max(max(lengths), 1)), dtype=values.dtype)
        padded[0, :values.size] = values
        rows = np.array(mx.distributed.all_gather(mx.array(padded), group=self.group))
        return [rows[r, :n] for r, n in enumerate(lengths)]

    def gather_json(self, obj) -> list:
        """Every process's JSON-able object, in rank order (JSON, never pickle)."""
        data = np.frombuffer(json.dumps(obj).encode(), dtype=np.uint8)
        return [json.loads(row.tobytes().decode()) for row in self.gather_arrays(data)]


def _buckets(leaves: list, max_bytes: int) -> list[list[int]]:
    """Indices of `leaves` grouped by dtype into runs of about max_bytes."""
    buckets, open_buckets = [], {}
    for i, leaf in enumerate(leaves):
        bucket, size = open_buckets.get(leaf.dtype, ([], 0))
        bucket.append(i)
        size += leaf.nbytes
        if size >= max_bytes:
            buckets.append(bucket)
            bucket, size = [], 0
        open_buckets[leaf.dtype] = (bucket, size)
    buckets.extend(bucket for bucket, _ in open_buckets.values() if bucket)
    return buckets


# ----------------------------------------------------------------------------------------------
# The GRPO pieces that need the other processes


def check_data_split(world: World, num_prompts: int, prompts_per_step: int) -> None:
    """Refuse a run in which some step would leave a process without prompts.

    num_prompts: prompts handed out over the whole run (examples x epochs); only the last step
    can be short.
    """
    if world.size == 1:
        return
    last = num_prompts - (math.ceil(num_prompts / prompts_per_step) - 1) * prompts_per_step
    smallest = min(prompts_per_step, last)
    if smallest < world.size:
        where = "every step" if prompts_per_step < world.size else "the last step"
        raise ConfigError(f"{where} has {smallest} prompt(s) for {world.size} processes: each process needs "
                          f"at least one; raise prompts_per_step / change max_train_samples so that every "
                          f"step has >= {world.size} prompts, or launch fewer processes")


def group_advantages_across(world: World, rewards: mx.array, group_size: int, scale_rewards: str) -> mx.array:
    """grpo_loss.group_advantages of this process's rewards, with the batch std over ALL processes'
    rewards for scale_rewards="batch" (gathered, so it is the one-process computation exactly)."""
    if world.size == 1 or scale_rewards != "batch":
        return group_advantages(rewards, group_size, scale_rewards)  # groups never straddle processes
    every_reward = mx.array(np.concatenate(world.gather_arrays(np.array(rewards, dtype=np.float32))))
    means, stds = group_reward_stats(rewards, group_size)
    return advantages_from_stats(rewards, means, "batch", group_stds=stds, batch_std=batch_reward_std(every_reward))


def normalize_then_sum_across(world: World, reward_parts, weights, group_size: int) -> mx.array:
    """TRL's "normalize_then_sum" advantages of this process's completions: each reward function normalized
    in its group, the weighted sum, then (sum - batch mean) / (batch std + 1e-4) over ALL processes' sums."""
    summed = normalized_reward_sum(reward_parts, weights, group_size)  # groups never straddle processes
    every = np.concatenate(world.gather_arrays(np.array(summed, dtype=np.float32))).astype(np.float64)
    if every.size < 2:
        raise ValueError("normalize_then_sum needs at least 2 completions in the batch")
    return (summed - float(every.mean())) / (float(np.std(every, ddof=1)) + ADVANTAGE_STD_EPS)


def reward_std_across(world: World, rewards) -> float:
    """TRL's reward_std: the std (ddof=1) of every reward of the step, over all processes."""
    every_reward = np.concatenate(world.gather_arrays(np.asarray(rewards, dtype=np.float32)))
    return float(np.std(every_reward.astype(np.float64), ddof=1)) if every_reward.size > 1 else 0.0


# How each logged metric combines over processes; the rest are means weighted by completions.
SAME_ON_EVERY_PROCESS = ("step", "epoch", "lr", "nan_events", "loss", "grad_norm", "kl", "entropy",
                         "clip_ratio/", "importance_ratio/", "cispo_clip_ratio", "vespo/", "policy_loss",
                         "entropy_coef",  # adapted from the all-summed entropy
                         "reward_std")  # computed after the all-sum (reward_std: over every process's rewards)
SUMMED = ("reward_failures", "tools/calls", "tools/failures", "tokens_per_sec/rollout")
SMALLEST = ("completions/min_length", "tokens_per_sec/train",  # train: global tokens / slowest process
            "sampling/importance_sampling_ratio/min")
LARGEST = ("completions/max_length", "memory/", "time/", "sampling/importance_sampling_ratio/max",
           "sampling/sampling_logp_difference/max")


def _rule(key: str) -> str:
    for rule, names in (("same", SAME_ON_EVERY_PROCESS), ("sum", SUMMED), ("min", SMALLEST), ("max", LARGEST)):
        if any(key == name or (name.endswith("/") and key.startswith(name)) for name in names):
            return rule
    return "mean"


def reduce_step_metrics(world: World, metrics: dict, num_completions: int) -> dict:
    """One step's metrics over all processes (one all_gather). Unchanged in one process."""
    if world.size == 1:
        return metrics
    keys = [k for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and _rule(k) != "same"]
    local = np.array([num_completions, len(keys)] + [metrics[k] for k in keys], dtype=np.float32)
    table = np.stack(world.gather_arrays(local)).astype(np.float64)  # [processes, 2 + keys]
    if len(set(table[:, 1])) > 1:
        raise DistributedError(f"the processes logged different metrics ({table[:, 1].tolist()} keys): "
                               "every process must compute the same metric names")
    weights, columns = table[:, 0], table[:, 2:]
    reduced = dict(metrics)
    for j, key in enumerate(keys):
        rule, column = _rule(key), columns[:, j]
        value = {"sum": column.sum(), "min": column.min(), "max": column.max(),
                 "mean": (column * weights).sum() / max(weights.sum(), 1.0)}[rule]
        reduced[key] = int(round(value)) if isinstance(metrics[key], int) else float(value)
    return reduced


def evaluate_sharded(world: World, model, prompts, answers, *, questions=None, **kwargs):
    """evaluation.evaluate with the questions split across processes and the results combined.

    Accuracy is the pooled fraction of correct answers (as in one process); pass@k the mean over
    questions; the samples are rank 0's, which are the first questions, as in one process.
    """
    from mlx_grpo.training.evaluation import EvalResult, evaluate

    if world.size == 1:
        return evaluate(model, prompts, answers, questions=questions, **kwargs)
    start, stop = world.shard_bounds(len(prompts))
    pass_k = kwargs.get("pass_k", 0)
    result = None
    if stop > start:  # fewer questions than processes leaves some without any
        result = evaluate(model, prompts[start:stop], answers[start:stop],
                          questions=questions[start:stop] if questions else None, **kwargs)
    n = stop - start
    local = [n, 0.0, 0.0, 0.0] + [0.0] * pass_k
    if result is not None:
        local = [n, round(result.accuracy * n), result.seconds, result.generated_tokens] + \
                [result.pass_at_k[k] * n for k in range(1, pass_k + 1)]
    table = np.stack(world.gather_arrays(np.array(local, dtype=np.float32))).astype(np.float64)
    totals = table.sum(axis=0)
    num = max(totals[0], 1.0)
    return EvalResult(
        accuracy=float(totals[1] / num),
        num_questions=int(totals[0]),
        pass_at_k={k: float(totals[3 + k] / num) for k in range(1, pass_k + 1)},
        samples=result.samples if result is not None else [],
        seconds=float(table[:, 2].max()),
        generated_tokens=int(totals[3]),
    )


# ----------------------------------------------------------------------------------------------
# Identical weights, checkpoints and exact resume


def weights_digest(model) -> str:
    """A hash of the trainable weights' bytes: equal digests mean bitwise-equal weights."""
    digest = hashlib.blake2b(digest_size=16)
    for name, value in tree_flatten(model.trainable_parameters()):
        value = mx.contiguous(value)
        mx.eval(value)
        digest.update(name.encode())
        digest.update(memoryview(value))  # the array's own bytes, no copy
    return digest.hexdigest()


def broadcast_trainable(world: World, model) -> None:
    """Give every process rank 0's trainable weights (e.g. randomly initialised adapters)."""
    if world.size == 1:
        return
    params = model.trainable_parameters()
    mine = params if world.is_main else tree_map(mx.zeros_like, params)
    model.update(world.sum_tree(mine))  # x + 0 + ... + 0 == x exactly
    mx.eval(model.parameters())


def process_states(world: World, model) -> dict:
    """What rank 0's checkpoint must hold about the other processes; {} in one process.

    Every process calls it (it gathers): each one's RNG state, for an exact resume, and a check
    that all processes still hold bitwise-identical weights.
    """
    if world.size == 1:
        return {}
    states = world.gather_json({"rng_state": capture_rng_state(), "weights": weights_digest(model)})
    digests = [s["weights"] for s in states]
    if len(set(digests)) > 1:
        raise DistributedError(f"the processes hold different weights (digests by rank: {digests}); "
                               "this is a bug: please report it with the launch command")
    print(f"[distributed] {world.size} processes hold identical weights (digest {digests[0]})")
    return {"world_size": world.size, "process_rng_states": [s["rng_state"] for s in states]}


def restore_process_state(world: World, trainer_state: dict, path) -> None:
    """After load_checkpoint: refuse another world size; give each process its own RNG state back."""
    saved = trainer_state.get("world_size", 1)
    if saved != world.size:
        raise CheckpointError(
            f"{path} was written by a run of {saved} process(es) but this run has {world.size}: resume with "
            f"the same number ({'plain python' if saved == 1 else f'mlx.launch -n/--hostfile with {saved}'}); "
            "the data split and each process's random stream depend on it")
    if world.size == 1:
        return
    names = world.gather_json(Path(path).name)
    if len(set(names)) > 1:
        raise CheckpointError(f"the processes resumed from different checkpoints {names}: give every machine "
                              "the same run folder (shared disk, or a copy of rank 0's checkpoints)")
    restore_rng_state(trainer_state["process_rng_states"][world.rank])
