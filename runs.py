"""A training run and its folder: what makes a long run safe to stop, resume and look at. Not
in the lecture; a training script makes these calls:

    run = Run(parser, argv, "vae", EXPERIMENT)   # flags; with --resume, the stored settings;
                                                 # run.device and run.amp (autocast dtype)
    run.lock(inputs)                             # the folder is this command's (OUT/.lock)
    step = run.begin(model, ema, opt, scaler)    # 0, or the resumed state; args.json
    run.log(step, loss)                          # progress line, log.jsonl, loss.png; NaN stops
    run.save(step, extra)                        # ckpt.pt, atomically
    run.stop_if_asked(step, extra, command)      # after Ctrl-C or SIGTERM: save, say how to resume

The promises behind them are README's "What happens when things go wrong" (and, for NaN, its
"Troubleshooting"); each method's docstring says which it keeps.

Offers: add_training_flags, Run, EMA, adamw, plot_loss
"""
import copy
import ctypes
import json
import math
import os
import re
import signal
import sys
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from checkpoint import FORMAT, FORMAT_VERSION, load_checkpoint, save_checkpoint
from common import (MAX_BATCH, MAX_STEPS, SIGNALS, Progress, UserError, add_machine_flags,
                    atomic_write, fraction, pick_amp, pick_device, positive, seed_value,
                    set_threads, write_json)

# A run's own files, the only ones --overwrite deletes.
RUN_FILES = re.compile(r"ckpt\.pt|log\.jsonl|args\.json|loss\.png|recon\.png|prompts\.txt|"
                       r"samples_\d{6,}\.png")
NOT_SETTINGS = {"resume", "overwrite", "allow_changes", "out", "threads"}   # how, not what
PATHS = {"data", "vae"}                    # stored absolute: a run resumes from any folder


def add_training_flags(p, defaults, out):
    """The flags both training scripts share; defaults from the script's DEFAULTS."""
    add = p.add_argument
    add("--data", default=None, help="folder of your images (searched recursively; captions from "
        "name.txt, metadata.jsonl or class sub-folders). Default: the built-in coloured shapes")
    add("--image-size", type=positive(int, at_most=4096), default=defaults["image_size"],
        help="train at this size in pixels (short side resized, centre-cropped)")
    add("--n-builtin", type=positive(int), default=defaults["n_builtin"],
        help="number of built-in training images (ignored with --data)")
    add("--out", default=out, help="the run folder: checkpoint, pictures, log")
    folder = f", {defaults['folder_steps']} on a --data folder" if defaults.get("folder_steps") \
        else ""
    add("--steps", type=positive(int, at_most=MAX_STEPS), default=defaults["steps"],
        help=f"optimizer steps in all (a resumed run continues up to this). Default: "
             f"{defaults['steps']}{folder}")
    add("--batch-size", type=positive(int, at_most=MAX_BATCH), default=defaults["batch_size"],
        help="images per optimizer step")
    add("--lr", type=positive(float), default=defaults["lr"], help="AdamW learning rate")
    add("--weight-decay", type=positive(float, allow_zero=True), default=defaults["weight_decay"],
        help="AdamW weight decay")
    add("--grad-clip", type=positive(float), default=defaults["grad_clip"],
        help="gradients are clipped to this global norm")
    add("--ema-decay", type=fraction, default=defaults["ema_decay"],
        help="decay of the weights' moving average, in [0, 1)")
    add("--seed", type=seed_value, default=0, help="random seed (data order, noise, init)")
    add("--log-every", type=positive(int), default=defaults["log_every"],
        help="steps between progress lines")
    add("--ckpt-every", type=positive(int), default=defaults["ckpt_every"],
        help="steps between checkpoints (one at the end and on Ctrl-C too)")
    add_machine_flags(p)
    add("--threads", type=positive(int, at_most=1024), default=None,
        help="torch's CPU threads. Default: OMP_NUM_THREADS when set, else the physical cores")
    add("--resume", action="store_true", help="continue the run in --out up to --steps, with "
        "its stored settings as defaults")
    add("--overwrite", action="store_true", help="start over in an --out that holds a run: its "
        "files are deleted first (never an input of this command)")
    add("--allow-changes", action="store_true", help="with --resume: accept flags that make "
        "another experiment (data, seed, model)")


