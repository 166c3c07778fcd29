"""nanochat: checkpoints and their conversion, the tiktoken tokenizer, the fast batched decoder."""
