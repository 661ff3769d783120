"""Tests for bench.py: the FLOP counting, the timing loop (with a fake clock), the peaks' and
rows' arithmetic, the mode sweep, the recipe's prediction, the flags' bounds, and one tiny
end-to-end run of the command line."""
import ast
import json
from argparse import Namespace
from pathlib import Path

import pytest
import torch

import bench
import common
import plan
import train_flow
import train_vae

CPU = torch.device("cpu")


def test_count_flops_of_a_matmul_is_exactly_2mnk():
    M, K, N = 7, 5, 3
    a, b = torch.randn(M, K), torch.randn(K, N)
    assert bench.count_flops(lambda: a @ b) == 2 * M * N * K


def test_count_flops_of_linear_forward_backward_is_three_forwards():
    B, d_in, d_out = 4, 6, 9
    layer = torch.nn.Linear(d_in, d_out)
    x = torch.randn(B, d_in, requires_grad=True)
    forward = 2 * B * d_in * d_out
    assert bench.count_flops(lambda: layer(x)) == forward
    # backward: grad of the input (B, out) @ (out, in) and of the weight (out, B) @ (B, in)
    assert bench.count_flops(lambda: layer(x).sum().backward()) == 3 * forward


def test_peaks_are_flops_and_bytes_over_the_measured_time(monkeypatch):
    seen = []

    def fake_median_time(fn, warmup, repeats, sync):
        seen.append((warmup, repeats))
        return 0.25
    monkeypatch.setattr(bench, "median_time", fake_median_time)
    monkeypatch.setattr(bench, "cpu_has_native_bf16", lambda: False)   # bf16 emulated: 512^2
    peaks = bench.measure_peaks(CPU, [torch.float32, torch.bfloat16], True, warmup=2, repeats=5)
    assert peaks["matmul_n"] == 2048 and peaks["bf16_matmul_n"] == 512
    assert peaks["fp32"] == pytest.approx(2 * 2048 ** 3 / 0.25 / 1e9)
    assert peaks["bf16"] == pytest.approx(2 * 512 ** 3 / 0.25 / 1e9)
    assert peaks["copy_gbs"] == pytest.approx(2 * 4 * 2 ** 25 / 0.25 / 1e9)   # read + write
    assert seen == [(2, 5)] * 3
    assert [bench.precision(d, CPU) for d in (None, torch.float32, torch.bfloat16,
                                              torch.float16)] == ["fp32", "fp32", "bf16", "fp16"]


def test_vae_rows_time_the_bare_step_and_train_vae_step_with_the_same_flops():
    args = Namespace(batch=2, image_size=32, untimed=0, repeats=1)
    peaks = {"fp32": 100.0}
    bare, whole = (bench.measure(name, build, kwargs, args, CPU, False, None, peaks)
                   for name, build, kwargs in bench.BENCHES["vae"])
    for row in (bare, whole):
        assert "error" not in row and row["mode"] == "eager/fp32" and row["peak"] == "fp32"
        assert row["img_s"] == pytest.approx(2 / (row["ms"] / 1e3))
        assert row["gflop_s"] == pytest.approx(row["gflop_img"] * row["img_s"])
        assert row["mfu"] == pytest.approx(row["gflop_s"])          # 100 * x / 100
    assert (bare["what"], whole["what"]) == ("vae-train", "vae-step")
    assert whole["gflop_img"] == pytest.approx(bare["gflop_img"]) and bare["gflop_img"] > 0


def test_attention_rows_take_the_dit_size_flags():
    tiny = bench.PRESETS["tiny"]                     # its self-attention: FLOPs ~ heads x Dh x L^2
    rows = [bench.measure("attn-manual", bench.bench_attention, {},
                          Namespace(batch=2, preset="tiny", latent_size=8, dim=dim, depth=None,
                                    heads=None, untimed=0, repeats=1), CPU, False, None,
                          {"fp32": 1.0}) for dim in (None, 2 * tiny.dim)]
    assert rows[0]["gflop_img"] > 0 and "error" not in rows[1]
    assert rows[1]["gflop_img"] == pytest.approx(2 * rows[0]["gflop_img"])


def test_a_failed_row_is_reported_not_raised():
    def broken(*_, **__):
        raise RuntimeError("no compiler\nmore lines")
    row = bench.measure("x", broken, {}, Namespace(batch=2), CPU, True, None, {})
    assert row == {"what": "x", "mode": "compile/fp32", "batch": 2,
                   "error": "RuntimeError: no compiler"}


def test_matrix_sweeps_only_the_axes_not_pinned_and_the_default_is_the_training_amp():
    def modes(*flags):
        return bench.modes(bench.parser().parse_args(list(flags)), CPU)
    assert modes() == [(False, common.pick_amp("auto", CPU))]
    assert modes("--matrix") == [
        (False, None), (False, torch.bfloat16), (True, None), (True, torch.bfloat16)]
    assert modes("--matrix", "--amp", "bf16") == [(False, torch.bfloat16), (True, torch.bfloat16)]
    assert modes("--matrix", "--no-compile") == [(False, None), (False, torch.bfloat16)]
    assert bench.BATCH["dit"] == train_flow.DEFAULTS["batch_size"] == 64
    assert bench.BATCH["vae"] == train_vae.DEFAULTS["batch_size"]


