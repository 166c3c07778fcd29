"""A tiny random-weight Qwen2-VL in Hugging Face format, and its processor, written offline.

transformers' own Qwen2VLForConditionalGeneration writes the weights (a real HF checkpoint, as the hub
holds one); the processor is Qwen2VLProcessor over a byte-level BPE trained here and Qwen2-VL's image
processor sized so that a 56 x 56 image is 4 x 4 patches of 14, merged 2 x 2 into 4 image tokens.
"""

import json
from pathlib import Path

import numpy as np

HIDDEN, LAYERS, HEADS, VOCAB = 32, 2, 2, 320
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|image_pad|>", "<|video_pad|>"]
IMAGE_SIZE = 56  # pixels a side: (56 / 14)^2 = 16 patches, 4 tokens after the 2 x 2 merge
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (30, 60, 220)}


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(["What colour is the square? red green blue. The answer is #### 42"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHAT_TEMPLATE)


def build_tiny_qwen2_vl(folder: Path, seed: int = 0) -> Path:
    """config.json, model.safetensors, tokenizer and processor files of a random tiny Qwen2-VL."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

    folder = Path(folder)
    folder.mkdir(parents=True)
    tokenizer = _tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL}
    config = Qwen2VLConfig(
        text_config={"hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "intermediate_size": 64,
                     "num_attention_heads": HEADS, "num_key_value_heads": HEADS, "vocab_size": VOCAB,
                     "max_position_embeddings": 512, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
                     "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}, "tie_word_embeddings": False,
                     "bos_token_id": None, "eos_token_id": ids["<|im_end|>"]},
        vision_config={"depth": 1, "embed_dim": 32, "hidden_size": HIDDEN, "num_heads": 2, "mlp_ratio": 2,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).to(torch.float32)
    with torch.no_grad():  # larger than the default init, so that greedy answers differ between images
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    model.save_pretrained(folder, safe_serialization=True)
    # The hub's Qwen2-VL repos keep the text model's keys at the top of config.json (transformers 5 nests them
    # under text_config, a layout mlx-vlm 0.7's qwen2_vl does not read): write the hub's layout.
    saved = json.loads((folder / "config.json").read_text())
    text = saved.pop("text_config")
    text.pop("rope_parameters", None)
    saved["vision_config"]["model_type"] = "qwen2_vl"  # as in the hub's files
    flat = {**text, **saved, "model_type": "qwen2_vl", "rope_theta": 10000.0,
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}}
    (folder / "config.json").write_text(json.dumps(flat, indent=2))
    image_processor = Qwen2VLImageProcessorPil(min_pixels=IMAGE_SIZE * IMAGE_SIZE, max_pixels=IMAGE_SIZE * IMAGE_SIZE,
                                            patch_size=14, merge_size=2, temporal_patch_size=2)
    # The files a hub repo's processor has; transformers' Qwen2VLProcessor itself wants torchvision for its
    # video processor, so the parts are saved one by one (mlx-vlm reads them with its own processor class).
    image_processor.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (folder / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen2VLProcessor"}))
    return folder


def write_square(path: Path, colour: str) -> Path:
    """A 56 x 56 PNG filled with one colour."""
    from PIL import Image

    Image.fromarray(np.full((IMAGE_SIZE, IMAGE_SIZE, 3), COLOURS[colour], np.uint8)).save(path)
    return path


def write_colour_dataset(folder: Path, rows_per_colour: int = 2) -> Path:
    """data.jsonl of "what colour is the square?" questions, one PNG per row beside it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "train.jsonl", "w") as f:
        for i in range(rows_per_colour):
            for colour in COLOURS:
                image = write_square(folder / f"{colour}_{i}.png", colour)
                f.write(json.dumps({"question": "What colour is the square?", "answer": colour,
                                    "image": image.name}) + "\n")
    return folder
