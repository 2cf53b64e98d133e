"""Pure logits -> token functions: repetition penalty, min-new-tokens, temperature, top-k/p, min-p, RNG.

Same numerics and order as transformers' logits processors (reference-notes §8.2-8.3); no model imports.
Every function takes fp32 logits (B, V), returns a new tensor, and accepts its knob as a scalar or as
one value per row (B,) (mixed requests in one batch, for the engine).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qwen2vl.errors import InputError

FILTER_VALUE = -float("inf")  # what a filtered-out token's logit becomes (softmax weight 0)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """The resolved per-call knobs the decode loop needs (from a GenerationConfig)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # 1 disables
    min_p: float | None = None  # None disables
    repetition_penalty: float = 1.0  # 1 disables
    min_tokens_to_keep: int = 1

    @property
    def greedy(self) -> bool:
        """Argmax decoding: do_sample off, or temperature 0 (our convention; transformers raises there)."""
        return not self.do_sample or self.temperature == 0


def seen_token_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, vocab_size: int) -> torch.Tensor:
    """(B, V) bool: which ids occur in each row's prompt, left padding excluded.

    Like transformers, only the *leading* masked positions (the left pads) are skipped; ids >= V
    (embedding rows past the lm_head) are ignored. Shapes: input_ids (B, L), attention_mask (B, L).
    """
    batch, length = input_ids.shape
    keep = torch.ones_like(input_ids, dtype=torch.bool)
    if attention_mask is not None:
        pads = (attention_mask != 0).int().argmax(dim=1)  # number of leading pads per row
        keep = torch.arange(length, device=input_ids.device)[None, :] >= pads[:, None]
    ids = torch.where(keep & (input_ids < vocab_size) & (input_ids >= 0), input_ids, vocab_size)
    mask = torch.zeros(batch, vocab_size + 1, dtype=torch.bool, device=input_ids.device)
    mask.scatter_(1, ids, True)  # slot V collects the ignored positions and is dropped
    return mask[:, :vocab_size]


def mark_seen(mask: torch.Tensor, tokens: torch.Tensor) -> None:
    """Add this step's tokens (B,) to the running seen mask (B, V), in place; O(B) per step."""
    ok = (tokens >= 0) & (tokens < mask.shape[1])
    rows = torch.arange(mask.shape[0], device=mask.device)[ok]
    mask[rows, tokens[ok]] = True


Knob = float | torch.Tensor  # a scalar for the whole batch, or one value per row (B,) for mixed batches


