"""The memory plan: the peak bytes of each phase of a GRPO step, known before anything loads.

    config = read_model_config(cfg.model_name)          # config.json only; None when it is not on disk
    plan = plan_memory(model_dims(config, cfg), cfg)    # phase -> bytes, and what this machine can use
    print("\\n".join(plan.lines()))
    check_fits(config, cfg, plan)                        # MemoryPlanError: the phase and the cheapest change that fits

A phase's peak is what is resident through the run (the policy, its optimizer state, the reference)
plus what the phase itself allocates, at the run's worst case: every prompt max_prompt_length tokens
and every completion the full generation limit. The model's sizes come from a lazy instance built
from config.json (MLX allocates nothing until an array is evaluated), so every architecture mlx-lm
knows is counted parameter by parameter, adapters included. What activations cost per token was
measured per backend: on MLX's CPU (tests/test_memory.py holds the plan within 15% of measured peaks)
and on an H200 with MLX's CUDA backend (BENCHMARKS.md); Metal takes the CPU's figures until measured.
"""

from __future__ import annotations

import dataclasses
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import BatchKVCache

from mlx_grpo import cuda_kernels
from mlx_grpo.nanochat.decoder import ALTERNATE_BUFFERS
from mlx_grpo.training.backend import current_backend

GB = 1e9
PHASES = ("rollout", "old_policy", "reference", "update", "eval")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


class MemoryPlanError(ValueError):
    """The run does not fit this machine: one line naming the phase and the cheapest change that fits."""


# ----------------------------------------------------------------------------------------------
# The model's sizes, from config.json


def read_model_config(model_name: str) -> dict | None:
    """config.json of a local folder (a model, a trainer checkpoint) or of a hub model already in the HF cache."""
    path = Path(model_name).expanduser() / "config.json"
    if not path.is_file() and not Path(model_name).expanduser().exists():
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(model_name, "config.json", local_files_only=True))
        except Exception:  # not cached (or not a repo id): the run will say why when it loads the model
            return None
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def lazy_model(config: dict):
    """The model of a config.json with nothing allocated (MLX evaluates parameters only when used)."""
    from mlx_grpo.nanochat.folder import MODEL_TYPES, model_classes

    if config.get("model_type") in MODEL_TYPES:
        model_class, args_class = model_classes(config)
    else:
        from mlx_lm.utils import _get_classes  # mlx-lm's own lookup of a config's model classes

        model_class, args_class = _get_classes(config)
    return model_class(args_class.from_dict(config))


@dataclass(frozen=True)
class ModelDims:
    """What the plan needs to know of a model."""

    params: int  # every parameter
    layers: int
    hidden: int
    heads: int
    kv_dim: int  # key (and value) width per token and layer: kv heads x head dim
    intermediate: int  # MLP hidden width
    vocab: int  # logits per position
    quantizable: tuple = ()  # (size, input width) of each weight mlx-lm's quantizer can take
    adapters: int = 0  # trainable adapter parameters (train_type lora/dora)
    fast_decoder: bool = False  # nanochat's or the llama family's decoder runs it (else mlx-lm's model call)
    decode_kernel: bool = False  # a fast decoder runs it and its heads take the CUDA decode kernel


def _config_value(config: dict, *names, default=None):
    for name in names:
        if config.get(name) is not None:
            return config[name]
    if default is None:
        raise MemoryPlanError(f"config.json has none of {', '.join(names)}: the memory plan cannot size this model")
    return default


