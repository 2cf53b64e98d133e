"""transformers-compatible generate() and a thread-free stream_generate(): prefill once, then decode.

One StaticCache per call sized prompt + max_new_tokens; per-row positions (last assigned + 1), per-row
stop state, and rows that finish are dropped from the running batch (the cache is compacted in place).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

import torch

from qwen2vl.config import GENERATION_DEFAULTS, GenerationConfig
from qwen2vl.errors import ConfigError, InputError
from qwen2vl.generation import sampling
from qwen2vl.generation.stopping import StopStringMatcher, eos_hit, new_token_budget
from qwen2vl.generation.streaming import IncrementalDetokenizer
from qwen2vl.model.cache import StaticCache

logger = logging.getLogger(__name__)

_FIELDS = frozenset(f.name for f in fields(GenerationConfig)) - {"extra"}


@dataclass
class GenerateOutput:
    """What generate returns with return_dict_in_generate=True (transformers' GenerateDecoderOnlyOutput)."""

    sequences: torch.Tensor  # (B * num_return_sequences, prompt_len + steps)
    scores: tuple[torch.Tensor, ...] | None = None  # per step (B, V) processed fp32 scores
    logits: tuple[torch.Tensor, ...] | None = None  # per step (B, V) raw fp32 logits

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)


@dataclass
class Step:
    """One decode step of the whole (original) batch: tokens (B,) with pad in finished rows."""

    tokens: torch.Tensor
    finished: torch.Tensor  # (B,) bool, rows that are done after this step
    scores: torch.Tensor | None = None
    logits: torch.Tensor | None = None


def resolve_generation_config(model: Any, generation_config: GenerationConfig | None,
                              kwargs: dict[str, Any]) -> tuple[GenerationConfig, dict[str, Any], bool]:
    """Merge: generate kwargs > generation_config= > model.generation_config > GENERATION_DEFAULTS.

    Returns (config, the kwargs that are not generation fields, has_default_max_length).
    """
    base = getattr(model, "generation_config", None)
    if base is None:  # no generation_config.json: eos/bos/pad come from config.json (as transformers)
        base = GenerationConfig.from_model_config(model.config)
    if generation_config is not None and not isinstance(generation_config, GenerationConfig):
        if not hasattr(generation_config, "to_dict"):
            raise InputError(f"generate: generation_config is a {type(generation_config).__name__}; pass a "
                             "qwen2vl GenerationConfig (or an object with to_dict(), e.g. transformers')")
        generation_config = GenerationConfig.from_dict(
            {k: v for k, v in generation_config.to_dict().items() if k in _FIELDS and v is not None})
    config = copy.deepcopy(generation_config) if generation_config is not None else GenerationConfig()
    config.update(defaults_only=True, **{k: v for k, v in base.to_dict().items() if k in _FIELDS})
    has_default_max_length = kwargs.get("max_length") is None and config.max_length is None
    config.update(defaults_only=True, **GENERATION_DEFAULTS)
    rest = config.update(**{k: v for k, v in kwargs.items() if k in _FIELDS})
    assert not rest
    return config, {k: v for k, v in kwargs.items() if k not in _FIELDS}, has_default_max_length


# Keyword arguments generate accepts besides the GenerationConfig fields (the processor's outputs).
_MODEL_INPUTS = ("input_ids", "attention_mask", "inputs_embeds", "pixel_values", "pixel_values_videos",
                 "image_grid_thw", "video_grid_thw", "mm_token_type_ids")
_IGNORED = ("rope_deltas", "logits_to_keep", "output_attentions", "output_hidden_states", "token_type_ids",
            "synced_gpus")
# transformers generate() arguments this loop does not implement (a clear error beats silently ignoring them)
_UNSUPPORTED = ("logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "assistant_model",
                "negative_prompt_ids", "custom_generate", "num_beam_groups", "typical_p", "no_repeat_ngram_size",
                "bad_words_ids", "suppress_tokens", "max_time", "top_h", "epsilon_cutoff", "eta_cutoff")


@dataclass
class PreparedInputs:
    """The prompt batch, on the model's device, expanded for num_return_sequences."""

    model_inputs: dict[str, torch.Tensor]  # what the prefill forward gets
    prompt_ids: torch.Tensor  # (B, L) ids returned in front of the new ones ((B, 0) with inputs_embeds only)
    input_ids: torch.Tensor | None
    attention_mask: torch.Tensor  # (B, L), 1 = real token
    position_ids: torch.Tensor  # (3, B, L) M-RoPE ids of the prompt
    rope_deltas: torch.Tensor  # (B, 1)

    @property
    def batch_size(self) -> int:
        return self.attention_mask.shape[0]

    @property
    def prompt_len(self) -> int:
        return self.attention_mask.shape[1]

    @property
    def device(self) -> torch.device:
        return self.attention_mask.device


