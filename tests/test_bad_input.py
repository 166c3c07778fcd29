"""Bad input, as a user gives it: each case runs a command line as a subprocess and must end with exit code
`code`, one line on stderr matching `expect` as its last line, and no traceback anywhere.

Most cases fail before any model loads (config, data files, model folders, run folders), so they take about
a second each; the cases run a few at a time (a session fixture) and each test reads its own result.
"""

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest
from conftest import REPO, subprocess_env

GOOD_ROW = {"question": "What is 2+3?", "answer": "2+3=5\n#### 5"}
OTHER_ROW = {"question": "What is 1+1?", "answer": "#### 2"}
WORKERS = 3  # subprocesses at once: most of a case is Python starting and importing


@dataclass
class Case:
    id: str
    args: list  # "{tmp}", "{model}" and "{repo}" are filled in
    expect: str  # a regex the last stderr line must match
    setup: Callable | None = None  # setup(tmp, fixtures) writes the case's files (fixtures.folder, fixtures.raw)
    script: str = "mlx-grpo.py"
    code: int = 1
    env: dict = field(default_factory=dict)
    after: Callable | None = None  # after(tmp): further checks once the command ended


# ---- setups -------------------------------------------------------------------------------------

def jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def data_folder(tmp, train=(GOOD_ROW,), test=(OTHER_ROW,)):
    jsonl(tmp / "data" / "train.jsonl", train)
    jsonl(tmp / "data" / "test.jsonl", test)


def write(name, content):
    """A setup writing one file under tmp (bytes or text)."""
    def setup(tmp, model):
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return setup


def bad_train_file(content: bytes, name="train.jsonl"):
    def setup(tmp, model):
        data_folder(tmp)
        (tmp / "data" / "train.jsonl").unlink()
        (tmp / "data" / name).write_bytes(content)
    return setup


def model_copy(edit):
    """A copy of the tiny model in tmp/m, then edit(folder)."""
    def setup(tmp, model):
        data_folder(tmp)
        shutil.copytree(model.folder, tmp / "m")
        edit(tmp / "m")
    return setup


def truncate(name, keep):
    def edit(folder):
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[:keep] if keep >= 0 else data[:len(data) + keep])
    return edit


class Hostile:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def hostile_tokenizer(folder):
    (folder / "tokenizer.pkl").write_bytes(pickle.dumps(Hostile()))


def model_type(folder):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt17"}))


def drop_a_weight(folder):
    """model.safetensors without one tensor: an intact file that does not fit config.json (found when loading)."""
    import mlx.core as mx

    weights = mx.load(str(folder / "model.safetensors"))
    del weights["transformer.h.1.attn.c_v.weight"]
    mx.save_safetensors(str(folder / "model.safetensors"), weights)


def run_with_checkpoint(complete=True, config="{}"):
    """outputs/r with config.resolved.json and one checkpoint step_000001 (without a manifest unless complete)."""
    def setup(tmp, model):
        data_folder(tmp)
        step = tmp / "outputs" / "r" / "checkpoints" / "step_000001"
        step.mkdir(parents=True)
        (tmp / "outputs" / "r" / "config.resolved.json").write_text(config)
        (step / "config.resolved.json").write_text(config)
        if complete:
            (step / "optimizer.safetensors").write_bytes(b"")
            (step / "trainer_state.json").write_text("{}")
            (step / "checkpoint.json").write_text(json.dumps({"format_version": 1, "files": {
                "optimizer.safetensors": 0, "trainer_state.json": 2, "config.resolved.json": len(config)}}))
    return setup


def resolved_config_unchanged(tmp):
    assert (tmp / "outputs" / "r" / "config.resolved.json").read_text() == "{}"


def locked_run(tmp, model):
    """outputs/r locked by another live process (started here, ended by the fixture)."""
    data_folder(tmp)
    (tmp / "outputs" / "r").mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[1]); from mlx_grpo.training.run_lock import lock_run_dir; "
        "lock_run_dir('outputs', 'r'); print('locked', flush=True); time.sleep(120)"), str(REPO / ".shim")],
        cwd=tmp, env=subprocess_env(), stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def raw_checkpoint_as_model(tmp, model):
    data_folder(tmp)
    (tmp / "raw").mkdir()
    (tmp / "raw" / "model_000005.pt").write_bytes(b"x")
    (tmp / "raw" / "meta_000005.json").write_text("{}")


TEXT_REWARD = "def as_text(completions):\n    return ['0.5' for _ in completions]\n"


