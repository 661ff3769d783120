"""Benchmark: how fast the DiT, the VAE and the sampler run, how close to the machine's limits,
and how long the default `python train_flow.py` takes here.

    python bench.py                            # DiT training step, tiny preset, --amp auto
    python bench.py --what all --matrix        # everything, {eager, compile} x {fp32, bf16}
    python bench.py --what recipe              # the default run's minutes, phase by phase

Measured in one process, each with untimed steps first (torch.compile compiles there), then the
median of --repeats timed steps (CUDA is synchronised before every clock reading):
    peak       matmul GFLOP/s, fp32 and bf16, of large square products (2048^2 on CPU, 8192^2 on
               CUDA), and copy GB/s (bytes read + written by a tensor copy)
    dit        DiT training step, images/s: dit-train is forward + flow_matching_loss + backward
               + AdamW; dit-step is train_flow.train_step itself, as a run calls it
    vae        the same for the VAE: vae-train (vae_loss) and vae-step (train_vae.train_step)
    sample     --sample-steps Euler steps with classifier-free guidance (one batched 2B forward
               per step) under torch.inference_mode, images/s
    attention  the hand-written attention() vs the fused F.scaled_dot_product_attention on the
               DiT's self-attention shape (B, H, L, Dh), forward + backward
    recipe     the default `python train_flow.py`, phase by phase: train_flow.step_seconds (what
               --minutes sizes by: a VAE step, a DiT step and an Euler step of a sample grid at
               the run's sizes, eager under --amp, two untimed calls and the median of --repeats)
               on 256 built-in images, and vae.encode_means of those, times the calls the run
               makes. The global RNG state is restored afterwards.

FLOPs per image: torch.utils.flop_counter.FlopCounterMode over one eager step (forward +
backward, not the optimizer) divided by the batch. It counts matmuls, convolutions and attention
kernels; elementwise work, norms and softmax count as free (the attention rows count the
written-out math for both versions: it sees no FLOPs in SDPA's CPU kernel). Then achieved
GFLOP/s = FLOPs/img x img/s, and MFU = achieved / the measured matmul peak of the same dtype: bf16
under bf16 autocast, else fp32 -- on CUDA that is TF32, which is on (the "peak" column says
which). MFU is against what this machine measurably does, not against the datasheet.

Memory: on CUDA torch.cuda.max_memory_allocated, reset before each row; on CPU the process's
peak resident set (VmHWM in /proc/self/status), reset per row through /proc/self/clear_refs where
Linux allows it (else the process's high-water mark so far), unknown ("-") where there is no /proc.
"""
import argparse
import gc
import json
import os
import platform
import sys

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import train_flow
import train_vae
from attention import attention
from common import (MAX_BATCH, MAX_STEPS, Parser, autocast, check_output, cpu_has_native_bf16,
                    median_time, pick_amp, pick_device, positive, run_main, set_threads,
                    synchronizer, write_json)
from data import load_dataset, to_model_range
from dit import PRESETS, DiT, dit_preset
from embeddings import null_prompt, tokenize
from flow import flow_matching_loss
from sample import euler_sample, guided_field
from vae import VAE, encode_means, vae_loss

# Prompts in the built-in data's caption format, tokenized at its max_prompt_len (BOS and up to
# 14 words, rounded up to a multiple of 8 as train_flow.py does).
CAPTIONS = ("a small red circle left of a large blue square on a white background",
            "a large green triangle on a black background",
            "a small yellow diamond left of a small purple cross on a gray background")
MAX_PROMPT_LEN = 16


# ---------------------------------------------------------------------------------------------
# Counting and timing

def count_flops(fn):
    """FLOPs that FlopCounterMode sees while fn() runs (matmuls, convolutions, attention)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# ---------------------------------------------------------------------------------------------
# The machine: name, peaks, memory

def device_name(device):
    """GPU name, or the CPU model with its core count and torch's thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def precision(dtype, device):
    """What a matmul in `dtype` (None: float32) runs in: bf16, fp16, or fp32 -- TF32 on CUDA,
    where pick_device turns TF32 on."""
    fp32 = "tf32" if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32 else "fp32"
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, fp32)


