"""Builds the offline demo in demo/ (tokenizer, synthetic problems, warm-up); not used at run time."""
