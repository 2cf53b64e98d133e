"""The Qwen2-VL network in plain torch: attention, rope, vision, text, cache, qwen2vl.

Imports config and errors only (never processing/generation/engine); submodules are imported directly.
"""
