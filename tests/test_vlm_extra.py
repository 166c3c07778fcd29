"""Vision-language paths without the vlm extra: each says in one line how to install mlx-vlm."""

import json
import sys

import pytest

from mlx_grpo import convert_model, inference
from mlx_grpo.vlm import INSTALL_HINT, VlmError, is_vlm_config, is_vlm_source, require_mlx_vlm


@pytest.fixture
def no_mlx_vlm(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlx_vlm", None)  # import mlx_vlm now raises ImportError


@pytest.fixture
def vlm_folder(tmp_path):
    folder = tmp_path / "tiny-vl"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2_vl", "vision_config": {"depth": 1}}))
    return folder


def test_detection_reads_the_config(vlm_folder, tmp_path):
    assert is_vlm_config({"vision_config": {}}) and not is_vlm_config({"model_type": "llama"})
    assert is_vlm_source(vlm_folder)
    assert not is_vlm_source(tmp_path / "missing") and not is_vlm_source("no-such-org/no-such-model")


def test_every_vlm_path_names_the_install(no_mlx_vlm, vlm_folder, tmp_path, capsys):
    with pytest.raises(VlmError, match="pip install"):
        require_mlx_vlm()
    assert convert_model.main(["--hf-path", str(vlm_folder), "--output-dir", str(tmp_path / "out")]) == 1
    assert convert_model.main(["--hf-path", "org/model", "--vlm", "--output-dir", str(tmp_path / "o")]) == 1
    assert inference.main(["--model", str(vlm_folder), "--prompt", "hi"]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line]
    assert errors == [f"error: vision-language models need mlx-vlm, which is not installed: {INSTALL_HINT}"] * 3
    assert not (tmp_path / "out").exists()
