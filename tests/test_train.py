"""The fine-tuning path: chat-formatted ids, label masking, loss, schedule, resume, evaluation."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from qwen2vl.config import Qwen2VLConfig
from qwen2vl.errors import InputError
from qwen2vl.model.qwen2vl import Qwen2VLForConditionalGeneration
from qwen2vl.processing.image import Qwen2VLImageProcessor
from qwen2vl.processing.processor import Qwen2VLProcessor
from qwen2vl.processing.tokenizer import Qwen2Tokenizer
from qwen2vl.processing.video import Qwen2VLVideoProcessor
from qwen2vl.synthetic import TASKS, make_samples
from qwen2vl.train import (
    IGNORE_INDEX, STATE_FILE, TrainConfig, conversation, encode_batch, encode_prompts, evaluate, loss_on_batch,
    lr_lambda, train,
)
from support.tokenizer import tokenizer_dir

IM_END, NEWLINE = 151645, 198
SIZE = 56  # 4x4 patches -> 4 visual tokens per image, 8 per 4-frame video


@pytest.fixture(scope="module")
def processor():
    pixels = {"min_pixels": SIZE * SIZE, "max_pixels": SIZE * SIZE}
    return Qwen2VLProcessor(Qwen2VLImageProcessor(**pixels), Qwen2Tokenizer.from_pretrained(tokenizer_dir()),
                            Qwen2VLVideoProcessor(**pixels))


def tiny_model(seed: int = 0) -> Qwen2VLForConditionalGeneration:
    config = Qwen2VLConfig.from_dict({
        "vocab_size": 151936, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "rope_theta": 10000.0, "tie_word_embeddings": True,
        "rope_scaling": {"type": "mrope", "mrope_section": [4, 2, 2]}, "image_token_id": 151655,
        "video_token_id": 151656, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
        "vision_config": {"depth": 1, "embed_dim": 32, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2},
    })
    torch.manual_seed(seed)
    return Qwen2VLForConditionalGeneration(config)


def samples(n=len(TASKS), seed="train-test"):
    return make_samples(n, seed=seed, size=SIZE)


def test_labels_are_the_answer_and_closing_im_end_only(processor):
    batch = encode_batch(processor, samples())
    for row, sample in enumerate(samples()):
        ids, labels = batch["input_ids"][row], batch["labels"][row]
        expected = processor.tokenizer.encode(sample.answer) + [IM_END]
        labelled = labels[labels != IGNORE_INDEX].tolist()
        assert labelled == expected
        assert processor.tokenizer.decode(labelled) == sample.answer + "<|im_end|>"
        # the labelled span is contiguous, equals the ids, and is followed only by the unlabelled "\n"
        n = len(expected)
        assert ids[-n - 1 : -1].tolist() == expected and labels[-n - 1 : -1].tolist() == expected
        assert ids[-1] == NEWLINE and labels[-1] == IGNORE_INDEX
        assert (labels[: -n - 1] == IGNORE_INDEX).all()


def test_training_ids_equal_the_processor_chat_template(processor):
    batch, prompts = encode_batch(processor, samples()), encode_prompts(processor, samples())
    for row, sample in enumerate(samples()):
        full = processor.apply_chat_template(conversation(sample, with_answer=True), tokenize=True,
                                             return_dict=True)
        ours = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
        assert ours == list(full["input_ids"][0])
        prompt = processor.apply_chat_template(conversation(sample, with_answer=False), tokenize=True,
                                               add_generation_prompt=True, return_dict=True)
        assert prompts["input_ids"][row][prompts["attention_mask"][row].bool()].tolist() == list(prompt["input_ids"][0])


def test_loss_is_mean_cross_entropy_over_answer_tokens(processor):
    model, batch = tiny_model(), encode_batch(processor, samples())
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits.float()  # (B, L, V)
    terms = []
    for row, sample in enumerate(samples()):
        answer = processor.tokenizer.encode(sample.answer) + [IM_END]
        length = logits.shape[1]
        for k, token in enumerate(answer):
            t = length - 1 - len(answer) + k  # position of this answer token; logits[t - 1] predict it
            terms.append(-F.log_softmax(logits[row, t - 1], -1)[token])
    expected = torch.stack(terms).mean()
    torch.testing.assert_close(loss_on_batch(model, batch), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(**batch).loss, expected, rtol=1e-5, atol=1e-5)  # the model's own loss


def test_loss_ignores_everything_outside_the_assistant_reply(processor):
    model, batch = tiny_model(), encode_batch(processor, samples())
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.detach().requires_grad_(True)
    labels = batch["labels"]
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
    loss.backward()
    predicts_answer = torch.zeros_like(labels, dtype=torch.bool)
    predicts_answer[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    grad_norm = logits.grad.abs().sum(-1)  # (B, L)
    # what the model predicts at system / user / vision-pad / padding / trailing-"\n" positions has no effect
    assert (grad_norm[~predicts_answer] == 0).all() and (grad_norm[predicts_answer] > 0).all()


def test_question_text_outside_the_reply_is_never_a_target(processor):
    # two batches that differ only in the question asked: the labelled token ids are the same
    a = samples()
    b = [type(s)(s.task, s.question + " Answer briefly.", s.answer, s.image, s.video) for s in a]
    la, lb = encode_batch(processor, a)["labels"], encode_batch(processor, b)["labels"]
    assert [r[r != IGNORE_INDEX].tolist() for r in la] == [r[r != IGNORE_INDEX].tolist() for r in lb]


def test_lr_schedule_is_linear_warmup_then_cosine_to_the_floor():
    cfg = TrainConfig(steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert [lr_lambda(s, cfg) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_lambda(10, cfg) == pytest.approx(1.0)
    assert lr_lambda(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_lambda(110, cfg) == pytest.approx(0.1) and lr_lambda(500, cfg) == pytest.approx(0.1)
    flat = TrainConfig(steps=110, warmup_steps=10, min_lr_ratio=0.1, decay_steps=40)  # flat 10..69, then cosine
    assert lr_lambda(10, flat) == lr_lambda(69, flat) == 1.0
    assert lr_lambda(90, flat) == pytest.approx(0.55) and lr_lambda(110, flat) == pytest.approx(0.1)


def _run(tmp_path, stops):
    cfg = TrainConfig(steps=4, batch_size=3, lr=1e-2, warmup_steps=2, save_every=100)
    model = tiny_model(seed=1)
    data = lambda step: make_samples(cfg.batch_size, seed=f"resume-{step}", size=SIZE)  # noqa: E731
    proc = Qwen2VLProcessor(Qwen2VLImageProcessor(min_pixels=SIZE * SIZE, max_pixels=SIZE * SIZE),
                            Qwen2Tokenizer.from_pretrained(tokenizer_dir()),
                            Qwen2VLVideoProcessor(min_pixels=SIZE * SIZE, max_pixels=SIZE * SIZE))
    for i, stop in enumerate(stops):
        if i:  # a fresh process: new model object with different random weights, then resume
            model = tiny_model(seed=99)
        result = train(model, proc, cfg, data, tmp_path, resume=i > 0, stop_at=stop)
    return model, result


def test_resumed_run_reaches_the_same_parameters(tmp_path):
    straight, r1 = _run(tmp_path / "a", [4])
    resumed, r2 = _run(tmp_path / "b", [2, 4])
    assert r1["step"] == r2["step"] == 4 and (tmp_path / "b" / STATE_FILE).is_file()
    assert r1["loss"] == pytest.approx(r2["loss"], rel=1e-5)
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_training_fits_a_repeated_batch(processor, tmp_path):
    model, fixed = tiny_model(), samples(3)
    batch = encode_batch(processor, fixed)
    cfg = TrainConfig(steps=8, lr=3e-2, warmup_steps=1, save_every=1000)
    with torch.no_grad():
        before = float(loss_on_batch(model, batch))
    train(model, processor, cfg, lambda step: fixed, tmp_path)
    with torch.no_grad():
        after = float(loss_on_batch(model, batch))
    assert before > 10 and after < before / 3


def test_evaluate_scores_exact_matches_per_task(processor):
    batch_samples = samples(12)
    replies = [s.answer if i % 3 else "wrong" for i, s in enumerate(batch_samples)]

    def generate(input_ids, **kwargs):  # a stub model that answers from the list, then stops
        start = generate.offset
        generate.offset += len(input_ids)
        rows = [processor.tokenizer.encode(" " + r) + [IM_END] for r in replies[start : start + len(input_ids)]]
        width = max(map(len, rows))
        new = torch.tensor([r + [151643] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, new], dim=1)

    generate.offset = 0
    stub = SimpleNamespace(generate=generate, eval=lambda: None)
    scores = evaluate(stub, processor, batch_samples, batch_size=5)
    hits = {}
    for i, s in enumerate(batch_samples):
        hits.setdefault(s.task, []).append(i % 3 != 0)
    assert scores["all"] == pytest.approx(8 / 12)
    assert {t: scores[t] for t in hits} == pytest.approx({t: sum(h) / len(h) for t, h in hits.items()})


def test_a_batch_without_answers_is_refused(processor):
    batch = encode_batch(processor, samples(2))
    batch["labels"][:] = IGNORE_INDEX
    with pytest.raises(InputError, match="no labelled token"):
        loss_on_batch(tiny_model(), batch)
