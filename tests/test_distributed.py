"""Data-parallel training (utils/training/distributed.py): 2 ranks on the CPU, ring backend over loopback.

- The update of 2 ranks equals the one-process update on the same global batch (fixed completions
  and rewards, so rollout sampling plays no part): this file is also the rank worker for that test,
  and the same 2 ranks then run bench/grpo_step.py's main: the trainer's data-parallel step.
- A real 2-rank `mlx.launch ... mlx-grpo.py` run: identical weights on every rank, only rank 0
  writes files, and a resumed 2-rank run continues exactly.

Run as a worker: python tests/test_distributed.py MODEL_DIR OUT_DIR  (under mlx.launch).
"""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from conftest import bench_main, subprocess_env
from mlx.utils import tree_flatten
from test_trainer import comparable, interrupted_copy, read_records, same_weights, saved_weights, toy_reward_file

from mlx_grpo.config import ConfigError
from mlx_grpo.generation.engine import Completion
from mlx_grpo.models import load_model
from mlx_grpo.training.checkpoint import CheckpointError
from mlx_grpo.training.distributed import (
    World,
    check_data_split,
    group_advantages_across,
    launcher_backend,
    reduce_step_metrics,
    restore_process_state,
    weights_digest,
)
from mlx_grpo.training.update import frozen_logprobs, make_loss_and_grad, pack_micro_batches, policy_update

REPO = Path(__file__).resolve().parents[1]
# The mlx.launch of this interpreter's environment (else its entry point, run with this interpreter).
LAUNCH = ([str(Path(sys.executable).with_name("mlx.launch"))] if Path(sys.executable).with_name("mlx.launch").is_file()
          else [sys.executable, "-c", "from mlx._distributed_utils.launch import main; main()"])
# 2 ranks vs 1 process: the batch gradient is the same sum of the same micro-batch gradients, added
# in another order, so it agrees to float32 rounding (measured <= 1.2e-7 of the largest entry).
GRAD_RTOL = 1e-6
# After two AdamW steps a few hundred of 164k weights differ by up to 1.7e-3 lr (measured): Adam's
# g / (sqrt(v) + eps) magnifies that rounding where a gradient entry is near eps. Allowed: 1% of a step.
LEARNING_RATE = 1e-2
WEIGHT_ATOL = 1e-2 * LEARNING_RATE


class FakeGroup:
    """Stands in for mx.distributed.Group where no communication happens."""

    def __init__(self, rank, size):
        self._rank, self._size = rank, size

    def rank(self):
        return self._rank

    def size(self):
        return self._size


# ---------------------------------------------------------------------------------------------
# In-process pieces


def test_shards_are_contiguous_disjoint_and_cover_the_step():
    for num_items in range(0, 9):
        for size in (1, 2, 3, 4):
            shards = [World(FakeGroup(rank, size)).shard(list(range(num_items))) for rank in range(size)]
            assert sum(shards, []) == list(range(num_items))
            assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_the_backend_is_the_one_the_launcher_set_up(tmp_path):
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text('[["127.0.0.1:5000"], ["127.0.0.1:5001"]]')
    assert launcher_backend({}) is None  # plain python: no backend is started
    assert launcher_backend({"MLX_RANK": "1", "MLX_HOSTFILE": str(hostfile)}) == "ring"
    assert launcher_backend({"MLX_RANK": "0", "NCCL_HOST_IP": "10.0.0.1", "NCCL_PORT": "12345",
                             "MLX_WORLD_SIZE": "8"}) == "nccl"
    assert launcher_backend({"OMPI_COMM_WORLD_SIZE": "2"}) == "mpi"
    empty = tmp_path / "empty"
    empty.write_text("\n")  # what mlx.launch -n 1 writes
    assert launcher_backend({"MLX_RANK": "0", "MLX_HOSTFILE": str(empty)}) is None


def test_one_process_world_leaves_everything_untouched():
    world = World()
    assert (world.rank, world.size, world.is_main) == (0, 1, True)
    tree = {"w": mx.ones((2, 2))}
    assert world.sum_tree(tree) is tree
    values = {"num_tokens_total": 7.0}
    assert world.sum_values(values) is values
    metrics = {"reward": 0.5}
    assert reduce_step_metrics(world, metrics, 4) is metrics
    assert world.all_true(False) is False


