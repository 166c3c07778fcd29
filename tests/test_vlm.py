"""Vision-language models through mlx-vlm on a tiny random Qwen2-VL (tests/fixture_vlm.py): conversion,
generation through the rollout engine against mlx-vlm's own generate, utils/inference.py --image."""

import json

import numpy as np
import pytest

pytest.importorskip("mlx_vlm")

import mlx.core as mx  # noqa: E402
from fixture_vlm import COLOURS, build_tiny_qwen2_vl, write_square  # noqa: E402

from mlx_grpo import convert_model, inference  # noqa: E402
from mlx_grpo.generation.engine import generate_completions  # noqa: E402
from mlx_grpo.generation.sampling import make_rollout_sampler  # noqa: E402
from mlx_grpo.vlm.model import build_vlm_prompt, load_vlm, vlm_tokenizer  # noqa: E402

QUESTION = "What colour is the square?"
GREEDY = ["--temperature", "0", "--max-tokens", "6"]


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    """(HF folder, converted MLX folder, {colour: image path}, loaded policy)."""
    root = tmp_path_factory.mktemp("vlm")
    hf = build_tiny_qwen2_vl(root / "tiny-qwen2-vl")
    out = root / "tiny-qwen2-vl-mlx"
    assert convert_model.main(["--hf-path", str(hf), "--output-dir", str(out)]) == 0  # detected from config.json
    images = {colour: str(write_square(root / f"{colour}.png", colour)) for colour in COLOURS}
    return hf, out, images, load_vlm(out)


def _embeddings_forward(policy, prompt):
    ids = mx.array(prompt)[None]
    vision = dict(prompt.vision)
    features = policy.vlm.get_input_embeddings(ids, vision.pop("pixel_values"), mask=mx.ones(ids.shape), **vision)
    extra = {k: v for k, v in features.to_dict().items() if k != "inputs_embeds" and v is not None}
    return policy.language_model(ids, inputs_embeds=features.inputs_embeds, **extra).logits[0]


def test_conversion_gives_the_hugging_face_models_logits(vlm):
    """The converted folder, through mlx-vlm, computes what transformers computes from the HF folder."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    hf, _, images, policy = vlm
    prompt = build_vlm_prompt(policy, QUESTION, [images["red"]])
    reference = Qwen2VLForConditionalGeneration.from_pretrained(hf, dtype=torch.float32).eval()
    ids = torch.tensor([list(prompt)])
    with torch.no_grad():
        expected = reference(input_ids=ids, pixel_values=torch.tensor(np.array(prompt.vision["pixel_values"])),
                             image_grid_thw=torch.tensor(np.array(prompt.vision["image_grid_thw"])),
                             mm_token_type_ids=(ids == policy.config.image_token_id).long()).logits[0].numpy()
    assert prompt.count(policy.config.image_token_id) == 4  # 56 x 56 pixels: 16 patches merged 2 x 2
    np.testing.assert_allclose(np.array(_embeddings_forward(policy, prompt)), expected, atol=1e-4)


def test_quantized_conversion_keeps_the_vision_tower(vlm, tmp_path, capsys):
    hf, _, images, _ = vlm
    out = tmp_path / "q8"
    assert convert_model.main(["--hf-path", str(hf), "--vlm", "--output-dir", str(out), "-q", "--q-bits", "8",
                               "--q-group-size", "32"]) == 0
    assert "8-bit language model" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 8
    weights = mx.load(str(out / "model.safetensors"))
    assert any(k.startswith("language_model.") and k.endswith(".scales") for k in weights)
    assert not any(k.startswith("vision_tower.") and k.endswith(".scales") for k in weights)
    assert convert_model.main(["--hf-path", str(hf), "--output-dir", str(out)]) == 1  # exists: refused
    assert "already exists" in capsys.readouterr().err


def test_greedy_rollouts_equal_mlx_vlms_generate(vlm):
    """Three image prompts x 2 samples decoded in one engine call = mlx-vlm's generate on each image alone."""
    from mlx_vlm import generate
    from mlx_vlm.prompt_utils import apply_chat_template

    _, _, images, policy = vlm
    tokenizer = vlm_tokenizer(policy)
    prompts = [build_vlm_prompt(policy, QUESTION, [images[c]]) for c in COLOURS]
    completions, _ = generate_completions(policy, prompts, group_size=2, max_new_tokens=8,
                                          sampler=make_rollout_sampler(0.0, 1.0, 0, 0.0),
                                          stop_token_ids=tokenizer.eos_token_ids)
    text = apply_chat_template(policy.processor, policy.config, QUESTION, num_images=1)
    expected = []
    for colour in COLOURS:
        result = generate(policy.vlm, policy.processor, text, image=[images[colour]], max_tokens=8, temperature=0.0)
        expected += [result.token_ids] * 2
    assert [c.tokens for c in completions] == expected
    assert len({tuple(t) for t in expected}) == 3  # the images change the answer: the features reach the model


def test_a_decode_step_continues_the_full_forward(vlm):
    """Prefill of all but the last prompt token, then one decode step = the whole prompt's forward (the
    multimodal positions carried across prefill and decode)."""
    from mlx_grpo.vlm.decode import prefill_prompt

    _, _, images, policy = vlm
    prompt = build_vlm_prompt(policy, QUESTION, [images["blue"]])
    cache, state = prefill_prompt(policy, prompt)
    policy.set_sequence_state(state)
    step = policy.language_model(mx.array(prompt[-1:])[None], cache=cache).logits[0, -1]
    np.testing.assert_allclose(np.array(step), np.array(_embeddings_forward(policy, prompt)[-1]), atol=1e-5)


def test_inference_cli_with_images(vlm, tmp_path, capsys):
    _, out, images, _ = vlm
    args = ["--model", str(out), "--image", images["red"], "--prompt", QUESTION, *GREEDY]
    assert inference.main(args) == 0
    plain = capsys.readouterr().out
    assert inference.main(args + ["--stream"]) == 0
    assert capsys.readouterr().out == plain
    file = tmp_path / "q.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": QUESTION, "image": images["green"]}, {"prompt": QUESTION}]))
    assert inference.main(["--model", str(out), "--image", images["red"], "--prompts-file", str(file),
                           "--output", str(tmp_path / "a.jsonl"), *GREEDY]) == 0
    rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert rows[1]["completion"] == plain.rstrip("\n")  # no image of its own: --image's
    assert rows[0]["completion"] != rows[1]["completion"]
    assert inference.main(["--model", str(out), "--image", str(tmp_path / "none.png"), "--prompt", "hi"]) == 1
    assert "image file not found" in capsys.readouterr().err


def test_chat_keeps_the_image_in_the_first_turn(vlm):
    from mlx_grpo.generation.chat import GenerationOptions
    from mlx_grpo.vlm.chat import VlmChatSession

    _, _, images, policy = vlm
    session = VlmChatSession(policy, vlm_tokenizer(policy), GenerationOptions(max_tokens=4, temperature=0.0),
                             images=[images["red"]])
    first = session.ask(QUESTION)
    second_prompt = session.prompt_tokens("And now?")
    image_id = policy.config.image_token_id
    assert second_prompt.count(image_id) == 4 and "pixel_values" in second_prompt.vision
    assert list(second_prompt[:second_prompt.index(image_id)]) == list(
        build_vlm_prompt(policy, QUESTION, [images["red"]]))[:second_prompt.index(image_id)]
    assert first.finish_reason in ("stop", "length")
