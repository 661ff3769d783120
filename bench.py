"""Benchmark: how fast the DiT, the VAE and the sampler run, and how close to the machine's limits.

    python bench.py                                    # DiT training step, tiny preset, eager fp32
    python bench.py --what all --matrix                # everything, {eager, compile} x {fp32, bf16}
    python bench.py --what dit --preset B --latent-size 32 --amp bf16 --compile --json

Measured, each in one process, with untimed warm-up steps (torch.compile compiles there) and the
median of --repeats timed steps (CUDA is synchronised before every clock reading):
    peak       the machine's ceilings: fp32 and bf16 matmul GFLOP/s on large square products
               (2048^2 on CPU, 8192^2 on CUDA) and copy GB/s (bytes read + written by a tensor copy)
    dit        DiT training step: forward + flow_matching_loss + backward + AdamW step, images/s
    vae        VAE training step: forward + vae_loss + backward + AdamW step, images/s
    sample     50 Euler steps with classifier-free guidance (one batched 2B forward per step)
               under torch.inference_mode, images/s
    attention  the hand-written attention() vs the fused F.scaled_dot_product_attention on the
               DiT's self-attention shape (B, H, L, Dh), forward + backward

FLOPs and MFU. FLOPs per image come from torch.utils.flop_counter.FlopCounterMode over one eager
step (forward + backward; the optimizer is not counted) divided by the batch. It counts matmuls,
convolutions and attention kernels only; elementwise work, norms and softmax count as free. Then
    achieved GFLOP/s = FLOPs/img x img/s,   MFU = achieved / measured matmul peak of the same dtype,
the bf16 peak under --amp bf16, else the fp32 peak -- which on CUDA is the TF32 peak, since TF32
is on (the "peak" column says which). MFU is against what this machine measurably does, not
against the datasheet. The attention rows count the FLOPs of the written-out math for both
versions (FlopCounterMode sees no FLOPs in SDPA's CPU kernel).

Memory. On CUDA, torch.cuda.max_memory_allocated after a reset before each row. On CPU, the
process's peak resident set (VmHWM), reset per row through /proc/self/clear_refs where Linux
allows it; otherwise it is the high-water mark of the whole process so far.
"""
import argparse
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from attention import attention
import train_flow
import train_vae
from common import (HelpFormatter, autocast, cpu_has_native_bf16, physical_cores, pick_amp,
                    pick_device, positive, run_main)
from dit import PRESETS, DiT, dit_config
from embeddings import null_prompt, tokenize
from flow import flow_matching_loss
from runs import check_output, write_json
from sample import euler_sample, guided_field
from vae import VAE, vae_loss, vae_preset

# Prompts in the built-in data's caption format, tokenized at its max_prompt_len.
CAPTIONS = ("a small red circle left of a large blue square on a white background",
            "a large green triangle on a black background",
            "a small yellow diamond left of a small purple cross on a gray background")
MAX_PROMPT_LEN = 80
CFG_SCALE = 4.0


# ---------------------------------------------------------------------------------------------
# Arithmetic and timing