def measure_peaks(device, dtypes, with_copy, warmup, repeats):
    """{precision: GFLOP/s of an (n, n) @ (n, n) product, 2 n^3 FLOPs, for each of `dtypes`;
    "copy_gbs": GB/s of dst.copy_(src) on float32, bytes read + written; "matmul_n": n}."""
    def seconds(fn):
        return median_time(fn, warmup, repeats, synchronizer(device))
    n = 8192 if device.type == "cuda" else 2048
    peaks = {"matmul_n": n}
    for dtype in dtypes:
        name = precision(dtype, device)
        # A CPU without native bf16 emulates it ~100x slower: a smaller product says as much.
        m = 512 if name == "bf16" and device.type == "cpu" and not cpu_has_native_bf16() else n
        a, b = (torch.randn(m, m, device=device, dtype=dtype) for _ in range(2))
        peaks[name] = 2 * m ** 3 / seconds(lambda: torch.mm(a, b)) / 1e9
        if m != n:
            peaks["bf16_matmul_n"] = m
    if with_copy:
        src = torch.ones(2 ** 28 if device.type == "cuda" else 2 ** 25, device=device)
        dst = torch.empty_like(src)                    # float32: 1 GiB on CUDA, 128 MiB on CPU
        peaks["copy_gbs"] = 2 * src.nbytes / seconds(lambda: dst.copy_(src)) / 1e9
    return peaks


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
    """MiB: CUDA max_memory_allocated, or the process's peak RSS on CPU; None where unknown."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration, ValueError, IndexError):
        return None


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


def settings(defaults, **more):
    """A training script's DEFAULTS as the parsed flags its functions read."""
    return argparse.Namespace(**{**defaults, "seed": 0, "vae_preset": None, **more})


def preset_config(args):
    """The DiT config: --preset at --latent-size, with any --dim/--depth/--heads."""
    sizes = {k: getattr(args, k) for k in ("dim", "depth", "heads") if getattr(args, k)}
    return dit_preset(args.preset, input_size=args.latent_size, max_prompt_len=MAX_PROMPT_LEN,
                      **sizes)


def dit_inputs(args, device):
    """The DiT config (`preset_config`), random (B, 4, h, w) latents, B captions as prompt tokens,
    and the null prompt."""
    config = preset_config(args)
    z = torch.randn(args.batch, config.in_channels, config.height, config.width, device=device)
    S, W = MAX_PROMPT_LEN, config.prompt_word_bytes
    tokens = tokenize([CAPTIONS[i % len(CAPTIONS)] for i in range(args.batch)], S, W)
    return config, z, tokens.to(device), null_prompt(S, W).to(device)


def bench_dit(args, device, compile_, amp, whole=False):
    """The DiT training step; with `whole`, train_flow.train_step itself as a run calls it
    (warm-up lr, the CondOT loss with prompt dropout, backward, clipping, fused AdamW, the EMA)."""
    config, z, tokens, null = dit_inputs(args, device)
    if whole:
        run = settings(train_flow.DEFAULTS)
        model, ema, opt, scaler = train_flow.build(config, run, device, amp)
    else:
        model = DiT(config).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    net = compile_fresh(model, compile_)
    eager = training_step(lambda: flow_matching_loss(model, z, tokens, null), device, amp)
    if whole:
        return (lambda: train_flow.train_step(net, model, ema, opt, scaler, z, tokens, null, 0,
                                              run, amp)), eager, model
    return training_step(lambda: flow_matching_loss(net, z, tokens, null), device, amp, opt), \
        eager, model


def bench_vae(args, device, compile_, amp, whole=False):
    """The VAE training step (the training scripts' preset for --image-size); with `whole`,
    train_vae.train_step itself on uint8 images (scaling, loss, backward, clipping, fused AdamW,
    the EMA)."""
    run = settings(train_vae.DEFAULTS, image_size=args.image_size)
    config = train_vae.vae_config(run)
    images = torch.randint(0, 256, (args.batch, 3, args.image_size, args.image_size),
                           dtype=torch.uint8, device=device)
    x = to_model_range(images)
    if whole:
        vae, ema, opt, scaler = train_vae.build(config, run, device, amp)
    else:
        vae = VAE(config).to(device)
        opt = torch.optim.AdamW(vae.parameters(), lr=1e-4)
    net = compile_fresh(vae, compile_)
    eager = training_step(lambda: vae_loss(x, *vae(x))[0], device, amp)
    if whole:
        return (lambda: train_vae.train_step(net, vae, ema, opt, scaler, images, 0, run, amp)), \
            eager, vae
    return training_step(lambda: vae_loss(x, *net(x))[0], device, amp, opt), eager, vae