def test_every_integer_flag_is_bounded_and_json_takes_a_path_or_dash():
    p = bench.parser()
    flags = [a.option_strings[0] for a in p._actions if a.type and isinstance(a.type("3"), int)]
    assert {"--batch-size", "--repeats", "--untimed", "--sample-steps", "--dim"} <= set(flags)
    for flag in flags:
        p.parse_args([flag, "3"])
        with pytest.raises(SystemExit):
            p.parse_args([flag, str(10 ** 12)])
    assert p.parse_args(["--json"]).json == p.parse_args(["--json", "-"]).json == "-"
    assert p.parse_args(["--json", "out.json"]).json == "out.json"


def test_bench_imports_nothing_posix_only():
    tree = ast.parse(Path(bench.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & {"resource", "fcntl", "termios", "pwd", "grp", "posix"}


def test_memory_is_unknown_without_proc_and_the_table_shows_dashes(monkeypatch):
    def no_proc(*_, **__):
        raise FileNotFoundError("/proc")
    monkeypatch.setattr(bench, "open", no_proc, raising=False)
    assert bench.peak_memory_mb(CPU) is None and bench.reset_peak_memory(CPU) is False
    rows = [{"what": "dit-train", "mode": "eager/fp32", "batch": 4, "ms": 10.0, "img_s": 400.0,
             "gflop_img": 0.25, "gflop_s": 100.0, "mfu": 50.0, "peak": "fp32", "mem_mb": None},
            {"what": "sample", "mode": "compile/bf16", "batch": 4, "error": "RuntimeError: x"}]
    lines = bench.format_table(rows).splitlines()
    assert len(lines) == 3 and "MFU %" in lines[0]
    assert "400.0" in lines[1] and "50.0" in lines[1] and lines[1].endswith(" -")
    assert lines[2].split()[3:5] == ["-", "-"] and "FAILED: RuntimeError: x" in lines[2]


def test_recipe_times_each_phase_and_multiplies_by_the_default_runs_calls(monkeypatch):
    timed = []

    def fake_median_time(fn, warmup=2, repeats=3, sync=None):
        fn()                                 # the real calls run once: the API is the scripts'
        timed.append((warmup, repeats))
        return 0.5
    for module in (bench, train_flow, plan):   # the steps: train_flow.step_seconds
        monkeypatch.setattr(module, "median_time", fake_median_time)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    recipe = bench.predict_recipe(7, CPU, None)
    assert torch.equal(torch.get_rng_state(), before)                 # the RNG is restored
    flow, vae = train_flow.DEFAULTS, train_vae.DEFAULTS
    grids = 3                                 # at 1000, 2000 and the end (2930)
    assert flow["steps"] == 2930 and flow["sample_every"] == 1000
    calls = {"VAE": vae["steps"], "encoding": flow["n_builtin"] / 256, "DiT": flow["steps"],
             "sample grids": grids * flow["sample_steps"]}
    assert list(recipe["phases"]) == list(calls) and timed == [(2, 7)] * 3 + [(1, 7)]
    for name, p in recipe["phases"].items():
        assert p["call_s"] == 0.5 and p["minutes"] == pytest.approx(calls[name] * 0.5 / 60)
    assert recipe["phases"]["encoding"]["count"] == flow["n_builtin"]
    assert recipe["phases"]["sample grids"]["count"] == grids
    assert recipe["minutes"] == pytest.approx(sum(calls.values()) * 0.5 / 60)
    text = bench.format_recipe(recipe)
    assert "20000 images" in text and f"{recipe['minutes']:.1f} min" in text.splitlines()[-1]


def test_cli_dit_tiny_prints_one_json_object_with_positive_throughput(cli, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    rc, out, err = cli("bench.py", "--what", "dit", "--preset", "tiny", "--batch-size", "4",
                       "--latent-size", "4", "--repeats", "2", "--untimed", "1", "--device", "cpu",
                       "--amp", "off", "--json")
    assert rc == 0, err
    report = json.loads(out)
    assert report["device_type"] == "cpu" and report["peaks"]["fp32"] > 0
    assert report["threads"] == 1 and "1 (OMP_NUM_THREADS)" in report["threads_line"]
    train, step = report["rows"]             # the bare step, and train_flow.train_step itself
    assert (train["what"], step["what"]) == ("dit-train", "dit-step")
    for row in (train, step):
        assert "error" not in row
        assert row["mode"] == "eager/fp32" and row["batch"] == 4
        assert row["img_s"] > 0 and row["gflop_img"] > 0
        assert row["gflop_s"] == pytest.approx(row["gflop_img"] * row["img_s"])
        assert row["mfu"] == pytest.approx(100 * row["gflop_s"] / report["peaks"]["fp32"])
    assert step["gflop_img"] == pytest.approx(train["gflop_img"])    # the same model's FLOPs
