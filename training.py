"""What the two training scripts share: the training loop's helpers, nothing from the lecture.

- `add_training_flags`: the flags train_vae.py and train_flow.py share, with the same meaning;
- `EMA` (the averaged weights that sample), `StopFlag` (Ctrl-C and SIGTERM save, then exit),
  `Progress` (the progress line and log.jsonl), `Stopwatch` (where a command's time went),
  `LossGuard`/`weights_finite` (stop on NaN or divergence before saving over a good
  checkpoint), `adamw` (the fused optimizer where there is one), `oom_error` (out of memory
  names a smaller batch);
- several processes (torchrun): `init_distributed`, `barrier`, `all_ranks_sum`, `any_rank`,
  `gather_objects`, `check_ranks_agree`; one process per device, rank 0 does all file I/O.

Offers: add_training_flags, EMA, StopFlag, Progress, Stopwatch, LossGuard, weights_finite, adamw,
oom_error, init_distributed, barrier, all_ranks_sum, any_rank, gather_objects, check_ranks_agree
"""
import argparse
import copy
import math
import os
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from common import MAX_BATCH, MAX_STEPS, UserError, fraction, pick_device, positive, seed_value
from runs import SIGNALS, append_json


# ---------------------------------------------------------------------------------------------
# Flags

def add_training_flags(p, defaults, out_default):
    """Flags both training scripts share, with the same meaning; their defaults come from the
    script's DEFAULTS (the recipe's numbers), so --help shows what a run will use."""
    p.add_argument("--data", default=None,
                   help="folder of your images (searched recursively; captions from name.txt "
                        "or class sub-folders). Default: the built-in coloured-shapes dataset")
    p.add_argument("--image-size", type=positive(int), default=defaults["image_size"],
                   help="train at this size in pixels (short side resized, centre-cropped)")
    p.add_argument("--out", default=out_default, help="run folder for checkpoint, pictures and log")
    p.add_argument("--steps", type=positive(int, at_most=MAX_STEPS), default=defaults["steps"],
                   help=f"optimizer steps in total (a resumed run continues up to this; at most "
                        f"{MAX_STEPS:,})")
    p.add_argument("--batch-size", type=positive(int, at_most=MAX_BATCH),
                   default=defaults["batch_size"],
                   help=f"images per optimizer step (at most {MAX_BATCH})")
    p.add_argument("--lr", type=positive(float), default=defaults["lr"], help="AdamW learning rate")
    p.add_argument("--weight-decay", type=positive(float, allow_zero=True),
                   default=defaults["weight_decay"], help="AdamW weight decay")
    p.add_argument("--grad-clip", type=positive(float), default=defaults["grad_clip"],
                   help="gradients are clipped to this global norm")
    p.add_argument("--ema-decay", type=fraction, default=defaults["ema_decay"],
                   help="decay of the weights' moving average (with warm-up), in [0, 1)")
    p.add_argument("--device", default="auto",
                   help="auto (CUDA when available, else MPS on Apple GPUs, else CPU), cpu, "
                        "cuda, cuda:N or mps. Default: auto")
    p.add_argument("--threads", type=positive(int), default=None,
                   help="torch's CPU threads. Default: the machine's physical cores (shared "
                        "between the processes of a torchrun)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (--no-compile to turn off). Default: on for CUDA, "
                        "off for CPU (compiling costs more than it saves in short CPU runs)")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto",
                   help="mixed precision: bf16 or fp16 autocast, or off (float32). auto = bf16 on "
                        "CUDA (fp16 + GradScaler where bf16 is missing) and on CPUs with native "
                        "bf16, else off. Default: auto")
    p.add_argument("--resume", action="store_true",
                   help="continue the run saved in OUT/ckpt.pt up to --steps; its stored settings "
                        "are the defaults, and flags you give that differ are listed")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an --out that holds a run: its checkpoint, log and "
                        "pictures are deleted first")
    p.add_argument("--allow-changes", action="store_true",
                   help="with --resume: accept flags that make another experiment (data, "
                        "--n-builtin, --seed, the VAE), which are refused otherwise")
    p.add_argument("--seed", type=seed_value, default=0,
                   help="random seed (data order, noise, init). Default: 0")
    p.add_argument("--log-every", type=positive(int), default=defaults["log_every"],
                   help="steps between progress lines (and NaN checks)")
    p.add_argument("--ckpt-every", type=positive(int), default=defaults["ckpt_every"],
                   help="steps between checkpoints (always one at the end and on Ctrl-C)")
    p.add_argument("--n-builtin", type=positive(int), default=defaults["n_builtin"],
                   help="number of built-in training images (ignored with --data)")


