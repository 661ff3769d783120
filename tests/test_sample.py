"""Tests for sample.py: the Euler solver against closed forms, its call pattern, classifier-free
guidance (the formula and the single batched 2B forward pass), and the command line."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint
import sample
from embeddings import BOS_ID, PAD_ID, WORD_BYTES, null_prompt, tokenize
from sample import cfg_velocity, euler_sample, guided_field

ROOT = Path(__file__).resolve().parents[1]


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
        bias = tokens.double().sum((1, 2)).view(-1, 1, 1, 1) / 100  # depends on the prompt
        return x * t.double().view(-1, 1, 1, 1) + bias


def test_guided_field_makes_one_2b_call_with_null_prompt_second_half():
    tokens = tokenize(["red", "a blue circle"], max_len=10)
    model = _RecordingModel()
    u = guided_field(model, tokens, null_prompt(10), cfg_scale=3.0)
    x = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    euler_sample(u, x, steps=4)
    assert len(model.calls) == 4
    for batch, seen in model.calls:
        assert batch == 4
        assert torch.equal(seen[:2], tokens)
        null = torch.full((2, 10, WORD_BYTES), PAD_ID)
        null[:, 0, 0] = BOS_ID
        assert torch.equal(seen[2:], null)


def test_guided_field_with_scale_one_makes_one_b_call_with_the_prompts():
    tokens = tokenize(["red", "a blue circle"], max_len=10)
    model = _RecordingModel()
    u = guided_field(model, tokens, null_prompt(10), cfg_scale=1.0)
    euler_sample(u, torch.randn(2, 1, 2, 2, dtype=torch.float64), steps=3)
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
        got = guided_field(model, tokens, null_prompt(10), w)(x, t)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(guided_field(model, tokens, null[:1], 4.0)(x, t), model(x, t, tokens))


def test_guidance_is_mixed_in_float32_when_the_model_answers_in_bf16():
    tokens, null = tokenize(["red", "a blue circle"], max_len=10), tokenize(["", ""], max_len=10)
    model = _RecordingModel()
    bf16 = lambda x, t, cond: model(x, t, cond).bfloat16()          # as under autocast
    x, t = torch.randn(2, 1, 4, 4), torch.full((2,), 0.3)
    u_cond, u_uncond = bf16(x, t, tokens), bf16(x, t, null)
    got = guided_field(bf16, tokens, null_prompt(10), 4.3)(x, t)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, cfg_velocity(u_cond.float(), u_uncond.float(), 4.3))
    assert not torch.equal(got, cfg_velocity(u_cond, u_uncond, 4.3).float())   # bf16 would round


def test_a_cfg_interval_guides_inside_it_and_uses_the_conditional_field_outside():
    tokens = tokenize(["red", "a blue circle"], max_len=10)
    model = _RecordingModel()
    x = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    t = torch.tensor([0.1, 0.5])                                  # one sample outside, one inside
    got = guided_field(model, tokens, null_prompt(10), 4.0, interval=(0.2, 1.0))(x, t)
    guided = guided_field(model, tokens, null_prompt(10), 4.0)(x, t)
    torch.testing.assert_close(got[0], model(x, t, tokens)[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1], guided[1], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(got[0], guided[0])


# ---------------------------------------------------------------------------------------------
# the command line

def test_sample_grid_has_a_row_per_prompt_and_same_seed_gives_same_png(runs, tmp_path, expect, run):
    args = ["--ckpt", runs["flow"], "--n", 3, "--sample-steps", 2, "--seed", 7, "--prompt",
            "a red circle", "--prompt", "", "--device", "cpu", "--scale", 1, "--no-labels"]
    run("sample.py", *args, "--out", tmp_path / "a.png")
    assert Image.open(tmp_path / "a.png").size == expect.grid_size(2, 3)
    assert sample.main([str(a) for a in args] + ["--out", str(tmp_path / "b.png")]) == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert sample.main([str(a) for a in args] + ["--cfg", "1", "--out", str(tmp_path / "c.png")]) == 0
    assert Image.open(tmp_path / "c.png").size == expect.grid_size(2, 3)
    assert (tmp_path / "c.png").read_bytes() != (tmp_path / "a.png").read_bytes()


def test_labelled_grid_carries_prompts_and_settings_in_png_text_and_a_prompts_file(runs, tmp_path,
                                                                                  expect):
    prompts = ["a red circle", "a small blue square on a black background"]
    args = ["--ckpt", runs["flow"], "--n", 2, "--sample-steps", 2, "--seed", 3, "--device", "cpu"]
    for p in prompts:
        args += ["--prompt", p]
    assert sample.main([str(a) for a in (*args, "--out", tmp_path / "l.png")]) == 0
    assert sample.main([str(a) for a in (*args, "--out", tmp_path / "u.png", "--no-labels")]) == 0
    labelled, plain = Image.open(tmp_path / "l.png"), Image.open(tmp_path / "u.png")
    assert plain.size == expect.grid_size(2, 2, px=64, pad=2)        # 32 px drawn 2x by default
    assert labelled.width == plain.width and labelled.height > plain.height   # a strip per row
    assert json.loads(labelled.text["prompts"]) == prompts
    assert (labelled.text["seed"], json.loads(labelled.text["cfg"]), json.loads(labelled.text["steps"])) \
        == ("3", [2.0], [2])
    assert labelled.text["checkpoint"] == str(runs["flow"])
    assert (tmp_path / "l.prompts.txt").read_text().splitlines() == prompts
    # the labels are text over the picture: the rows of images themselves are unchanged
    assert np.asarray(labelled)[-64:].tolist() == np.asarray(plain)[-64:].tolist()


def test_a_sweep_grid_has_a_block_of_columns_per_guidance_weight_and_step_count(runs, tmp_path,
                                                                               expect):
    args = ["--ckpt", runs["flow"], "--n", 2, "--seed", 1, "--prompt", "a red circle", "--prompt",
            "a blue square", "--device", "cpu", "--scale", 1, "--no-labels"]

    def draw(*extra, out="s.png"):
        assert sample.main([str(a) for a in (*args, *extra, "--out", tmp_path / out,
                                             "--overwrite")]) == 0
        return np.asarray(Image.open(tmp_path / out))
    sweep = draw("--cfg", 1, 2, 4, "--sample-steps", 1, 3)
    assert sweep.shape[:2][::-1] == expect.grid_size(2, 2 * 3 * 2)   # rows: prompts; 6 blocks of 2
    for block, (steps, w) in [(1, (1, 2)), (5, (3, 4))]:    # of (1, 1), (1, 2), ..., (3, 4)
        one = draw("--cfg", w, "--sample-steps", steps, out="one.png")   # the same images, alone
        width = one.shape[1] + 2
        assert np.array_equal(sweep[:, block * width: block * width + width - 2], one), block
    args.remove("--no-labels")
    assert draw("--cfg", 1, 4, out="l.png").shape[0] > expect.grid_size(2, 4)[1]   # labels on top


# outputs never clobber; pictures are never silently wrong (issue 22)


def test_sample_refuses_an_existing_picture_or_prompts_file_unless_overwrite(cli, runs, tmp_path,
                                                                            expect):
    png = tmp_path / "keep.png"
    png.write_bytes(b"a picture of mine")
    args = ["sample.py", "--ckpt", runs["flow"], "--n", 1, "--sample-steps", 1, "--prompt", "a red circle"]
    expect.one_line_error(cli(*args, "--out", png), f"--out {png} exists")
    assert png.read_bytes() == b"a picture of mine" and not (tmp_path / "keep.prompts.txt").exists()
    (tmp_path / "new.prompts.txt").write_text("my notes\n")
    expect.one_line_error(cli(*args, "--out", tmp_path / "new.png"), "new.prompts.txt exists")
    assert not (tmp_path / "new.png").exists()
    assert cli(*args, "--out", png, "--overwrite")[0] == 0
    assert Image.open(png).width == 64                            # now the picture


def test_nan_weights_or_a_huge_guidance_weight_stop_with_the_cause_not_a_picture(cli, runs,
                                                                                 tmp_path, expect):
    tampered = torch.load(runs["flow"], weights_only=True)
    next(iter(tampered["ema"].values())).view(-1)[0] = float("nan")
    checkpoint.save_checkpoint(tmp_path / "nan.pt", tampered)   # a valid digest: only the NaN
    args = ["sample.py", "--n", 1, "--sample-steps", 2, "--prompt", "a red circle"]
    expect.one_line_error(cli(*args, "--ckpt", tmp_path / "nan.pt", "--out", tmp_path / "a.png"),
                          "its weights hold inf/NaN")
    expect.one_line_error(cli(*args, "--ckpt", runs["flow"], "--cfg", "1e308", "--out", tmp_path / "b.png"),
                          "the guidance weight 1e+308 is far too large")
    assert not list(tmp_path.glob("*.png")) and not list(tmp_path.glob("*.txt"))


def test_a_multiline_prompt_takes_one_line_of_the_prompts_file(cli, runs, tmp_path):
    prompts = ["a red\ncircle", "a blue\r\nsquare\u2028here"]
    rc, _, err = cli("sample.py", "--ckpt", runs["flow"], "--n", 1, "--sample-steps", 1, "--prompt",
                     prompts[0], "--prompt", prompts[1], "--out", tmp_path / "p.png")
    assert rc == 0, err
    assert (tmp_path / "p.prompts.txt").read_text().splitlines() == \
        ["a red\\ncircle", "a blue\\r\\nsquare\\u2028here"]


# ---------------------------------------------------------------------------------------------
# a newcomer's first hour (issue 23)


def test_sample_without_a_run_names_the_command_that_makes_one(cli, expect):
    rc, out, err = cli("sample.py", "--prompt", "a red circle")            # runs/flow/ckpt.pt: none
    expect.one_line_error((rc, out, err), "--ckpt runs/flow/ckpt.pt: file not found; train one "
                                          "with python train_flow.py")
    assert "--out runs/smoke" in err


def test_sample_uses_autocast_by_default_and_generate_depends_only_on_the_seed(runs):
    assert sample.parser().parse_args([]).amp == "auto"
    model, vae, _ = checkpoint.load_flow(runs["flow"])
    one = sample.generate(model, vae, ["a red circle", "a blue square"], 2, 2.0, seed=1)
    two = sample.generate(model, vae, ["a red circle"], sample_steps=2, cfg_scale=2.0, seed=1)
    assert one.dtype == torch.uint8 and torch.equal(one[:1], two)   # image i: (seed, i) alone


def test_words_the_training_captions_never_had_get_a_note(cli, runs, tmp_path):
    ckpt = torch.load(runs["flow"], weights_only=True)
    words = ckpt["caption_words"]
    assert words["circle"] > 0 and "zebra" not in words
    rc, _, err = cli("sample.py", "--ckpt", runs["flow"], "--n", 1, "--sample-steps", 1,
                     "--prompt", "a red Zebra and a circle", "--prompt", "a red circle",
                     "--out", tmp_path / "z.png")
    assert rc == 0, err
    notes = [line for line in err.splitlines() if line.startswith("note: prompt")]
    assert len(notes) == 1 and "'Zebra'" in notes[0] and "'circle'" not in notes[0]
    assert "'and'" in notes[0]                 # no built-in caption says "and" either
    rc, _, err = cli("sample.py", "--ckpt", runs["flow"], "--n", 1, "--sample-steps", 1,
                     "--prompt", "A LARGE RED CIRCLE", "--out", tmp_path / "upper.png")
    assert rc == 0 and "'LARGE', 'RED'" in err, err       # the model reads bytes: case counts