class Run:
    """One training run in its folder --out (see the module docstring)."""

    def __init__(self, parser, argv, kind, experiment):
        self.args, self.flags_given = parser.parse(argv)  # the flags; those the command set
        self.derived = set()    # settings the script computes (--minutes' steps): a run stopped
                                # before its first checkpoint starts again though they differ
        args, self.kind, self.out = self.args, kind, Path(self.args.out)
        for key in PATHS & set(vars(args)):
            if getattr(args, key) is not None:
                setattr(args, key, os.path.abspath(os.path.expanduser(getattr(args, key))))
        self.locked = self.signum = self.resume = None
        self.made, self._handlers, self.replaced, self.lowest = False, {}, [], math.inf
        if args.resume and args.overwrite:
            raise UserError("--resume and --overwrite exclude each other")
        folder = self.out
        while not folder.exists():
            folder = folder.parent
        if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
            raise UserError(f"--out {self.out}: cannot write there ({folder} is not a writable "
                            f"folder); choose another --out")
        if args.resume:
            if not (self.out / "ckpt.pt").is_file() and (self.out / "args.json").is_file():
                raise UserError(f"--resume: the run in {self.out} stopped before its first "
                                f"checkpoint; start it again with its command without --resume")
            self.resume = load_checkpoint(self.out / "ckpt.pt", kind, "--resume")
            self._restore(parser, self.flags_given, self.resume["args"], experiment)
        self.device = pick_device(args.device)
        self.amp = pick_amp(args.amp, self.device)      # a wrong --amp fails before the work
        line = set_threads(args.threads)
        print(line if self.device.type == "cpu" else f"device: {self.device}", flush=True)

    def _restore(self, parser, given, saved, experiment):
        """The stored settings become the values of the flags not given, checked as the command
        line's are; given flags that differ are listed, experiment ones refused; settings the run
        did not store (newer than it) are named with the defaults they take."""
        args, changes, newer = self.args, {}, []
        for action in parser._actions:
            key, flag = action.dest, (action.option_strings or [""])[0]
            if key in NOT_SETTINGS or key not in vars(args):
                continue
            if key not in saved:             # a setting newer than the run: today's value
                if key not in given:
                    newer.append(f"{flag} {getattr(args, key)}")
                continue
            old, now = saved[key], getattr(args, key)
            if key not in given:
                try:
                    for v in ((old if isinstance(old, list) else [old])
                              if old is not None and action.type else []):
                        action.type(str(v))
                    if action.choices and old is not None and old not in action.choices:
                        raise ValueError(f"not one of {sorted(action.choices)}")
                except Exception as e:
                    raise UserError(f"--resume: the run's stored {flag} {old!r:.40} is not valid "
                                    f"({e}); start a new run (another --out)")
                setattr(args, key, old)
            elif now != old and not (key in PATHS and now and old and
                                     os.path.realpath(now) == os.path.realpath(old)):
                changes[flag] = (now, old, key in experiment)
        text = ", ".join(f"{flag} {now} (was {old})" for flag, (now, old, _) in changes.items())
        refused = [flag for flag, (_, _, exp) in changes.items() if exp]
        if refused and not args.allow_changes:
            raise UserError(f"--resume: {text}; {', '.join(refused)} would make another "
                            f"experiment: use the run's values, another --out, or --allow-changes")
        if text:
            print(f"resuming with changed settings: {text}")
        if newer:
            print(f"note: settings newer than this run take today's defaults: {', '.join(newer)}",
                  file=sys.stderr)

    def settings(self):
        """The run's settings as stored (plain values, JSON's view of them)."""
        return json.loads(json.dumps({k: v for k, v in vars(self.args).items()
                                      if k not in NOT_SETTINGS}))

    # -----------------------------------------------------------------------------------------
    # The folder

    def lock(self, inputs=()):
        """Make --out this command's: checked (a run there is refused unless --resume or
        --overwrite; never an input inside it, nor it inside --data), made, locked."""
        out, args = self.out, self.args
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out}: is a file, not a folder; choose another folder")
        if args.data and (os.path.realpath(out) + os.sep).startswith(
                os.path.realpath(args.data) + os.sep):
            raise UserError(f"--out {out} is inside --data {args.data}: the run's pictures would "
                            f"become training images; choose an --out outside it")
        found = sorted(n for n in os.listdir(out) if RUN_FILES.fullmatch(n)) if out.is_dir() else []
        if found and not args.resume:
            try:
                stored = dict(json.loads((out / "args.json").read_text()))
            except (OSError, ValueError, TypeError):
                stored = {}
            now = self.settings()
            keys = sorted(k for k in set(stored) | set(now) if stored.get(k) != now.get(k))
            stopped_early = "ckpt.pt" not in found and not set(keys) - self.derived
            if not (args.overwrite or stopped_early):
                raise UserError(f"--out {out} already holds a run ({', '.join(found[:6])}); "
                                f"{'continue it with --resume, ' if 'ckpt.pt' in found else ''}"
                                f"start over with --overwrite, or choose another --out")
            for flag, path in inputs:
                if path and any(os.path.realpath(out / n) == os.path.realpath(path) for n in found):
                    raise UserError(f"--out {out}: starting over would delete a file this command "
                                    f"reads as {flag} ({path}); choose another --out")
            differ = [f"--{k.replace('_', '-')} {now.get(k)} (was {stored.get(k)})" for k in keys]
            why = "--overwrite" if "ckpt.pt" in found else "starting again a run stopped early"
            print(f"note: {why}: the files {', '.join(found)} in {out} are deleted when "
                  f"training starts{'; settings that differ: ' if differ else ''}"
                  f"{', '.join(differ)}", file=sys.stderr)
            self.replaced = found
        self.made = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        lock = out / ".lock"
        for _ in range(3):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                self.locked = lock
                return
            except FileExistsError:
                pid = _live_owner(lock)
                if pid is None:                            # its process is gone: a stale lock
                    pid = _remove_stale(lock)
                if pid is not None:
                    raise UserError(f"--out {out} is in use by another command (pid {pid}); wait "
                                    f"for it to finish, or remove {lock} if none runs")
        raise UserError(f"--out {out}: could not take its lock {lock}")

    def close(self):
        """Unlock (removing the folder if this command made it and left it empty), restore the
        signal handlers."""
        if self.locked is not None:
            self.locked.unlink(missing_ok=True)
            self.locked = None
            if self.made and not any(self.out.iterdir()):
                self.out.rmdir()
        for s, handler in self._handlers.items():
            signal.signal(s, handler)
        self._handlers = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -----------------------------------------------------------------------------------------
    # Training: begin, log, save

    def begin(self, model, ema, opt, scaler):
        """Start training: delete the replaced run's files, restore a resumed state, set the
        optimizer's lr, weight decay (and AdamW betas) from the flags, write args.json, catch Ctrl-C
        and SIGTERM. Returns the step to continue from (0: a new run)."""
        out, resume, step, elapsed = self.out, self.resume, 0, 0.0
        self.state = (model, ema, opt, scaler)
        for name in self.replaced:
            (out / name).unlink(missing_ok=True)
        if resume is not None:
            try:
                model.load_state_dict(resume["model"])
                ema.model.load_state_dict(resume["ema"])
                opt.load_state_dict(resume["optimizer"])
                if resume["scaler"]:       # {}: saved without fp16; --amp fp16 starts afresh
                    scaler.load_state_dict(resume["scaler"])
                torch.set_rng_state(resume["rng"]["torch"])
            except Exception as e:
                raise UserError(f"--resume {out / 'ckpt.pt'}: it does not fit this model "
                                f"({type(e).__name__}: {str(e)[:80]}); start a new run")
            if "cuda" in resume["rng"] and torch.cuda.is_available():   # as many GPUs as fit
                torch.cuda.set_rng_state_all(resume["rng"]["cuda"][:torch.cuda.device_count()])
            step, elapsed = resume["step"], resume["elapsed"]
            if (out / "log.jsonl").exists():   # drop what followed the save
                entries, bad = _read_log(out / "log.jsonl")
                if bad:
                    print(f"note: dropped {bad} line(s) of log.jsonl that are no log entry (torn "
                          f"by a kill, or edited)", file=sys.stderr)
                atomic_write(out / "log.jsonl", lambda f: f.write("".join(
                    json.dumps(e) + "\n" for e in entries if e.get("step", 0) <= step).encode()))
            print(f"resumed {out / 'ckpt.pt'} at step {step}")
        for group in opt.param_groups:        # the flags, not the stored optimizer, set these
            group.update(lr=self.args.lr, weight_decay=self.args.weight_decay)
            if "adam_betas" in vars(self.args):
                group["betas"] = tuple(self.args.adam_betas)
        write_json(out / "args.json", self.settings(), "settings")
        self.progress = Progress("step", self.args.steps, step, self.args.batch_size,
                                 every=math.inf, elapsed0=elapsed)
        self.sums, self.pending = None, 0
        self._handlers = {s: signal.signal(s, self._on_signal) for s in SIGNALS}
        return step

    def _on_signal(self, signum, frame):
        if self.signum is not None:              # a second signal: give up at once
            self.close()
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{'interrupted' if signum == signal.SIGINT else 'terminated (SIGTERM)'}: saving "
              f"a checkpoint at the end of this step...", file=sys.stderr, flush=True)

    @property
    def stopped(self):
        """Ctrl-C or SIGTERM arrived: the loop saves and exits at the end of this step."""
        return self.signum is not None

    def log(self, step, terms, names=("loss",)):
        """Add this step's loss terms (a tensor: no host sync); on a report step (every
        --log-every, the last and a new run's first) print and log their mean, checked."""
        terms = terms.detach().reshape(-1).float()
        self.sums = terms if self.sums is None else self.sums + terms
        self.pending += 1
        if step % self.args.log_every == 0 or step == self.args.steps or step == 1:
            mean = self.mean(step)
            self.record(self.progress.update(step, dict(zip(names, mean)), force=True))
            with self.progress.paused():
                plot_loss(self.out / "log.jsonl", self.out / "loss.png")
            self.sums, self.pending = None, 0

    def mean(self, step, check_weights=False):
        """The mean loss terms since the last report (None if none); a loss
        that is not finite or has grown 100x over the lowest mean so far (or, checked, weights
        that are not finite) stop the run with one line."""
        mean = (self.sums / self.pending).tolist() if self.pending else None
        what = None
        if mean is not None and not math.isfinite(mean[0]):
            what = f"loss became {mean[0]}"
        elif mean is not None and mean[0] > 100 * self.lowest:
            what = f"loss grew from {self.lowest:.4g} to {mean[0]:.4g} (diverging)"
        elif check_weights and not bool(torch.isfinite(torch.stack(
                [p.detach().float().sum() for p in self.state[0].parameters()])).all()):
            what = "the weights became inf/NaN"
        if what:
            kept = "the last checkpoint is untouched" if (self.out / "ckpt.pt").is_file() \
                else "no checkpoint had been written"
            raise UserError(f"{what} by step {step}; stopped without saving, {kept}; lower --lr "
                            f"or use --amp off")
        self.lowest = min(self.lowest, mean[0]) if mean else self.lowest
        return mean

    def save(self, step, extra, finished=False):
        """Write ckpt.pt: the model, EMA, optimizer and scaler given to `begin`, the RNG state,
        the settings, and the script's `extra` entries."""
        self.mean(step, check_weights=True)                  # never save a broken state
        model, ema, opt, scaler = self.state
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        with self.progress.paused():
            save_checkpoint(self.out / "ckpt.pt", {
                "format": FORMAT, "version": FORMAT_VERSION, "kind": self.kind, "step": step,
                "model": model.state_dict(), "ema": ema.model.state_dict(),
                "optimizer": opt.state_dict(), "scaler": scaler.state_dict(), "rng": rng,
                "args": self.settings(), "elapsed": self.progress.elapsed(),
                "finished": finished, **extra})

    def record(self, entry):
        """Append one entry to log.jsonl."""
        with open(self.out / "log.jsonl", "ab") as f:
            f.write((json.dumps(entry) + "\n").encode())

    def stop_if_asked(self, step, extra, command):
        """After a signal: save (extra None: saved already), name the command that resumes, exit
        with 130 or 143."""
        if self.signum is None:
            return
        if extra is not None:
            self.save(step, extra)
        print(f"saved {self.out / 'ckpt.pt'} at step {step}; resume with: {command}",
              file=sys.stderr)
        code = 128 + self.signum
        self.close()
        sys.exit(code)



