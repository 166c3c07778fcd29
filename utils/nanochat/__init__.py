"""nanochat models: their checkpoints, the conversion to MLX folders, the tiktoken tokenizer, the fast decoder.

    checkpoint.py    find and read nanochat's .pt checkpoints (model, meta, tokenizer.pkl)
    convert.py       the October-2025 architecture's checks and the conversion (convert_nanochat.py's CLI)
    folder.py        converted MLX folders: build, save, load
    tokenizer.py     the tiktoken tokenizer and its chat format; hf_tokenizer.py: HF tokenizer files from it
    decoder.py       the fast batched decode step of the rollouts
"""