def test_a_step_that_leaves_a_process_without_prompts_is_refused():
    two = World(FakeGroup(0, 2))
    check_data_split(two, num_prompts=6, prompts_per_step=2)
    with pytest.raises(ConfigError, match="every step has 1 prompt"):
        check_data_split(two, num_prompts=6, prompts_per_step=1)
    with pytest.raises(ConfigError, match="the last step has 1 prompt"):
        check_data_split(two, num_prompts=5, prompts_per_step=2)
    check_data_split(World(), num_prompts=5, prompts_per_step=1)


def test_resume_with_another_world_size_is_refused():
    with pytest.raises(CheckpointError, match="2 process.*this run has 1"):
        restore_process_state(World(), {"world_size": 2}, "run/checkpoints/step_000002")
    with pytest.raises(CheckpointError, match="1 process.*this run has 2"):
        restore_process_state(World(FakeGroup(1, 2)), {"step": 2}, "run/checkpoints/step_000002")


# ---------------------------------------------------------------------------------------------
# The update of 2 ranks equals the update of one process


# name: (prompts, group size, micro_batch_size, loss_type, scale_rewards, beta, mask_truncated, entropy_coef);
# entropy_coef: use_adaptive_entropy's runtime coefficient, None = no entropy bonus
SETTINGS = {
    "dapo-batch-std": (4, 3, 2, "dapo", "batch", 0.0, False, None),
    "grpo-uneven-kl": (3, 2, 4, "grpo", "group", 0.04, True, None),  # ranks hold 2 and 1 prompts
    "bnpo-aligned": (4, 2, 2, "bnpo", "none", 0.0, False, None),  # same micro-batches in both layouts
    "dr_grpo": (4, 2, 3, "dr_grpo", "group", 0.0, False, None),
    "grpo-adaptive-entropy": (3, 2, 2, "grpo", "group", 0.0, False, 0.05),
}


def global_batch(num_prompts, group_size):
    """Fixed prompts, completions (some with forced tool tokens, one truncated) and rewards."""
    rng = np.random.default_rng(num_prompts * 10 + group_size)
    prompts = [rng.integers(1, 500, size=int(rng.integers(3, 7))).tolist() for _ in range(num_prompts)]
    completions, rewards = [], []
    for p in range(num_prompts):
        for g in range(group_size):
            length = int(rng.integers(2, 8))
            sampled = [1] * length
            if length > 3 and g == 0:
                sampled[2] = 0  # a forced tool-output token: no gradient
            completions.append(Completion(p, tokens=rng.integers(1, 500, size=length).tolist(), sampled=sampled,
                                          stopped=not (p == 0 and g == 1)))
            rewards.append(float(rng.normal()))
    return prompts, completions, rewards


def fixed_update(model, world, setting):
    """Two updates (the second one clipped against the first's old log-probs) on this rank's share."""
    num_prompts, group_size, micro_batch_size, loss_type, scale_rewards, beta, mask_truncated, entropy_coef = setting
    prompts, completions, rewards = global_batch(num_prompts, group_size)
    start, stop = world.shard_bounds(num_prompts)
    local = [i for i, c in enumerate(completions) if start <= c.prompt_index < stop]
    completions = [Completion(completions[i].prompt_index - start, completions[i].tokens, completions[i].sampled,
                              completions[i].stopped) for i in local]
    slices, batches = pack_micro_batches(prompts[start:stop], completions, micro_batch_size, mask_truncated)
    advantages = group_advantages_across(world, mx.array([rewards[i] for i in local], dtype=mx.float32),
                                         group_size, scale_rewards)
    normalizers = world.sum_values({"num_sequences_total": len(completions),
                                    "num_tokens_total": sum(float(b.mask.sum()) for b in batches),
                                    "num_micro_batches": len(batches)})
    loss_and_grad = make_loss_and_grad(
        model, temperature=1.0, loss_type=loss_type, epsilon=0.2, epsilon_high=0.28, beta=beta,
        importance_sampling_level="token", max_completion_length=8, adaptive_entropy=entropy_coef is not None)
    old_logp = frozen_logprobs(model, batches, 1.0)
    ref_logp = old_logp if beta > 0 else None  # the reference is the starting weights
    optimizer = optim.AdamW(learning_rate=LEARNING_RATE, weight_decay=0.01)
    summed_grads = []

    def all_sum(tree):  # world.sum_tree, keeping the gradients of the whole batch for the test
        tree = world.sum_tree(tree)
        summed_grads.append(dict(tree_flatten(tree[0])))
        return tree

    results = [policy_update(model, optimizer, loss_and_grad, batches, slices, advantages, old_logp, ref_logp,
                             normalizers, max_grad_norm=1.0, all_sum=all_sum, entropy_coef=entropy_coef)
               for _ in range(2)]
    return [{"loss": r.loss, "grad_norm": r.grad_norm, **r.stats} for r in results], summed_grads[0]