def _live_owner(lock):
    """The pid a lock file names when that process runs, else None (gone, or no pid); "?" for a
    lock still empty a moment after it was made (its command writes the pid just after)."""
    try:
        text = lock.read_text().strip()
        if not text and abs(time.time() - lock.stat().st_mtime) < 10:
            return "?"
    except OSError:
        return None
    pid = int(text) if text.isdigit() and 0 < int(text) < 2 ** 31 else None
    if pid is None:
        return None
    if os.name == "nt":                      # os.kill would end the process: ask the kernel
        kernel = ctypes.windll.kernel32
        handle, code = kernel.OpenProcess(0x1000, False, pid), ctypes.c_ulong()
        alive = bool(handle) and kernel.GetExitCodeProcess(handle, ctypes.byref(code)) and \
            code.value == 259                                            # STILL_ACTIVE
        kernel.CloseHandle(handle)
        return pid if alive else None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass                                 # alive, someone else's
    return pid


def _remove_stale(lock):
    """Remove a lock whose process is gone: None (try again), or the pid of the live command
    ("?" while unknown) that took it over first. Two commands that both saw it stale would each
    delete it, the second deleting the first's fresh lock; so it is moved aside and read again
    there, where no other command can change it under us."""
    aside = lock.with_name(f"{lock.name}.{os.getpid()}")
    try:
        os.replace(lock, aside)
    except FileNotFoundError:
        return None                          # another command removed it: try again
    except PermissionError:
        return "?"                           # Windows: its maker or a reader has it open
    pid = _live_owner(aside)
    if pid is not None:                      # that command's lock, not the dead one: put it back
        os.replace(aside, lock)
    else:
        aside.unlink()
        print(f"note: removed the stale lock of a process that is gone ({lock})", file=sys.stderr)
    return pid


