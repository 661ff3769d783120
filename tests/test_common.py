"""Tests for common.py: the argparse types, run_main's one-line errors, the device/precision
choice, the compile fallback, Phase, and the flags every script shares."""

import argparse
import errno
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


def test_finite_type_and_every_float_flag_reject_nan_and_inf():
    assert common.finite("-2.5") == -2.5
    for text in ("nan", "inf", "-inf", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            common.finite(text)


@pytest.mark.parametrize("script,flag", [("train_vae.py", "--beta"), ("train_vae.py", "--sigma"),
                                         ("train_flow.py", "--cfg"), ("train_flow.py", "--p-uncond"),
                                         ("sample.py", "--cfg"), ("evaluate.py", "--cfg")])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_float_flags_refuse_nan_and_inf_at_parse_time(cli, script, flag, value):
    rc, _, err = cli(script, flag, value)
    assert rc == 2 and "usage:" in err and flag in err and "Traceback" not in err


def test_mps_falls_back_to_the_cpu_with_one_line_where_it_is_missing(capsys, monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert common.pick_device("mps") == torch.device("cpu")
    assert capsys.readouterr().err.strip() == \
        "warning: --device mps: MPS is not available on this machine; using the CPU"
    assert common.pick_amp("auto", torch.device("mps")) is None       # autocast only when asked


def test_phase_prints_progress_with_an_eta_and_a_last_line(capsys, monkeypatch):
    clock = iter([0.0, 6.0, 7.0, 12.0, 13.0])                # seconds at each update
    monkeypatch.setattr(common.time, "perf_counter", lambda: next(clock))
    phase = common.Phase("encoding 100 images", 100)         # every 5 s
    phase.update(50)                                         # 6 s: half done -> ETA 6 s
    phase.update(60)                                         # 7 s: too soon for another line
    phase.update(100)                                        # 12 s: the end
    assert capsys.readouterr().out.splitlines() == ["encoding 100 images: 50/100 in 6 s, ETA 6 s",
                                                    "encoding 100 images: 100/100 in 12 s, done"]


@pytest.mark.parametrize("script", ["train_vae.py", "train_flow.py", "sample.py", "evaluate.py",
                                    "bench.py", "dit.py"])
def test_every_help_ends_with_examples(cli, script):
    rc, out, _ = cli(script, "--help")
    examples = out[out.rindex("example"):].splitlines()
    assert rc == 0 and 3 <= len(examples) <= 4 and all(f"python {script}" in line
                                                        for line in examples[1:])


def test_threads_default_to_the_physical_cores_and_a_busy_machine_is_named(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(common.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
        cores = common.physical_cores()
        assert 1 <= cores <= os.cpu_count()
        assert common.set_threads() == f"CPU threads: {cores} ({cores} physical cores)"
        assert torch.get_num_threads() == cores
        assert common.set_threads(1).startswith("CPU threads: 1 (--threads)")
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(2 * cores))      # torchrun shares the cores
        assert common.set_threads().startswith("CPU threads: 1 ")
        monkeypatch.setattr(common.os, "getloadavg", lambda: (cores + 3.0, 0.0, 0.0))
        assert "this machine is busy (load average" in common.set_threads()
    finally:
        torch.set_num_threads(before)
