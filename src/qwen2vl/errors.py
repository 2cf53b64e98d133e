"""Error families raised by qwen2vl. Imports nothing.

Messages read `<where>: <what is wrong>; <what is allowed / how to fix>` with the real values.
Every family subclasses ValueError (bad input) or RuntimeError (bad state) as well as
Qwen2VLError, so callers written for transformers (`except ValueError`) keep working.
"""


class Qwen2VLError(Exception):
    """Base class of every error qwen2vl raises on purpose."""


class ConfigError(Qwen2VLError, ValueError):
    """A config.json / generation_config.json / constructor value is invalid."""


class CheckpointError(Qwen2VLError, ValueError):
    """A checkpoint folder or hub id cannot be found, read, or does not match the model."""


class InputError(Qwen2VLError, ValueError):
    """Tensors given to the model or to generate() are inconsistent (counts, shapes, ranges)."""


class MediaError(Qwen2VLError, ValueError):
    """An image or video cannot be fetched, decoded or is outside the allowed sizes."""


class ChatTemplateError(Qwen2VLError, ValueError):
    """A conversation cannot be rendered by the chat template."""


class RequestError(Qwen2VLError, ValueError):
    """A request to the server or batch job is malformed."""


class MissingDependencyError(Qwen2VLError, ImportError):
    """An optional extra is needed for this feature (the message names the pip extra)."""
