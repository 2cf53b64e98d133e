"""Text and media processing for Qwen2-VL: tokenizer, chat template, image/video processors, processor."""
