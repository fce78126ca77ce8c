"""The embedded model zoo: a synthetic corpus with known circuits and its word-level tokenizer."""
