"""Run configuration: one typed dataclass, filled from defaults < TOML file < --set overrides.

    cfg = load_config(args.config, args.set)         # raises ConfigError before any model loads
    cfg = resolve_for_model(cfg, is_nanochat)        # every "auto" choice made from the model, validated
    save_resolved_config(cfg, cfg.run_dir)           # config.resolved.json: what the run uses, once

A resumed run continues its saved config: the keys given now go on top of it
(config_from_values(given, base=saved)), and config_changes / check_resume_changes say which of
them differ and refuse those that change the math.

TOML keys may sit at the top level or in an [mlx_grpo] table. Keys of the original MLX-GRPO keep
their meaning: clip_eps = epsilon, kl_coeff = beta, eval_every_updates = eval_steps,
eval_subset_size = eval_samples. Unknown keys and wrongly typed values are errors, never ignored.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    try:
        import tomli as tomllib
    except ModuleNotFoundError:
        tomllib = None

CONFIG_ENV_VAR = "MLX_GRPO_CONFIG"
TOML_TABLE = "mlx_grpo"
RESOLVED_CONFIG_NAME = "config.resolved.json"

# Original MLX-GRPO key -> canonical field. Only canonical names are stored and written out.
ALIASES = {
    "clip_eps": "epsilon",
    "kl_coeff": "beta",
    "eval_every_updates": "eval_steps",
    "eval_subset_size": "eval_samples",
}

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
SCALE_REWARDS = ("group", "batch", "none")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
LR_SCHEDULERS = ("cosine", "constant", "linear")
REWARD_ERRORS = ("raise", "zero")
PROMPT_FORMATS = ("nanochat", "xml", "auto")
COMPUTE_DTYPES = ("float32", "bfloat16")
REPORT_TO = ("tensorboard", "wandb")
QUANT_BITS = (2, 3, 4, 5, 6, 8)
QUANT_GROUP_SIZES = (32, 64, 128)  # what mx.quantize accepts
TRAIN_TYPES = ("full", "lora", "dora")
OPTIMIZERS = ("adamw", "muon")
# TRL's vllm_importance_sampling_mode values: ratio per token or per sequence, clipped (truncate) or zeroed (mask).
IMPORTANCE_SAMPLING_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
MULTI_OBJECTIVE_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")


class ConfigError(ValueError):
    """A bad config file, key or value; the message is one line naming the key and the fix."""


@dataclass
class GRPOConfig:
    # --- model and run ---
    model_name: str = "models/nanochat-d32-mlx"  # local MLX folder, trainer checkpoint folder or HF repo id
    output_dir: str = "outputs"  # runs go to output_dir/run_name
    run_name: str = ""  # "" = "run-YYYYmmdd-HHMMSS", fixed by load_config and saved
    seed: int = 0  # seeds MLX, NumPy and data shuffling

    # --- optimisation ---
    learning_rate: float = 1e-6  # peak AdamW learning rate
    batch_size: int = 1  # prompts per micro-batch
    gradient_accumulation_steps: int = 4  # micro-batches of prompts per optimizer update
    num_epochs: int = 1  # passes over the (possibly truncated) training set
    max_train_samples: int = 0  # 0 = the whole training split
    warmup_ratio: float = 0.1  # fraction of all updates spent warming the LR up from near 0
    max_grad_norm: float = 0.1  # global-norm gradient clipping; 0 = no clipping
    lr_scheduler_type: str = "cosine"  # cosine | constant | linear (decay after warmup)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    compute_dtype: str = "float32"  # float32 | bfloat16 for forward passes; master weights stay float32
    use_compile: bool = True  # mx.compile the loss/grad step
    max_nan_steps: int = 5  # stop the run after this many non-finite (skipped) updates in a row
    prompts_per_step: int = 0  # prompts per step (one generation batch); 0 = batch_size * gradient_accumulation_steps
    micro_batch_size: int = 0  # completions per forward/backward; 0 = batch_size * num_generations

    # --- memory and backend (utils/training/memory.py, backend.py; "auto"/None = chosen per backend, printed) ---
    pad_to_multiple_of: int | None = None  # micro-batch row width rounded up to this; auto: CUDA 64, else 1
    prefill_align: int | None = None  # nanochat prefill lengths rounded up to this; auto: CUDA 64, else 1
    rollout_headroom: float | None = None  # buffer cache trimmed to leave this fraction of MLX's memory limit free
    rollout_kv_buffers: int | None = None  # KV buffers per layer, written in turn; auto: 2 where the plan fits, else 1
    grad_checkpoint: bool = False  # recompute each block's activations in the backward pass: less memory, more time
    memory_check: bool = True  # stop before loading when the memory plan does not fit this machine
    eval_batch_size: int = 64  # evaluation questions decoded (and prefilled) together

    # --- optimizer: AdamW, or nanochat's MuonAdamW (utils/training/muon.py) ---
    optimizer: str = "adamw"  # adamw | muon (then learning_rate is the fraction of the base rates below)
    matrix_lr: float = 0.02  # muon: Muon's base rate for the blocks' matrices (nanochat's --matrix-lr)
    embedding_lr: float = 0.2  # muon: AdamW base rate of the embeddings, x (n_embd/768)^-0.5; value embeddings x 0.5
    unembedding_lr: float = 0.004  # muon: AdamW base rate of lm_head, x (n_embd/768)^-0.5
    scalar_lr: float = 0.5  # muon: AdamW base rate of x0_lambdas (resid_lambdas x 0.01)

    # --- GRPO rollouts and loss ---
    num_generations: int = 64  # group size G: completions sampled per prompt
    max_prompt_length: int = 512  # prompts longer than this (in tokens) are skipped and counted
    max_completion_length: int = 1024  # completion length cap; also dr_grpo's normaliser
    max_new_tokens: int = 512  # tokens sampled per completion (capped by max_completion_length)
    temperature: float = 0.7  # rollout sampling temperature; log-probs use the same scaling
    top_p: float = 0.95  # nucleus sampling; 1.0 = off
    top_k: int = 0  # 0 = off
    min_p: float = 0.0  # 0 = off
    epsilon: float = 0.2  # lower PPO clip range (alias clip_eps)
    epsilon_high: float | None = None  # upper clip range; None = epsilon (DAPO uses 0.28)
    beta: float = 0.0  # KL penalty to the reference model (alias kl_coeff); 0 = no reference model
    loss_type: str = "dapo"  # grpo | bnpo | dr_grpo | dapo (loss aggregation, as in TRL)
    importance_sampling_level: str = "token"  # token | sequence (GSPO)
    num_iterations: int = 1  # optimizer passes over each generation batch (>1 = off-policy reuse)
    scale_rewards: str = "group"  # advantage std scaling: group | batch | none
    mask_truncated_completions: bool = False  # drop completions cut at the length limit from the loss
    quantize_for_rollouts: bool = True  # sample rollouts from a quantized copy of the policy
    rollout_quant_bits: int = 4  # 2 | 3 | 4 | 5 | 6 | 8
    rollout_quant_group_size: int = 64  # 32 | 64 | 128

    # --- shared-prompt training forward (utils/training/shared_prompt.py) ---
    share_prompt_forward: bool = True  # the update runs each prompt once per micro-batch (the models it covers)
    # --- TRL's newer losses and the rollout importance-sampling correction (TRL's names and defaults) ---
    delta: float | None = None  # two-sided clipping: the unclipped ratio capped at delta (INTELLECT-2); None = off
    sapo_temperature_pos: float = 1.0  # sapo's gate temperature for tokens with advantage > 0
    sapo_temperature_neg: float = 1.05  # sapo's gate temperature for tokens with advantage <= 0
    vespo_k_pos: float = 2.0  # vespo's gamma weight exponent k, advantage >= 0
    vespo_lambda_pos: float = 3.0  # vespo's gamma weight decay lambda, advantage >= 0
    vespo_k_neg: float = 3.0  # vespo's k, advantage < 0
    vespo_lambda_neg: float = 2.0  # vespo's lambda, advantage < 0
    # Quantized rollouts: the trained policy's own log-probs are the PPO "old" policy and each token (or
    # sequence) is weighted by pi_trained / pi_rollout, clipped or masked to [clip_min, clip_max].
    # false = the quantized copy's log-probs are "old" (no weights).
    vllm_importance_sampling_correction: bool = True
    vllm_importance_sampling_mode: str = "token_truncate"  # token_truncate | token_mask | sequence_truncate | sequence_mask
    vllm_importance_sampling_clip_min: float | None = None  # None = no lower bound
    vllm_importance_sampling_clip_max: float | None = 3.0  # None = no upper bound
    off_policy_mask_threshold: float | None = None  # DeepSeek-V3.2: drop A < 0 sequences this far off-policy; None = off
    top_entropy_quantile: float = 1.0  # keep only the top-q tokens by entropy in the loss (0.2 in its paper); 1 = all
    entropy_coef: float = 0.0  # entropy bonus: the loss minus entropy_coef * mean token entropy; 0 = off
    # TRL's adaptive entropy control (Skywork-OR1): entropy_coef is the starting coefficient; after each update
    # it moves up by entropy_coef_delta if that update's mean token entropy was <= entropy_target, else down,
    # within [entropy_coef_min, entropy_coef_max], and applies only while the last entropy was <= entropy_target.
    use_adaptive_entropy: bool = False
    entropy_coef_min: float = 0.0  # lower bound of the adaptive coefficient
    entropy_coef_max: float = 1.0  # upper bound of the adaptive coefficient
    entropy_coef_delta: float = 0.005  # the adaptive coefficient's step per update
    entropy_target: float = 0.2  # nats; a language model starts at 2-10, so TRL's 0.2 only engages near collapse
    use_bias_correction_kl: bool = False  # the KL term weighted by the ratio (DeepSeek-V3.2's unbiased estimator)
    multi_objective_aggregation: str = "sum_then_normalize"  # sum_then_normalize | normalize_then_sum (GDPO)
    # TRL's sync_ref_model (TR-DPO): every ref_model_sync_steps steps the reference moves toward the policy,
    # reference = alpha * policy + (1 - alpha) * reference; the reference is then a dense compute_dtype copy.
    sync_ref_model: bool = False
    ref_model_sync_steps: int = 512  # steps between syncs (TRL counts optimizer steps: the same at num_iterations 1)
    ref_model_mixup_alpha: float = 0.6  # alpha above

    # --- LoRA / DoRA / QLoRA (utils/training/lora.py: mlx-lm's adapter layers) ---
    train_type: str = "full"  # full | lora | dora; lora/dora train only adapters on a frozen base
    lora_rank: int = 8  # adapter rank r
    lora_scale: float = 20.0  # mlx-lm's scale: the update is scale * x A B (PEFT's alpha = scale * rank)
    lora_dropout: float = 0.0  # dropout on the adapter input, in the loss forward only
    lora_layers: int = -1  # adapt the top N blocks; -1 = all
    lora_keys: list[str] = field(default_factory=list)  # layers relative to a block, e.g. ["attn.c_q"]; [] = all linears
    base_quant_bits: int = 0  # QLoRA: quantize the frozen base to 2|3|4|5|6|8 bits; 0 = no
    base_quant_group_size: int = 64  # 32 | 64 | 128
    # Rollouts and evaluation decode from a copy with the adapters merged into a dense compute_dtype base (the
    # fast decoder; one more model's worth of memory); false: through the adapters in place (mlx-lm's model call).
    merge_adapters_for_decoding: bool = True

    # --- rewards and prompt format ---
    reward_funcs: list[str] = field(default_factory=list)  # [] = the prompt format's defaults
    reward_weights: list[float] = field(default_factory=list)  # [] = weight 1 for every reward
    reward_file: str = ""  # Python file with extra reward functions; "" = none
    reward_errors: str = "raise"  # a reward function that raises: raise (stop) | zero (score 0, counted)
    prompt_format: str = "auto"  # nanochat | xml | auto (nanochat for nanochat tokenizers, else xml)
    system_prompt: str | None = None  # None = the format's default; "" = no system prompt
    use_calculator: bool | None = None  # nanochat calculator tool; None ("auto") = on for nanochat models in their format

    # --- data ---
    dataset: str = "openai/gsm8k"  # HF dataset id (ignored when dataset_path is set)
    dataset_config: str = "main"
    dataset_path: str = ""  # local jsonl/parquet file or folder; overrides dataset
    train_split: str = "train"
    eval_split: str = "test"
    shuffle: bool = True  # shuffle training prompts each epoch (seeded)

    # --- vision-language models (utils/vlm/: mlx-vlm models, rows with image or images) ---
    vlm_train_vision: bool = False  # full training: train the vision tower too (use_compile = false); false = frozen

    # Every *_steps key counts steps: one step is one generation batch and its num_iterations updates,
    # so with num_iterations = 1 steps and updates coincide (as eval_every_updates counted them).

    # --- evaluation ---
    eval_steps: int = 50  # evaluate every N steps (alias eval_every_updates); 0 = only before and after training
    eval_samples: int = 200  # eval questions (alias eval_subset_size); 0 = the whole eval split
    eval_max_new_tokens: int = 128
    eval_pass_k: int = 0  # 0 = off; k sampled answers per question for pass@1..k
    eval_temperature: float = 1.0  # sampling temperature for pass@k

    # --- saving and logging ---
    save_steps: int = 100  # checkpoint every N steps; 0 = only the final save
    keep_last: int = 0  # checkpoints to keep; 0 = keep all
    logging_steps: int = 1  # print the metrics of every N-th step's updates
    log_jsonl: bool = True  # write metrics.jsonl and completions.jsonl in the run dir
    completions_log_steps: int = 10  # write sample completions every N steps; 0 = never
    completions_log_count: int = 4  # completions written each time
    report_to: list[str] = field(default_factory=list)  # extra loggers: tensorboard, wandb
    plot: bool = True  # write PNG plots of the metrics at the end

    # --- derived values (not fields: never read from or written to config files) ---

    @property
    def effective_prompts_per_step(self) -> int:
        return self.prompts_per_step or self.batch_size * self.gradient_accumulation_steps

    @property
    def effective_micro_batch_size(self) -> int:
        return self.micro_batch_size or self.batch_size * self.num_generations

    @property
    def effective_epsilon_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    @property
    def generation_limit(self) -> int:
        return min(self.max_new_tokens, self.max_completion_length)

    @property
    def resolved_run_name(self) -> str:
        if self.run_name:
            return self.run_name
        # Built directly (not via load_config): pick a timestamp once per instance so it stays put.
        if "_default_run_name" not in self.__dict__:
            self.__dict__["_default_run_name"] = default_run_name()
        return self.__dict__["_default_run_name"]

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.resolved_run_name


FIELD_TYPES: dict[str, Any] = typing.get_type_hints(GRPOConfig)
FIELD_NAMES = tuple(f.name for f in dataclasses.fields(GRPOConfig))
# Optional fields where the string "auto" also means None.
AUTO_MEANS_NONE = {"use_calculator", "pad_to_multiple_of", "prefill_align", "rollout_headroom", "rollout_kv_buffers"}

# Where a run lives: a resumed run takes them from its folder, so they are never compared.
IDENTITY_KEYS = ("output_dir", "run_name")
# Keys a resumed run may change freely: what is evaluated, logged, saved and reported, not what is trained.
SAFE_KEYS = ("eval_split", "eval_steps", "eval_samples", "eval_max_new_tokens", "eval_pass_k", "eval_temperature",
             "save_steps", "keep_last", "logging_steps", "log_jsonl", "completions_log_steps",
             "completions_log_count", "report_to", "plot", "memory_check", "rollout_headroom", "rollout_kv_buffers",
             "eval_batch_size")


def default_run_name() -> str:
    return datetime.now().strftime("run-%Y%m%d-%H%M%S")


# ---------------------------------------------------------------------------------------------
# Types: every field is bool, int, float, str, list[str], list[float], or one of these | None.


def _split_optional(tp: Any) -> tuple[Any, bool]:
    """(inner type, is_optional) for `X | None` / Optional[X]; (tp, False) otherwise."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _type_name(tp: Any) -> str:
    inner, optional = _split_optional(tp)
    if typing.get_origin(inner) is list:
        name = f"list of {typing.get_args(inner)[0].__name__}"
    else:
        name = inner.__name__
    return f"{name} or none" if optional else name


