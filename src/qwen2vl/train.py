"""Fine-tuning path: question/answer samples -> chat-formatted batches with masked labels -> AdamW loop.

Uses the model's own loss and backward pass; checkpoints (model, optimizer, schedule, step, RNG)
are resumable. A sample is any object with `question`, `answer`, `task` and `image` or `video`
(`qwen2vl.synthetic.Sample` is one); the model and processor are passed in.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import InputError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
SYSTEM_PROMPT = "You are a helpful assistant."
STATE_FILE = "train_state.pt"


@dataclass
class TrainConfig:
    """Hyper-parameters of one run; saved inside every checkpoint."""

    steps: int = 3000
    batch_size: int = 32
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    decay_steps: int | None = None  # cosine over the last decay_steps (None: everything after warmup)
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    seed: int = 0
    save_every: int = 200
    log_every: int = 20


def conversation(sample, with_answer: bool) -> list[dict]:
    """The chat messages for `sample` (no system turn: the template adds the default one)."""
    media = {"type": "image", "image": sample.image} if sample.video is None else {"type": "video", "video": sample.video}
    messages = [{"role": "user", "content": [media, {"type": "text", "text": sample.question}]}]
    if with_answer:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": sample.answer}]})
    return messages


def prompt_text(sample) -> str:
    """The rendered chat prompt up to `<|im_start|>assistant\\n` (reference-notes §7.2)."""
    pad = "<|image_pad|>" if sample.video is None else "<|video_pad|>"
    return (
        f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"
        f"<|im_start|>user\n<|vision_start|>{pad}<|vision_end|>{sample.question}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def _media(samples: Sequence) -> dict:
    images = [s.image for s in samples if s.video is None]
    videos = [s.video for s in samples if s.video is not None]
    return {"images": images or None, "videos": videos or None}


def encode_prompts(processor, samples: Sequence) -> dict[str, torch.Tensor]:
    """Left-padded prompts (ending in `<|im_start|>assistant\\n`) with pixels, ready for generate."""
    texts = [prompt_text(s) for s in samples]
    return dict(processor(text=texts, **_media(samples), padding=True, return_tensors="pt"))


def encode_batch(processor, samples: Sequence) -> dict[str, torch.Tensor]:
    """Prompt + answer + `<|im_end|>\\n`, left-padded, with `labels`.

    Only the answer tokens and the closing `<|im_end|>` are labelled; everything else (system and
    user turns, vision pads, padding, and the `\\n` after `<|im_end|>`) is IGNORE_INDEX. The `\\n`
    is template glue after the stop token: generation ends at `<|im_end|>` and never predicts it.
    """
    tokenizer = processor.tokenizer
    texts = [prompt_text(s) + s.answer + "<|im_end|>\n" for s in samples]
    batch = dict(processor(text=texts, **_media(samples), padding=True, return_tensors="pt"))
    input_ids = batch["input_ids"]
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    length = input_ids.shape[1]
    for row, sample in enumerate(samples):
        n = len(tokenizer.encode(sample.answer + "<|im_end|>"))
        # left padding: the row ends with [answer ids..., <|im_end|>, \n]
        labels[row, length - 1 - n : length - 1] = input_ids[row, length - 1 - n : length - 1]
    batch["labels"] = labels
    return batch


def lr_lambda(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to 1 over warmup_steps, flat, then cosine to min_lr_ratio over the last decay_steps."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    decay = cfg.steps - cfg.warmup_steps if cfg.decay_steps is None else cfg.decay_steps
    start = cfg.steps - decay
    if step < start:
        return 1.0
    progress = min(1.0, (step - start) / max(1, decay))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig):
    """AdamW (weight decay on matrices only, not on norms/biases) and its warmup+cosine schedule."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, foreach=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(s, cfg))
    return optimizer, scheduler


