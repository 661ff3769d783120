"""Tests for sample.py: the Euler solver against closed forms, its call pattern, and
classifier-free guidance (the formula and the single batched 2B forward pass)."""

import pytest
import torch

from embeddings import BOS_ID, PAD_ID, tokenize
from sample import cfg_velocity, euler_sample, guided_field


def test_euler_integrates_a_constant_field_exactly():
    x0 = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    c = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    for steps in (1, 4, 50):
        x1 = euler_sample(lambda x, t: c.expand_as(x), x0, steps)
        torch.testing.assert_close(x1, x0 + c, rtol=0, atol=1e-12)


@pytest.mark.parametrize("a,steps", [(1.0, 10), (-2.0, 7), (0.5, 100)])
def test_euler_on_linear_field_gives_one_plus_a_over_n_to_the_n_float64(a, steps):
    x0 = torch.randn(4, 3, dtype=torch.float64)
    x1 = euler_sample(lambda x, t: a * x, x0, steps)
    torch.testing.assert_close(x1, x0 * (1 + a / steps) ** steps, rtol=1e-12, atol=0)


def test_euler_calls_the_field_exactly_n_times_at_left_grid_times():
    steps, B = 8, 3
    seen = []

    def u(x, t):
        seen.append(t.clone())
        return torch.zeros_like(x)

    euler_sample(u, torch.zeros(B, 2), steps)
    assert len(seen) == steps
    for i, t in enumerate(seen):
        assert t.shape == (B,)
        torch.testing.assert_close(t.double(), torch.full((B,), i / steps, dtype=torch.float64),
                                   rtol=0, atol=1e-7)


def test_euler_rejects_zero_steps():
    with pytest.raises(ValueError):
        euler_sample(lambda x, t: x, torch.zeros(1, 2), 0)


def test_cfg_velocity_endpoints_and_linearity_in_w():
    u_cond = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    u_uncond = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(cfg_velocity(u_cond, u_uncond, 1.0), u_cond, rtol=0, atol=1e-15)
    torch.testing.assert_close(cfg_velocity(u_cond, u_uncond, 0.0), u_uncond, rtol=0, atol=1e-15)
    for w in (-1.0, 2.5, 7.0):
        torch.testing.assert_close(cfg_velocity(u_cond, u_uncond, w),
                                   (1 - w) * u_uncond + w * u_cond, rtol=1e-12, atol=1e-12)
    a, b = cfg_velocity(u_cond, u_uncond, 2.0), cfg_velocity(u_cond, u_uncond, 4.0)
    torch.testing.assert_close(cfg_velocity(u_cond, u_uncond, 3.0), (a + b) / 2,
                               rtol=1e-12, atol=1e-12)


class _RecordingModel:
    """A prompt-dependent field that records the batches it is called with."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, tokens):
        self.calls.append((x.shape[0], tokens.clone()))
        bias = tokens.double().sum(1).view(-1, 1, 1, 1) / 100       # depends on the prompt
        return x * t.double().view(-1, 1, 1, 1) + bias


def test_guided_field_makes_one_2b_call_with_null_prompt_second_half():
    tokens = tokenize(["red", "a blue circle"], max_len=10)
    model = _RecordingModel()
    u = guided_field(model, tokens, cfg_scale=3.0)
    x = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    euler_sample(u, x, steps=4)
    assert len(model.calls) == 4
    for batch, seen in model.calls:
        assert batch == 4
        assert torch.equal(seen[:2], tokens)
        null = torch.full((2, 10), PAD_ID)
        null[:, 0] = BOS_ID
        assert torch.equal(seen[2:], null)


def test_guided_field_with_scale_one_makes_one_b_call_with_the_prompts():
    tokens = tokenize(["red", "a blue circle"], max_len=10)
    model = _RecordingModel()
    euler_sample(guided_field(model, tokens, cfg_scale=1.0), torch.randn(2, 1, 2, 2,
                 dtype=torch.float64), steps=3)
    assert len(model.calls) == 3
    assert all(batch == 2 and torch.equal(seen, tokens) for batch, seen in model.calls)


def test_guided_field_equals_cfg_of_two_separate_calls():
    tokens = tokenize(["red", "a blue circle"], max_len=10)
    null = tokenize(["", ""], max_len=10)
    model = _RecordingModel()
    x = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    t = torch.full((2,), 0.3)
    for w in (0.0, 1.0, 4.0):
        expected = cfg_velocity(model(x, t, tokens), model(x, t, null), w)
        got = guided_field(model, tokens, w)(x, t)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(guided_field(model, tokens, 4.0)(x, t), model(x, t, tokens))
