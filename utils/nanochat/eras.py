"""nanochat's architecture eras: which one a checkpoint is (read from its tensors and meta), each era's
constants, and the config.json of the 2026 model (utils/nanochat/model.py) that states them all.

nanochat's files hold tensors and a model_config; the constants of its forward pass (RoPE base, softcap,
QK scale, value-embedding gate, window sizes) changed from commit to commit without a trace in them. Where
two eras have the same tensors and meta, the constant comes from the user (convert_nanochat.py's
--softcap, --window-pattern) or a documented default, with a one-line warning that names the ambiguity.
Tensors of no known era are refused by name. The table, in words: README, "nanochat checkpoints that work".
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from mlx_grpo.nanochat.checkpoint import NanochatCheckpointError, list_names
from mlx_grpo.nanochat.mlx_lm_hook import MODEL_TYPE

KNOWN_HEAD = "92d63d4 (2026-07-03)"  # the newest nanochat commit whose architecture is known here
PAD_VOCAB_TO = 64  # nanochat pads the embedding and head rows to a multiple of this (f1bf69d)
# nanochat's norm is F.rms_norm without eps: float32's machine epsilon (bfloat16 activations are normed in float32).
RMS_NORM_EPS = float(np.finfo(np.float32).eps)
SMEAR_GATE_CHANNELS = 24
DEFAULT_SOFTCAP = 15.0
SOFTCAPS = (15.0, 20.0)  # the two softcaps of the value-embedding eras before 6ed7d1d
WINDOW_LETTERS = "SL"


@dataclass(frozen=True)
class Era:
    """One span of nanochat's history with a fixed forward pass; named by its first commit."""

    commit: str
    date: str
    lambdas: bool = True  # resid_lambdas and x0_lambdas
    rope_theta: float = 10000.0
    softcap: float = DEFAULT_SOFTCAP
    qk_scale: float = 1.0
    ve_gate_channels: int = 0  # 0: no value embeddings
    ve_gate_scale: float = 0.0
    short_window_divisor: int = 0  # 0: no sliding windows
    short_window_tile: int = 1  # 1: S = sequence_len // divisor; 128: rounded up to FA3's tile
    smear: bool = False  # smear and backout came together

    def short_window(self, sequence_len: int) -> int:
        if self.short_window_tile == 1:
            return sequence_len // self.short_window_divisor
        return -(-sequence_len // self.short_window_divisor // self.short_window_tile) * self.short_window_tile

    def __str__(self) -> str:
        return f"{self.commit} ({self.date})"


OCTOBER_2025 = Era("3a5e0bc", "2025-10-13", lambdas=False)  # mlx-lm's model_type "nanochat"
LAMBDAS = Era("aa530cd", "2026-01-11")  # full attention
WINDOWS = Era("fbc1484", "2026-01-11", short_window_divisor=2)
VALUE_EMBEDDINGS = Era("e85db6b", "2026-01-16", ve_gate_channels=32, ve_gate_scale=2.0, short_window_divisor=2)
SOFTCAP_20 = Era("aba30cb", "2026-03-02", softcap=20.0, ve_gate_channels=32, ve_gate_scale=2.0,
                 short_window_divisor=2)
AUTORESEARCH = Era("6ed7d1d", "2026-03-09", rope_theta=100000.0, qk_scale=1.15, ve_gate_channels=12,
                   ve_gate_scale=3.0, short_window_divisor=3, short_window_tile=128)
SMEAR = Era("a825e63", "2026-03-14", rope_theta=100000.0, qk_scale=1.2, ve_gate_channels=12, ve_gate_scale=3.0,
            short_window_divisor=4, short_window_tile=128, smear=True)
ERAS = (OCTOBER_2025, LAMBDAS, WINDOWS, VALUE_EMBEDDINGS, SOFTCAP_20, AUTORESEARCH, SMEAR)
# The pattern base_train used by default when a meta did not record it (chat_sft before 8b4849d).
DEFAULT_WINDOW_PATTERN = "SSSL"

_LAMBDA_TENSORS = ("resid_lambdas", "x0_lambdas")
_SMEAR_TENSORS = ("smear_gate.weight", "smear_lambda", "backout_lambda")
_KNOWN_TENSOR = re.compile(
    r"^(transformer\.wte\.weight|lm_head\.weight|resid_lambdas|x0_lambdas|smear_gate\.weight|smear_lambda"
    r"|backout_lambda|value_embeds\.\d+\.weight"
    r"|transformer\.h\.\d+\.(attn\.(c_q|c_k|c_v|c_proj|ve_gate)|mlp\.(c_fc|c_proj))\.weight)$"
)
_VE_GATE = re.compile(r"^transformer\.h\.\d+\.attn\.ve_gate\.weight$")
_ENGRAM_PREFIX = "bigram_"  # the January "engram" experiment's tensors (bigram_embed.*, bigram_lambdas)


@dataclass
class Architecture:
    """What a checkpoint is: its era and the constants that were chosen for it (flag or default)."""

    era: Era
    window_pattern: Optional[str]  # None: full attention (no sliding windows)
    softcap: float
    warnings: list[str] = field(default_factory=list)  # one line per ambiguity resolved by a default

    @property
    def is_october_2025(self) -> bool:
        return self.era is OCTOBER_2025

    def describe(self) -> str:
        if self.is_october_2025:
            return f"nanochat architecture: October 2025 (from {OCTOBER_2025}, mlx-lm's model_type nanochat)"
        windows = f"windows {self.window_pattern}" if self.window_pattern else "full attention"
        return f"nanochat architecture: the {self.era} era ({windows}, softcap {self.softcap:g})"


def check_window_pattern(pattern: str, source: str) -> str:
    """The pattern in nanochat's spelling (upper case); letters other than S and L are an error naming source."""
    if not isinstance(pattern, str) or not pattern or any(c not in WINDOW_LETTERS for c in pattern.upper()):
        raise NanochatCheckpointError(
            f"{source}: window_pattern {pattern!r} has letters other than S and L; nanochat tiles a pattern of S "
            f"(short) and L (long) windows over the layers, e.g. 'SSSL': give one of those"
        )
    return pattern.upper()


def identify(shapes: dict, model_config: dict, *, model_path, meta_path, softcap: Optional[float] = None,
             window_pattern: Optional[str] = None) -> Architecture:
    """The era of a checkpoint from its tensor names/shapes and meta; softcap and window_pattern are the
    user's choices for the constants the files cannot show (refused where the era fixes them otherwise)."""
    names = set(shapes)
    unknown = sorted(n for n in names if not _KNOWN_TENSOR.match(n))
    if unknown:
        origin = ("nanochat's 'engram' experiment, 59e36cc 2026-01-25 .. 74554be 2026-01-28"
                  if any(n.startswith(_ENGRAM_PREFIX) for n in unknown)
                  else f"newer than nanochat {KNOWN_HEAD}, or not nanochat's")
        raise NanochatCheckpointError(
            f"{model_path} has tensors of no known nanochat era ({origin}): {list_names(unknown)}; only the eras "
            f"in README's 'nanochat checkpoints that work' convert"
        )
    lambdas = [n for n in _LAMBDA_TENSORS if n in names]
    value_embeddings = sorted(n for n in names if n.startswith("value_embeds.") or _VE_GATE.match(n))
    smear = [n for n in _SMEAR_TENSORS if n in names]
    meta_pattern = model_config.get("window_pattern")

    if not lambdas and not value_embeddings and not smear:
        if meta_pattern is not None:
            raise NanochatCheckpointError(
                f"{meta_path} and {model_path} disagree: the meta has window_pattern {meta_pattern!r} (recorded from "
                f"fbc1484, 2026-01-11) but the tensors are the October-2025 architecture's (no resid_lambdas, "
                f"x0_lambdas); convert the model and meta files of one step of one run"
            )
        _refuse_flags(OCTOBER_2025, softcap, window_pattern)
        return Architecture(OCTOBER_2025, None, OCTOBER_2025.softcap)
    if not lambdas and (value_embeddings or smear):
        raise NanochatCheckpointError(
            f"{model_path} has {list_names(value_embeddings + smear, 4)} but no resid_lambdas/x0_lambdas: no "
            f"nanochat era has value embeddings or smear without the lambdas (tensors of no known era)"
        )
    if smear and not value_embeddings:
        raise NanochatCheckpointError(
            f"{model_path} has {list_names(smear)} but no value embeddings: no nanochat era has smear without them "
            f"(tensors of no known era)"
        )
    era = _era_of(shapes, value_embeddings, bool(smear), model_path)

    warnings = []
    if meta_pattern is not None:
        pattern = check_window_pattern(meta_pattern, f"{meta_path} model_config")
        if window_pattern is not None and check_window_pattern(window_pattern, "--window-pattern") != pattern:
            raise NanochatCheckpointError(
                f"--window-pattern {window_pattern} contradicts {meta_path}, which records window_pattern "
                f"{meta_pattern!r}; drop the flag (it is only for metas that do not record the pattern)"
            )
    elif window_pattern is not None:
        pattern = check_window_pattern(window_pattern, "--window-pattern")
    elif era is LAMBDAS:
        pattern = None
        warnings.append(
            f"{meta_path} records no window_pattern: an aa530cd checkpoint (2026-01-11, full attention) or a chat_sft "
            f"checkpoint of fbc1484..e85db6b that dropped its base's pattern; converting with full attention, pass "
            f"--window-pattern (e.g. SSSL) if the base run used sliding windows"
        )
    else:
        pattern = DEFAULT_WINDOW_PATTERN
        warnings.append(
            f"{meta_path} records no window_pattern (nanochat's chat_sft dropped it before 8b4849d, 2026-02-01); "
            f"converting with {DEFAULT_WINDOW_PATTERN}, base_train's default since 2026-01-11 (nanochat's own loader "
            f"would assume L); pass --window-pattern if the base run used another"
        )

    if era is LAMBDAS and pattern is not None:  # the same tensors: the windows tell fbc1484
        era = WINDOWS
    if era is VALUE_EMBEDDINGS:  # the same tensors as SOFTCAP_20
        if softcap is None:
            softcap = DEFAULT_SOFTCAP
            warnings.append(
                f"{model_path}: softcap 15 or 20 cannot be told from the tensors (nanochat used 15 from e85db6b "
                f"2026-01-16 and 20 from aba30cb 2026-03-02 to 6ed7d1d 2026-03-09); converting with 15, pass "
                f"--softcap 20 for a run trained from 2026-03-02 to 2026-03-09"
            )
        elif softcap not in SOFTCAPS:
            raise NanochatCheckpointError(
                f"--softcap {softcap:g}: nanochat's value-embedding eras before 6ed7d1d used 15 (e85db6b) or 20 "
                f"(aba30cb); pass one of those"
            )
        era = SOFTCAP_20 if softcap == SOFTCAP_20.softcap else VALUE_EMBEDDINGS
    else:
        _refuse_flags(era, softcap, None)
    return Architecture(era, pattern, era.softcap, warnings)


def _refuse_flags(era: Era, softcap: Optional[float], window_pattern: Optional[str]) -> None:
    if softcap is not None and softcap != era.softcap:
        raise NanochatCheckpointError(
            f"--softcap {softcap:g}: the checkpoint is of the {era} era, whose softcap is {era.softcap:g}; drop the "
            f"flag (it is only for checkpoints of 2026-01-16 .. 2026-03-09, whose tensors do not show it)"
        )
    if window_pattern is not None:
        raise NanochatCheckpointError(
            f"--window-pattern {window_pattern}: the checkpoint is of the {era} era, which has no sliding windows; "
            f"drop the flag"
        )


def _era_of(shapes: dict, value_embeddings: list, smear: bool, model_path) -> Era:
    if not value_embeddings:
        return LAMBDAS
    gates = sorted({shapes[n][-1] for n in value_embeddings if _VE_GATE.match(n) and len(shapes[n]) == 2})
    known = {VALUE_EMBEDDINGS.ve_gate_channels: VALUE_EMBEDDINGS,
             SMEAR.ve_gate_channels: SMEAR if smear else AUTORESEARCH}
    if len(gates) != 1 or gates[0] not in known:
        found = ", ".join(map(str, gates)) or "none"
        raise NanochatCheckpointError(
            f"{model_path} has value embeddings with attn.ve_gate input widths {found}; nanochat's eras have one "
            f"width, 32 (e85db6b, 2026-01-16) or 12 (6ed7d1d, 2026-03-09): tensors of no known era"
        )
    era = known[gates[0]]
    if smear and not era.smear:
        raise NanochatCheckpointError(
            f"{model_path} has smear/backout tensors with {gates[0]}-wide value-embedding gates: no nanochat era "
            f"has both (smear came with 12-wide gates, a825e63): tensors of no known era"
        )
    return era


# ---------------------------------------------------------------------------------------------
# Each era's tensors, and the 2026 model's config.json


def padded_vocab_size(vocab_size: int) -> int:
    return -(-vocab_size // PAD_VOCAB_TO) * PAD_VOCAB_TO


def value_embedding_layers(n_layer: int) -> list[int]:
    """Alternating layers, the last one always included (nanochat's has_ve)."""
    return [i for i in range(n_layer) if i % 2 == (n_layer - 1) % 2]


def window_sizes(arch: Architecture, n_layer: int, sequence_len: int) -> list[Optional[int]]:
    """Per layer, the w of "a query at p sees keys p-w..p": the pattern tiled, the last layer always L."""
    if arch.window_pattern is None:
        return [None] * n_layer
    short = arch.era.short_window(sequence_len)
    sizes = [short if arch.window_pattern[i % len(arch.window_pattern)] == "S" else sequence_len
             for i in range(n_layer)]
    sizes[-1] = sequence_len
    return sizes


def expected_shapes(cfg: dict, arch: Architecture) -> dict[str, tuple[int, ...]]:
    """Every tensor of a checkpoint of this era, torch (out, in) layout (the 2026 eras: padded vocab rows)."""
    era, n, n_layer = arch.era, cfg["n_embd"], cfg["n_layer"]
    vocab = padded_vocab_size(cfg["vocab_size"]) if era.lambdas else cfg["vocab_size"]
    kv = cfg["n_kv_head"] * (n // cfg["n_head"])
    shapes = {"transformer.wte.weight": (vocab, n), "lm_head.weight": (vocab, n)}
    if era.lambdas:
        shapes.update({"resid_lambdas": (n_layer,), "x0_lambdas": (n_layer,)})
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        shapes[p + "attn.c_q.weight"] = (n, n)
        shapes[p + "attn.c_k.weight"] = (kv, n)
        shapes[p + "attn.c_v.weight"] = (kv, n)
        shapes[p + "attn.c_proj.weight"] = (n, n)
        shapes[p + "mlp.c_fc.weight"] = (4 * n, n)
        shapes[p + "mlp.c_proj.weight"] = (n, 4 * n)
    if era.ve_gate_channels:
        for i in value_embedding_layers(n_layer):
            shapes[f"value_embeds.{i}.weight"] = (vocab, kv)
            shapes[f"transformer.h.{i}.attn.ve_gate.weight"] = (cfg["n_kv_head"], era.ve_gate_channels)
    if era.smear:
        shapes.update({"smear_gate.weight": (1, SMEAR_GATE_CHANNELS), "smear_lambda": (1,), "backout_lambda": (1,)})
    return shapes


def model_config(cfg: dict, arch: Architecture) -> dict:
    """config.json of the 2026 model (utils/nanochat/model.py): every constant stated, so loading never guesses."""
    era, n_layer = arch.era, cfg["n_layer"]
    return {
        "model_type": MODEL_TYPE,
        "nanochat_era": era.commit,
        "hidden_size": cfg["n_embd"],
        "num_hidden_layers": n_layer,
        "num_attention_heads": cfg["n_head"],
        "num_key_value_heads": cfg["n_kv_head"],
        "vocab_size": cfg["vocab_size"],
        "padded_vocab_size": padded_vocab_size(cfg["vocab_size"]),
        "max_position_embeddings": cfg["sequence_len"],
        "intermediate_size": 4 * cfg["n_embd"],
        "rope_theta": era.rope_theta,
        "softcap": arch.softcap,
        "qk_scale": era.qk_scale,
        "rms_norm_eps": RMS_NORM_EPS,
        "window_pattern": arch.window_pattern,
        "window_sizes": window_sizes(arch, n_layer, cfg["sequence_len"]),
        "value_embedding_layers": value_embedding_layers(n_layer) if era.ve_gate_channels else [],
        "ve_gate_channels": era.ve_gate_channels,
        "ve_gate_scale": era.ve_gate_scale,
        "smear": era.smear,
        "smear_gate_channels": SMEAR_GATE_CHANNELS if era.smear else 0,
        "backout_layer": n_layer // 2 if era.smear else None,
    }
