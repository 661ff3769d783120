"""Tests for common.py: the argparse types, run_main's one-line errors, the device/precision
choice, the compile fallback, the EMA, the progress log and the NaN / out-of-memory guards."""

import argparse
import errno
import json
import os

import pytest
import torch

import common
from data import DataError


@pytest.mark.parametrize("flag,value", [("--steps", 0), ("--batch-size", -4), ("--lr", 0),
                                        ("--lr", "inf"), ("--lr", "nan"), ("--seed", -1)])
def test_non_positive_numbers_are_argparse_errors(cli, flag, value):
    rc, _, err = cli("train_flow.py", flag, value)
    assert rc == 2 and "usage:" in err and flag in err and "Traceback" not in err


def test_maybe_compile_falls_back_to_eager_with_a_warning(monkeypatch, capsys):
    model = torch.nn.Linear(2, 2)
    x = torch.randn(3, 2)

    def no_compiler(m):
        raise RuntimeError("no C++ compiler found")
    monkeypatch.setattr(torch, "compile", no_compiler)
    net, compiled = common.maybe_compile(model, torch.device("cpu"), True)
    assert net is model and not compiled
    assert "warning: torch.compile failed" in capsys.readouterr().err

    def fails_on_first_call(m):                  # the real failure mode: compile is lazy
        def call(*a):
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")
        return call
    monkeypatch.setattr(torch, "compile", fails_on_first_call)
    net, _ = common.maybe_compile(model, torch.device("cpu"), True)
    assert torch.equal(net(x), model(x)) and torch.equal(net(x), model(x))
    err = capsys.readouterr().err
    assert err.count("warning: torch.compile failed") == 1 and "running eagerly" in err
    assert common.maybe_compile(model, torch.device("cpu"), None) == (model, False)


def test_argparse_types_accept_valid_and_reject_invalid_values():
    assert common.positive(int)("3") == 3 and common.positive(float, allow_zero=True)("0") == 0.0
    assert common.fraction("0.5") == 0.5 and common.seed_value("0") == 0
    for parse, text in [(common.positive(int), "0"), (common.positive(float), "nan"),
                        (common.positive(int), "x"), (common.fraction, "1"),
                        (common.fraction, "-0.1"), (common.seed_value, str(2 ** 63))]:
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


def test_help_ends_each_flag_with_its_default_unless_the_text_names_it():
    p = argparse.ArgumentParser(formatter_class=common.HelpFormatter)
    p.add_argument("--steps", type=int, default=7, help="training steps")
    p.add_argument("--lr", type=float, default=0.5, help="learning rate. Default: half")
    text = " ".join(p.format_help().split())
    assert "training steps. Default: 7" in text and "Default: half" in text
    assert "Default: 0.5" not in text


@pytest.mark.parametrize("error,code,fragment", [
    (common.UserError("--data x: folder not found"), 2, "error: --data x: folder not found"),
    (DataError("no images"), 2, "error: no images"),
    (OSError(errno.ENOSPC, "No space left on device", "/full/ckpt.pt"), 2,
     "error: No space left on device: /full/ckpt.pt"),
    (KeyboardInterrupt(), 130, "interrupted"),
])
def test_run_main_turns_user_errors_disk_errors_and_ctrl_c_into_one_line(capsys, error, code,
                                                                         fragment):
    def main():
        raise error
    assert common.run_main(main) == code
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert common.run_main(lambda: 0) == 0


def test_pick_amp_on_cpu():
    cpu = torch.device("cpu")
    assert common.pick_amp("off", cpu) is None
    assert common.pick_amp("bf16", cpu) is torch.bfloat16
    assert common.pick_amp("auto", cpu) is (torch.bfloat16 if common.cpu_has_native_bf16() else None)
    with pytest.raises(common.UserError, match="--amp fp16 needs CUDA"):
        common.pick_amp("fp16", cpu)
    with pytest.raises(common.UserError, match="not a device"):
        common.pick_device("toaster")


def test_ema_follows_the_warmed_up_decay_in_closed_form_float64():
    model = torch.nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = common.EMA(model, decay=0.9)
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
    progress = common.Progress(log, total_steps=10, start_step=0, batch_size=4)
    progress.report(5, {"loss": 0.25})
    progress.report(10, {"loss": 0.125})
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(line["step"], line["loss"]) for line in lines] == [(5, 0.25), (10, 0.125)]
    assert all(line["img_per_s"] > 0 for line in lines)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("step 5/10 loss 0.25 |") and "ETA" in out[0]


def test_check_finite_names_the_step_and_the_checkpoint_for_nan_loss_or_weights(tmp_path):
    model = torch.nn.Linear(2, 2)
    common.check_finite(torch.tensor(1.0), 3, tmp_path / "ckpt.pt", model)     # all finite: quiet
    with pytest.raises(common.UserError, match=r"loss became nan by step 3; .*ckpt\.pt"):
        common.check_finite(torch.tensor(float("nan")), 3, tmp_path / "ckpt.pt")
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(common.UserError, match="weights became inf/NaN by step 4"):
        common.check_finite(torch.tensor(1.0), 4, tmp_path / "ckpt.pt", model)


def test_out_of_memory_is_recognised_and_names_a_smaller_batch():
    assert common.is_oom(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried ..."))
    assert common.is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory"))
    assert not common.is_oom(RuntimeError("shape mismatch"))
    assert "--batch-size 32" in str(common.oom_error(64))


def test_prepare_out_refuses_a_folder_it_cannot_write(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(common.UserError, match="cannot write there"):
        common.prepare_out(a_file / "sub")
    assert common.prepare_out(tmp_path / "new" / "run").is_dir()
    assert os.listdir(tmp_path / "new" / "run") == []