def _default_attention_mask(input_ids: torch.Tensor, config: GenerationConfig) -> torch.Tensor:
    """transformers' rule: mask the pad id only when it occurs and is not also an eos id, else all ones."""
    pad, eos = config.pad_token_id, config.eos_token_ids or []
    if pad is None or pad in eos or not bool((input_ids == pad).any()):
        return torch.ones_like(input_ids)
    return (input_ids != pad).long()


def _expand_media(ids: torch.Tensor, pixels: torch.Tensor, grids: torch.Tensor, token_id: int, merge: int,
                  n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Repeat each row's images (pixel rows and grids, in flattened batch order) n times, row by row."""
    tokens_per_item = (grids.prod(-1) // merge ** 2).tolist()
    patches_per_item = grids.prod(-1).tolist()
    starts = [0]
    for count in patches_per_item:
        starts.append(starts[-1] + count)
    item, pix_parts, grid_parts = 0, [], []
    for row_tokens in (ids == token_id).sum(-1).tolist():
        first = item
        while row_tokens > 0 and item < len(tokens_per_item):
            row_tokens -= tokens_per_item[item]
            item += 1
        for _ in range(n):
            pix_parts.append(pixels[starts[first]:starts[item]])
            grid_parts.append(grids[first:item])
    return torch.cat(pix_parts), torch.cat(grid_parts)


def _expand(inputs: dict[str, torch.Tensor], n: int, model: Any) -> dict[str, torch.Tensor]:
    """num_return_sequences: every row (and its media) repeated n times, adjacent (as transformers)."""
    if n == 1:
        return inputs
    out = {k: v.repeat_interleave(n, dim=0) for k, v in inputs.items()
           if k in ("input_ids", "attention_mask", "inputs_embeds", "mm_token_type_ids")}
    merge = model.config.vision_config.spatial_merge_size
    for pix, grid, token in (("pixel_values", "image_grid_thw", model.config.image_token_id),
                             ("pixel_values_videos", "video_grid_thw", model.config.video_token_id)):
        if inputs.get(pix) is not None:
            if inputs.get("input_ids") is None:
                raise InputError("generate: num_return_sequences > 1 with media needs input_ids; pass input_ids")
            out[pix], out[grid] = _expand_media(inputs["input_ids"], inputs[pix], inputs[grid], token, merge, n)
    return out


def prepare_inputs(model: Any, kwargs: dict[str, Any], config: GenerationConfig) -> PreparedInputs:
    """Check the model inputs, move them to the model's device, fill attention mask and M-RoPE ids."""
    unknown = sorted(k for k in kwargs if k not in _MODEL_INPUTS and k not in _IGNORED)
    if kwargs.get("past_key_values") is not None or kwargs.get("position_ids") is not None:
        raise InputError("generate: past_key_values / position_ids cannot be passed; generate builds its own "
                         "cache and positions (call the model's forward for manual decoding)")
    unknown = [k for k in unknown if k not in ("past_key_values", "position_ids")]
    unsupported = [k for k in unknown if k in _UNSUPPORTED and kwargs[k] is not None]
    if unsupported:
        raise InputError(f"generate: {unsupported} are not supported by qwen2vl's generate; supported are "
                         "greedy/sampling with temperature, top_k, top_p, min_p, repetition_penalty, "
                         "min/max_new_tokens, eos_token_id and stop_strings")
    unknown = [k for k in unknown if k not in _UNSUPPORTED]
    if unknown:
        raise InputError(f"generate: unknown argument(s) {unknown}; allowed are the processor outputs "
                         f"{list(_MODEL_INPUTS)} and the GenerationConfig fields {sorted(_FIELDS)}")
    device = model.device
    inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()
              if k in _MODEL_INPUTS and v is not None}
    ids, embeds = inputs.get("input_ids"), inputs.get("inputs_embeds")
    if ids is None and embeds is None:
        raise InputError("generate: got neither input_ids nor inputs_embeds; pass the processor's output "
                         "(model.generate(**inputs)) or input_ids of shape (B, L)")
    if ids is not None and embeds is not None:
        inputs.pop("inputs_embeds")  # transformers generates from the ids in that case too
        embeds = None
    if ids is not None and (ids.dim() != 2 or ids.shape[1] == 0 or ids.dtype not in (torch.int32, torch.int64)):
        raise InputError(f"input_ids: expected integer ids of shape (B, L) with L >= 1, got "
                         f"{tuple(ids.shape)} {ids.dtype}; add a batch dimension with input_ids[None]")
    if ids is not None:
        inputs["input_ids"] = ids = ids.long()
    ref = ids if ids is not None else embeds[..., 0]
    mask = inputs.get("attention_mask")
    if mask is None:
        mask = _default_attention_mask(ids, config) if ids is not None else torch.ones_like(ref, dtype=torch.long)
    elif tuple(mask.shape) != tuple(ref.shape):
        raise InputError(f"attention_mask: shape {tuple(mask.shape)} differs from the prompt's {tuple(ref.shape)}; "
                         "pass one 0/1 entry per prompt token")
    inputs["attention_mask"] = mask.long()
    inputs = _expand(inputs, config.num_return_sequences, model)
    ids, mask = inputs.get("input_ids"), inputs["attention_mask"]
    if ids is not None:
        positions, deltas = model.get_rope_index(ids, inputs.get("mm_token_type_ids"), inputs.get("image_grid_thw"),
                                                 inputs.get("video_grid_thw"), mask)
    else:  # embeddings only: text positions over the real tokens (pads 0)
        positions = (mask.cumsum(-1) - 1).clamp(min=0).masked_fill(mask == 0, 0)[None].expand(3, -1, -1)
        deltas = torch.zeros(mask.shape[0], 1, dtype=torch.long, device=mask.device)
    prompt = ids if ids is not None else torch.zeros(mask.shape[0], 0, dtype=torch.long, device=mask.device)
    return PreparedInputs(inputs, prompt, ids, mask, positions.to(mask.device), deltas.to(mask.device))


def _check_config(config: GenerationConfig, tokenizer: Any) -> None:
    """Combinations the loop cannot run (the single-field ranges are checked by GenerationConfig).

    eos/pad rules: an eos_token_id kwarg replaces the file's (no conflict); pad_token_id may equal an
    eos id (the hub files do: pad 151643 is the second eos); pad unset -> eos[0]. The one conflict is
    stop_strings (which finish rows) with neither pad nor eos to pad the finished rows.
    """
    if config.num_beams != 1:
        raise ConfigError(f"generate: num_beams={config.num_beams} is not supported; allowed: num_beams=1 "
                          "(greedy or sampling)")
    if config.num_return_sequences > 1 and not config.do_sample:
        raise ConfigError(f"generate: num_return_sequences={config.num_return_sequences} needs do_sample=True; "
                          "greedy decoding returns one sequence per prompt")
    if config.stop_strings is not None and tokenizer is None:
        raise InputError("generate: stop_strings need the tokenizer to read the text; pass tokenizer=processor "
                         "(or its tokenizer) to generate")
    if config.pad_token_id is None and config.eos_token_id is None and config.stop_strings is not None:
        raise InputError("generate: stop_strings can finish rows early but neither pad_token_id nor eos_token_id "
                         "is set, so finished rows cannot be padded; set pad_token_id")
    if config.min_new_tokens is not None and config.max_new_tokens is not None \
            and config.min_new_tokens > config.max_new_tokens:  # transformers only warns here, so do we
        logger.warning("generate: min_new_tokens=%d > max_new_tokens=%d; generation stops at max_new_tokens",
                       config.min_new_tokens, config.max_new_tokens)


def sampling_params(config: GenerationConfig) -> sampling.SamplingParams:
    return sampling.SamplingParams(
        do_sample=bool(config.do_sample), temperature=float(config.temperature), top_k=int(config.top_k or 0),
        top_p=float(config.top_p), min_p=config.min_p, repetition_penalty=float(config.repetition_penalty))


class _Decoder:
    """The decode loop state for one call: which original rows are still running, and their tensors."""

    def __init__(self, model: Any, prep: PreparedInputs, config: GenerationConfig, budget: int,
                 tokenizer: Any, generator: torch.Generator | None, keep_scores: bool):
        self.model, self.prep, self.config, self.budget = model, prep, config, budget
        self.params = sampling_params(config)
        self.generator = generator
        self.keep_scores = keep_scores
        device = prep.device
        self.eos = (torch.tensor(config.eos_token_ids, device=device) if config.eos_token_ids else None)
        pad = config.pad_token_id if config.pad_token_id is not None else (config.eos_token_ids or [0])[0]
        self.pad = int(pad)
        min_new = max(config.min_new_tokens or 0, (config.min_length or 0) - prep.prompt_len)
        self.min_new = min_new if self.eos is not None else 0
        self.matcher = (StopStringMatcher(config.stop_strings, tokenizer.decode)
                        if config.stop_strings is not None else None)
        self.rows = torch.arange(prep.batch_size, device=device)  # original index of each running row
        self.generated: list[list[int]] = []  # per row: the prompt's real tail + new ids, for stop strings
        if self.matcher is not None:
            self.generated = [[] for _ in range(prep.batch_size)]
            if prep.input_ids is not None:
                self.generated = [row[mask.bool()][-self.matcher.window:].tolist()
                                  for row, mask in zip(prep.input_ids, prep.attention_mask)]
        vocab = model.config.text_config.vocab_size
        self.seen = (sampling.seen_token_mask(prep.input_ids, prep.attention_mask, vocab)
                     if self.params.repetition_penalty != 1.0 and prep.input_ids is not None else None)
        if self.seen is None and self.params.repetition_penalty != 1.0:
            self.seen = torch.zeros(prep.batch_size, vocab, dtype=torch.bool, device=device)
        self.next_pos = prep.position_ids[:, :, -1] + 1  # (3, B) last assigned position + 1, per axis

    def _pick(self, logits: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raw = logits[:, -1].float()  # (B, V) fp32 copy, as the reference
        banned = self.eos if step < self.min_new else None
        scores = sampling.process_logits(raw, self.params, self.seen, banned)
        if self.params.greedy or len(self.rows) == self.prep.batch_size:
            return sampling.select_tokens(scores, self.params, self.generator), scores, raw
        # Sampling after compaction: draw for the full original batch (finished rows get a dummy
        # uniform row) so the RNG stream advances exactly as in transformers, which keeps sampling
        # finished rows; a given seed then gives the same tokens as the reference.
        full = self._full(scores, 0.0)
        return sampling.select_tokens(full, self.params, self.generator)[self.rows], scores, raw

    def _finished(self, tokens: torch.Tensor, step: int) -> torch.Tensor:
        done = eos_hit(tokens, self.eos)
        if self.matcher is not None:
            host = tokens.tolist()
            hits = []
            for row, tok in zip(self.rows.tolist(), host):
                self.generated[row].append(tok)
                hits.append(self.matcher.matches(self.generated[row]))
            done |= torch.tensor(hits, device=tokens.device)
        if step + 1 >= self.budget:
            done = torch.ones_like(done)
        return done

    def _full(self, values: torch.Tensor, fill: float | int) -> torch.Tensor:
        """Scatter running-row values (n, ...) into a tensor over the original batch."""
        out = torch.full((self.prep.batch_size, *values.shape[1:]), fill, dtype=values.dtype, device=values.device)
        out[self.rows] = values
        return out

    def run(self) -> Iterator[Step]:
        prep, model = self.prep, self.model
        cache = StaticCache(model.config, prep.batch_size, prep.prompt_len + self.budget, dtype=model.dtype,
                            device=prep.device)
        out = model(**prep.model_inputs, position_ids=prep.position_ids, past_key_values=cache,
                    use_cache=True, logits_to_keep=1)
        cache.rope_deltas = prep.rope_deltas
        finished_all = torch.zeros(prep.batch_size, dtype=torch.bool, device=prep.device)
        for step in range(self.budget):
            tokens, scores, raw = self._pick(out.logits, step)
            del out
            # rows that finished earlier emit pad (only without compaction do they still run)
            was_done = finished_all[self.rows]
            tokens = tokens.masked_fill(was_done, self.pad)
            if self.seen is not None:
                sampling.mark_seen(self.seen, tokens)
            done = self._finished(tokens, step) | was_done
            finished_all[self.rows[done]] = True
            yield Step(self._full(tokens, self.pad), finished_all.clone(),
                       self._full(scores, -float("inf")) if self.keep_scores else None,
                       self._full(raw, 0.0) if self.keep_scores else None)
            if bool(finished_all.all()):
                return
            if bool(done.any()) and not self.keep_scores:  # compact: finished rows stop costing work
                keep = (~done).nonzero().flatten()
                cache.select_rows(keep)  # finished rows leave; no new k/v memory
                self.rows, tokens = self.rows[keep], tokens[keep]
                self.next_pos = self.next_pos[:, keep]
                self.seen = self.seen[keep] if self.seen is not None else None
            out = model(input_ids=tokens[:, None], position_ids=self.next_pos[:, :, None], past_key_values=cache,
                        use_cache=True, logits_to_keep=1)
            self.next_pos = self.next_pos + 1


def _decode_steps(model: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[PreparedInputs, Iterator[Step], Any,
                                                                           GenerationConfig]:
    """Everything generate and stream_generate share: resolve the config, prepare inputs, build the loop."""
    if args:
        if len(args) > 1 or "input_ids" in kwargs:
            raise InputError("generate: pass the prompt as input_ids= (or one positional tensor), not both")
        kwargs["input_ids"] = args[0]
    generation_config = kwargs.pop("generation_config", None)
    tokenizer = kwargs.pop("tokenizer", None)
    seed, generator = kwargs.pop("seed", None), kwargs.pop("generator", None)
    config, model_kwargs, has_default_max_length = resolve_generation_config(model, generation_config, kwargs)
    _check_config(config, tokenizer)
    prep = prepare_inputs(model, model_kwargs, config)
    context = model.config.text_config.max_position_embeddings
    budget = new_token_budget(config.max_new_tokens, config.max_length, prep.prompt_len, context,
                              has_default_max_length)
    keep_scores = bool(config.return_dict_in_generate and (config.output_scores or config.output_logits))
    rng = sampling.make_generator(seed, generator, prep.device) if config.do_sample else None
    loop = _Decoder(model, prep, config, budget, tokenizer, rng, keep_scores)
    return prep, loop.run(), tokenizer, config


@torch.no_grad()
def generate(model: Any, *args: Any, streamer: Any = None, **kwargs: Any) -> torch.Tensor | GenerateOutput:
    """model.generate(**inputs, max_new_tokens=..., ...) -> (B, prompt_len + new) ids, as transformers.

    Finished rows are padded with pad_token_id (eos[0] when unset); the call ends when every row has
    finished or max_new_tokens were generated. Extra keywords: seed= / generator= (sampling RNG),
    tokenizer= (needed for stop_strings). `streamer` gets put(prompt ids), put(each step's ids), end().
    Rows that finish leave the running batch (their cache rows are compacted away), except with
    output_scores/output_logits, where every row runs to the end as in transformers. use_cache=False
    is accepted and ignored: the cached loop gives the same tokens.
    """
    prep, steps, _, config = _decode_steps(model, args, kwargs)
    if streamer is not None:
        streamer.put(prep.prompt_ids.cpu())
    tokens, scores, logits = [], [], []
    for step in steps:
        tokens.append(step.tokens)
        if streamer is not None:
            streamer.put(step.tokens.cpu())
        if step.scores is not None:
            scores.append(step.scores)
            logits.append(step.logits)
    if streamer is not None:
        streamer.end()
    sequences = torch.cat([prep.prompt_ids, torch.stack(tokens, dim=1).to(prep.prompt_ids.device)], dim=1)
    if not config.return_dict_in_generate:
        return sequences
    return GenerateOutput(sequences, tuple(scores) if config.output_scores else None,
                          tuple(logits) if config.output_logits else None)


@torch.no_grad()
def stream_generate(model: Any, *args: Any, tokenizer: Any = None, skip_special_tokens: bool = True,
                    **kwargs: Any) -> Iterator[str] | Iterator[torch.Tensor]:
    """Generator API without threads: yields text pieces (whole characters) when a tokenizer is given
    (batch size 1; the pieces join to the non-streaming decode of the new ids), else each step's
    (B,) token ids (pad in finished rows)."""
    if tokenizer is not None:
        kwargs["tokenizer"] = tokenizer
    prep, steps, tokenizer, _ = _decode_steps(model, args, kwargs)
    if tokenizer is None:
        for step in steps:
            yield step.tokens
        return
    if prep.batch_size != 1:
        raise InputError(f"stream_generate: text streaming needs batch size 1 but got {prep.batch_size} rows; "
                         "stream ids (no tokenizer) or call once per prompt")
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
    for step in steps:
        piece = detok.push(step.tokens.tolist())
        if piece:
            yield piece
    tail = detok.flush()
    if tail:
        yield tail