# ---------------------------------------------------------------------------------------------
# log.jsonl and loss.png

def _read_log(path):
    """The entries of a log.jsonl, and how many lines are none (torn by a kill, edited)."""
    entries, bad = [], 0
    for line in Path(path).read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            entry = None
        if isinstance(entry, dict) and isinstance(entry.get("step", 0), (int, float)):
            entries.append(entry)
        else:
            bad += 1
    return entries, bad


def plot_loss(log_path, png_path, key="loss", size=(640, 400)):
    """loss.png: log.jsonl's `key` against the step, both on log scales, drawn with Pillow: the
    logged values (light) and their running mean (dark)."""
    points = [(e["step"], e[key]) for e in _read_log(log_path)[0] if e.get("step", 0) > 0
              and isinstance(e.get(key), (int, float)) and 0 < e[key] < math.inf]
    if not points:
        return
    W, H, left, bottom, pad = *size, 60, 30, 12
    lx, ly = [math.log10(x) for x, _ in points], [math.log10(y) for _, y in points]
    x0, x1, y0, y1 = min(lx), max(lx) + 1e-9, min(ly), max(ly) + 1e-9

    def xy(x, y):
        return (left + (math.log10(x) - x0) / (x1 - x0) * (W - left - pad),
                pad + (y1 - math.log10(y)) / (y1 - y0) * (H - bottom - pad))
    smooth, mean = [], points[0][1]
    for _, y in points:
        mean = 0.8 * mean + 0.2 * y
        smooth.append(mean)
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([left, pad, W - pad, H - bottom], outline=(160, 160, 160))
    px, py = xy(*points[-1])
    draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=(20, 60, 160))
    draw.line([xy(x, y) for x, y in points], fill=(170, 200, 240), width=1)
    draw.line([xy(x, y) for (x, _), y in zip(points, smooth)], fill=(20, 60, 160), width=2)
    for (x, y), text in [((left, H - bottom + 6), f"step {points[0][0]}"),
                         ((W - pad - 90, H - bottom + 6), f"step {points[-1][0]} (log)"),
                         ((4, pad), f"{10 ** y1:.3g}"), ((4, H - bottom - 12), f"{10 ** y0:.3g}"),
                         ((left + 8, pad + 4), f"{key} (log scale): logged, running mean")]:
        draw.text((x, y), text, fill="black")
    atomic_write(png_path, lambda f: image.save(f, format="PNG"), "picture")


# ---------------------------------------------------------------------------------------------
# The optimiser and the averaged weights

class EMA:
    """Exponential moving average of a model's weights, with warm-up:
    decay_k = min(decay, (1 + k) / (10 + k)), so early averages are not dominated by the init."""

    def __init__(self, model, decay):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model, step):
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(list(self.model.parameters()),
                             [p.detach() for p in model.parameters()], 1 - d)


def adamw(params, lr, betas=(0.9, 0.999), weight_decay=0.0):
    """AdamW with its fused kernel where this torch and device have it (the same algorithm in one
    pass over every tensor: the optimizer step takes a third of the time on a CPU)."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
