"""qwen2vl: an independent PyTorch implementation of Qwen2-VL.

Re-exports the transformers-compatible public names, so that code written for
`transformers` runs with only the import line changed. Names are resolved lazily
(PEP 562) so `import qwen2vl` stays cheap and never imports torch-heavy modules
that the caller does not use.
"""

from importlib import import_module

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    # errors
    "Qwen2VLError": "qwen2vl.errors",
    "ConfigError": "qwen2vl.errors",
    "CheckpointError": "qwen2vl.errors",
    "InputError": "qwen2vl.errors",
    "MediaError": "qwen2vl.errors",
    "ChatTemplateError": "qwen2vl.errors",
    # configuration
    "Qwen2VLConfig": "qwen2vl.config",
    "Qwen2VLTextConfig": "qwen2vl.config",
    "Qwen2VLVisionConfig": "qwen2vl.config",
    "GenerationConfig": "qwen2vl.config",
    # model
    "Qwen2VLTextModel": "qwen2vl.model.text",
    "Qwen2VLModel": "qwen2vl.model.qwen2vl",
    "Qwen2VLForConditionalGeneration": "qwen2vl.model.qwen2vl",
    "Qwen2VisionTransformerPretrainedModel": "qwen2vl.model.vision",
    # processing
    "Qwen2Tokenizer": "qwen2vl.processing.tokenizer",
    "AutoTokenizer": "qwen2vl.processing.tokenizer",
    "Qwen2VLImageProcessor": "qwen2vl.processing.image",
    "Qwen2VLImageProcessorPil": "qwen2vl.processing.image",
    "Qwen2VLVideoProcessor": "qwen2vl.processing.video",
    "Qwen2VLProcessor": "qwen2vl.processing.processor",
    "AutoProcessor": "qwen2vl.processing.processor",
    "BatchFeature": "qwen2vl.processing.processor",
    # generation
    "TextIteratorStreamer": "qwen2vl.generation.streaming",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'qwen2vl' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value  # cache: the next lookup skips __getattr__
    return value


def __dir__() -> list[str]:
    return __all__
