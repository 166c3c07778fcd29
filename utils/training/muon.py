"""nanochat's MuonAdamW on MLX: Muon for the blocks' matrices, AdamW for the rest, nanochat's groups.

    optimizer = muon_adamw(model, schedule, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004,
                           scalar_lr=0.5, weight_decay=0.0)

As nanochat defines it at 92d63d4 (nanochat/optim.py, GPT.setup_optimizer): every group's learning
rate is its base rate x schedule(step) (chat_rl.py: base x init_lr_frac x a linear decay to 0), the
AdamW groups' rates scaled by (n_embd / 768) ** -0.5. Groups a model lacks (the October 2025
architecture has no lambdas, value embeddings or smear) are left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from mlx_grpo.config import ConfigError

# nanochat's base widths: the AdamW rates were tuned at n_embd = 768 and scale as 1/sqrt(n_embd).
REFERENCE_WIDTH = 768

# Polar Express coefficients (Amsel et al. 2025, num_iters=5, safety 2e-2, cushion 2), nanochat's.
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
MUON_MOMENTUM = 0.95
MUON_NS_STEPS = 5
MUON_BETA2 = 0.9  # NorMuon's second-moment decay
ADAMW_EPS = 1e-10


def _lerp(a, b, weight):
    return a + weight * (b - a)  # torch's lerp, as nanochat's step uses it


def _frobenius(x):
    return mx.sqrt(mx.sum(mx.square(x), axis=(-2, -1), keepdims=True))


def orthogonalize(g: mx.array, ns_steps: int = MUON_NS_STEPS) -> mx.array:
    """MuonEq row equilibration, then ns_steps Polar Express iterations (~ U V^T of g = U S V^T)."""
    rows, cols = g.shape
    target = _frobenius(g) / rows**0.5
    row_norm = mx.maximum(mx.sqrt(mx.sum(mx.square(g), axis=-1, keepdims=True)), 1e-6)
    x = g * (target / row_norm)
    x = x / (_frobenius(x) * 1.01 + 1e-6)
    for a, b, c in POLAR_EXPRESS_COEFFS[:ns_steps]:
        if rows > cols:  # tall: iterate on the smaller Gram matrix
            gram = x.T @ x
            x = a * x + x @ (b * gram + c * (gram @ gram))
        else:
            gram = x @ x.T
            x = a * x + (b * gram + c * (gram @ gram)) @ x
    return x


@partial(mx.compile, shapeless=False)
def _muon_step(grad, param, momentum_buffer, variance_buffer, lr, momentum, weight_decay, beta2):
    """nanochat's muon_step_fused for one matrix: Nesterov momentum, orthogonalization, Muon+ norm,
    NorMuon variance reduction, cautious weight decay. Returns (param, momentum_buffer, variance_buffer)."""
    rows, cols = grad.shape
    momentum_buffer = _lerp(momentum_buffer, grad, 1 - momentum)
    g = orthogonalize(_lerp(grad, momentum_buffer, momentum))
    g = g * (min(rows, cols) ** 0.5 / mx.maximum(_frobenius(g), 1e-6))  # Muon+: the norm of a semi-orthogonal matrix
    axis = -1 if rows >= cols else -2  # the second moment is kept per row (tall) or per column (wide)
    size = g.shape[axis]
    v_mean = mx.mean(mx.square(g), axis=axis, keepdims=True)
    v_norm = mx.sqrt(mx.sum(v_mean, axis=(-2, -1), keepdims=True) * size)
    variance_buffer = _lerp(variance_buffer, v_mean, 1 - beta2)
    step_size = mx.rsqrt(mx.maximum(variance_buffer, 1e-10))
    v_norm_new = mx.sqrt(mx.sum(v_mean * size * mx.square(step_size), axis=(-2, -1), keepdims=True))
    g = g * (step_size * (v_norm / mx.maximum(v_norm_new, 1e-10)))
    lr = lr * max(1.0, rows / cols) ** 0.5
    cautious = (g * param >= 0).astype(param.dtype)  # decay only where the update agrees with the weight
    return param - (lr * g + lr * weight_decay * param * cautious), momentum_buffer, variance_buffer


class NanochatMuon(optim.Optimizer):
    """nanochat's Muon for 2-D weights (out, in), one matrix at a time (nanochat stacks same-shape
    matrices only to batch the kernel; each slice is updated on its own).

    mlx's optim.Muon has the same Nesterov momentum and max(1, rows/cols)^0.5 scaling but orthogonalizes
    with fixed quintic coefficients and adds weight decay to the gradient: hand-written for nanochat's
    Polar Express + MuonEq + Muon+ + NorMuon + cautious decay. In float32 (nanochat runs the iteration in
    bf16 on CUDA only).
    """

    def __init__(self, learning_rate, momentum=MUON_MOMENTUM, weight_decay=0.0, beta2=MUON_BETA2):
        super().__init__()
        self._maybe_schedule("learning_rate", learning_rate)
        self.momentum, self.weight_decay, self.beta2 = momentum, weight_decay, beta2

    def init_single(self, parameter: mx.array, state: dict):
        if parameter.ndim != 2:
            raise ValueError(f"Muon updates 2-D matrices, got a parameter of shape {parameter.shape}")
        rows, cols = parameter.shape
        state["momentum_buffer"] = mx.zeros_like(parameter)
        state["second_momentum_buffer"] = mx.zeros((rows, 1) if rows >= cols else (1, cols), parameter.dtype)

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict):
        new, state["momentum_buffer"], state["second_momentum_buffer"] = _muon_step(
            gradient, parameter, state["momentum_buffer"], state["second_momentum_buffer"],
            self.learning_rate.astype(gradient.dtype), self.momentum, self.weight_decay, self.beta2)
        return new


@dataclass(frozen=True)
class ParamGroup:
    """One of nanochat's parameter groups: which weights, the optimizer and its hyperparameters."""

    name: str
    kind: str  # adamw | muon
    lr: float  # the base rate, before the schedule
    betas: tuple = ()
    weight_decay: float = 0.0


