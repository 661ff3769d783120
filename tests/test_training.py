"""Tests for training.py: the EMA against its closed form, the progress log, the NaN /
divergence guard and the out-of-memory message."""

import errno
import json
import os

import pytest
import torch

import common
import runs
import training


def test_ema_follows_the_warmed_up_decay_in_closed_form_float64():
    model = torch.nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = training.EMA(model, decay=0.9)
    expected = 0.0
    for step in range(30):
        with torch.no_grad():
            model.weight.fill_(float(step + 1))
        ema.update(model, step)
        d = min(0.9, (1 + step) / (10 + step))
        expected = d * expected + (1 - d) * (step + 1)
        assert ema.model.weight.item() == pytest.approx(expected, rel=1e-12)
    assert not ema.model.weight.requires_grad and not ema.model.training


def test_progress_prints_a_line_and_appends_one_json_object_per_report(tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    progress = training.Progress(log, total_steps=10, start_step=0, batch_size=4)
    progress.report(5, {"loss": 0.25})
    progress.report(10, {"loss": 0.125})
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(line["step"], line["loss"]) for line in lines] == [(5, 0.25), (10, 0.125)]
    assert all(line["img_per_s"] > 0 for line in lines)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("step 5/10 loss 0.25 |") and "ETA" in out[0]


def test_loss_guard_names_the_step_and_the_checkpoint_for_nan_loss_or_weights(tmp_path):
    model = torch.nn.Linear(2, 2)
    (tmp_path / "ckpt.pt").write_bytes(b"the last good one")
    guard = training.LossGuard(tmp_path / "ckpt.pt")
    guard.check(1.0, 3, model)                                     # all finite: quiet
    with pytest.raises(common.UserError, match=r"loss became nan by step 3; .*ckpt\.pt"):
        guard.check(float("nan"), 3)
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(common.UserError, match="weights became inf/NaN by step 4"):
        guard.check(None, 4, model)


def test_loss_guard_stops_a_loss_that_grows_by_orders_of_magnitude(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"the last good one")
    guard = training.LossGuard(tmp_path / "ckpt.pt")
    guard.reference(2.0)                          # the first step's loss
    for step, loss in enumerate([1.5, 0.9, 0.5, 0.8, 30.0], start=1):   # noisy, 60x the lowest
        guard.check(loss, step)
    with pytest.raises(common.UserError, match=r"loss grew from 0\.5 to 2\.8e\+23 \(diverging\) "
                                               r"by step 6; stopped without saving.*ckpt\.pt"):
        guard.check(2.8e23, 6)
    early = training.LossGuard(tmp_path / "ckpt.pt")
    early.reference(2.0)                          # exploding before the first check is caught too
    with pytest.raises(common.UserError, match="diverging"):
        early.check(5e3, 50)


def test_out_of_memory_is_recognised_and_names_a_smaller_batch():
    assert common.is_oom(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried ..."))
    assert common.is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory"))
    assert not common.is_oom(RuntimeError("shape mismatch"))
    assert "--batch-size 32" in str(training.oom_error(64))


def test_fused_adamw_takes_the_same_steps_as_the_reference_implementation():
    torch.manual_seed(0)
    a = torch.nn.Linear(8, 4)
    b = torch.nn.Linear(8, 4)
    b.load_state_dict(a.state_dict())
    fast = training.adamw(a.parameters(), 1e-2, (0.9, 0.95), 0.01)
    reference = torch.optim.AdamW(b.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.01,
                                  foreach=False)
    for _ in range(5):
        x = torch.randn(16, 8)
        for model, opt in ((a, fast), (b, reference)):
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_progress_leaves_paused_work_out_of_the_images_per_second(tmp_path, capsys, monkeypatch):
    clock = iter([0.0, 1.0, 3.0])                # start; a pause from 1 s to 3 s; then 4 s
    monkeypatch.setattr(training.time, "perf_counter", lambda: next(clock, 4.0))
    progress = training.Progress(tmp_path / "log.jsonl", total_steps=20, start_step=0, batch_size=10)
    with progress.paused():                      # e.g. a sample grid
        pass
    progress.report(4, {"loss": 1.0})
    line = json.loads((tmp_path / "log.jsonl").read_text())
    assert line["img_per_s"] == 20.0             # 40 images in the 2 s that were training
    assert "| 20 img/s |" in capsys.readouterr().out


def test_loss_guard_says_no_checkpoint_exists_and_advises_amp_off_only_under_autocast(tmp_path):
    guard = training.LossGuard(tmp_path / "ckpt.pt")                  # no checkpoint yet, float32
    with pytest.raises(common.UserError) as stopped:
        guard.check(float("nan"), 3)
    assert "no checkpoint had been written yet; lower --lr" in str(stopped.value)
    assert "untouched" not in str(stopped.value) and "--amp off" not in str(stopped.value)
    under_bf16 = training.LossGuard(tmp_path / "ckpt.pt", amp=torch.bfloat16)
    with pytest.raises(common.UserError, match="lower --lr or use --amp off"):
        under_bf16.check(float("inf"), 3)


def test_a_log_that_is_a_symlink_is_replaced_by_a_copy_never_appended_through(tmp_path):
    elsewhere = tmp_path / "elsewhere.jsonl"
    elsewhere.write_text('{"step": 1, "loss": 2.0}\n')
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").symlink_to(elsewhere)
    training.Progress(run / "log.jsonl", total_steps=4, start_step=1, batch_size=2).report(
        2, {"loss": 1.0})
    assert elsewhere.read_text() == '{"step": 1, "loss": 2.0}\n'       # untouched
    assert not (run / "log.jsonl").is_symlink()
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()] == \
        [1, 2]


def test_a_full_disk_while_appending_to_the_log_names_the_file(tmp_path, monkeypatch):
    log = tmp_path / "log.jsonl"
    progress = training.Progress(log, total_steps=4, start_step=0, batch_size=2)

    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(runs.os, "write", full)
    with pytest.raises(common.UserError, match=f"could not append to {log} \\(No space left on "
                                               f"device\\)"):
        progress.report(2, {"loss": 1.0})