def _closest_keys_hint(key: str) -> str:
    matches = difflib.get_close_matches(key, list(FIELD_NAMES) + list(ALIASES), n=3, cutoff=0.6)
    if matches:
        return f"did you mean {' / '.join(matches)}?"
    return "see the GRPOConfig fields in utils/config.py for valid keys"


def _canonical_key(key: str, source: str) -> str:
    canonical = ALIASES.get(key, key)
    if canonical not in FIELD_TYPES:
        raise ConfigError(f"unknown config key {key!r} ({source}); {_closest_keys_hint(key)}")
    return canonical


def _check_scalar(value: Any, tp: type) -> Any:
    """Return value as type tp, or raise TypeError. Strict: no strings for numbers, no bools for ints."""
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise TypeError


def _check_value(key: str, value: Any, source: str) -> Any:
    """Type-check a structured value (from TOML, JSON or Python) for field `key`."""
    tp = FIELD_TYPES[key]
    inner, optional = _split_optional(tp)
    if value is None and optional:
        return None
    if optional and key in AUTO_MEANS_NONE and isinstance(value, str) and value.lower() == "auto":
        return None
    try:
        if typing.get_origin(inner) is list:
            if not isinstance(value, (list, tuple)):
                raise TypeError
            item_type = typing.get_args(inner)[0]
            return [_check_scalar(item, item_type) for item in value]
        return _check_scalar(value, inner)
    except TypeError:
        expected = _type_name(tp)
        if key in AUTO_MEANS_NONE:
            expected = f'{_type_name(inner)} or "auto"'
        raise ConfigError(
            f"config key {key!r} ({source}) expects {expected}, got {type(value).__name__} {value!r}"
        ) from None