def loss_on_batch(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The causal-LM loss of `model(**batch).loss`, projecting only the labelled positions.

    forward(labels=...) sends every position (B x L) through the 151,936-row head; here the
    backbone runs once and `lm_head` sees only the positions that predict a label, which gives the
    same mean cross-entropy (tests/test_train.py checks it against the model's own loss).
    """
    targets = batch["labels"][:, 1:]  # position t predicts token t+1
    keep = targets != IGNORE_INDEX  # (B, L-1)
    if not bool(keep.any()):
        raise InputError("loss_on_batch: no labelled token in the batch; every row needs an answer")
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = model.model(**inputs, use_cache=False).last_hidden_state  # (B, L, H)
    logits = model.lm_head(hidden[:, :-1][keep])  # (N, V), N = labelled tokens
    return F.cross_entropy(logits.float(), targets[keep])


def train_step(model, batch, optimizer, scheduler, cfg: TrainConfig) -> tuple[float, float]:
    """One optimisation step; returns (loss, gradient norm before clipping)."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss = loss_on_batch(model, batch)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    scheduler.step()
    return float(loss.detach()), float(norm)


def save_state(path: Path, model, optimizer, scheduler, step: int, cfg: TrainConfig) -> None:
    """Everything needed to resume, written atomically (tmp file + rename)."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": step,
        "config": asdict(cfg),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_state(path: Path, model, optimizer, scheduler) -> int:
    """Restore a save_state checkpoint into the given objects; returns the next step to run."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    return int(state["step"])


def train(model, processor, cfg: TrainConfig, samples_for_step: Callable[[int], Sequence], run_dir: str | Path,
          resume: bool = False, stop_at: int | None = None) -> dict:
    """Train `model` in place for cfg.steps (or until `stop_at`), checkpointing to run_dir.

    `samples_for_step(step)` gives the batch of `step`; it must be a pure function of the step so
    that a resumed run sees the same data. With `resume`, continues from run_dir/train_state.pt
    when it exists. Returns the last loss, the step reached and the wall time.
    """
    run_dir = Path(run_dir)
    optimizer, scheduler = make_optimizer(model, cfg)
    state_path = run_dir / STATE_FILE
    step = load_state(state_path, model, optimizer, scheduler) if resume and state_path.exists() else 0
    end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    start_time, losses, loss = time.time(), [], float("nan")
    while step < end:
        batch = encode_batch(processor, samples_for_step(step))
        loss, norm = train_step(model, batch, optimizer, scheduler, cfg)
        losses.append(loss)
        step += 1
        if step % cfg.log_every == 0 or step == end:
            logger.info("step %d loss %.4f (avg %.4f) grad_norm %.3f lr %.2e %.2fs/step", step, loss,
                        sum(losses) / len(losses), norm, scheduler.get_last_lr()[0],
                        (time.time() - start_time) / max(1, len(losses)))
        if step % cfg.save_every == 0 or step == end:
            save_state(state_path, model, optimizer, scheduler, step, cfg)
    return {"step": step, "loss": loss, "seconds": time.time() - start_time}


@torch.no_grad()
def answer_questions(model, processor, samples: Sequence, max_new_tokens: int = 6,
                     batch_size: int = 50) -> list[str]:
    """Greedy answers (decoded, special tokens dropped, stripped) to every sample's question."""
    model.eval()
    answers = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        inputs = encode_prompts(processor, chunk)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1] :]
        answers += [a.strip() for a in processor.batch_decode(new, skip_special_tokens=True)]
    return answers


def evaluate(model, processor, samples: Sequence, **kwargs) -> dict[str, float]:
    """Exact-match accuracy per task and overall ("all") on `samples`."""
    answers = answer_questions(model, processor, samples, **kwargs)
    hits: dict[str, list[bool]] = {}
    for sample, answer in zip(samples, answers):
        hits.setdefault(sample.task, []).append(answer == sample.answer)
        hits.setdefault("all", []).append(answer == sample.answer)
    return {task: sum(h) / len(h) for task, h in hits.items()}