def bench_sample(args, device, compile_, amp):
    """--sample-steps Euler steps with CFG: each step one forward of 2B through the DiT."""
    config, noise, tokens, null = dit_inputs(args, device)
    model = DiT(config).to(device).eval().requires_grad_(False)

    def sampler(m):
        def run():
            with torch.inference_mode(), autocast(device, amp):
                u = guided_field(m, tokens, null, train_flow.DEFAULTS["cfg_scale"])
                return euler_sample(lambda x, t: u(x, t).float(), noise, args.sample_steps)
        return run
    return sampler(compile_fresh(model, compile_)), sampler(model), model


def bench_attention(args, device, compile_, amp, fused_kernel=False):
    """forward + backward of attention on the DiT's self-attention shape (B, H, L, Dh):
    the hand-written attention(), or F.scaled_dot_product_attention when fused_kernel."""
    config = preset_config(args)
    L = (config.height // config.patch_size) * (config.width // config.patch_size)
    shape = (args.batch, config.heads, L, config.dim // config.heads)
    q, k, v = (torch.randn(shape, device=device, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(shape, device=device)

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
         "sample": train_flow.DEFAULTS["batch_size"],
         "attention": train_flow.DEFAULTS["batch_size"]}
BENCHES = {"dit": [("dit-train", bench_dit, {}), ("dit-step", bench_dit, {"whole": True})],
           "vae": [("vae-train", bench_vae, {}), ("vae-step", bench_vae, {"whole": True})],
           "sample": [("sample", bench_sample, {})],
           "attention": [("attn-manual", bench_attention, {}),
                         ("attn-sdpa", bench_attention, {"fused_kernel": True})]}


def measure(what, build, kwargs, args, device, compile_, amp, peaks):
    """One table row: build, count FLOPs on the eager step, warm up, time, read peak memory."""
    peak = precision(amp, device)                     # the matmul peak that MFU is against
    row = {"what": what, "mode": f"{'compile' if compile_ else 'eager'}/"
                                 f"{'fp32' if amp is None else peak}", "batch": args.batch}
    try:
        counters = torch._dynamo.utils.counters["inductor"]
        memory_was_reset = reset_peak_memory(device)
        torch.manual_seed(0)
        step, eager, model = build(args, device, compile_, amp, **kwargs)
        flops = count_flops(eager)
        if model is not None:
            model.zero_grad(set_to_none=True)   # the counted step's gradients
        fused = counters["fuse_attention"]
        seconds = median_time(step, args.untimed, args.repeats, synchronizer(device))
        achieved = flops / seconds / 1e9          # GFLOP/s = FLOPs/img x img/s
        row.update(ms=1e3 * seconds, img_s=args.batch / seconds, gflop_img=flops / args.batch / 1e9,
                   gflop_s=achieved, mfu=100 * achieved / peaks[peak], peak=peak,
                   mem_mb=peak_memory_mb(device), mem_reset=memory_was_reset)
        if compile_:
            row["fused_attention"] = counters["fuse_attention"] - fused
    except Exception as e:   # one failed row (no compiler, out of memory) must not end a sweep
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
    return row


def predict_recipe(repeats, device, amp):
    """The default `python train_flow.py` here (the docstring's `recipe`): train_flow.step_seconds
    (what --minutes sizes by) at the default run's sizes, on 256 built-in images, and
    vae.encode_means of those: {"phases": {name: {count, call_s, minutes}}, "minutes", "amp"}."""
    flow = settings(train_flow.DEFAULTS)
    train_set = load_dataset(None, flow.image_size, "train", 256, flow.seed)
    vae_config = train_vae.vae_config(flow)
    grids = len(range(flow.sample_every, flow.steps, flow.sample_every)) + 1
    with torch.random.fork_rng():                  # the caller's random streams stay as they were
        t_vae, t_dit, t_grid = train_flow.step_seconds(flow, device, amp, train_set, vae_config,
                                                     True, repeats)
        vae = VAE(vae_config).to(device)
        t_enc = median_time(lambda: encode_means(vae, train_set.images), 1, repeats,
                            synchronizer(device))
    vae_steps = train_vae.DEFAULTS["steps"]     # name: (count, calls, seconds a call)
    phases = {"VAE": (vae_steps, vae_steps, t_vae),
              "encoding": (flow.n_builtin, flow.n_builtin / 256, t_enc),
              "DiT": (flow.steps, flow.steps, t_dit),
              "sample grids": (grids, grids * flow.sample_steps, t_grid)}
    phases = {name: {"count": count, "call_s": s, "minutes": calls * s / 60}
              for name, (count, calls, s) in phases.items()}
    return {"phases": phases, "minutes": sum(p["minutes"] for p in phases.values()),
            "amp": str(amp)}


# ---------------------------------------------------------------------------------------------
# Command line

def parser():
    p = Parser("Throughput, FLOPs, MFU and peak memory of the DiT and VAE training steps, the "
               "sampler and attention, against this machine's measured matmul peak; or the "
               "predicted minutes of the default `python train_flow.py` here. --amp and --compile "
               "pin one value each; --matrix sweeps every axis they leave free.", """examples:
  python bench.py                                   # DiT-tiny training step, eager, --amp auto
  python bench.py --what all --matrix               # everything, {eager, compile} x {fp32, bf16}
  python bench.py --what dit --preset B --latent-size 32 --batch-size 256 --amp bf16 --compile --json b.json
""")
    add = p.add_argument
    add("--what", choices=["dit", "vae", "sample", "attention", "peak", "all", "recipe"],
        default="dit", help="what to measure; peak = matmul GFLOP/s and copy GB/s only; all = "
        "every row; recipe = the predicted minutes of each phase of `python train_flow.py`")
    add("--preset", choices=list(PRESETS), default="tiny", help="DiT preset")
    for name, most in (("dim", 2 ** 14), ("depth", 256), ("heads", 256)):
        add(f"--{name}", type=positive(int, at_most=most), default=None,
            help=f"override the preset's {name}")
    add("--batch-size", type=positive(int, at_most=MAX_BATCH), default=None,
        help="images per step (attention: its B). Default: the training runs' (DiT, sampling and "
             "attention 64, VAE 32)")
    add("--latent-size", type=positive(int, at_most=512), default=8,
        help="DiT latent height = width (4 channels, patch 2)")
    add("--image-size", type=positive(int, at_most=4096), default=32,
        help="VAE image size, with the training scripts' preset for it")
    add("--sample-steps", type=positive(int, at_most=MAX_STEPS), default=50,
        help="Euler steps (each a 2B forward, CFG) of the sample row")
    add("--amp", choices=["auto", "off", "bf16"], default=None,
        help="fp32 (TF32 matmuls on CUDA) or bf16 autocast; auto = the training scripts' choice "
             "(bf16 on CUDA and CPUs with native bf16). Default: auto; off and bf16 with --matrix")
    add("--compile", action=argparse.BooleanOptionalAction, default=None,
        help="torch.compile the model (or attention function). Default: eager; both with --matrix")
    add("--matrix", action="store_true",
        help="sweep {eager, compile} x {fp32, bf16}, except the axes --amp/--compile pin")
    add("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    add("--threads", type=positive(int, at_most=1024), default=None,
        help="torch's CPU threads. Default: OMP_NUM_THREADS when set, else the physical cores")
    add("--repeats", type=positive(int, at_most=10 ** 4), default=10,
        help="timed steps; the median is reported")
    add("--untimed", type=positive(int, allow_zero=True, at_most=10 ** 4), default=3,
        help="untimed steps first; torch.compile compiles here, so keep >= 1 with it")
    add("--json", nargs="?", const="-", default=None, metavar="PATH",
        help="write one JSON object (rows, recipe, device, threads, peaks) to PATH; --json alone "
             "or --json - prints it instead of the table")
    add("--overwrite", action="store_true",
        help="let --json PATH replace an existing file (refused otherwise, before any measurement)")
    return p


def modes(args, device):
    """[(compile, amp dtype or None)] from --compile, --amp and --matrix."""
    compiles = [False, True] if args.matrix and args.compile is None else [bool(args.compile)]
    amps = ["off", "bf16"] if args.matrix and args.amp is None else [args.amp or "auto"]
    return [(c, pick_amp(a, device)) for c in compiles for a in amps]


COLUMNS = [("what", "what", "<12", ""), ("mode", "mode", "<12", ""), ("batch", "batch", ">5", ""),
           ("ms/step", "ms", ">9", ".2f"), ("img/s", "img_s", ">9", ".1f"),
           ("GFLOP/img", "gflop_img", ">9", ".4g"), ("GFLOP/s", "gflop_s", ">9", ".1f"),
           ("MFU %", "mfu", ">6", ".1f"), ("peak", "peak", ">5", ""),
           ("mem MB", "mem_mb", ">8", ".0f")]


def format_table(rows):
    """Plain-text table of the rows (COLUMNS); missing or unknown numbers show as '-'."""
    lines = [" ".join(f"{head:{align}}" for head, _, align, _ in COLUMNS)]
    for row in rows:
        line = " ".join(f"{'-':{align}}" if row.get(key) is None else f"{row[key]:{align}{spec}}"
                        for _, key, align, spec in COLUMNS)
        if "fused_attention" in row:
            line += f"  fused attention patterns: {row['fused_attention']}"
        lines.append(line + (f"  FAILED: {row['error']}" if "error" in row else ""))
    return "\n".join(lines)


def format_recipe(recipe):
    lines = [f"predicted `python train_flow.py` on this machine (amp {recipe['amp']}):"]
    for name, p in recipe["phases"].items():
        unit = {"encoding": "images", "sample grids": "grids"}.get(name, "steps")
        lines.append(f"  {name:<13} {p['count']:>6} {unit:<6} {p['minutes']:6.1f} min")
    return "\n".join(lines + [f"  {'total':<20} {recipe['minutes']:13.1f} min"])


def main(argv=None):
    args = parser().parse_args(argv)
    device = pick_device(args.device)                  # on CUDA also turns TF32 on, as training
    if args.json not in (None, "-"):
        check_output(args.json, "--json", args.overwrite)
    threads = set_threads(args.threads)                # with a note when the machine is busy
    print(threads, file=sys.stderr)
    mode_list = modes(args, device)
    todo = list(BENCHES) if args.what == "all" else [args.what] if args.what in BENCHES else []
    dtypes = ([torch.float32, torch.bfloat16] if args.what in ("all", "peak") else   # else only
              sorted({amp or torch.float32 for _, amp in mode_list}, key=str))       # MFU's peaks
    print(f"measuring peaks on {device_name(device)} ...", file=sys.stderr, flush=True)
    peaks = measure_peaks(device, dtypes, args.what in ("peak", "all"), args.untimed, args.repeats)
    rows = []
    for what in todo:
        args.batch = args.batch_size or BATCH[what]
        for compile_, amp in mode_list:
            for name, build, kwargs in BENCHES[what]:
                print(f"measuring {name} ...", file=sys.stderr, flush=True)
                rows.append(measure(name, build, kwargs, args, device, compile_, amp, peaks))
    recipe = None
    if args.what == "recipe":
        print("timing the phases of the default run ...", file=sys.stderr, flush=True)
        recipe = predict_recipe(args.repeats, device, mode_list[0][1])
    report = {"device": device_name(device), "device_type": device.type,
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "threads_line": threads, "busy": "busy" in threads, "peaks": peaks,
              "rows": rows, "recipe": recipe, "args": vars(args),
              "memory": "torch.cuda.max_memory_allocated" if device.type == "cuda" else
                        "process peak RSS (VmHWM; null: unknown); mem_reset: reset per row"}
    if args.json == "-":
        print(json.dumps(report))
    else:
        print(f"device {report['device']}, torch {report['torch']}; {threads}")
        print("peaks: " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in peaks.items()
                                    if k in ("fp32", "tf32", "bf16", "fp16"))
              + (f", copy {peaks['copy_gbs']:.1f} GB/s" if "copy_gbs" in peaks else "")
              + f" ({peaks['matmul_n']}^2 matmuls)")
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