def hostile_pt(tmp, model):
    """A raw nanochat folder whose model_000005.pt would run a command when unpickled without weights_only."""
    import torch

    shutil.copytree(model.raw, tmp / "raw")
    torch.save({"w": Hostile()}, tmp / "raw" / "model_000005.pt")


def not_installed(tmp, model):
    """A sitecustomize that hides mlx_grpo, as in a checkout never installed."""
    (tmp / "site").mkdir()
    (tmp / "site" / "sitecustomize.py").write_text(
        "import sys\n"
        "for name in [m for m in sys.modules if m.split('.')[0] == 'mlx_grpo']:\n"
        "    del sys.modules[name]\n"
        "class Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'mlx_grpo':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Hide())\n")


# The data the light cases train on: their failure comes before it is read, or it is the failure.
DATA = ["--set", "dataset_path=data", "--set", "output_dir=outputs"]
TINY = ["--set", "model_name={model}", *DATA]
SMOKE = ["--config", "{repo}/configs/smoke.toml", *TINY]
FAST_RUN = [*SMOKE, "--set", "max_train_samples=2", "--set", "eval_samples=1", "--set", "run_name=r",
            "--set", "max_prompt_length=4096"]

CASES = [
    # --- config: keys, values, files --------------------------------------------------------------
    Case("unknown-key", ["--set", "foo=1"], r"unknown config key 'foo' \(from --set\)"),
    Case("typo-key", ["--set", "learnin_rate=1e-5"], r"did you mean learning_rate"),
    Case("int-not-a-number", ["--set", "batch_size=two"], r"--set batch_size='two': expected int"),
    Case("float-for-int", ["--set", "batch_size=2.0"], r"--set batch_size='2.0': expected int"),
    Case("bool-word", ["--set", "shuffle=maybe"], r"expected bool \(true/false"),
    Case("set-without-equals", ["--set", "learning_rate"], r"expected KEY=VALUE"),
    Case("group-of-one", ["--set", "num_generations=1"], r"num_generations must be >= 2, got 1"),
    Case("unknown-loss", ["--set", "loss_type=ppo"], r"loss_type must be one of grpo\|bnpo\|dr_grpo\|dapo"),
    Case("nan-learning-rate", ["--set", "learning_rate=nan"], r"learning_rate must be a finite number"),
    Case("warmup-ratio", ["--set", "warmup_ratio=1.5"], r"warmup_ratio must be in \[0, 1\), got 1.5"),
    Case("run-name-path", ["--set", "run_name=a/b"], r"run_name must be a plain folder name"),
    Case("weights-count", ["--set", "reward_funcs=gsm8k,int", "--set", "reward_weights=1"],
         r"reward_weights has 1 entries but reward_funcs has 2"),
    Case("calculator-xml", ["--set", "use_calculator=true", "--set", "prompt_format=xml"],
         r"use_calculator = true needs the nanochat prompt format"),
    Case("qlora-full", ["--set", "base_quant_bits=4"], r"base_quant_bits > 0 \(QLoRA\).*train_type = \"lora\""),
    Case("adaptive-entropy-bounds", ["--set", "use_adaptive_entropy=true", "--set", "entropy_coef_min=0.5",
                                     "--set", "entropy_coef_max=0.1"],
         r"entropy_coef_min \(0.5\) must be <= entropy_coef_max \(0.1\)$"),
    Case("adaptive-entropy-delta", ["--set", "use_adaptive_entropy=true", "--set", "entropy_coef_delta=-0.01"],
         r"entropy_coef_delta must be >= 0 .*got -0.01$"),
    Case("report-to-unknown", ["--set", "report_to=mlflow"], r"report_to entries must be among tensorboard\|wandb"),
    Case("report-to-not-installed", [*TINY, "--set", "report_to=tensorboard"],
         r"report_to includes \"tensorboard\" but it is not installed: pip install tensorboard",
         setup=lambda tmp, model: data_folder(tmp)),
    Case("config-missing", ["--config", "nope.toml"], r"config file not found: 'nope.toml' \(from --config\)"),
    Case("env-config-missing", [], r"config file not found: 'nope.toml' \(from \$MLX_GRPO_CONFIG\)",
         env={"MLX_GRPO_CONFIG": "nope.toml"}),
    Case("env-config-bad-key", [], r"unknown config key 'foo' \(in .*bad.toml\)",
         setup=write("bad.toml", "foo = 1\n"), env={"MLX_GRPO_CONFIG": "bad.toml"}),
    Case("toml-syntax", ["--config", "bad.toml"], r"bad.toml: invalid TOML: .*line 2",
         setup=write("bad.toml", "seed = 1\nlearning_rate = = 2\n")),
    Case("toml-not-utf8", ["--config", "bad.toml"], r"bad.toml: not UTF-8 \(byte 0xff",
         setup=write("bad.toml", b"seed = 1\n# \xff\xfe\n")),
    Case("toml-bom-is-read", ["--config", "bom.toml"], r"unknown config key 'foo' \(in bom.toml\)",
         setup=write("bom.toml", b"\xef\xbb\xbfseed = 1\nfoo = 2\n")),
    Case("toml-wrong-type", ["--config", "bad.toml"], r"config key 'batch_size' \(in bad.toml\) expects int, got str",
         setup=write("bad.toml", 'batch_size = "2"\n')),
    Case("toml-alias-twice", ["--config", "bad.toml"], r"'clip_eps' is an alias of 'epsilon'",
         setup=write("bad.toml", "epsilon = 0.2\nclip_eps = 0.3\n")),
    Case("toml-table-value", ["--config", "bad.toml"], r"'mlx_grpo' must be a table",
         setup=write("bad.toml", "mlx_grpo = 3\n")),
    Case("accept-changes-alone", ["--accept-changes"], r"error: --accept-changes goes with --resume", code=2),

    # --- data ---------------------------------------------------------------------------------------
    Case("data-missing", ["--set", "dataset_path=nope.jsonl"], r"dataset_path 'nope.jsonl' does not exist.*data/gsm8k"),
    Case("data-folder-without-split", ["--set", "dataset_path=."], r"is a folder without test.jsonl or test.parquet"),
    Case("data-csv", ["--set", "dataset_path=d.csv"], r"must be a .jsonl, .json or .parquet file",
         setup=write("d.csv", "question,answer\n")),
    Case("data-empty", DATA, r"train.jsonl: no rows: the file is empty", setup=bad_train_file(b"")),
    Case("data-broken-line", DATA, r"train.jsonl: line 2: invalid JSON \(Expecting property name",
         setup=bad_train_file(json.dumps(GOOD_ROW).encode() + b"\n{broken\n")),
    Case("data-not-utf8", DATA, r"train.jsonl: line 1 is not UTF-8 \(byte 0xff",
         setup=bad_train_file(b'{"question": "\xff", "answer": "#### 1"}\n')),
    Case("data-bad-parquet", DATA, r"could not read .*train.parquet as parquet",
         setup=bad_train_file(b"PAR1 not really", name="train.parquet")),
    Case("data-missing-field", DATA, r"train.jsonl: line 1: missing field\(s\) \['answer'\]",
         setup=bad_train_file(b'{"question": "q", "solution": "#### 1"}\n')),
    Case("data-no-final-answer", DATA, r"train.jsonl: line 1: 'answer' has no '#### <number>'",
         setup=bad_train_file(b'{"question": "q", "answer": "five"}\n')),
    Case("data-row-not-object", DATA, r"train.jsonl: line 1: expected an object",
         setup=bad_train_file(b'["q", "#### 1"]\n')),
    Case("data-question-not-string", DATA, r"train.jsonl: line 1: 'question' and 'answer' must be strings",
         setup=bad_train_file(b'{"question": 7, "answer": "#### 1"}\n')),
    Case("data-one-file-both-splits", ["--set", "dataset_path={repo}/data/gsm8k/test.jsonl"],
         r"gives train_split 'train' and eval_split 'test' the same file .*dataset_path = \"data/gsm8k\""),
    Case("data-same-split-in-folder", [*DATA, "--set", "train_split=test"], r"the same file .*test.jsonl",
         setup=lambda tmp, model: data_folder(tmp)),
    Case("data-same-rows", DATA, r"all 1 eval questions are training questions too",
         setup=lambda tmp, model: data_folder(tmp, train=[GOOD_ROW, OTHER_ROW], test=[OTHER_ROW])),
    Case("hub-same-split", ["--set", "dataset_path=", "--set", "eval_split=train"],
         r"train_split and eval_split are both 'train' of openai/gsm8k"),

    # --- model folders ----------------------------------------------------------------------------
    Case("model-not-converted", ["--config", "{repo}/configs/nanochat_d32.toml", *DATA],
         r"models/nanochat-d32-mlx does not exist: convert a nanochat checkpoint there: python convert_nanochat.py",
         setup=lambda tmp, model: data_folder(tmp)),
    Case("model-path-missing", [*DATA, "--set", "model_name=./nowhere"], r"'./nowhere'.* does not exist: fix the path",
         setup=lambda tmp, model: data_folder(tmp)),
    Case("model-is-a-file", [*DATA, "--set", "model_name=data/train.jsonl"], r"is a file, not a model folder",
         setup=lambda tmp, model: data_folder(tmp)),
    Case("model-no-config", [*DATA, "--set", "model_name=m"], r"m has no config.json, so it is not a model folder",
         setup=model_copy(lambda f: (f / "config.json").unlink())),
    Case("model-config-not-json", [*DATA, "--set", "model_name=m"], r"config.json is not valid JSON",
         setup=model_copy(lambda f: (f / "config.json").write_text("{model_type: nanochat"))),
    Case("model-no-weights", [*DATA, "--set", "model_name=m"], r"has no \*.safetensors weights",
         setup=model_copy(lambda f: (f / "model.safetensors").unlink())),
    Case("model-truncated-weights", [*DATA, "--set", "model_name=m"], r"model.safetensors is truncated: \d+ bytes",
         setup=model_copy(truncate("model.safetensors", -1000))),
    Case("model-garbage-weights", [*DATA, "--set", "model_name=m"], r"model.safetensors is not a safetensors file",
         setup=model_copy(lambda f: (f / "model.safetensors").write_bytes(b"\x00garbage" * 100))),
    Case("model-empty-weights", [*DATA, "--set", "model_name=m"], r"not a safetensors file \(0 bytes\)",
         setup=model_copy(lambda f: (f / "model.safetensors").write_bytes(b""))),
    Case("model-hostile-tokenizer", [*DATA, "--set", "model_name=m"],
         r"refusing to unpickle global 'posix.system' from m/tokenizer.pkl",
         setup=model_copy(hostile_tokenizer), after=lambda tmp: not (tmp / "pwned.txt").exists() or pytest.fail()),
    Case("model-adapters", [*DATA, "--set", "model_name=m"], r"holds LoRA adapters, not a model",
         setup=model_copy(lambda f: (f / "adapter_config.json").write_text("{}"))),
    Case("model-raw-checkpoint", [*DATA, "--set", "model_name=raw"],
         r"raw is a raw nanochat checkpoint: convert it first", setup=raw_checkpoint_as_model),
    Case("model-missing-weight", [*SMOKE, "--set", "model_name=m"], r"Missing 1 parameters: transformer\.h\.1",
         setup=model_copy(drop_a_weight)),
    Case("model-unknown-type", [*DATA, "--set", "model_name=m"],
         r"m holds tokenizer.pkl but config.json says model_type 'gpt17'",
         setup=model_copy(model_type)),

    # --- run folders and --resume ---------------------------------------------------------------
    Case("run-exists", [*TINY, "--set", "run_name=r"], r"outputs/r already holds a run: pass --resume",
         setup=lambda tmp, model: (data_folder(tmp), jsonl(tmp / "outputs" / "r" / "metrics.jsonl", [{}]))),
    Case("run-locked", [*TINY, "--set", "run_name=r"],
         r"outputs/r is being written by another run \(pid \d+, started .*\): wait for it",
         setup=locked_run),
    Case("resume-nothing", [*TINY, "--resume"], r"--resume: no run with a complete checkpoint in outputs",
         setup=lambda tmp, model: data_folder(tmp)),
    Case("resume-bad-path", [*TINY, "--resume", "outputs/typo"], r"--resume outputs/typo: no such folder",
         setup=run_with_checkpoint(), after=resolved_config_unchanged),
    Case("resume-incomplete", [*TINY, "--set", "run_name=r", "--resume"],
         r"--resume: no complete checkpoint under outputs/r/checkpoints",
         setup=run_with_checkpoint(complete=False), after=resolved_config_unchanged),
    Case("resume-not-a-checkpoint", [*TINY, "--set", "run_name=r", "--resume", "data"],
         r"data is not a complete checkpoint: no checkpoint.json", setup=run_with_checkpoint(),
         after=resolved_config_unchanged),
    Case("resume-run-folder-bad-config", [*TINY, "--resume", "outputs/r"],
         r"unknown config key 'bogus' \(in outputs/r/checkpoints/step_000001/config.resolved.json\)",
         setup=run_with_checkpoint(config='{"bogus": 1}')),

    # --- the environment, and a reward function's return value at run time (this one loads the model) ---
    Case("kernel-switch", TINY, r"MLX_GRPO_CUDA_KERNELS='maybe' is not a switch",
         setup=lambda tmp, model: data_folder(tmp), env={"MLX_GRPO_CUDA_KERNELS": "maybe"}),
    Case("reward-returns-str", [*FAST_RUN, "--set", "reward_funcs=as_text", "--set", "reward_file=r.py"],
         r"reward function 'as_text' returned str '0.5' at index 0: return one int or float",
         setup=lambda tmp, model: (data_folder(tmp), write("r.py", TEXT_REWARD)(tmp, model))),

    # --- the other command-line tools, and an uninstalled checkout --------------------------------
    Case("convert-hostile-pt", ["raw", "--output", "out"],
         r"model_000005.pt is refused: .*loading it would run code \(.*GLOBAL posix.system",
         script="convert_nanochat.py", setup=hostile_pt, after=lambda tmp: not (tmp / "pwned.txt").exists()
         or pytest.fail()),
    Case("convert-missing-folder", ["nowhere", "--output", "out"], r"nowhere", script="convert_nanochat.py"),
    Case("inference-missing-model", ["--model", "nowhere", "--prompt", "hi"], r"nowhere",
         script="utils/inference.py"),
    Case("not-installed", [], r"the package mlx_grpo is not installed in this Python: run pip install -e \.",
         setup=not_installed, env={"PYTHONPATH": "site"}),
    Case("convert-not-installed", [], r"the package mlx_grpo is not installed in this Python: run pip install -e \.",
         script="convert_nanochat.py", setup=not_installed, env={"PYTHONPATH": "site"}),
    Case("convert-model-not-installed", [], r"the package mlx_grpo is not installed in this Python: run pip install",
         script="utils/convert_model.py", setup=not_installed, env={"PYTHONPATH": "site"}),
    Case("plot-not-installed", [], r"the package mlx_grpo is not installed in this Python: run pip install -e \.",
         script="utils/plot.py", setup=not_installed, env={"PYTHONPATH": "site"}),
    Case("fuse-not-installed", [], r"the package mlx_grpo is not installed in this Python: run pip install -e \.",
         script="utils/fuse.py", setup=not_installed, env={"PYTHONPATH": "site"}),
    Case("inference-not-installed", [], r"the package mlx_grpo is not installed in this Python: run pip install -e \.",
         script="utils/inference.py", setup=not_installed, env={"PYTHONPATH": "site"}),
]