def model_dims(config: dict, cfg=None) -> ModelDims:
    """ModelDims of a config.json; with cfg a LoRA/DoRA run's adapters are counted on the lazy model too."""
    from mlx.utils import tree_flatten

    from mlx_grpo.cuda_kernels.decode import supports_shape

    model = lazy_model(config)
    params = sum(v.size for _, v in tree_flatten(model.parameters()))
    quantizable = tuple((m.weight.size, m.weight.shape[-1]) for _, m in model.named_modules()
                        if hasattr(m, "to_quantized") and "weight" in m)
    hidden = _config_value(config, "hidden_size", "n_embd", "d_model")
    heads = _config_value(config, "num_attention_heads", "n_head")
    head_dim = _config_value(config, "head_dim", default=hidden // heads)
    adapters = adapter_params(model, cfg) if cfg is not None and cfg.train_type != "full" else 0
    kv_heads = _config_value(config, "num_key_value_heads", "n_kv_head", default=heads)
    fast_decoder = _takes_fast_decoder(model)
    return ModelDims(
        params=params, layers=_config_value(config, "num_hidden_layers", "n_layer"), hidden=hidden, heads=heads,
        kv_dim=kv_heads * head_dim,
        intermediate=_config_value(config, "intermediate_size", default=4 * hidden),
        vocab=_config_value(config, "padded_vocab_size", "vocab_size"), quantizable=quantizable, adapters=adapters,
        fast_decoder=fast_decoder, decode_kernel=fast_decoder and supports_shape(heads, kv_heads, head_dim))


def _takes_fast_decoder(model) -> bool:
    """The rule of engine.make_decoder for the model without adapters (a dense or quantized copy)."""
    from mlx_grpo.generation import llama_decoder
    from mlx_grpo.nanochat import decoder as nanochat_decode

    return nanochat_decode.supports(model) or llama_decoder.supports(model)



def adapter_params(model, cfg) -> int:
    """The parameters mlx-lm's LoRA (DoRA) layers add for cfg: rank x (in + out) per adapted linear layer (+ out, the
    DoRA magnitude), in the top lora_layers blocks, on lora_keys or the model's default (else every linear)."""
    from mlx_grpo.training.lora import default_lora_keys

    blocks = model.layers if cfg.lora_layers == -1 else model.layers[-cfg.lora_layers:]
    keys = set(cfg.lora_keys or default_lora_keys(model))
    total = 0
    for block in blocks:
        for name, module in block.named_modules():
            if isinstance(module, nn.Linear) and (not keys or name in keys):
                out_dim, in_dim = module.weight.shape
                total += cfg.lora_rank * (in_dim + out_dim) + (out_dim if cfg.train_type == "dora" else 0)
    return total


def dense_bytes(dims: ModelDims, dtype_bytes: int) -> int:
    return dims.params * dtype_bytes


def quantized_bytes(dims: ModelDims, bits: int, group_size: int, dtype_bytes: int) -> int:
    """The model with mlx-lm's quantizer applied: bits per weight of every layer whose input width the
    group size divides, plus a scale and a bias (in dtype_bytes) per group; the rest stays dense."""
    taken = [size for size, width in dims.quantizable if width % group_size == 0]
    packed = sum(size * bits // 8 + 2 * (size // group_size) * dtype_bytes for size in taken)
    return packed + (dims.params - sum(taken)) * dtype_bytes


# ----------------------------------------------------------------------------------------------
# Per-token costs, measured on MLX's CPU backend (float32 and bfloat16, compiled and not) with
# bench/memory_plan.py: bytes each micro-batch token keeps for the backward pass, per layer per
# unit of width (in compute-dtype elements) and per logit (float32 elements).

TRAIN_ELEMENTS_PER_LAYER_WIDTH = 20  # per token, layer and hidden unit (attention and MLP inputs, norms)
TRAIN_ELEMENTS_PER_LAYER_MLP = 3  # per token, layer and MLP unit (c_fc's output, relu2)
TRAIN_ELEMENTS_PER_ATTENTION = 2  # per token, layer, head and key: the scores and softmax kept for the backward
SHARED_PROMPT_ELEMENTS_PER_ATTENTION = 1  # the shared forward's causal prompt pass keeps one (measured: smoke.toml)
TRAIN_FLOAT32_PER_LOGIT = 4  # per token and logit: the logits, their float32 copy, softmax and its gradient
FORWARD_FLOAT32_PER_LOGIT = 3  # a forward without gradient for log-probs (old policy, reference)
PREFILL_FLOAT32_PER_LOGIT = 2  # a prefill's forward: the logits and the softcap's output
CHECKPOINTED_ELEMENTS_PER_LAYER_WIDTH = 2  # grad_checkpoint: each block keeps its input and output only


@dataclass(frozen=True)
class ActivationCosts:
    """What activations cost on one backend: elements (of the compute dtype) per token, layer and unit of width,
    per attention score, and bytes per logit. Defaults: the CPU's, above."""

    layer_width: float = TRAIN_ELEMENTS_PER_LAYER_WIDTH
    layer_mlp: float = TRAIN_ELEMENTS_PER_LAYER_MLP
    score: float = TRAIN_ELEMENTS_PER_ATTENTION
    shared_prompt_score: float = SHARED_PROMPT_ELEMENTS_PER_ATTENTION
    checkpointed_layer_width: float = CHECKPOINTED_ELEMENTS_PER_LAYER_WIDTH
    train_logit_bytes: float = 4 * TRAIN_FLOAT32_PER_LOGIT
    forward_logit_bytes: float = 4 * FORWARD_FLOAT32_PER_LOGIT  # a forward without gradient, per row-width logit
    # The shared-prompt forward without gradient, per completion logit by compute dtype (None: as the plain one)
    shared_forward_logit_bytes: dict | None = None
    prefill_logit_bytes: float = 4 * PREFILL_FLOAT32_PER_LOGIT
    adapter_layer_width: float = 0  # LoRA/DoRA: more per token, layer and hidden unit (the adapters' own temporaries)


CPU_COSTS = ActivationCosts()
# Fitted to the phase peaks of d20, d24 and d32 runs on an H200 (MLX 0.32.4's CUDA backend; BENCHMARKS.md, "The
# memory plan on the GPU"): the fused loss head (utils/cuda_kernels/logprobs.py) keeps no float32 copies in the
# update, attention keeps one element per score, and a pass without gradient frees less as it goes.
CUDA_COSTS = ActivationCosts(layer_width=12, layer_mlp=2, score=1, shared_prompt_score=1,
                             train_logit_bytes=6, forward_logit_bytes=24,
                             shared_forward_logit_bytes={"float32": 10, "bfloat16": 17}, prefill_logit_bytes=2,
                             adapter_layer_width=8)
# Metal is not measured yet: it takes the CPU's figures.


def activation_costs(backend: str | None = None) -> ActivationCosts:
    return CUDA_COSTS if (backend or current_backend()) == "cuda" else CPU_COSTS


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass
class MemoryPlan:
    """Peak bytes per phase, what makes them up, and the memory this machine can use."""

    phases: dict  # phase -> peak bytes (phases that do not run are left out)
    resident: dict  # what stays through the run: name -> bytes
    available: int  # bytes this machine can use (0: unknown)
    source: str  # where `available` comes from
    widths: dict = field(default_factory=dict)  # "row": the padded row width the update trains on

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    @property
    def peak(self) -> int:
        return self.phases[self.peak_phase]

    @property
    def fits(self) -> bool:
        return not self.available or self.peak <= self.available

    def lines(self) -> list[str]:
        resident = ", ".join(f"{name} {value / GB:.2f}" for name, value in self.resident.items() if value)
        phases = ", ".join(f"{name} {value / GB:.2f}" for name, value in self.phases.items())
        where = f"{self.available / GB:.1f} GB ({self.source})" if self.available else f"unknown ({self.source})"
        verdict = "fits" if self.fits else "does NOT fit"
        return [f"[memory] resident GB: {resident}",
                f"[memory] peak GB per phase: {phases}",
                f"[memory] largest: {self.peak_phase} {self.peak / GB:.2f} GB; this machine can use {where}: {verdict}"]


def plan_memory(dims: ModelDims, cfg, world_size: int = 1, available: int | None = None,
                source: str = "", backend: str | None = None) -> MemoryPlan:
    """Every phase's peak bytes for a run of `cfg` on a model of `dims` (one process of world_size), on `backend`
    (default: this machine's)."""
    if available is None:
        available, source = machine_memory()
    backend = backend or current_backend()
    cd = DTYPE_BYTES[cfg.compute_dtype]
    full = cfg.train_type == "full"
    costs = activation_costs(backend)
    if not full:
        costs = dataclasses.replace(costs, layer_width=costs.layer_width + costs.adapter_layer_width)
    trainable = dims.params if full else dims.adapters

    # What stays through the run.
    if full:
        policy = 4 * dims.params
    elif cfg.base_quant_bits:
        policy = quantized_bytes(dims, cfg.base_quant_bits, cfg.base_quant_group_size, cd) + 4 * dims.adapters
    else:
        policy = dense_bytes(dims, cd) + 4 * dims.adapters
    copy_dtype = cd
    quantized_copy = quantized_bytes(dims, cfg.rollout_quant_bits, cfg.rollout_quant_group_size, copy_dtype)
    reference = 0
    if cfg.beta > 0 and full:  # with adapters the reference is the base itself
        reference = quantized_copy if cfg.quantize_for_rollouts and not cfg.sync_ref_model else dense_bytes(dims, cd)
    resident = {"policy": policy, "optimizer": 8 * trainable, "reference": reference}
    base = sum(resident.values())

    # The generation batch: rows of prompt + completion, right-padded for the update.
    prompts = -(-cfg.effective_prompts_per_step // world_size)
    rows = prompts * cfg.num_generations
    prompt_len, new = cfg.max_prompt_length, cfg.generation_limit
    pad = cfg.pad_to_multiple_of or 1
    width = _round_up(prompt_len + new - 1, pad)
    micro = min(cfg.effective_micro_batch_size, rows)
    packed = rows * width * 12  # inputs, targets (int32) and mask (float32)
    logp = rows * width * 4  # one float32 log-prob per position, per pass kept

    def forward(batch: int, length: int, act_bytes: int, logit_bytes: float = costs.forward_logit_bytes) -> int:
        """A forward without gradient: the logits and one layer's activations and attention scores at a time."""
        logits = int(batch * length * dims.vocab * logit_bytes)
        scores = batch * dims.heads * length * length  # MLX's CPU attention forms them; Metal's and CUDA's fused kernels not
        return logits + max(batch * length * (4 * dims.hidden + dims.intermediate), scores) * act_bytes

    def kv_cache(num_rows: int, length: int, act_bytes: int) -> int:
        return num_rows * dims.layers * 2 * dims.kv_dim * length * act_bytes

    # Rollouts: the copy that samples, each prompt prefilled once, every row's KV cache at full length.
    merged = not full and cfg.merge_adapters_for_decoding  # adapters merged into a dense copy (step.rollout_policy)
    if cfg.quantize_for_rollouts:
        copy = quantized_copy
    elif (cd != 4 and full) or merged:
        copy = dense_bytes(dims, cd)
    else:
        copy = 0  # the policy itself samples
    act = cd if (copy or not full) else 4
    align = cfg.prefill_align or 1
    prefill_len = _round_up(prompt_len, align)

    def prefill_bytes(num_prompts: int, act_bytes: int, fast_decoder: bool) -> int:
        """The prompts' prefill: the fast decoders' runs them all at once (aligned), mlx-lm's model call one
        at a time (MlxLmDecoder); either keeps each prompt's cache."""
        kept_keys = kv_cache(num_prompts, prompt_len, act_bytes)
        if not fast_decoder:
            return forward(1, prompt_len, act_bytes, costs.prefill_logit_bytes) + kept_keys
        return (forward(num_prompts, prefill_len, act_bytes, costs.prefill_logit_bytes)
                + kv_cache(num_prompts, prefill_len, act_bytes) + kept_keys)

    kernels_on = backend == "cuda" and cuda_kernels.enabled()
    buffers = cfg.rollout_kv_buffers or ALTERNATE_BUFFERS

    def decode_bytes(num_prompts: int, group: int, new_tokens: int, act_bytes: int, fast_decoder: bool) -> int:
        """The decode's KV caches and last logits, by the decoder that runs (a fast one, else mlx-lm's call)."""
        num_rows = num_prompts * group
        logits = num_rows * dims.vocab * 4 * FORWARD_FLOAT32_PER_LOGIT
        if not fast_decoder:
            # mlx-lm's BatchKVCache: one buffer, from the longest prompt less one, grown by BatchKVCache.step
            # tokens at a time by concatenation, one layer's old and new at once; the prompts' caches it merges
            # are freed layer by layer as the first step's growth consumes them.
            cache = kv_cache(num_rows, prompt_len - 1 + _round_up(new_tokens, BatchKVCache.step), act_bytes)
            return cache + cache // dims.layers + logits
        if dims.decode_kernel and kernels_on:
            # CUDA's decode kernel: each prompt's keys once per group, each row's own for its generated tokens
            return kv_cache(num_prompts, prompt_len, act_bytes) + kv_cache(num_rows, new_tokens, act_bytes) + logits
        # Every row's cache at full length in each of its buffers, one layer's more while the rows are copied out
        # of the prompts' caches.
        cache = kv_cache(num_rows, prompt_len + new_tokens, act_bytes)
        return buffers * cache + cache // dims.layers + kv_cache(num_prompts, prompt_len, act_bytes) + logits

    # engine.make_decoder's choice: a fast decoder only for a copy without adapters (dense or quantized)
    fast_rollout = dims.fast_decoder and (full or merged or cfg.quantize_for_rollouts)
    decode = decode_bytes(prompts, cfg.num_generations, new, act, fast_rollout)
    phases = {"rollout": base + copy + max(prefill_bytes(prompts, act, fast_rollout), decode)}
    old_policy = cfg.quantize_for_rollouts or cfg.num_iterations > 1
    kept = packed + (logp if old_policy else 0)
    shared = micro % cfg.num_generations == 0 and cfg.share_prompt_forward and not cfg.grad_checkpoint  # step's rule

    def logprob_pass(act_bytes: int, dtype: str) -> int:
        """A forward for log-probs (old policy, reference): the shared forward's logits are the completions' only."""
        if shared and costs.shared_forward_logit_bytes:
            return forward(micro, new, act_bytes, costs.shared_forward_logit_bytes[dtype])
        return forward(micro, width, act_bytes)

    if old_policy:
        # The importance-sampling correction also runs the trained policy, at compute_dtype (one cast copy).
        trained_copy = dense_bytes(dims, cd) if (cfg.quantize_for_rollouts and cfg.vllm_importance_sampling_correction
                                                 and full and cd != 4) else 0
        phases["old_policy"] = base + copy + trained_copy + kept + logprob_pass(act, cfg.compute_dtype)
    if cfg.beta > 0:
        phases["reference"] = base + kept + logp + logprob_pass(cd, cfg.compute_dtype)
        kept += logp

    # The update: float32 gradient sum, one micro-batch's gradient and activations, compute-dtype weights.
    grads = 4 * trainable + cd * trainable + (cd * trainable if cd != 4 else 0)
    if shared:
        activations = shared_prompt_activations(dims, micro, cfg.num_generations, prompt_len, new, cd, costs)
    else:
        activations = train_activations(dims, micro, width, cd, cfg, costs)
    phases["update"] = base + kept + grads + activations

    # Evaluation: eval_batch_size questions at a time, decoded by the policy itself (float32) or, with adapters,
    # by a merged compute_dtype copy (lora.eval_policy).
    eval_act = 4 if full else cd
    eval_copy = dense_bytes(dims, cd) if merged else 0
    eval_rows = min(cfg.eval_batch_size, max(1, -(-(cfg.eval_samples or cfg.eval_batch_size) // world_size)))
    fast_eval = dims.fast_decoder and (full or merged)
    eval_decode = decode_bytes(eval_rows, 1, cfg.eval_max_new_tokens, eval_act, fast_eval)
    phases["eval"] = base + eval_copy + max(prefill_bytes(eval_rows, eval_act, fast_eval), eval_decode)
    return MemoryPlan(phases, resident, available, source, {"row": width, "micro_batch": micro})


def train_activations(dims: ModelDims, batch: int, width: int, act_bytes: int, cfg,
                      costs: ActivationCosts = CPU_COSTS) -> int:
    """What one micro-batch's forward keeps for its backward pass."""
    tokens = batch * width
    logits = int(tokens * dims.vocab * costs.train_logit_bytes)
    if getattr(cfg, "grad_checkpoint", False):
        # Block inputs kept; one block's activations live again, with their gradients, while its backward runs.
        kept = int(tokens * dims.layers * dims.hidden * costs.checkpointed_layer_width * act_bytes)
        return logits + kept + 2 * train_activations_per_layer(dims, batch, width, act_bytes, costs=costs)
    return logits + dims.layers * train_activations_per_layer(dims, batch, width, act_bytes, costs=costs)


def train_activations_per_layer(dims: ModelDims, batch: int, width: int, act_bytes: int, keys: int = 0,
                                per_score: float | None = None, costs: ActivationCosts = CPU_COSTS) -> int:
    """One layer's kept activations for `batch` rows of `width` queries attending to `keys` keys (0: width)."""
    tokens = batch * width
    dense = tokens * (costs.layer_width * dims.hidden + costs.layer_mlp * dims.intermediate)
    attention = tokens * dims.heads * (keys or width) * (costs.score if per_score is None else per_score)
    return int((dense + attention) * act_bytes)


def shared_prompt_activations(dims: ModelDims, batch: int, group: int, prompt_len: int, new: int, act_bytes: int,
                              costs: ActivationCosts = CPU_COSTS) -> int:
    """train_activations for the shared-prompt forward (training/shared_prompt.py) of whole groups: each prompt
    once, its keys and values broadcast to its group's rows, logits on the completions only. (grad_checkpoint
    takes the plain forward.)"""
    prompts = batch // group
    logits = int(batch * new * dims.vocab * costs.train_logit_bytes)
    per_layer = (train_activations_per_layer(dims, prompts, prompt_len, act_bytes,
                                             per_score=costs.shared_prompt_score, costs=costs)
                 + train_activations_per_layer(dims, batch, new, act_bytes, keys=prompt_len + new, costs=costs))
    return logits + dims.layers * per_layer


# ----------------------------------------------------------------------------------------------
# The machine


def physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows): unknown
        return 0


def machine_memory() -> tuple[int, str]:
    """(bytes a run may use, where that figure comes from)."""
    kind = current_backend()
    if kind == "metal":
        working_set = mx.device_info().get("max_recommended_working_set_size")
        if working_set:
            return int(working_set), "Metal's recommended working set"
    if kind == "cuda":
        return int(mx.get_memory_limit()), "MLX's CUDA memory limit"
    return physical_memory(), "physical memory"


@contextmanager
def wired_limit():
    """On Metal, wire up to the recommended working set for the run (as mlx-lm's train and generate do),
    so the model's memory is not paged out between steps; the previous limit is restored after."""
    previous = None
    if current_backend() == "metal":
        from mlx_lm.utils import maybe_set_recommended_wired_limit

        previous = maybe_set_recommended_wired_limit()
    try:
        yield
    finally:
        if previous is not None:
            mx.set_wired_limit(previous)


# ----------------------------------------------------------------------------------------------
# When it does not fit: the cheapest change that does


def _fix_candidates(cfg):
    """(change, --set text) in the order of what they cost: the math unchanged first, then precision,
    then what is trained, then the batch."""
    micro = cfg.effective_micro_batch_size
    candidates = []
    size = cfg.eval_batch_size // 2
    while size >= 8:  # the fast decoders prefill the whole batch at once: smaller ones change nothing but time
        candidates.append({"eval_batch_size": size})
        size //= 2
    size = micro // 2
    while size >= 1:  # the largest micro-batch that fits comes first
        candidates.append({"micro_batch_size": size})
        size //= 2
    if not getattr(cfg, "grad_checkpoint", True):
        candidates.append({"grad_checkpoint": True})
    if cfg.compute_dtype != "bfloat16":
        candidates.append({"compute_dtype": "bfloat16"})
    if not cfg.quantize_for_rollouts:
        candidates.append({"quantize_for_rollouts": True, "rollout_quant_bits": 8})
    if cfg.train_type == "full":
        candidates.append({"train_type": "lora", "compute_dtype": "bfloat16"})
    if not cfg.base_quant_bits:
        candidates.append({"train_type": cfg.train_type if cfg.train_type != "full" else "lora",
                           "base_quant_bits": 4, "compute_dtype": "bfloat16"})
    generations = cfg.num_generations // 2
    while generations >= 2:
        candidates.append({"num_generations": generations})
        generations //= 2
    return candidates


def _set_text(change: dict) -> str:
    def value(v):
        return str(v).lower() if isinstance(v, bool) else str(v)

    return " ".join(f"--set {k}={value(v)}" for k, v in change.items())


def cheapest_fix(config: dict, cfg, available: int, world_size: int = 1):
    """(change, plan) of the first change that fits, alone or on top of the ones before it; None if none does."""
    from mlx_grpo.config import validate

    dims = {}  # the model's sizes depend only on what is trained: built once per kind of run

    def plan_for(change):
        candidate = validate(dataclasses.replace(cfg, **change))
        kind = candidate.train_type, candidate.lora_rank, candidate.lora_layers, tuple(candidate.lora_keys)
        if kind not in dims:
            dims[kind] = model_dims(config, candidate)
        return plan_memory(dims[kind], candidate, world_size, available, "")

    candidates = _fix_candidates(cfg)
    for change in candidates:
        plan = plan_for(change)
        if plan.fits:
            return change, plan
    sizes = [cfg.effective_micro_batch_size] + [c["micro_batch_size"] for c in candidates if "micro_batch_size" in c]

    def with_micro_batch(change):  # the change with the largest micro-batch that fits, or None
        for size in sizes:
            plan = plan_for({**change, "micro_batch_size": size})
            if plan.fits:
                return {**change, "micro_batch_size": size} if size != cfg.effective_micro_batch_size else change, plan
        return None

    steps = [c for c in candidates if "micro_batch_size" not in c]
    for count in range(1, len(steps) + 1):  # none alone: stack them in order until the stack fits
        found = with_micro_batch({k: v for step in steps[:count] for k, v in step.items()})
        if found is None:
            continue
        kept = list(steps[:count])
        for step in steps[:count - 1]:  # then leave out every earlier one the fit does not need
            trial = [s for s in kept if s is not step]
            if with_micro_batch({k: v for s in trial for k, v in s.items()}) is not None:
                kept = trial
        return with_micro_batch({k: v for s in kept for k, v in s.items()})
    return None


def check_fits(config: dict, cfg, plan: MemoryPlan, world_size: int = 1) -> None:
    """Raise MemoryPlanError (one line: the phase, the cheapest change that fits) when the plan does not fit."""
    if plan.fits:
        return
    head = (f"memory plan: the {plan.peak_phase} phase needs {plan.peak / GB:.1f} GB but this machine can use "
            f"{plan.available / GB:.1f} GB ({plan.source})")
    fix = cheapest_fix(config, cfg, plan.available, world_size)
    if fix is None:
        raise MemoryPlanError(f"{head}; no single change fits: use a smaller model or a larger machine")
    change, fixed = fix
    raise MemoryPlanError(f"{head}; the cheapest change that fits: {_set_text(change)} "
                          f"(plan {fixed.peak / GB:.1f} GB, largest phase {fixed.peak_phase})")


# ----------------------------------------------------------------------------------------------
# Measured peaks, phase by phase


def record_peak(peaks: dict, phase: str) -> None:
    """peaks[phase] = the largest MLX memory in use since the last record (or reset); then reset."""
    mx.synchronize()
    peak = max(mx.get_peak_memory(), mx.get_active_memory())
    peaks[phase] = max(peaks.get(phase, 0), peak)
    mx.reset_peak_memory()


def memory_metrics(plan: MemoryPlan | None, peaks: dict) -> dict:
    """memory/<phase>_gb (measured) beside memory/<phase>_plan_gb for the phases this step ran."""
    out = {}
    for phase, value in peaks.items():
        out[f"memory/{phase}_gb"] = value / GB
        if plan is not None and phase in plan.phases:
            out[f"memory/{phase}_plan_gb"] = plan.phases[phase] / GB
    return out


def planned_gb(plan: MemoryPlan) -> dict:
    return {phase: round(value / GB, 3) for phase, value in plan.phases.items()}


# ----------------------------------------------------------------------------------------------
# Gradient checkpointing


_CHECKPOINTED_CLASSES: dict = {}


def _checkpointed_class(block_class):
    """A subclass of a block class whose training forward is mx.checkpoint-ed (mlx-lm's grad_checkpoint
    mechanism); a call with a KV cache (decoding) runs the plain forward."""
    if block_class not in _CHECKPOINTED_CLASSES:
        def __call__(self, x, *args, **kwargs):
            if kwargs.get("cache") is not None or any(not isinstance(a, (mx.array, str, type(None))) for a in args):
                return block_class.__call__(self, x, *args, **kwargs)

            def forward(params, x):
                self.update(params)
                return block_class.__call__(self, x, *args, **kwargs)

            return mx.checkpoint(forward)(self.trainable_parameters(), x)

        _CHECKPOINTED_CLASSES[block_class] = type(f"Checkpointed{block_class.__name__}", (block_class,),
                                                  {"__call__": __call__})
    return _CHECKPOINTED_CLASSES[block_class]


def checkpoint_blocks(model) -> int:
    """Gradient checkpointing on this model's blocks only: each block instance becomes an instance of a
    checkpointed subclass of its class. mlx_lm.tuner.trainer.grad_checkpoint patches the class itself,
    which would change every other model of that class in the process (the rollout copies, the reference)."""
    count = 0
    for block in model.layers:
        if type(block) not in _CHECKPOINTED_CLASSES.values():
            block.__class__ = _checkpointed_class(type(block))
            count += 1
    return count