# ---------------------------------------------------------------------------------------------
# The loop

class EMA:
    """Exponential moving average of a model's weights, with warm-up:
    decay_k = min(decay, (1 + k) / (10 + k)) so early averages are not dominated by the init."""

    def __init__(self, model, decay):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model, step):
        d = min(self.decay, (1 + step) / (10 + step))
        ema_p = list(self.model.parameters())
        torch._foreach_lerp_(ema_p, [p.detach() for p in model.parameters()], 1 - d)


class StopFlag:
    """Ctrl-C (SIGINT) or SIGTERM (kill, docker stop, SLURM) sets a flag; the loop saves a
    checkpoint at the end of the step and exits with `exit_code` (130 or 143). A second signal
    gives up at once (KeyboardInterrupt: the last checkpoint stays), except inside a save, which
    it never interrupts (save_checkpoint defers signals until its file is complete)."""

    def __init__(self):
        self.signum = None
        self._old = {s: signal.signal(s, self._handle) for s in SIGNALS}

    @property
    def stop(self):
        return self.signum is not None

    @property
    def exit_code(self):
        return 128 + self.signum

    def _handle(self, signum, frame):
        if self.stop:  # a second signal: give up at once
            self.restore()
            raise KeyboardInterrupt
        self.signum = signum
        what = "interrupted" if signum == signal.SIGINT else "terminated (SIGTERM)"
        print(f"\n{what}: saving a checkpoint at the end of this step...", file=sys.stderr,
              flush=True)

    def restore(self):
        for s, handler in self._old.items():
            signal.signal(s, handler)


class Progress:
    """One progress line per report: step, loss terms, images/s and ETA; also appended to log.jsonl.
    `elapsed0`: training seconds of the run before this process (a resumed run's clock goes on).
    The images/s are those of the training steps: time spent inside `paused()` (checkpoints,
    sample grids, loss.png) is left out of the rate, and the ETA adds it back in proportion."""

    def __init__(self, log_path, total_steps, start_step, batch_size, elapsed0=0.0):
        self.log_path, self.total, self.batch = log_path, total_steps, batch_size
        self.t0, self.step0, self.elapsed0 = time.perf_counter(), start_step, elapsed0
        self.paused_seconds = 0.0

    @contextmanager
    def paused(self):
        """Work inside this block is not training: it does not count against images/s."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.paused_seconds += time.perf_counter() - t

    def elapsed(self):
        """Training seconds of the whole run so far."""
        return self.elapsed0 + time.perf_counter() - self.t0

    def report(self, step, terms):
        seconds = time.perf_counter() - self.t0
        done = step - self.step0
        ips = done * self.batch / max(seconds - self.paused_seconds, 1e-9)
        eta = (self.total - step) * seconds / max(done, 1)
        text = " ".join(f"{k} {v:.4g}" for k, v in terms.items())
        print(f"step {step}/{self.total} {text} | {ips:.0f} img/s | ETA {eta / 60:.1f} min", flush=True)
        if self.log_path is not None:
            append_json(self.log_path, {"step": step, **terms, "img_per_s": round(ips, 2),
                                        "time": round(self.elapsed(), 2)})


class Stopwatch:
    """Wall-clock seconds of a command's phases: `with watch("DiT training"):` charges the time to
    that phase; a phase inside another pauses the outer one, so the shares add up to 100%."""

    def __init__(self):
        self.seconds, self.stack = {}, []
        self.t0 = self.mark = time.perf_counter()

    @contextmanager
    def __call__(self, name):
        self._charge()
        self.stack.append(name)
        try:
            yield
        finally:
            self._charge()
            self.stack.pop()

    def _charge(self):
        now = time.perf_counter()
        name = self.stack[-1] if self.stack else "other"
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self.mark
        self.mark = now

    def report(self):
        """Lines 'phase  minutes  share' for every phase, then the total."""
        self._charge()
        total = max(time.perf_counter() - self.t0, 1e-9)
        width = max(len(name) for name in self.seconds)
        lines = [f"  {name:<{width}}  {s / 60:5.1f} min  {100 * s / total:3.0f}%"
                 for name, s in self.seconds.items() if s >= 0.05]
        return "\n".join([f"time: {total / 60:.1f} min in all"] + lines)


class LossGuard:
    """Stops a run whose loss is not finite, or has grown by orders of magnitude (more than
    DIVERGED times) over the lowest value seen, before anything is saved over the last good
    checkpoint. The first step's loss is the first reference (`reference`), so an explosion
    within the first log interval is caught too. `check` takes the mean loss since the last one.
    `amp`: the run's autocast dtype (None: float32), for the advice."""

    DIVERGED = 100.0

    def __init__(self, ckpt_path, amp=None):
        self.ckpt_path, self.amp, self.lowest = ckpt_path, amp, math.inf

    def reference(self, loss):
        """A loss known to be sane (the first step's), as a float."""
        if math.isfinite(loss):
            self.lowest = min(self.lowest, loss)

    def check(self, loss, step, model=None):
        """loss: mean loss (float) since the last check, or None if none. Given `model`, its
        weights are checked too (an update can break the weights before the loss shows it)."""
        what = None
        if loss is not None and not math.isfinite(loss):
            what = f"loss became {loss}"
        elif loss is not None and loss > self.DIVERGED * self.lowest:
            what = f"loss grew from {self.lowest:.4g} to {loss:.4g} (diverging)"
        elif model is not None and not weights_finite(model):
            what = "the weights became inf/NaN"
        if what:
            kept = (f"the last good checkpoint ({self.ckpt_path}) is untouched"
                    if Path(self.ckpt_path).is_file() else "no checkpoint had been written yet")
            advice = "lower --lr" + (" or use --amp off" if self.amp is not None else "")
            raise UserError(f"{what} by step {step}; stopped without saving, {kept}; {advice}")
        if loss is not None:
            self.reference(loss)


