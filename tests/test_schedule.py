"""The learning-rate schedule at its landmarks against numbers worked out by hand.

With peak lr, floor min_lr, W warmup steps and M max steps (0-based step s):

    s < W:       lr * (s + 1) / W                                   (linear warmup)
    W <= s < M:  min_lr + (lr - min_lr) * (1 + cos(pi * r)) / 2,   r = (s - W) / (M - W)
    s >= M:      min_lr

Half a cosine period from the end of the warmup to max_steps: the peak at r = 0, halfway between
peak and floor at r = 1/2, the floor at r = 1.
"""

import pytest

from minigpt.config import TrainConfig
from minigpt.train.optim import lr_at

# lr 6e-3, min_lr 6e-4 (configs/tiny.toml's), W = 100, M = 500: r = (s - 100) / 400
SCHEDULE = TrainConfig(learning_rate=6e-3, min_lr=6e-4, warmup_steps=100, max_steps=500)
LANDMARKS = [
    (0, 6e-5),  # 6e-3 * 1 / 100
    (49, 3e-3),  # 6e-3 * 50 / 100: half the peak
    (99, 6e-3),  # the end of the warmup: 6e-3 * 100 / 100
    (100, 6e-3),  # r = 0: cos 0 = 1, the peak
    (200, 5.209188309203678e-3),  # r = 1/4: 6e-4 + 5.4e-3 * (1 + 0.70710678) / 2
    (300, 3.3e-3),  # r = 1/2, the midpoint: cos(pi / 2) = 0, 6e-4 + 5.4e-3 / 2
    (400, 1.3908116907963219e-3),  # r = 3/4: 6e-4 + 5.4e-3 * (1 - 0.70710678) / 2
    (499, 6.000832743590679e-4),  # r = 399/400: cos = -0.99996916, 6e-4 + 5.4e-3 * 1.54e-5
    (500, 6e-4),  # the end: min_lr
    (600, 6e-4),  # past the end: min_lr
]


@pytest.mark.parametrize(("step", "expected"), LANDMARKS, ids=[str(s) for s, _ in LANDMARKS])
def test_schedule_landmarks(step, expected):
    assert lr_at(step, SCHEDULE) == pytest.approx(expected, rel=1e-12)


def test_tiny_toml_lr_at_its_first_log_line():
    """configs/tiny.toml (W = 30, M = 500): the log line of step 100 shows the lr of step 99,
    r = 69 / 470, 6e-4 + 5.4e-3 * (1 + cos(0.4612)) / 2 = 5.72e-3 (README's "lr 5.72e-03")."""
    tiny = TrainConfig(learning_rate=6e-3, min_lr=6e-4, warmup_steps=30, max_steps=500)
    assert lr_at(99, tiny) == pytest.approx(5.717886543886676e-3, rel=1e-12)


def test_no_warmup_starts_at_the_peak():
    t = TrainConfig(learning_rate=1e-3, min_lr=0.0, warmup_steps=0, max_steps=10)
    assert lr_at(0, t) == pytest.approx(1e-3)
    assert lr_at(5, t) == pytest.approx(5e-4)  # r = 1/2
    assert lr_at(10, t) == 0.0