_TRUE_WORDS = ("true", "1", "yes")
_FALSE_WORDS = ("false", "0", "no")


def _strip_quotes(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1]
    return text


def _parse_scalar(text: str, tp: type) -> Any:
    """Parse one --set value string as type tp, or raise ValueError."""
    if tp is bool:
        word = text.strip().lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
        raise ValueError
    if tp is int:
        return int(text.strip())  # "8.0" and "1e3" are rejected: floats for int fields are errors
    if tp is float:
        return float(text.strip())  # accepts 1e-6 and plain integers
    return _strip_quotes(text)


def _parse_override_value(key: str, text: str) -> Any:
    """Convert the text of `--set key=text` to the field's type."""
    tp = FIELD_TYPES[key]
    inner, optional = _split_optional(tp)
    word = text.strip().lower()
    if optional and (word in ("none", "null") or (key in AUTO_MEANS_NONE and word == "auto")):
        return None
    try:
        if typing.get_origin(inner) is list:
            item_type = typing.get_args(inner)[0]
            body = text.strip()
            if body.startswith("[") and body.endswith("]"):  # TOML-style "[a, b]"
                body = body[1:-1]
            if not body.strip():
                return []
            return [_parse_scalar(item, item_type) for item in body.split(",")]
        return _parse_scalar(text, inner)
    except ValueError:
        expected = _type_name(tp)
        if key in AUTO_MEANS_NONE:
            expected = "true/false/auto" if inner is bool else f"{_type_name(inner)} or auto"
        elif inner is bool:
            expected = "bool (true/false/1/0/yes/no)"
        raise ConfigError(f"--set {key}={text!r}: expected {expected}") from None


