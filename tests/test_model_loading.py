"""mlx_grpo.models: nanochat folders load strictly with their tokenizer; the rest goes to mlx_lm.load."""

import json
import shutil

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from huggingface_hub.errors import LocalEntryNotFoundError
from mlx_lm.tokenizer_utils import TokenizerWrapper

from mlx_grpo.models import ModelLoadError, load_model, save_model_folder
from mlx_grpo.nanochat.checkpoint import NanochatCheckpointError
from mlx_grpo.nanochat.folder import read_nanochat_meta, save_nanochat_folder
from mlx_grpo.nanochat.tokenizer import TiktokenTokenizerWrapper, nanochat_tokenizer

IDS = mx.array([[1, 5, 9, 200, 300, 17]])


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, out)
    return out


def test_nanochat_folder_loads_with_wrapped_tokenizer(tiny_model_dir):
    model, tokenizer, config = load_model(tiny_model_dir, return_config=True)
    assert config["model_type"] == "nanochat"
    assert type(model).__module__ == "mlx_lm.models.nanochat"
    assert isinstance(tokenizer, TokenizerWrapper)
    assert isinstance(nanochat_tokenizer(tokenizer), TiktokenTokenizerWrapper)
    assert model(IDS).shape == (1, 6, 512)


def test_other_paths_go_through_mlx_lm_load(tmp_path, monkeypatch):
    calls = []

    def fake_load(path, **kwargs):
        calls.append((path, kwargs))
        return "model", "tokenizer", {"model_type": "llama"}

    monkeypatch.setattr(mlx_lm, "load", fake_load)
    assert load_model("mlx-community/Qwen2.5-0.5B-Instruct-4bit") == ("model", "tokenizer")
    (tmp_path / "config.json").write_text("{}")  # an mlx-lm folder: no tokenizer.pkl
    assert load_model(tmp_path, return_config=True) == ("model", "tokenizer", {"model_type": "llama"})
    assert [c[0] for c in calls] == ["mlx-community/Qwen2.5-0.5B-Instruct-4bit", str(tmp_path)]


def test_hub_failure_is_one_clear_line(monkeypatch):
    def offline(path, **kwargs):
        raise LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder\nfor the specified revision")

    monkeypatch.setattr(mlx_lm, "load", offline)
    with pytest.raises(ModelLoadError) as e:
        load_model("someone/some-model")
    message = str(e.value)
    assert "\n" not in message
    assert "someone/some-model" in message and "Hugging Face cache" in message


def _rewrite_weights(folder, edit):
    weights = mx.load(str(folder / "model.safetensors"))
    edit(weights)
    mx.save_safetensors(str(folder / "model.safetensors"), weights)


def test_missing_weight_is_an_error_naming_it(model_copy):
    _rewrite_weights(model_copy, lambda w: w.pop("transformer.h.1.attn.c_v.weight"))
    with pytest.raises(NanochatCheckpointError, match=r"Missing 1 parameters: transformer\.h\.1\.attn\.c_v\.weight"):
        load_model(model_copy)


def test_extra_weight_is_an_error_naming_it(model_copy):
    _rewrite_weights(model_copy, lambda w: w.update({"transformer.h.0.attn.c_q.bias": mx.zeros((64,))}))
    with pytest.raises(NanochatCheckpointError, match=r"transformer\.h\.0\.attn\.c_q\.bias"):
        load_model(model_copy)


def test_raw_checkpoint_folder_says_convert_first(tiny_nanochat_ckpt_dir):
    with pytest.raises(NanochatCheckpointError, match="convert it first: python convert_nanochat.py"):
        load_model(tiny_nanochat_ckpt_dir)


def test_wrong_model_type_is_refused(model_copy):
    config = json.loads((model_copy / "config.json").read_text())
    (model_copy / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(NanochatCheckpointError, match="model_type 'llama'"):
        load_model(model_copy)


def test_save_nanochat_folder_round_trip(tiny_model_dir, tmp_path):
    model, _, config = load_model(tiny_model_dir, return_config=True)
    out = tmp_path / "saved"
    meta = {**read_nanochat_meta(tiny_model_dir), "training": {"step": 3}}
    save_nanochat_folder(out, model, config, tiny_model_dir / "tokenizer.pkl", extra_meta=meta)
    reloaded, tokenizer = load_model(out)
    assert np.array_equal(np.array(reloaded(IDS)), np.array(model(IDS)))
    assert read_nanochat_meta(out)["training"] == {"step": 3}
    assert read_nanochat_meta(out)["conversion"]["step"] == 5
    # Saving again into the same folder (a training checkpoint overwritten) keeps it loadable.
    save_nanochat_folder(out, reloaded, config, out / "tokenizer.pkl")
    assert np.array_equal(np.array(load_model(out)[0](IDS)), np.array(model(IDS)))


def test_save_refuses_a_model_its_config_does_not_describe(tiny_model_dir, tmp_path):
    model, _, config = load_model(tiny_model_dir, return_config=True)
    with pytest.raises(NanochatCheckpointError, match="lacks parameters"):
        save_nanochat_folder(tmp_path / "bad", model, {**config, "num_hidden_layers": 3}, tiny_model_dir / "tokenizer.pkl")
    assert not (tmp_path / "bad").exists()


def test_mlx_lm_folder_loads_and_saves_back(tiny_mlx_lm_dir, tmp_path):
    model, tokenizer = load_model(tiny_mlx_lm_dir)
    assert nanochat_tokenizer(tokenizer) is None
    ids = mx.array([tokenizer.encode("the cat sat on the mat")])
    out = save_model_folder(tmp_path / "saved", model, tokenizer, tiny_mlx_lm_dir)
    reloaded, tokenizer2 = load_model(out)
    assert np.array_equal(np.array(reloaded(ids)), np.array(model(ids)))
    assert tokenizer2.encode("how many cats") == tokenizer.encode("how many cats")


def test_save_model_folder_nanochat_keeps_provenance(tiny_model_dir, tmp_path):
    model, tokenizer = load_model(tiny_model_dir)
    out = save_model_folder(tmp_path / "step_000001", model, tokenizer, tiny_model_dir)
    assert np.array_equal(np.array(load_model(out)[0](IDS)), np.array(model(IDS)))
    meta = read_nanochat_meta(out)
    assert meta["parent"] == str(tiny_model_dir) and meta["conversion"]["step"] == 5