# ---- running them -------------------------------------------------------------------------------

@dataclass
class Result:
    code: int
    stdout: str
    stderr: str
    tmp: Path


def run_case(case: Case, tmp: Path, model: SimpleNamespace) -> Result:
    tmp.mkdir(parents=True)
    holder = case.setup(tmp, model) if case.setup else None
    env = subprocess_env(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", **case.env)
    env.pop("MLX_GRPO_CONFIG", None) if "MLX_GRPO_CONFIG" not in case.env else None
    args = [a.format(tmp=tmp, model=model.folder, repo=REPO) for a in case.args]
    try:
        proc = subprocess.run([sys.executable, str(REPO / case.script), *args], cwd=tmp, env=env,
                              capture_output=True, text=True, timeout=300)
    finally:
        if isinstance(holder, subprocess.Popen):
            holder.kill()
            holder.wait()
    return Result(proc.returncode, proc.stdout, proc.stderr, tmp)


@pytest.fixture(scope="module")
def results(request, tiny_model_dir, tiny_nanochat_ckpt_dir, tmp_path_factory):
    """The result of every selected case (-k picks some), run WORKERS at a time."""
    selected = {item.callspec.params["case"].id for item in request.session.items
                if isinstance(getattr(item, "callspec", None) and item.callspec.params.get("case"), Case)}
    root = tmp_path_factory.mktemp("bad_input")
    fixtures = SimpleNamespace(folder=tiny_model_dir, raw=tiny_nanochat_ckpt_dir)
    with ThreadPoolExecutor(WORKERS) as pool:
        futures = {case.id: pool.submit(run_case, case, root / case.id, fixtures)
                   for case in CASES if case.id in selected}
        return {name: future.result() for name, future in futures.items()}


def test_the_cases_are_many_and_named_once():
    assert len(CASES) >= 50
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_one_line(case, results):
    result = results[case.id]
    shown = result.stdout + result.stderr
    assert "Traceback" not in shown, shown
    lines = result.stderr.strip().splitlines()
    assert lines, f"nothing on stderr (exit code {result.code}); stdout:\n{result.stdout}"
    assert re.search(case.expect, lines[-1]), f"last stderr line: {lines[-1]!r}\nstderr:\n{result.stderr}"
    assert sum(line.startswith("error") or ": error:" in line for line in lines) == 1, result.stderr
    assert result.code == case.code, result.stderr
    if case.after:
        case.after(result.tmp)