# ---------------------------------------------------------------------------------------------
# Sources


def _merge_key(values: dict, spelled: dict, key: str, canonical: str, value: Any, source: str,
               later_wins: bool) -> None:
    """Store `value` for `canonical`, refusing an alias and its canonical key with different values."""
    if canonical in values and spelled[canonical] != key:
        if values[canonical] != value:
            alias, name = (key, canonical) if key in ALIASES else (spelled[canonical], canonical)
            raise ConfigError(
                f"{alias!r} is an alias of {name!r} and both are given with different values "
                f"({values[canonical]!r} vs {value!r}, {source}); keep only one"
            )
        return
    if canonical in values and not later_wins:
        raise ConfigError(f"config key {key!r} is given twice ({source}); keep only one")
    values[canonical] = value
    spelled[canonical] = key


def _values_from_mapping(raw: dict, source: str) -> dict[str, Any]:
    """Canonical, type-checked values from a TOML/JSON mapping."""
    values: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for key, value in raw.items():
        canonical = _canonical_key(key, source)
        value = _check_value(canonical, value, source)
        _merge_key(values, spelled, key, canonical, value, source, later_wins=False)
    return values


def _values_from_overrides(overrides: list[str]) -> dict[str, Any]:
    """Canonical values from repeated `--set key=value`; the same key repeated: the last one wins."""
    values: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set learning_rate=3e-6")
        canonical = _canonical_key(key, "from --set")
        value = _parse_override_value(canonical, text)
        _merge_key(values, spelled, key, canonical, value, "from --set", later_wins=True)
    return values