def group_of(path: str) -> str:
    """The group of a parameter by its MLX name (both nanochat architectures), or "" for none of them."""
    if path.startswith("lm_head."):
        return "unembedding"
    if path.startswith("transformer.wte."):
        return "embedding"
    if ".value_embed." in path:  # ours sit in the blocks; nanochat's value_embeds are top-level
        return "value_embeds"
    if path == "resid_lambdas":
        return "resid"
    if path == "x0_lambdas":
        return "x0"
    if path.startswith("smear_gate.") or path in ("smear_lambda", "backout_lambda"):
        return "smear"
    if path.startswith("transformer.h."):
        return "matrix"
    return ""


def nanochat_groups(width: int, *, matrix_lr: float, embedding_lr: float, unembedding_lr: float,
                    scalar_lr: float, weight_decay: float) -> list[ParamGroup]:
    """GPT.setup_optimizer's groups and rates; weight_decay is the Muon groups' (chat_rl.py's --weight-decay)."""
    scale = (width / REFERENCE_WIDTH) ** -0.5
    return [
        ParamGroup("unembedding", "adamw", unembedding_lr * scale, (0.8, 0.96), 0.01),
        ParamGroup("embedding", "adamw", embedding_lr * scale, (0.8, 0.995), 0.001),
        ParamGroup("value_embeds", "adamw", embedding_lr * scale * 0.5, (0.8, 0.995), 0.01),
        ParamGroup("resid", "adamw", scalar_lr * 0.01, (0.8, 0.95), 0.05),
        ParamGroup("x0", "adamw", scalar_lr, (0.96, 0.95), 0.0),
        ParamGroup("smear", "adamw", 0.2, (0.8, 0.95), 0.0),
        ParamGroup("matrix", "muon", matrix_lr, weight_decay=weight_decay),
    ]


class MuonAdamW(optim.MultiOptimizer):
    """mlx's MultiOptimizer over nanochat's groups; the groups all step together, so one step counter."""

    def __init__(self, groups: list[ParamGroup], schedule: Callable):
        self.groups = groups
        optimizers = [_group_optimizer(group, schedule) for group in groups]
        names = [group.name for group in groups]
        filters = [partial(_in_group, name) for name in names[:-1]]
        super().__init__(optimizers, filters)

    @property
    def step(self):
        return self.optimizers[0].step


def _in_group(name, path, _):
    return group_of(path) == name


def _group_optimizer(group: ParamGroup, schedule: Callable):
    rate = lambda step, base=group.lr: mx.multiply(base, schedule(step))  # noqa: E731
    if group.kind == "muon":
        return NanochatMuon(rate, weight_decay=group.weight_decay)
    # mlx's AdamW with bias correction is nanochat's adamw_step_fused: decoupled decay, then
    # lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps).
    return optim.AdamW(rate, betas=list(group.betas), eps=ADAMW_EPS, weight_decay=group.weight_decay,
                       bias_correction=True)


def muon_adamw(model, schedule: Callable, *, matrix_lr: float, embedding_lr: float, unembedding_lr: float,
               scalar_lr: float, weight_decay: float) -> MuonAdamW:
    """nanochat's MuonAdamW for `model` (a nanochat model of either architecture, trained in full)."""
    names = [name for name, _ in tree_flatten(model.trainable_parameters())]
    strangers = [name for name in names if not group_of(name)]
    if strangers:
        raise ConfigError(f"optimizer = \"muon\" is nanochat's MuonAdamW and knows nanochat's parameters only; "
                             f"{', '.join(strangers[:3])} fit none of its groups: use optimizer = \"adamw\"")
    groups = nanochat_groups(model.args.hidden_size, matrix_lr=matrix_lr, embedding_lr=embedding_lr,
                             unembedding_lr=unembedding_lr, scalar_lr=scalar_lr, weight_decay=weight_decay)
    present = {group_of(name) for name in names}
    return MuonAdamW([group for group in groups if group.name in present], schedule)
