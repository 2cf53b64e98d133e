"""Shared test helpers (checkpoint builders, tokenizer folder); imported as `support.<name>`."""