def weights_finite(model):
    """True when no parameter holds inf or NaN (one sum per tensor, one sync in all)."""
    sums = [p.detach().float().sum() for p in model.parameters()]
    return bool(torch.isfinite(torch.stack(sums)).all())


def adamw(params, lr, betas=(0.9, 0.999), weight_decay=0.0):
    """torch.optim.AdamW with its fused kernel (one pass over every tensor instead of a loop of
    small ops per tensor: the optimizer step takes a third of the time on a 2-core CPU), where
    this torch and device have it; else the default implementation. Same algorithm either way."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)


def oom_error(batch_size):
    return UserError(f"out of memory at --batch-size {batch_size}; lower it, e.g. "
                     f"--batch-size {max(1, batch_size // 2)}")


# ---------------------------------------------------------------------------------------------
# Several processes (torchrun): one per device, rank 0 does all file I/O

def init_distributed(device_flag):
    """(rank, world, device). Under torchrun: NCCL on CUDA, gloo on CPU; else (0, 1, device)."""
    if "RANK" not in os.environ:
        return 0, 1, pick_device(device_flag)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    device = pick_device(device_flag)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def barrier(world):
    if world > 1:
        dist.barrier()


def all_ranks_sum(value, world):
    """A tensor summed over every rank: a NaN on one rank stops all of them at the same step (a
    rank stopping alone would leave the others waiting in the next collective)."""
    if world == 1:
        return value
    total = value.detach().clone()
    dist.all_reduce(total)
    return total


def any_rank(flag, world, device):
    """Ctrl-C on any rank stops every rank at the same step (so the saved state is consistent)."""
    if world == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_objects(obj, world):
    """[rank 0's obj, ..., rank world-1's obj]: a collective under torchrun, [obj] alone."""
    if world == 1:
        return [obj]
    gathered = [None] * world
    dist.all_gather_object(gathered, obj)
    return gathered


def check_ranks_agree(model, world, rank):
    """DDP keeps every rank's weights equal; verify it (a cheap checksum) and say so."""
    sums = torch.stack([p.detach().double().sum() for p in model.parameters()]).cpu()
    gathered = [None] * world
    dist.all_gather_object(gathered, sums)
    same = all(torch.equal(gathered[0], g) for g in gathered)
    if rank == 0:
        print(f"weights identical on all {world} ranks: {'yes' if same else 'NO'}")
    return same