def count_flops(fn):
    """FLOPs that FlopCounterMode sees while fn() runs (matmuls, convolutions, attention)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def gflops(flops, seconds):
    """Throughput in GFLOP/s of `flops` done in `seconds`."""
    return flops / seconds / 1e9


def mfu(achieved, peak):
    """Model FLOPs utilisation in percent: achieved / peak (same units)."""
    return 100.0 * achieved / peak


def synchronizer(device):
    """A function that waits for the device's queued work (a no-op on CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def median_time(fn, warmup, repeats, sync=lambda: None, clock=time.perf_counter):
    """Median seconds of one fn() call: `warmup` untimed calls, then `repeats` timed ones.
    sync() runs before each clock reading, so queued GPU work is inside its own measurement."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = clock()
        fn()
        sync()
        times.append(clock() - t0)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------
# The machine: name, peaks, memory

def device_name(device):
    """GPU name, or the CPU model with its core count and torch's thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def matmul_peak(device, dtype, n, warmup, repeats):
    """GFLOP/s of an (n, n) @ (n, n) product in `dtype`: 2 n^3 FLOPs per product."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = median_time(lambda: torch.mm(a, b), warmup, repeats, synchronizer(device))
    return gflops(2 * n ** 3, seconds)


def copy_bandwidth(device, numel, warmup, repeats):
    """GB/s of dst.copy_(src) for float32 tensors of `numel` elements: bytes read + written."""
    src = torch.ones(numel, device=device)
    dst = torch.empty_like(src)
    seconds = median_time(lambda: dst.copy_(src), warmup, repeats, synchronizer(device))
    return 2 * src.nbytes / seconds / 1e9


def fp32_peak_name(device):
    """What the fp32 peak really measures: TF32 tensor cores on CUDA when TF32 is allowed."""
    return "tf32" if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32 else "fp32"


def reset_peak_memory(device):
    """Start a new memory high-water mark; True if it really was reset."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:   # "5" resets VmHWM (Linux >= 4.0)
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory_mb(device):
    """MiB: CUDA max_memory_allocated, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    try:
        with open("/proc/self/status") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # KiB on Linux
    return kb / 1024


# ---------------------------------------------------------------------------------------------
# What is measured. Each bench_* returns (the timed step, its eager twin for FLOP counting,
# the module whose gradients the counted step leaves behind, or None).

def compile_fresh(fn, on):
    """torch.compile(fn) on a fresh dynamo cache (so this row's compile lands in its warm-up);
    fn itself when `on` is false."""
    if not on:
        return fn
    torch._dynamo.reset()
    return torch.compile(fn)


def prompt_tokens(batch, device):
    """(batch, MAX_PROMPT_LEN) tokens of realistic captions."""
    return tokenize([CAPTIONS[i % len(CAPTIONS)] for i in range(batch)], MAX_PROMPT_LEN).to(device)


def training_step(loss_fn, device, amp, opt=None):
    """forward + loss under autocast, backward, and (when opt is given) AdamW step + zero_grad."""
    def step():
        with autocast(device, amp):
            loss = loss_fn()
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return step


def dit_config_from_args(args):
    """The preset at --latent-size, with any --dim/--depth/--heads overrides."""
    sizes = {k: getattr(args, k) for k in ("dim", "depth", "heads") if getattr(args, k)}
    return dit_config(args.preset, input_size=args.latent_size, max_prompt_len=MAX_PROMPT_LEN,
                      **sizes)


def bench_dit(args, device, compile_, amp):
    """DiT training step on (B, 4, h, w) latents with prompt tokens."""
    config = dit_config_from_args(args)
    model = DiT(config).to(device)
    z = torch.randn(args.batch, config.in_channels, config.height, config.width, device=device)
    tokens = prompt_tokens(args.batch, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    null = null_prompt(MAX_PROMPT_LEN).to(device)
    net = compile_fresh(model, compile_)
    eager = training_step(lambda: flow_matching_loss(model, z, tokens, null), device, amp)
    step = training_step(lambda: flow_matching_loss(net, z, tokens, null), device, amp, opt)
    return step, eager, model


def bench_vae(args, device, compile_, amp):
    """VAE training step on (B, 3, H, W) images in [-1, 1]."""
    name = {32: "32", 64: "64"}.get(args.image_size, "large")
    vae = VAE(vae_preset(name, args.image_size)).to(device)
    x = torch.rand(args.batch, 3, args.image_size, args.image_size, device=device) * 2 - 1
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-4)
    net = compile_fresh(vae, compile_)

    def loss_fn(m):
        x_hat, mu, logvar = m(x)
        return vae_loss(x, x_hat, mu, logvar)[0]
    eager = training_step(lambda: loss_fn(vae), device, amp)
    step = training_step(lambda: loss_fn(net), device, amp, opt)
    return step, eager, vae


def run_settings(defaults, amp):
    """A training script's DEFAULTS as the parsed flags its step function reads."""
    return argparse.Namespace(**defaults, seed=0, amp="bf16" if amp is not None else "off")


def bench_dit_step(args, device, compile_, amp):
    """train_flow.train_step itself, as a run calls it: warm-up lr, the CondOT loss, backward,
    gradient clipping, AdamW (fused where available), the EMA update."""
    config = dit_config_from_args(args)
    run = run_settings(train_flow.DEFAULTS, amp)
    model, ema, opt, scaler = train_flow.build(config, run, device, amp)
    z = torch.randn(args.batch, config.in_channels, config.height, config.width, device=device)
    tokens = prompt_tokens(args.batch, device)
    null = null_prompt(MAX_PROMPT_LEN).to(device)
    net = compile_fresh(model, compile_)
    eager = training_step(lambda: flow_matching_loss(model, z, tokens, null), device, amp)
    return (lambda: train_flow.train_step(net, model, ema, opt, scaler, z, tokens, null, 0, run,
                                          amp)), eager, model


def bench_vae_step(args, device, compile_, amp):
    """train_vae.train_step itself, as a run calls it (loss, backward, clipping, AdamW, EMA)."""
    run = run_settings(train_vae.DEFAULTS, amp)
    name = {32: "32", 64: "64"}.get(args.image_size, "large")
    vae, ema, opt, scaler = train_vae.build(vae_preset(name, args.image_size), run, device, amp)
    images = torch.randint(0, 256, (args.batch, 3, args.image_size, args.image_size),
                           dtype=torch.uint8, device=device)
    net = compile_fresh(vae, compile_)

    def loss_fn():
        x = images.float() / 127.5 - 1
        x_hat, mu, logvar = vae(x)
        return vae_loss(x, x_hat, mu, logvar)[0]
    eager = training_step(loss_fn, device, amp)
    return (lambda: train_vae.train_step(net, vae, ema, opt, scaler, images, 0, run, amp)), eager, vae


def bench_sample(args, device, compile_, amp):
    """--steps Euler steps with CFG: each step one forward of 2B through the (compiled) DiT."""
    config = dit_config_from_args(args)
    model = DiT(config).to(device).eval().requires_grad_(False)
    noise = torch.randn(args.batch, config.in_channels, config.height, config.width, device=device)
    tokens = prompt_tokens(args.batch, device)
    null = null_prompt(MAX_PROMPT_LEN).to(device)
    net = compile_fresh(model, compile_)

    def sampler(m):
        def run():
            with torch.inference_mode(), autocast(device, amp):
                u = guided_field(m, tokens, null, CFG_SCALE)
                return euler_sample(lambda x, t: u(x, t).float(), noise, args.steps)
        return run
    return sampler(net), sampler(model), model


def bench_attention(args, device, compile_, amp, fused_kernel=False):
    """forward + backward of attention on the DiT's self-attention shape (B, H, L, Dh):
    the hand-written attention(), or F.scaled_dot_product_attention when fused_kernel."""
    config = dit_config(args.preset, input_size=args.latent_size)
    B, H = args.batch, config.heads
    L = (config.height // config.patch_size) * (config.width // config.patch_size)
    Dh = config.dim // config.heads
    q, k, v = (torch.randn(B, H, L, Dh, device=device, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(B, H, L, Dh, device=device)

    def fwd_bwd(fn):
        def run():
            with autocast(device, amp):
                out = fn(q, k, v)                                     # (B, H, L, Dh)
            torch.autograd.grad(out, (q, k, v), grad_out.to(out.dtype))
        return run
    fn = F.scaled_dot_product_attention if fused_kernel else attention
    return fwd_bwd(compile_fresh(fn, compile_)), fwd_bwd(attention), None


# Each row's default batch: the training runs' (train_flow.py, train_vae.py), and the grids'.
BATCH = {"dit": train_flow.DEFAULTS["batch_size"], "vae": train_vae.DEFAULTS["batch_size"],
         "sample": train_flow.DEFAULTS["batch_size"], "attention": train_flow.DEFAULTS["batch_size"]}
BENCHES = {"dit": [("dit-train", bench_dit, {}), ("dit-step", bench_dit_step, {})],
           "vae": [("vae-train", bench_vae, {}), ("vae-step", bench_vae_step, {})],
           "sample": [("sample", bench_sample, {})],
           "attention": [("attn-manual", bench_attention, {}),
                         ("attn-sdpa", bench_attention, {"fused_kernel": True})]}


def measure(what, build, kwargs, args, device, compile_, amp, peaks):
    """One table row: build, count FLOPs on the eager step, warm up, time, read peak memory."""
    mode = f"{'compile' if compile_ else 'eager'}/{'bf16' if amp is not None else 'fp32'}"
    row = {"what": what, "mode": mode, "batch": args.batch}
    try:
        memory_was_reset = reset_peak_memory(device)
        torch.manual_seed(0)
        step, eager, model = build(args, device, compile_, amp, **kwargs)
        flops = count_flops(eager)
        if model is not None:
            model.zero_grad(set_to_none=True)   # the counted step's gradients
        fused_before = torch._dynamo.utils.counters["inductor"]["fuse_attention"]
        seconds = median_time(step, args.untimed, args.repeats, synchronizer(device))
        peak_name = "bf16" if amp is not None else fp32_peak_name(device)
        achieved = gflops(flops, seconds)             # = FLOPs/img x img/s
        row.update(ms=1e3 * seconds, img_s=args.batch / seconds, gflop_img=flops / args.batch / 1e9,
                   gflop_s=achieved, mfu=mfu(achieved, peaks[peak_name]), peak=peak_name,
                   mem_mb=peak_memory_mb(device), mem_reset=memory_was_reset)
        if compile_:
            row["fused_attention"] = (torch._dynamo.utils.counters["inductor"]["fuse_attention"]
                                      - fused_before)
    except Exception as e:   # one failed row (no compiler, out of memory) must not end a sweep
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
    return row


def measure_peaks(device, dtypes, with_copy, warmup, repeats):
    """{"fp32"/"tf32": GFLOP/s, "bf16": GFLOP/s, "copy_gbs": GB/s} for what is asked."""
    n = 8192 if device.type == "cuda" else 2048
    peaks = {}
    for dtype in dtypes:
        name = "bf16" if dtype == torch.bfloat16 else fp32_peak_name(device)
        emulated = name == "bf16" and device.type == "cpu" and not cpu_has_native_bf16()
        # A CPU without native bf16 emulates it ~100x slower: a smaller product says as much.
        peaks[name] = matmul_peak(device, dtype, 512 if emulated else n, warmup, repeats)
        if emulated:
            peaks["bf16_matmul_n"] = 512
    if with_copy:
        numel = 2 ** 28 if device.type == "cuda" else 2 ** 25   # 1 GiB / 128 MiB of float32
        peaks["copy_gbs"] = copy_bandwidth(device, numel, warmup, repeats)
    peaks["matmul_n"] = n
    return peaks


# ---------------------------------------------------------------------------------------------
# Command line

def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Throughput, FLOPs, MFU and peak memory of the DiT and VAE training steps, "
                    "the sampler and attention, against this machine's measured matmul peak. "
                    "Modes: --amp and --compile pin one value each; --matrix sweeps every axis "
                    "they leave free, i.e. {eager, compile} x {fp32, bf16}.",
        epilog="""examples:
  python bench.py                                   # DiT-tiny training step, eager fp32
  python bench.py --what all --matrix               # everything, {eager, compile} x {fp32, bf16}
  python bench.py --what dit --preset B --latent-size 32 --batch-size 256 --amp bf16 --compile --json b.json
""", formatter_class=HelpFormatter)
    p.add_argument("--what", choices=["dit", "vae", "sample", "attention", "peak", "all", "recipe"],
                   default="dit", help="what to measure; peak = matmul GFLOP/s and copy GB/s "
                                       "only; all = every one; recipe = a few timed steps of each "
                                       "phase of `python train_flow.py` and its predicted minutes "
                                       "on this machine. Default: dit")
    p.add_argument("--preset", choices=list(PRESETS), default="tiny", help="DiT preset. Default: tiny")
    p.add_argument("--dim", type=positive(int), default=None,
                   help="override the preset's width (e.g. 384 with --depth 6 --heads 6)")
    p.add_argument("--depth", type=positive(int), default=None, help="override the preset's depth")
    p.add_argument("--heads", type=positive(int), default=None, help="override the preset's heads")
    p.add_argument("--batch-size", "--batch", dest="batch_size", type=positive(int), default=None,
                   help="images per step (attention: its B). Default: the training runs' (DiT, "
                        "sampling and attention 64, VAE 32)")
    p.add_argument("--latent-size", type=positive(int), default=8,
                   help="DiT latent height = width (4 channels, patch 2). Default: 8")
    p.add_argument("--image-size", type=positive(int), default=32,
                   help="VAE image size; 32 and 64 use those presets, other sizes the 'large' "
                        "one. Default: 32")
    p.add_argument("--sample-steps", "--steps", dest="steps", type=positive(int), default=50,
                   help="Euler steps (each a 2B forward, CFG) for sample. Default: 50")
    p.add_argument("--amp", choices=["auto", "off", "bf16"], default=None,
                   help="plain fp32 (TF32 matmuls on CUDA) or bf16 autocast; auto = what the "
                        "training scripts pick (bf16 on CUDA and on CPUs with native bf16, else "
                        "off). Default: auto, both off and bf16 with --matrix")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (or attention function). Default: eager, "
                        "both with --matrix")
    p.add_argument("--matrix", action="store_true",
                   help="sweep {eager, compile} x {fp32, bf16}, except the axes --amp/--compile pin")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps. Default: auto")
    p.add_argument("--repeats", type=positive(int), default=10,
                   help="timed steps; the median is reported. Default: 10")
    p.add_argument("--untimed", "--warmup", dest="untimed", type=positive(int, allow_zero=True),
                   default=3, help="untimed steps first; torch.compile compiles here, so keep >= 1 "
                                   "with it (--warmup is the old spelling: in the training "
                                   "scripts it means learning-rate warm-up). Default: 3")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                   help="write one JSON object (rows, device, torch, threads, peaks) to PATH; "
                        "--json alone or --json - prints it instead of the table")
    p.add_argument("--overwrite", action="store_true",
                   help="let --json PATH replace an existing file (refused otherwise, before any "
                        "measurement)")
    return p.parse_args(argv)


def busy_note():
    """A line when the machine is busy (load average above its physical cores), else None: the
    peaks and rates measured then are below what the machine does idle."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    cores = physical_cores()
    if load > cores + 0.5:
        return (f"note: this machine is busy (load average {load:.1f} on {cores} cores): every "
                f"number below is lower than on an idle machine")
    return None


def predict_recipe(args, device, amp):
    """The default `python train_flow.py` on this machine, phase by phase: seconds per call from
    --repeats timed calls (train_flow.estimate_phases, which the run itself prints up front), and
    the minutes the default run's counts of calls make."""
    run = run_settings(train_flow.DEFAULTS, amp)
    run.amp = args.amp or "auto"
    steps, every = run.steps, run.sample_every
    counts = {"VAE": train_vae.DEFAULTS["steps"], "encoding": run.n_builtin, "DiT": steps,
              "sample grids": len(range(every, steps, every)) + 1}
    print("timing the phases of the default run ...", file=sys.stderr, flush=True)
    seconds = train_flow.estimate_phases(run, device, 1, counts["VAE"], counts["encoding"],
                                         counts["DiT"], counts["sample grids"], MAX_PROMPT_LEN,
                                         timed=args.repeats)
    return {"phases": {k: {"count": counts[k], "minutes": s / 60} for k, s in seconds.items()},
            "minutes": sum(seconds.values()) / 60, "amp": str(pick_amp(run.amp, device))}


def format_recipe(recipe):
    lines = [f"predicted `python train_flow.py` on this machine (amp {recipe['amp']}):"]
    for name, p in recipe["phases"].items():
        unit = "images" if name == "encoding" else "grids" if name == "sample grids" else "steps"
        lines.append(f"  {name:<13} {p['count']:>6} {unit:<6} {p['minutes']:6.1f} min")
    lines.append(f"  {'total':<20} {recipe['minutes']:13.1f} min")
    return "\n".join(lines)


def modes(args, device):
    """[(compile, amp dtype or None)] from --compile, --amp and --matrix."""
    compiles = [args.compile] if args.compile is not None else ([False, True] if args.matrix else [False])
    amps = [args.amp] if args.amp is not None else (["off", "bf16"] if args.matrix else ["auto"])
    return [(c, pick_amp(a, device)) for c in compiles for a in amps]


COLUMNS = [("what", "what", "<12", ""), ("mode", "mode", "<12", ""), ("batch", "batch", ">5", ""),
           ("ms/step", "ms", ">9", ".2f"), ("img/s", "img_s", ">9", ".1f"),
           ("GFLOP/img", "gflop_img", ">9", ".4g"), ("GFLOP/s", "gflop_s", ">9", ".1f"),
           ("MFU %", "mfu", ">6", ".1f"), ("peak", "peak", ">5", ""), ("mem MB", "mem_mb", ">8", ".0f")]


def format_table(rows):
    """Plain-text table of the rows (COLUMNS); missing numbers show as '-'."""
    lines = [" ".join(f"{head:{align}}" for head, _, align, _ in COLUMNS)]
    for row in rows:
        line = " ".join(f"{row[key]:{align}{spec}}" if key in row else f"{'-':{align}}"
                        for _, key, align, spec in COLUMNS)
        if "fused_attention" in row:
            line += f"  fused attention patterns: {row['fused_attention']}"
        if "error" in row:
            line += f"  FAILED: {row['error']}"
        lines.append(line)
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    args.batch = args.batch_size
    device = pick_device(args.device)
    if args.json not in (None, "-"):
        check_output(args.json, "--json", args.overwrite)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True   # as in training: fp32 matmuls use TF32
        torch.backends.cudnn.allow_tf32 = True
    todo = list(BENCHES) if args.what == "all" else [] if args.what in ("peak", "recipe") else [args.what]
    mode_list = modes(args, device)
    if args.what not in ("all", "peak"):   # only the peaks that the MFU column needs
        dtypes = sorted({amp or torch.float32 for _, amp in mode_list}, key=str)
    else:
        dtypes = [torch.float32, torch.bfloat16]
    if "--warmup" in (argv if argv is not None else sys.argv[1:]):
        print("note: --warmup is now --untimed (the training scripts' --warmup is the learning-rate "
              "warm-up)", file=sys.stderr)
    busy = busy_note()
    if busy:
        print(busy, file=sys.stderr)
    print(f"measuring peaks on {device_name(device)} ...", file=sys.stderr, flush=True)
    peaks = measure_peaks(device, dtypes, args.what in ("peak", "all"), args.untimed, args.repeats)
    rows = []
    for what in todo:
        args.batch = args.batch_size or BATCH[what]
        for compile_, amp in mode_list:
            for name, build, kwargs in BENCHES[what]:
                print(f"measuring {name} ...", file=sys.stderr, flush=True)
                rows.append(measure(name, build, kwargs, args, device, compile_, amp, peaks))
    recipe = predict_recipe(args, device, mode_list[0][1]) if args.what == "recipe" else None
    report = {"device": device_name(device), "device_type": device.type,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "busy": busy,
              "peaks": peaks, "rows": rows, "args": vars(args), "recipe": recipe,
              "memory": ("torch.cuda.max_memory_allocated" if device.type == "cuda"
                         else "process peak RSS (VmHWM); mem_reset says if reset per row")}
    if args.json == "-":
        print(json.dumps(report))
    else:
        print(f"device {report['device']}, torch {report['torch']}")
        print("peaks: " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in peaks.items()
                                    if k in ("fp32", "tf32", "bf16"))
              + (f", copy {peaks['copy_gbs']:.1f} GB/s" if "copy_gbs" in peaks else "")
              + f" ({peaks['matmul_n']}^2 matmuls)")
        if busy:
            print(busy)
        if rows:
            print(format_table(rows))
        if recipe is not None:
            print(format_recipe(recipe))
        if args.json is not None:
            write_json(args.json, report, "results")
            print(f"wrote {args.json}")
    return 1 if any("error" in row for row in rows) else 0


if __name__ == "__main__":
    sys.exit(run_main(main))
