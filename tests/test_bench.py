"""Tests for bench.py: the FLOP counting, the throughput/MFU arithmetic, the timing loop (with a
fake clock), the mode sweep, and one tiny end-to-end run of the command line."""
import json

import pytest
import torch

import bench
import common
import train_flow
import train_vae


def test_count_flops_of_a_matmul_is_exactly_2mnk():
    M, K, N = 7, 5, 3
    a, b = torch.randn(M, K), torch.randn(K, N)
    assert bench.count_flops(lambda: a @ b) == 2 * M * N * K


def test_count_flops_of_a_linear_forward_is_2_batch_in_out():
    B, d_in, d_out = 4, 6, 9
    layer, x = torch.nn.Linear(d_in, d_out), torch.randn(B, d_in)
    assert bench.count_flops(lambda: layer(x)) == 2 * B * d_in * d_out


def test_count_flops_of_linear_forward_backward_is_three_forwards():
    B, d_in, d_out = 4, 6, 9
    layer = torch.nn.Linear(d_in, d_out)
    x = torch.randn(B, d_in, requires_grad=True)
    forward = 2 * B * d_in * d_out
    # backward: grad of the input (B, out) @ (out, in) and of the weight (out, B) @ (B, in)
    assert bench.count_flops(lambda: layer(x).sum().backward()) == 3 * forward


def test_gflops_and_mfu_arithmetic():
    assert bench.gflops(2e9, 0.5) == pytest.approx(4.0)
    assert bench.mfu(achieved=50.0, peak=200.0) == pytest.approx(25.0)


def test_matmul_peak_is_2n_cubed_over_its_measured_time(monkeypatch):
    seen = {}

    def fake_median_time(fn, warmup, repeats, sync):
        fn()
        seen["calls"] = (warmup, repeats)
        return 0.25
    monkeypatch.setattr(bench, "median_time", fake_median_time)
    n = 32
    peak = bench.matmul_peak(torch.device("cpu"), torch.float32, n, warmup=2, repeats=5)
    assert peak == pytest.approx(2 * n ** 3 / 0.25 / 1e9)
    assert peak > 0 and seen["calls"] == (2, 5)


def test_median_time_calls_warmup_plus_repeats_times_and_returns_median_of_timed_calls():
    ticks = iter([0.0, 1.0, 10.0, 13.0, 20.0, 22.0])   # durations 1, 3, 2 -> median 2
    calls, syncs = [], []
    result = bench.median_time(lambda: calls.append(1), warmup=2, repeats=3,
                               sync=lambda: syncs.append(1), clock=lambda: next(ticks))
    assert len(calls) == 2 + 3
    assert result == 2.0
    assert len(syncs) == 2 * 3          # before starting and before stopping each timed call


def test_matrix_sweeps_only_the_axes_not_pinned():
    cpu = torch.device("cpu")
    assert bench.modes(bench.parse_args([]), cpu) == [(False, None)]
    assert bench.modes(bench.parse_args(["--matrix"]), cpu) == [
        (False, None), (False, torch.bfloat16), (True, None), (True, torch.bfloat16)]
    assert bench.modes(bench.parse_args(["--matrix", "--amp", "bf16"]), cpu) == [
        (False, torch.bfloat16), (True, torch.bfloat16)]
    assert bench.modes(bench.parse_args(["--matrix", "--no-compile"]), cpu) == [
        (False, None), (False, torch.bfloat16)]


def test_table_shows_missing_values_as_dashes_and_failures():
    rows = [{"what": "dit-train", "mode": "eager/fp32", "batch": 4, "ms": 10.0, "img_s": 400.0,
             "gflop_img": 0.25, "gflop_s": 100.0, "mfu": 50.0, "peak": "fp32", "mem_mb": 512.0},
            {"what": "sample", "mode": "compile/bf16", "batch": 4, "error": "RuntimeError: x"}]
    lines = bench.format_table(rows).splitlines()
    assert len(lines) == 3 and "MFU %" in lines[0]
    assert "400.0" in lines[1] and "50.0" in lines[1]
    assert "-" in lines[2] and "FAILED: RuntimeError: x" in lines[2]


def test_cli_dit_tiny_prints_one_json_object_with_positive_throughput(run):
    proc = run("bench.py", "--what", "dit", "--preset", "tiny", "--batch-size", "4", "--latent-size", "4",
               "--repeats", "2", "--untimed", "1", "--device", "cpu", "--amp", "off", "--json",
               timeout=120)
    report = json.loads(proc.stdout)
    assert report["device_type"] == "cpu" and report["peaks"]["fp32"] > 0
    train, step = report["rows"]             # the bare step, and train_flow.train_step itself
    assert (train["what"], step["what"]) == ("dit-train", "dit-step")
    for row in (train, step):
        assert "error" not in row
        assert row["mode"] == "eager/fp32" and row["batch"] == 4
        assert row["img_s"] > 0 and row["gflop_img"] > 0
        assert row["gflop_s"] == pytest.approx(row["gflop_img"] * row["img_s"])
        assert row["mfu"] == pytest.approx(100 * row["gflop_s"] / report["peaks"]["fp32"])
    assert step["gflop_img"] == pytest.approx(train["gflop_img"])    # the same model's FLOPs


def test_old_flag_spellings_still_parse_and_json_takes_a_path():
    old = bench.parse_args(["--batch", "8", "--steps", "5", "--warmup", "2", "--json"])
    new = bench.parse_args(["--batch-size", "8", "--sample-steps", "5", "--untimed", "2", "--json",
                            "-"])
    assert (old.batch_size, old.steps, old.untimed, old.json) == \
        (new.batch_size, new.steps, new.untimed, new.json) == (8, 5, 2, "-")
    assert bench.parse_args(["--json", "out.json"]).json == "out.json"


def test_a_busy_machine_is_named_next_to_the_peaks_and_rows_default_to_the_training_batch(
        monkeypatch):
    monkeypatch.setattr(bench.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert bench.busy_note() is None
    monkeypatch.setattr(bench.os, "getloadavg", lambda: (bench.physical_cores() + 4.0, 0.0, 0.0))
    assert "this machine is busy" in bench.busy_note()
    assert bench.BATCH["dit"] == train_flow.DEFAULTS["batch_size"] == 64
    assert bench.BATCH["vae"] == train_vae.DEFAULTS["batch_size"]
    auto = common.pick_amp("auto", torch.device("cpu"))               # --amp auto, as training
    assert bench.modes(bench.parse_args([]), torch.device("cpu")) == [(False, auto)]
