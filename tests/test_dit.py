"""Tests for dit.py: adaLN-Zero initialisation, trainability of every weight, prompt and time
conditioning, non-square latents, the presets, torch.compile, and the config round trip."""
from dataclasses import asdict

import pytest
import torch

import dit
from dit import DiT, DiTConfig, PRESETS, dit_preset, preset_table
from embeddings import tokenize

SMALL = dict(dim=64, depth=2, heads=2, prompt_dim=32, prompt_heads=2, prompt_depth=1,
             max_prompt_len=16, time_dim=64, input_size=8, in_channels=4, patch_size=2)


def _inputs(B=3, config=None, seed=0):
    config = config or DiTConfig(**SMALL)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, config.in_channels, config.height, config.width, generator=g)
    t = torch.rand(B, generator=g)
    prompts = ["a red circle", "", "green triangle on blue", "x", "🐈 cat"][:B]
    return x, t, tokenize(prompts, config.max_prompt_len)


def test_new_model_outputs_exact_zero():
    torch.manual_seed(0)
    model = DiT(DiTConfig(**SMALL))
    x, t, tokens = _inputs()
    out = model(x, t, tokens)
    assert out.shape == x.shape
    assert torch.equal(out, torch.zeros_like(x))


def test_every_block_is_identity_at_init():
    torch.manual_seed(1)
    model = DiT(DiTConfig(**SMALL))
    x, t, tokens = _inputs()
    y, mask, pooled = model.prompt(tokens)
    c = model.condition(t, pooled)
    h = model.patch(x) + torch.randn(3, 16, 64)
    for block in model.blocks:
        assert torch.equal(block(h, c, y, mask), h)


