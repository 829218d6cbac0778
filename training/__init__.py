"""Training and evaluation of the default model: synthetic edits, the corpus, the tokenizer trainer and the
checkpoint writer. Nothing a role runs imports this package."""