def read_toml(path: str | os.PathLike, origin: str = "") -> dict[str, Any]:
    """Canonical, type-checked values from a TOML file (flat keys and/or an [mlx_grpo] table).

    origin names where the path came from (e.g. "from $MLX_GRPO_CONFIG") for error messages.
    """
    if tomllib is None:
        raise ConfigError("reading TOML on Python 3.10 needs tomli: pip install tomli")
    path = Path(path)
    try:
        text = path.read_bytes().removeprefix(b"\xef\xbb\xbf")  # a byte-order mark, as some editors write
        doc = tomllib.loads(text.decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {str(path)!r}{' ' + origin if origin else ''}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 (byte {e.object[e.start]:#04x} at offset {e.start}): save it as "
                          "UTF-8") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {str(path)!r}: {e.strerror}") from None

    source = f"in {path}"
    table = doc.pop(TOML_TABLE, {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: {TOML_TABLE!r} must be a table ([{TOML_TABLE}]), not a value")
    for key in table:
        if key in doc:
            raise ConfigError(
                f"config key {key!r} is given both at the top level and in [{TOML_TABLE}] ({source}); keep only one"
            )
    return _values_from_mapping({**doc, **table}, source)


# ---------------------------------------------------------------------------------------------
# Public API


def validate(cfg: GRPOConfig) -> GRPOConfig:
    """Check types, ranges and choices; raise one ConfigError listing every problem."""
    for name in FIELD_NAMES:  # catches bad values set from Python, e.g. GRPOConfig(batch_size="2")
        setattr(cfg, name, _check_value(name, getattr(cfg, name), "in GRPOConfig"))

    errors: list[str] = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            errors.append(message)

    def one_of(name: str, choices: tuple) -> None:
        value = getattr(cfg, name)
        need(value in choices, f"{name} must be one of {'|'.join(map(str, choices))}, got {value!r}")

    def at_least(name: str, low: int | float) -> None:
        value = getattr(cfg, name)
        need(value >= low, f"{name} must be >= {low}, got {value!r}")

    def positive(name: str) -> None:
        value = getattr(cfg, name)
        need(value > 0, f"{name} must be > 0, got {value!r}")

    for name in FIELD_NAMES:
        value = getattr(cfg, name)
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            errors.append(f"{name} must be a finite number, got {value!r}")
    if errors:
        raise ConfigError("; ".join(errors))

    need(bool(cfg.model_name.strip()), "model_name must not be empty")
    name = cfg.run_name
    need("/" not in name and "\\" not in name and name not in (".", ".."),
         f"run_name must be a plain folder name (no path separators), got {name!r}")
    need(bool(cfg.dataset_path or cfg.dataset), "set dataset (HF id) or dataset_path (local file/folder)")

    one_of("loss_type", LOSS_TYPES)
    one_of("scale_rewards", SCALE_REWARDS)
    one_of("importance_sampling_level", IMPORTANCE_SAMPLING_LEVELS)
    one_of("vllm_importance_sampling_mode", IMPORTANCE_SAMPLING_MODES)
    one_of("multi_objective_aggregation", MULTI_OBJECTIVE_AGGREGATIONS)
    one_of("lr_scheduler_type", LR_SCHEDULERS)
    one_of("reward_errors", REWARD_ERRORS)
    one_of("prompt_format", PROMPT_FORMATS)
    one_of("compute_dtype", COMPUTE_DTYPES)
    one_of("rollout_quant_bits", QUANT_BITS)
    one_of("rollout_quant_group_size", QUANT_GROUP_SIZES)
    for logger in cfg.report_to:
        need(logger in REPORT_TO, f"report_to entries must be among {'|'.join(REPORT_TO)}, got {logger!r}")

    positive("learning_rate")
    for name in ("batch_size", "gradient_accumulation_steps", "num_epochs", "logging_steps",
                 "max_prompt_length", "max_completion_length", "max_new_tokens",
                 "eval_max_new_tokens", "num_iterations", "max_nan_steps", "eval_batch_size"):
        at_least(name, 1)
    for name in ("pad_to_multiple_of", "prefill_align"):
        value = getattr(cfg, name)
        need(value is None or value >= 1, f"{name} must be >= 1 or \"auto\", got {value!r}")
    need(cfg.rollout_headroom is None or 0.0 <= cfg.rollout_headroom < 1.0,
         f"rollout_headroom must be in [0, 1) or \"auto\", got {cfg.rollout_headroom!r}")
    need(cfg.rollout_kv_buffers is None or 1 <= cfg.rollout_kv_buffers <= 3,
         f"rollout_kv_buffers must be 1, 2, 3 or \"auto\", got {cfg.rollout_kv_buffers!r}")
    for name in ("max_train_samples", "save_steps", "eval_steps", "eval_samples", "seed", "top_k",
                 "prompts_per_step", "micro_batch_size", "eval_pass_k", "keep_last",
                 "completions_log_steps", "completions_log_count"):
        at_least(name, 0)
    at_least("num_generations", 2)  # a group of one has no advantage signal
    need(0.0 <= cfg.warmup_ratio < 1.0, f"warmup_ratio must be in [0, 1), got {cfg.warmup_ratio!r}")
    at_least("max_grad_norm", 0.0)
    at_least("weight_decay", 0.0)
    for name in ("adam_beta1", "adam_beta2"):
        value = getattr(cfg, name)
        need(0.0 <= value < 1.0, f"{name} must be in [0, 1), got {value!r}")

    positive("temperature")
    need(0.0 < cfg.top_p <= 1.0, f"top_p must be in (0, 1], got {cfg.top_p!r}")
    need(0.0 <= cfg.min_p < 1.0, f"min_p must be in [0, 1), got {cfg.min_p!r}")
    positive("epsilon")
    need(cfg.epsilon_high is None or cfg.epsilon_high > 0,
         f"epsilon_high must be > 0 (or none = epsilon), got {cfg.epsilon_high!r}")
    at_least("beta", 0.0)
    at_least("eval_temperature", 0.0)
    need(cfg.eval_pass_k == 0 or cfg.eval_temperature > 0,
         "eval_pass_k > 0 samples k answers per question and needs eval_temperature > 0")

    errors.extend(trl_loss_errors(cfg))
    if cfg.sync_ref_model:  # TRL refuses it with PEFT adapters, and without a reference there is nothing to sync
        need(cfg.beta > 0, "sync_ref_model moves the KL reference, which beta = 0 switches off: set beta > 0 "
             "(e.g. 0.04) or sync_ref_model = false")
        need(cfg.train_type == "full", f"sync_ref_model needs train_type = \"full\" (with {cfg.train_type} the "
             "reference is the frozen base itself, as TRL's PEFT runs, which refuse it too)")
        need(cfg.ref_model_sync_steps >= 1, f"ref_model_sync_steps must be >= 1, got {cfg.ref_model_sync_steps}")
        need(0.0 <= cfg.ref_model_mixup_alpha <= 1.0,
             f"ref_model_mixup_alpha must be in [0, 1], got {cfg.ref_model_mixup_alpha}")

    if cfg.reward_funcs and cfg.reward_weights:
        need(len(cfg.reward_weights) == len(cfg.reward_funcs),
             f"reward_weights has {len(cfg.reward_weights)} entries but reward_funcs has "
             f"{len(cfg.reward_funcs)}; give one weight per reward function")
    need(cfg.use_calculator is not True or cfg.prompt_format != "xml",
         "use_calculator = true needs the nanochat prompt format (its tool tokens), but prompt_format is 'xml'")

    one_of("train_type", TRAIN_TYPES)
    at_least("lora_rank", 1)
    positive("lora_scale")
    need(0.0 <= cfg.lora_dropout < 1.0, f"lora_dropout must be in [0, 1), got {cfg.lora_dropout!r}")
    need(cfg.lora_layers == -1 or cfg.lora_layers >= 1,
         f"lora_layers must be -1 (all blocks) or >= 1 (the top N blocks), got {cfg.lora_layers!r}")
    one_of("base_quant_bits", (0,) + QUANT_BITS)
    one_of("base_quant_group_size", QUANT_GROUP_SIZES)
    need(cfg.base_quant_bits == 0 or cfg.train_type != "full",
         "base_quant_bits > 0 (QLoRA) quantizes a frozen base: set train_type = \"lora\" (or \"dora\")")

    # optimizer (utils/training/muon.py)
    one_of("optimizer", OPTIMIZERS)
    for name in ("matrix_lr", "embedding_lr", "unembedding_lr", "scalar_lr"):
        at_least(name, 0.0)
    need(cfg.optimizer != "muon" or cfg.learning_rate >= 1e-3,
         "with optimizer = \"muon\" learning_rate is the fraction of nanochat's base learning rates "
         f"(chat_rl.py's --init-lr-frac: 0.05), got {cfg.learning_rate!r}; set learning_rate = 0.05")
    need(cfg.optimizer != "muon" or cfg.train_type == "full",
         f"optimizer = \"muon\" trains every weight as nanochat does; set train_type = \"full\" (got "
         f"{cfg.train_type!r}) or optimizer = \"adamw\"")

    if errors:
        raise ConfigError("; ".join(errors))
    return cfg


def trl_loss_errors(cfg: GRPOConfig) -> list[str]:
    """The combinations TRL's GRPOConfig / GRPOTrainer refuse, and the ranges of their keys."""
    errors = []
    lo, hi = cfg.vllm_importance_sampling_clip_min, cfg.vllm_importance_sampling_clip_max
    if lo is not None and hi is not None and lo >= hi:
        errors.append(f"vllm_importance_sampling_clip_min ({lo}) must be below vllm_importance_sampling_clip_max ({hi})")
    if cfg.vllm_importance_sampling_mode.endswith("_truncate") and lo is None and hi is None:
        errors.append("a *_truncate vllm_importance_sampling_mode needs vllm_importance_sampling_clip_min or "
                      "vllm_importance_sampling_clip_max; set vllm_importance_sampling_clip_max = 3.0")
    if lo is not None and lo < 0:
        errors.append(f"vllm_importance_sampling_clip_min must be >= 0, got {lo}")
    if cfg.loss_type == "vespo" and not cfg.vllm_importance_sampling_mode.startswith("token_"):
        errors.append("loss_type = \"vespo\" weighs whole sequences itself and takes token-level importance "
                      "weights only: set vllm_importance_sampling_mode = \"token_truncate\" (or \"token_mask\")")
    q = cfg.top_entropy_quantile
    if not 0.0 <= q <= 1.0:
        errors.append(f"top_entropy_quantile must be in [0, 1] (1 = every token), got {q}")
    if cfg.off_policy_mask_threshold is not None and cfg.off_policy_mask_threshold <= 0:
        errors.append(f"off_policy_mask_threshold must be > 0 (e.g. 0.5) or none, got {cfg.off_policy_mask_threshold}")
    if cfg.delta is not None and cfg.delta <= 1.0:
        errors.append(f"delta caps the ratio from above and must be > 1 (TRL recommends > 1 + epsilon), got {cfg.delta}")
    for name in ("sapo_temperature_pos", "sapo_temperature_neg", "vespo_lambda_pos", "vespo_lambda_neg"):
        if getattr(cfg, name) <= 0:
            errors.append(f"{name} must be > 0, got {getattr(cfg, name)}")
    for name in ("vespo_k_pos", "vespo_k_neg"):
        if getattr(cfg, name) < 0:
            errors.append(f"{name} must be >= 0, got {getattr(cfg, name)}")
    if cfg.use_adaptive_entropy:  # ours: TRL takes these, then steps the wrong way or jumps from bound to bound
        if cfg.entropy_coef_min > cfg.entropy_coef_max:
            errors.append(f"entropy_coef_min ({cfg.entropy_coef_min}) must be <= entropy_coef_max "
                          f"({cfg.entropy_coef_max})")
        if cfg.entropy_coef_delta < 0:
            errors.append(f"entropy_coef_delta must be >= 0 (the coefficient's step per update), got "
                          f"{cfg.entropy_coef_delta}")
    return errors


def config_warnings(cfg: GRPOConfig) -> list[str]:
    """Settings TRL accepts with a warning (each one line): they run, but not as the method's paper does."""
    warnings = []
    if cfg.loss_type == "luspo" and cfg.importance_sampling_level != "sequence":
        warnings.append("loss_type = \"luspo\" is a sequence-level loss: set importance_sampling_level = "
                        "\"sequence\" as its paper does")
    if cfg.loss_type == "vespo" and cfg.importance_sampling_level != "token":
        warnings.append("loss_type = \"vespo\" computes sequence weights itself: set importance_sampling_level = "
                        "\"token\" (the default)")
    if cfg.importance_sampling_level == "sequence" and cfg.loss_type in ("bnpo", "dr_grpo", "dapo", "cispo"):
        warnings.append(f"importance_sampling_level = \"sequence\" with loss_type = \"{cfg.loss_type}\" sums "
                        "per-token losses, weighting each sequence by its length; GSPO's setup is loss_type = \"grpo\"")
    if cfg.multi_objective_aggregation == "normalize_then_sum" and cfg.scale_rewards != "group":
        warnings.append(f"multi_objective_aggregation = \"normalize_then_sum\" normalizes by itself: scale_rewards = "
                        f"\"{cfg.scale_rewards}\" is not used")
    if cfg.use_bias_correction_kl and cfg.beta == 0:
        warnings.append("use_bias_correction_kl weights the KL term, which beta = 0 switches off: it does nothing")
    if cfg.loss_type == "cispo" and cfg.effective_epsilon_high < 1.0:
        warnings.append(f"loss_type = \"cispo\" caps every weight at epsilon_high = {cfg.effective_epsilon_high}, "
                        "below 1; CISPO's eps_max is epsilon_high (TRL recommends 5.0)")
    return warnings


def config_from_dict(d: dict[str, Any], source: str = "in config dict") -> GRPOConfig:
    """Build and validate a config from a mapping (e.g. a loaded config.resolved.json, for resume).

    Same strict checks as a TOML file; aliases are accepted; a missing key keeps its default.
    source says where the mapping came from, for error messages (e.g. "in RUN/config.resolved.json").
    """
    if not isinstance(d, dict):
        raise ConfigError(f"a config must be a mapping of key -> value, got {type(d).__name__} ({source})")
    return validate(GRPOConfig(**_values_from_mapping(d, source)))


def read_config_values(config_path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                       default_path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The keys given for a run, canonical and type-checked: the TOML (config_path, else
    $MLX_GRPO_CONFIG if set, else default_path) with the --set overrides on top."""
    origin = "(from --config)"
    if config_path is None and os.environ.get(CONFIG_ENV_VAR):
        config_path, origin = os.environ[CONFIG_ENV_VAR], f"(from ${CONFIG_ENV_VAR})"
    elif config_path is None and default_path is not None:
        config_path, origin = default_path, "(the default config)"
    values = read_toml(config_path, origin) if config_path is not None else {}
    values.update(_values_from_overrides(list(overrides or [])))
    return values


def config_from_values(values: dict[str, Any], base: GRPOConfig | None = None) -> GRPOConfig:
    """`values` on top of `base` (a run's saved config; default: the dataclass defaults), validated.

    An empty run_name is replaced by a timestamp here, so the saved config names the real run dir.
    """
    cfg = dataclasses.replace(base, **values) if base is not None else GRPOConfig(**values)
    if not cfg.run_name:
        cfg.run_name = default_run_name()
    return validate(cfg)


def load_config(config_path: str | os.PathLike | None, overrides: list[str] | None = None,
                default_path: str | os.PathLike | None = None) -> GRPOConfig:
    """defaults < TOML (config_path, else $MLX_GRPO_CONFIG if set, else default_path) < --set; validated."""
    return config_from_values(read_config_values(config_path, overrides, default_path))


def resolve_for_model(cfg: GRPOConfig, is_nanochat: bool) -> GRPOConfig:
    """A copy of cfg with every model-dependent "auto" choice made, validated: the config a run uses and saves.

    prompt_format auto -> nanochat for a nanochat tokenizer, else xml; use_calculator auto -> on in
    the nanochat format of a nanochat model; reward_funcs [] -> the prompt format's defaults.
    """
    from mlx_grpo.data.rewards import default_reward_names  # the reward registry, not needed to read a config

    prompt_format = cfg.prompt_format if cfg.prompt_format != "auto" else ("nanochat" if is_nanochat else "xml")
    use_calculator = cfg.use_calculator
    if use_calculator is None:
        use_calculator = is_nanochat and prompt_format == "nanochat"
    if use_calculator and not is_nanochat:
        raise ConfigError("use_calculator needs a nanochat model (its tokenizer has the python/output tokens); "
                          "set use_calculator = false")
    return validate(dataclasses.replace(cfg, prompt_format=prompt_format, use_calculator=use_calculator,
                                        reward_funcs=list(cfg.reward_funcs) or default_reward_names(prompt_format)))


@dataclass(frozen=True)
class ConfigChange:
    """A key whose value a resumed run changes: `update` is the first update that uses the new value."""

    key: str
    old: Any
    new: Any

    @property
    def safe(self) -> bool:
        return self.key in SAFE_KEYS

    def __str__(self) -> str:
        return f"{self.key} {self.old!r} -> {self.new!r}"

    def record(self, update: int) -> dict:
        return {"key": self.key, "old": self.old, "new": self.new, "update": update}


def config_changes(saved: GRPOConfig, cfg: GRPOConfig) -> list[ConfigChange]:
    """Every key (but where the run lives) whose value differs between a run's saved config and cfg."""
    before, after = config_to_dict(saved), config_to_dict(cfg)
    return [ConfigChange(key, before[key], after[key]) for key in FIELD_NAMES
            if key not in IDENTITY_KEYS and before[key] != after[key]]


def check_resume_changes(changes: list[ConfigChange], accept: bool) -> None:
    """Refuse changes to keys that change the math of a resumed run, unless accepted; one line naming each."""
    unsafe = [str(change) for change in changes if not change.safe]
    if unsafe and not accept:
        raise ConfigError(f"--resume: the run was saved with other values of keys that change its math: "
                          f"{'; '.join(unsafe)}. Give the saved values, or pass --accept-changes to continue "
                          "with the new ones (the run records both and the update where they changed)")


def config_to_dict(cfg: GRPOConfig) -> dict[str, Any]:
    """All fields by canonical name, JSON-ready (lists copied)."""
    return dataclasses.asdict(cfg)


def save_resolved_config(cfg: GRPOConfig, run_dir: str | os.PathLike) -> Path:
    """Write run_dir/config.resolved.json (every field) and return its path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / RESOLVED_CONFIG_NAME
    tmp = path.with_name(path.name + ".tmp")  # write then rename: a crash never leaves half a file
    tmp.write_text(json.dumps(config_to_dict(cfg), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def load_resolved_config(path: str | os.PathLike) -> GRPOConfig:
    """Read a config.resolved.json (or the run dir holding one) back into a validated config."""
    path = Path(path)
    if path.is_dir():
        path = path / RESOLVED_CONFIG_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"resolved config not found: {str(path)!r}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON: {e}") from None
    return config_from_dict(data, f"in {path}")


def add_config_arguments(parser: argparse.ArgumentParser, default: str = "built-in defaults"):
    """Add --config PATH and repeatable --set KEY=VALUE, for read_config_values / load_config(args.config, args.set).

    default: what a run without --config and $MLX_GRPO_CONFIG uses, for the help text.
    """
    parser.add_argument("--config", default=None, metavar="PATH",
                        help=f"TOML config file (default: ${CONFIG_ENV_VAR} if set, else {default})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set learning_rate=3e-6 (repeatable); wins over the TOML")
    return parser


if __name__ == "__main__":
    # python -m mlx_grpo.config --config configs/x.toml --set k=v : print the resolved config.
    import sys

    cli = add_config_arguments(argparse.ArgumentParser(description="Print a resolved MLX-GRPO config."))
    cli_args = cli.parse_args()
    try:
        resolved = load_config(cli_args.config, cli_args.set)
    except ConfigError as err:
        sys.exit(f"config error: {err}")
    print(json.dumps(config_to_dict(resolved), indent=2))