def test_three_adamw_steps_change_every_parameter(one_thread):
    """adaLN-Zero makes gradients arrive in a chain of three steps (weight decay is off, so a
    parameter moves only when its gradient is non-zero):
      step 1: only the final Linear has a gradient (everything behind it is multiplied by its
              zero weight);
      step 2: with the final Linear non-zero, gradients reach the final adaLN, the block gates
              (adaLN Linears), the zero cross-attention output projections and the patch
              embedding, but not the branches, which are multiplied by zero gates/projections;
      step 3: the gates and cross projections are non-zero, so the attention/MLP branches, the
              cross-attention q/kv, the prompt encoder, the time MLP and the pooled-prompt
              Linear all receive gradients.
    So 3 is the smallest number of steps after which every weight can have moved."""
    torch.manual_seed(2)
    model = DiT(DiTConfig(**SMALL))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    x, t, tokens = _inputs(B=4, seed=2)
    target = torch.randn_like(x)
    unchanged_after = []
    for _ in range(3):
        loss = (model(x, t, tokens) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        unchanged_after.append({n for n, p in model.named_parameters() if torch.equal(p, before[n])})
    assert unchanged_after[2] == set(), f"dead weights: {sorted(unchanged_after[2])}"
    # The chain is really three steps long (otherwise the docstring above is wrong).
    assert "blocks.0.attn.to_qkv.weight" in unchanged_after[1]
    assert "prompt.ngram.weight" in unchanged_after[1]
    assert "final.linear.weight" not in unchanged_after[0]


def test_trained_model_output_depends_on_prompt(one_thread):
    torch.manual_seed(3)
    model = DiT(DiTConfig(**SMALL))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens = tokenize(["a red circle", "a blue square"], 16).repeat(4, 1, 1)  # (8, S, W): A, B, A..
    sign = torch.tensor([1.0, -1.0]).repeat(4).view(-1, 1, 1, 1)
    losses = []
    for step in range(100):
        x = torch.randn(8, 4, 8, 8)
        t = torch.rand(8)
        loss = (model(x, t, tokens) - sign).pow(2).mean()       # A -> +1, B -> -1 everywhere
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 0.9                                       # zero output, unit target
    assert sum(losses[-10:]) / 10 < 0.2 * losses[0]
    model.eval()
    with torch.no_grad():
        x, t = torch.randn(1, 4, 8, 8).expand(2, -1, -1, -1), torch.full((2,), 0.5)
        out = model(x, t, tokens[:2])
    assert out[0].mean() > 0.5 and out[1].mean() < -0.5
    assert (out[0] - out[1]).abs().mean() > 1.0


def test_condition_differs_materially_between_t0_and_t1_at_init():
    torch.manual_seed(4)
    model = DiT(DiTConfig(**SMALL))
    _, _, tokens = _inputs()
    _, _, pooled = model.prompt(tokens)
    c0 = model.condition(torch.zeros(3), pooled)
    c1 = model.condition(torch.ones(3), pooled)
    rel = (c0 - c1).norm(dim=1) / torch.maximum(c0.norm(dim=1), c1.norm(dim=1))
    assert (rel > 0.3).all()


def test_non_square_latents_give_output_of_input_shape():
    torch.manual_seed(5)
    config = DiTConfig(**{**SMALL, "input_size": 8, "input_width": 4})
    model = DiT(config)
    for p in model.parameters():                  # leave the zero init, so the shape is not 0 * x
        p.data.normal_(0, 0.05)
    x, t, tokens = _inputs(B=2, config=config)
    out = model(x, t, tokens)
    assert out.shape == (2, 4, 8, 4)
    assert out.abs().max() > 0
    with pytest.raises(ValueError, match="8x4"):
        model(torch.randn(2, 4, 4, 8), t, tokens)   # transposed: same token count, wrong layout


def test_preset_table_lists_dit_widths_depths_heads_and_growing_sizes():
    rows = preset_table()
    assert [r[0] for r in rows] == ["micro", "tiny", "S", "B", "L", "XL"]
    dims = {name: (dim, depth, heads) for name, dim, depth, heads, _ in rows}
    assert dims["S"] == (384, 12, 6)
    assert dims["B"] == (768, 12, 12)
    assert dims["L"] == (1024, 24, 16)
    assert dims["XL"] == (1152, 28, 16)
    counts = [r[4] for r in rows]
    assert all(n > 0 for n in counts)
    assert counts == sorted(counts) and len(set(counts)) == 6
    small = DiT(dit_preset("tiny", input_size=32))
    assert counts[1] == sum(p.numel() for p in small.parameters())


def test_dit_config_dict_round_trip_and_unknown_field_error():
    config = dit_preset("S", input_size=16, input_width=8, qk_norm=True)
    d = asdict(config)
    assert DiTConfig.from_dict(d) == config
    assert DiTConfig.from_dict(asdict(PRESETS["tiny"])) == PRESETS["tiny"]
    with pytest.raises(ValueError, match="colour"):
        DiTConfig.from_dict({**d, "colour": 3})
    with pytest.raises(ValueError):
        dit_preset("XXL")


@pytest.mark.slow
def test_tiny_dit_compiles_fullgraph_and_matches_eager():
    torch.manual_seed(6)
    config = DiTConfig(**{**SMALL, "prompt_depth": 2})
    model = DiT(config).eval()
    for p in model.parameters():                  # non-zero weights, so the comparison has content
        p.data.normal_(0, 0.1)
    x, t, tokens = _inputs(B=2, config=config)
    compiled = torch.compile(model, fullgraph=True)   # fullgraph: a graph break raises
    with torch.no_grad():
        eager = model(x, t, tokens)
        out = compiled(x, t, tokens)
    assert eager.abs().max() > 0.1
    torch.testing.assert_close(out, eager, rtol=0, atol=1e-4)


def test_dit_command_line_prints_the_table_and_refuses_unknown_flags(capsys):
    dit.main(["--latent-size", "8"])
    out = capsys.readouterr().out.splitlines()
    assert "(8x8x4 latents, patch 2)" in out[0] and [line.split()[0] for line in out[1:]] == \
        list(PRESETS)
    with pytest.raises(SystemExit) as e:
        dit.main(["--bogus"])
    assert e.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err