def _column(value: Knob, logits: torch.Tensor) -> Knob:
    """Per-row values (B,) -> (B, 1) on the logits' device, so they broadcast over the vocabulary."""
    if isinstance(value, torch.Tensor):
        return value.to(device=logits.device, dtype=logits.dtype).reshape(-1, 1)
    return value


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: Knob) -> torch.Tensor:
    """score*p where score < 0, else score/p, for each id seen in the row (set semantics)."""
    penalty = _column(penalty, logits)
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def suppress_tokens(logits: torch.Tensor, token_ids: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Set the given ids to -inf (min_new_tokens masks eos this way); rows (B,) bool limits it to some rows."""
    ban = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    ban[token_ids[token_ids < logits.shape[-1]]] = True
    ban = ban[None, :] if rows is None else ban[None, :] & rows[:, None]
    return logits.masked_fill(ban, -float("inf"))


def apply_temperature(logits: torch.Tensor, temperature: Knob) -> torch.Tensor:
    return logits / _column(temperature, logits)


def apply_top_k(logits: torch.Tensor, top_k: int | torch.Tensor, min_tokens_to_keep: int = 1,
                filter_value: float = FILTER_VALUE) -> torch.Tensor:
    """Keep tokens whose logit is >= the k-th largest (ties at the boundary survive, as in the reference).
    Per-row top_k (B,) int: 0 in a row keeps its whole vocabulary."""
    vocab = logits.shape[-1]
    if not isinstance(top_k, torch.Tensor):
        k = min(max(top_k, min_tokens_to_keep), vocab)
        kth = torch.topk(logits, k).values[..., -1:]  # (B, 1)
        return logits.masked_fill(logits < kth, filter_value)
    k = top_k.to(logits.device).long().clamp(min=min_tokens_to_keep, max=vocab)
    k = torch.where(top_k.to(logits.device) == 0, vocab, k)
    best = torch.topk(logits, int(k.max())).values  # (B, kmax), descending
    kth = best.gather(1, (k - 1)[:, None])
    return logits.masked_fill(logits < kth, filter_value)


def apply_top_p(logits: torch.Tensor, top_p: Knob, min_tokens_to_keep: int = 1,
                filter_value: float = FILTER_VALUE) -> torch.Tensor:
    """Nucleus filter: drop the low tail whose cumulative probability is <= 1 - top_p.
    A row with top_p 1 (per-row form) only loses tokens whose probability is already 0."""
    # ascending sort: the tail to drop is at the front, the min_tokens_to_keep best at the end
    sorted_logits, order = torch.sort(logits, descending=False)
    tail = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - _column(top_p, logits))
    tail[..., -min_tokens_to_keep:] = False
    drop = tail.scatter(1, order, tail)  # back to vocabulary order
    return logits.masked_fill(drop, filter_value)


def apply_min_p(logits: torch.Tensor, min_p: Knob, min_tokens_to_keep: int = 1,
                filter_value: float = FILTER_VALUE) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the top token's probability (0 disables)."""
    probs = logits.softmax(dim=-1)
    drop = probs < _column(min_p, logits) * probs.amax(dim=-1, keepdim=True)
    best = torch.topk(probs, min(min_tokens_to_keep, probs.shape[-1]), dim=-1).indices
    drop.scatter_(-1, best, False)
    return logits.masked_fill(drop, filter_value)


def process_logits(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None,
                   banned: torch.Tensor | None = None, banned_rows: torch.Tensor | None = None) -> torch.Tensor:
    """The reference's processor chain on (B, V) logits, upcast to fp32 first.

    Order (transformers `_get_logits_processor`): repetition penalty -> min-new-tokens eos ban ->
    [sampling only] temperature -> top-k -> top-p -> min-p.
    """
    scores = logits.float()
    if params.repetition_penalty != 1.0 and seen is not None:
        scores = apply_repetition_penalty(scores, seen, params.repetition_penalty)
    if banned is not None and banned.numel() and (banned_rows is None or bool(banned_rows.any())):
        scores = suppress_tokens(scores, banned, banned_rows)
    if params.greedy:
        return scores
    if params.temperature != 1.0:
        scores = apply_temperature(scores, params.temperature)
    if params.top_k:
        scores = apply_top_k(scores, params.top_k, params.min_tokens_to_keep)
    if params.top_p < 1.0:
        scores = apply_top_p(scores, params.top_p, params.min_tokens_to_keep)
    if params.min_p is not None:
        scores = apply_min_p(scores, params.min_p, params.min_tokens_to_keep)
    return scores


def select_tokens(scores: torch.Tensor, params: SamplingParams,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) processed scores -> (B,) int64 ids: argmax, or one multinomial draw per row."""
    if params.greedy:
        return scores.argmax(dim=-1)
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


def make_generator(seed: int | None = None, generator: torch.Generator | None = None,
                   device: torch.device | str = "cpu") -> torch.Generator | None:
    """The RNG for sampling: the caller's generator, a new one seeded with `seed`, or None (global RNG)."""
    if generator is not None and seed is not None:
        raise InputError(f"generate: both seed={seed} and generator= were given; pass only one of them")
    if generator is not None:
        return generator
    if seed is None:
        return None
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise InputError(f"generate: seed={seed!r} is invalid; allowed: an integer >= 0")
    return torch.Generator(device=device).manual_seed(seed)
