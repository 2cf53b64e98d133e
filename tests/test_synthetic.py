"""The synthetic task generator: determinism, and answers checked against the pixels from first principles."""

import random

import numpy as np
import pytest

from qwen2vl.errors import InputError
from qwen2vl.synthetic import COLORS, CORNERS, DIRECTIONS, NUM_FRAMES, QUESTIONS, SHAPES, TASKS, make_sample, make_samples


def _ink(img) -> np.ndarray:
    """Boolean (H, W) mask of drawn pixels: every channel of the background is >= 248 - 48 = 200,
    every object colour and the digit ink have a channel below 70."""
    return np.asarray(img).min(-1) < 150


def _components(mask: np.ndarray) -> int:
    """Number of 4-connected components (plain flood fill)."""
    seen = np.zeros_like(mask)
    count = 0
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        count += 1
        stack = [(y, x)]
        seen[y, x] = True
        while stack:
            cy, cx = stack.pop()
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
    return count


def _samples(task: str, n: int = 40):
    return make_samples(n, seed=f"test-{task}", tasks=(task,))


def test_same_seed_same_samples_and_other_seed_differs():
    a, b, c = make_samples(12, 7), make_samples(12, 7), make_samples(12, 8)
    for x, y in zip(a, b):
        assert (x.task, x.question, x.answer) == (y.task, y.question, y.answer)
        frames_x = [x.image] if x.image else x.video
        frames_y = [y.image] if y.image else y.video
        assert all(np.array_equal(np.asarray(p), np.asarray(q)) for p, q in zip(frames_x, frames_y))
    assert [s.answer for s in a] != [s.answer for s in c] or any(
        not np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, c) if x.image
    )


def test_tasks_cycle_in_order_with_questions_from_the_fixed_set():
    samples = make_samples(2 * len(TASKS), seed=0)
    assert [s.task for s in samples] == list(TASKS) * 2
    for s in samples:
        assert s.question in QUESTIONS[s.task]
        if s.task == "motion":
            assert s.image is None and len(s.video) == NUM_FRAMES
            assert all(f.size == (112, 112) and f.mode == "RGB" for f in s.video)
        else:
            assert s.video is None and s.image.size == (112, 112) and s.image.mode == "RGB"


def test_background_codes_position_with_a_fixed_gradient():
    a = np.asarray(make_sample(random.Random(3), "color").image).astype(int)
    assert a.min() >= 0 and (a[..., 0][~_ink(a)].min() >= 200)
    assert a[5, 5, 0] - a[5, 106, 0] == pytest.approx(48 * 101 / 111, abs=1)  # red falls to the right
    assert a[5, 5, 1] - a[106, 5, 1] == pytest.approx(48 * 101 / 111, abs=1)  # green falls downwards
    assert a[5, 5, 2] == a[106, 106, 2]


def test_size_parameter_sets_the_canvas():
    assert make_sample(random.Random(0), "digits", size=168).image.size == (168, 168)


def test_colour_answer_is_the_colour_of_the_ink():
    for s in _samples("color"):
        a = np.asarray(s.image).astype(int)
        pixels = a[_ink(s.image)]
        nearest = min(COLORS, key=lambda name: np.abs(pixels.mean(0) - COLORS[name]).sum())
        assert s.answer == nearest


def test_position_answer_is_the_quadrant_of_the_ink_centroid():
    for s in _samples("position"):
        ys, xs = np.nonzero(_ink(s.image))
        vertical = "top" if ys.max() < 56 else "bottom" if ys.min() >= 56 else None
        horizontal = "left" if xs.max() < 56 else "right" if xs.min() >= 56 else None
        assert s.answer in CORNERS
        assert s.answer == f"{vertical} {horizontal}"  # the whole shape lies inside its quadrant


def test_shape_answer_matches_fill_ratio_of_the_bounding_box():
    # filled fraction of the bounding box: square ~1, circle ~pi/4 = 0.785, triangle ~0.5
    for s in _samples("shape"):
        mask = _ink(s.image)
        ys, xs = np.nonzero(mask)
        ratio = mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
        expected = "square" if ratio > 0.93 else "circle" if ratio > 0.65 else "triangle"
        assert s.answer == expected and s.answer in SHAPES


def test_count_answer_equals_connected_components():
    answers = set()
    for s in _samples("count"):
        assert _components(_ink(s.image)) == int(s.answer)
        answers.add(s.answer)
    assert answers == {"1", "2", "3", "4"}


def test_digit_answer_has_one_ink_column_group_per_digit():
    for s in _samples("digits"):
        assert s.answer.isdigit() and 2 <= len(s.answer) <= 3 and s.answer[0] != "0"
        cols = _ink(s.image).any(0)
        runs = int(cols[0]) + int(np.count_nonzero(cols[1:] & ~cols[:-1]))  # starts of ink runs
        assert runs == len(s.answer)


def test_motion_answer_is_the_direction_of_the_centroid():
    seen = set()
    for s in _samples("motion"):
        centroids = [np.argwhere(_ink(f)).mean(0) for f in s.video]  # (y, x) per frame
        dy, dx = centroids[-1] - centroids[0]
        expected = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
        assert s.answer == expected and abs(min(dx, dy, key=abs)) < 1
        seen.add(s.answer)
    assert seen == set(DIRECTIONS)


def test_bad_arguments_raise_input_error():
    with pytest.raises(InputError, match="unknown task 'colour'"):
        make_sample(random.Random(0), "colour")
    with pytest.raises(InputError, match="n is -1"):
        make_samples(-1, seed=0)
