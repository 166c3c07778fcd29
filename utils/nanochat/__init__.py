"""nanochat models: their checkpoints, the conversion to MLX folders, the tiktoken tokenizer, the fast decoder.

    checkpoint.py    find and read nanochat's .pt checkpoints (model, meta, tokenizer.pkl)
    eras.py          which architecture era a checkpoint is, each era's constants
    convert.py       the checks of the files and the conversion (convert_nanochat.py's CLI)
    model.py         the 2026 architecture as an mlx-lm model (model_type nanochat_2026)
    mlx_lm_hook.py   lets plain mlx_lm.load find that model type (installed as a .pth by setup.py)
    folder.py        converted MLX folders: build, save, load
    tokenizer.py     the tiktoken tokenizer and its chat format; hf_tokenizer.py: HF tokenizer files from it
    decoder.py       the fast batched decode step of the rollouts
"""