def worker(model_dir, out_dir):
    from mlx_grpo.training.distributed import init_world

    world = init_world()
    assert world.size == 2, f"expected 2 ranks, got {world.size}"
    for name, setting in SETTINGS.items():
        model, _ = load_model(model_dir)
        results, grads = fixed_update(model, world, setting)
        mx.save_safetensors(str(Path(out_dir) / f"{name}-rank{world.rank}.safetensors"),
                            dict(tree_flatten(model.parameters())))
        mx.save_safetensors(str(Path(out_dir) / f"{name}-grads-rank{world.rank}.safetensors"), grads)
        (Path(out_dir) / f"{name}-rank{world.rank}.json").write_text(json.dumps(results))
    # The step benchmark in the same 2 processes (a second launch would only add its start-up).
    bench_main("grpo_step.py", ["--depth", "2", "--vocab", "256", "--prompts", "3", "--group", "2", "--prompt-len", "6",
                   "--new-tokens", "3", "--micro-batch-size", "2", "--pad-multiple", "1", "--compute-dtype", "float32",
                   "--num-iterations", "2", "--steps", "1", "--json", str(Path(out_dir) / "bench.json")])


def free_port_pair():
    """A port p with p and p + 1 free now (the ring backend listens on one port per rank)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port < 65000:
            try:
                with socket.socket() as a, socket.socket() as b:
                    a.bind(("127.0.0.1", port))
                    b.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue
    raise RuntimeError("no two consecutive free ports on 127.0.0.1")


def launch(args, log_path, timeout=120):
    """mlx.launch -n 2 (ring backend, 127.0.0.1) running `python args...`; returns (returncode, output)."""
    env = subprocess_env(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    command = [*LAUNCH, "-n", "2", "--backend", "ring", "-p", str(free_port_pair()), sys.executable, *map(str, args)]
    with open(log_path, "w") as log:
        # stdin stays an open pipe: the launcher forwards stdin and would spin on an EOF.
        process = subprocess.Popen(command, cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the launcher and both ranks it started
            process.wait()
            code = "timeout"
        process.stdin.close()
    output = Path(log_path).read_text()
    if code == 0 and "Traceback" in output:  # mlx.launch can exit 0 though a rank raised
        code = "a rank raised"
    return code, output


@pytest.fixture(scope="module")
def two_rank_worker(tmp_path_factory, tiny_model_dir):
    """This file's worker under mlx.launch -n 2: (its output folder, the launch's console output)."""
    out = tmp_path_factory.mktemp("two_ranks")
    code, output = launch([Path(__file__), tiny_model_dir, out], out / "launch.log")
    assert code == 0, output[-3000:]
    return out, output


def test_two_ranks_compute_the_one_process_update(two_rank_worker, tiny_model_dir):
    tmp_path, _ = two_rank_worker
    for name, setting in SETTINGS.items():
        model, _ = load_model(tiny_model_dir)
        before = {k: mx.array(v) for k, v in tree_flatten(model.parameters())}
        single_results, single_grads = fixed_update(model, World(), setting)
        single = dict(tree_flatten(model.parameters()))
        ranks = [mx.load(str(tmp_path / f"{name}-rank{r}.safetensors")) for r in range(2)]
        assert all(mx.array_equal(ranks[0][k], ranks[1][k]) for k in single), f"{name}: ranks differ"
        grads = mx.load(str(tmp_path / f"{name}-grads-rank0.safetensors"))
        largest = max(mx.abs(g).max().item() for g in single_grads.values())
        grad_gap = max(mx.abs(grads[k] - single_grads[k]).max().item() for k in single_grads)
        assert grad_gap <= GRAD_RTOL * largest, (name, grad_gap, largest)
        moved = max(mx.abs(single[k] - before[k]).max().item() for k in single)
        gap = max(mx.abs(ranks[0][k] - single[k]).max().item() for k in single)
        assert moved > LEARNING_RATE and gap <= WEIGHT_ATOL, (name, moved, gap)
        rank_results = json.loads((tmp_path / f"{name}-rank0.json").read_text())
        for ours, theirs in zip(rank_results, single_results):
            assert ours.keys() == theirs.keys()
            for key in ours:
                if key.startswith("mean/") or key == "micro_batches":
                    continue  # per-micro-batch means (TRL's metrics) depend on how the batch is split
                assert ours[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-7), (name, key)
        if setting[-1] is not None:  # the adaptive controller's entropy: the whole batch's, the same on every rank
            other_rank = json.loads((tmp_path / f"{name}-rank1.json").read_text())
            for ours, theirs in zip(rank_results, other_rank):
                assert ours["entropy_bonus_tokens"] > 0
                assert [ours[k] for k in ("entropy_bonus_sum", "entropy_bonus_tokens")] == \
                       [theirs[k] for k in ("entropy_bonus_sum", "entropy_bonus_tokens")]


def test_the_step_benchmark_runs_the_data_parallel_step_under_mlx_launch(two_rank_worker):
    tmp_path, output = two_rank_worker
    result = json.loads((tmp_path / "bench.json").read_text())
    summary, (row,) = result["summary"], result["steps"]
    assert summary["processes"] == 2 and summary["identical_weights"]  # gradients summed: one update everywhere
    assert row["shape"] == "3x2x3" and row["update_s"] > 0 and row["old_policy_s"] > 0  # num_iterations 2
    assert 0 < row["rollout_ref_peak_gb"] <= row["peak_memory_gb"] and 0 < row["update_peak_gb"] <= row["peak_memory_gb"]
    assert output.count("[mean]") == 1  # rank 0 alone prints


# ---------------------------------------------------------------------------------------------
# A real 2-rank training run




def trainer_args(tmp_path, model_dir, run_name, *extra):
    return [REPO / "mlx-grpo.py", "--config", REPO / "configs" / "smoke.toml",
            "--set", f"model_name={model_dir}", "--set", f"output_dir={tmp_path / 'out'}",
            "--set", f"run_name={run_name}", "--set", "max_prompt_length=4096",
            "--set", f"dataset_path={REPO / 'data' / 'gsm8k'}", "--set", "max_train_samples=4",
            "--set", "eval_samples=3", "--set", f"reward_file={tmp_path / 'toy_reward.py'}",
            "--set", "reward_funcs=digit_reward", "--set", "temperature=1.0",
            "--set", "learning_rate=1e-3", "--set", "save_steps=1", *extra]



def test_two_rank_run_keeps_ranks_identical_writes_on_rank_0_only_and_resumes_exactly(tmp_path, tiny_model_dir):
    toy_reward_file(tmp_path)
    code, output = launch(trainer_args(tmp_path, tiny_model_dir, "full"), tmp_path / "full.log")
    assert code == 0, output[-3000:]
    full = tmp_path / "out" / "full"

    # Every checkpoint compared the weight digests of both ranks; the last one is the saved model's.
    digests = [line.split("digest ")[1].rstrip(")") for line in output.splitlines()
               if "processes hold identical weights" in line]
    assert len(digests) == 2 and "2 processes" in output
    assert digests[-1] == weights_digest(load_model(full / "checkpoints" / "step_000002")[0])

    # Only rank 0 wrote: one record per update, one set of files, one "[done]" on the console.
    assert [r["update"] for r in read_records(full)] == [0, 1, 2, 2]
    assert len(open(full / "completions.jsonl").readlines()) == 2 * 2  # completions_log_count x steps
    assert sorted(p.name for p in full.iterdir()) == ["checkpoints", "completions.jsonl", "config.resolved.json",
                                                       "metrics.jsonl"]
    assert sorted(p.name for p in (full / "checkpoints").iterdir()) == ["step_000001", "step_000002"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".full.lock", "full"]  # rank 0's run lock
    assert output.count("[done]") == 1
    state = json.loads((full / "checkpoints" / "step_000002" / "trainer_state.json").read_text())["trainer_state"]
    assert state["world_size"] == 2 and len(state["process_rng_states"]) == 2
    assert state["process_rng_states"][0] != state["process_rng_states"][1]  # seed + rank

    # Resume after step 1 on 2 ranks: the same metrics and weights as the uninterrupted run.

    part = interrupted_copy(full, tmp_path / "out" / "part", step=1, update=1)
    code, output = launch(trainer_args(tmp_path, tiny_model_dir, "part", "--resume"), tmp_path / "part.log")
    assert code == 0, output[-3000:]
    assert comparable(read_records(part)) == comparable(read_records(full))
    assert same_weights(saved_weights(full, 2), saved_weights(part, 2))


if __name__ == "__main__":
    worker(*sys.argv[1:3])
