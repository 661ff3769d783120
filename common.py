"""Plumbing every script needs; nothing here is in the lecture.

A mistake the user can fix (a flag, a path, a full disk) is one line on stderr and exit status
2, never a traceback (`UserError`, `run_main`, `Parser`, the flag types); the device and precision;
files written atomically and never over one the command did not make; the progress line.

Imports no project module, and nothing POSIX-only: it runs on Windows, macOS and Linux.

Offers: UserError, run_main, Parser, add_machine_flags, MAX_STEPS, MAX_BATCH, MAX_COUNT, positive,
finite, fraction, seed_value, pick_device, cpu_has_native_bf16, pick_amp, autocast, maybe_compile,
median_time, synchronizer, is_oom, set_threads, atomic_write, quoted, write_json, check_output,
Progress
"""
import argparse
import errno
import glob
import json
import math
import os
import re
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

MAX_STEPS = 10 ** 7      # optimizer or sampler steps: more is a typo
MAX_BATCH = 2 ** 16      # images per batch: more fits in no machine's memory
MAX_COUNT = 10 ** 6      # images to draw or render, threads, grid cells: more is a typo


class UserError(Exception):
    """A mistake the user can fix; run_main prints it as one line and exits with status 2."""


def run_main(main):
    """Run a script's main(): a UserError or a problem outside the code (a full disk, an
    unwritable folder) is one line on stderr and exit status 2; Ctrl-C is exit status 130."""
    try:
        return main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
    except (RuntimeError, MemoryError) as e:
        if not is_oom(e):
            raise
        print("error: out of memory; lower --batch-size (e.g. to half of it)", file=sys.stderr)
    except OSError as e:
        print(f"error: {e.strerror or e}{f': {e.filename}' if e.filename else ''}; check the "
              f"path, its permissions and the free disk space", file=sys.stderr)
    except KeyboardInterrupt:
        print("\ninterrupted: stopped (the last checkpoint, if any, is intact)", file=sys.stderr)
        return 130
    return 2


# ---------------------------------------------------------------------------------------------
# Flags

class _HelpFormatter(argparse.HelpFormatter):
    """Each flag's help ends with its default; the examples keep their lines."""

    def _fill_text(self, text, width, indent):
        if text.startswith("example"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _get_help_string(self, action):
        text = action.help or ""
        if "Default" in text or any(action.default is d for d in (None, False, argparse.SUPPRESS)):
            return text
        return f"{text}. Default: %(default)s"


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors ("error: argument --steps: must be ...", exit status 2)
    instead of the usage block, and `parse` that also tells which flags the command line set."""

    def __init__(self, description, examples):
        super().__init__(description=description, epilog=examples, allow_abbrev=False,
                         formatter_class=_HelpFormatter)

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)

    def parse(self, argv=None):
        """(args, given): the flags, and the names of those the command line set."""
        args = self.parse_args(argv)
        defaults = [(action, action.default) for action in self._actions]
        for action, _ in defaults:
            action.default = argparse.SUPPRESS
        given = set(vars(self.parse_args(argv)))
        for action, default in defaults:
            action.default = default
        return args, given


def add_machine_flags(p, compile_default=None):
    """--device, --amp and --compile, with the same meaning in every script."""
    p.add_argument("--device", default="auto", help="auto (CUDA, else Apple's MPS, else CPU), "
                   "cpu, cuda, cuda:N or mps")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto",
                   help="autocast dtype; auto = bf16 on CUDA and on CPUs with native bf16, else "
                        "float32")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=compile_default,
                   help="torch.compile the model" + (". Default: on for CUDA, off for CPU"
                                                     if compile_default is None else ""))


def positive(kind, allow_zero=False, at_most=None):
    """argparse type: a finite int or float > 0 (>= 0 with allow_zero), at most `at_most`
    (an integer, by default, at most MAX_COUNT)."""
    bound = ">= 0" if allow_zero else "> 0"
    at_most = MAX_COUNT if at_most is None and kind is int else at_most

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if not (math.isfinite(value) and (value >= 0 if allow_zero else value > 0)):
            raise argparse.ArgumentTypeError(f"must be a finite number {bound}, got {text}")
        if at_most is not None and value > at_most:
            raise argparse.ArgumentTypeError(f"must be at most {at_most:,}, got {text}")
        return value
    parse.__name__ = f"{'non-negative' if allow_zero else 'positive'} {kind.__name__}"
    return parse


def finite(text):
    """argparse type: any finite float (a guidance weight may be 0 or negative)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def fraction(text):
    """argparse type: a float in [0, 1) (an EMA decay, a dropout probability)."""
    value = positive(float, allow_zero=True)(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def seed_value(text):
    """argparse type: a random seed, an integer in [0, 2**63)."""
    return positive(int, allow_zero=True, at_most=2 ** 63 - 1)(text)


# ---------------------------------------------------------------------------------------------
# Device and precision

def pick_device(name):
    """torch.device from --device: auto (CUDA, else Apple's MPS, else CPU), cpu, cuda[:N], mps."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {name}: not a device; use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    if device.type == "cuda":                 # TF32 matmuls and convolutions: free speed on Ampere+
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return device


def cpu_has_native_bf16():
    """True when this CPU computes bf16 matmuls natively (AVX512-BF16 or AMX)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def pick_amp(amp, device):
    """The autocast dtype for --amp on `device` (None: float32). auto: bf16 on CUDA (fp16 where
    a GPU lacks bf16) and on CPUs with native bf16; float32 elsewhere."""
    if amp == "off" or (device.type == "mps" and amp == "auto"):
        return None
    if device.type == "cuda":
        if amp in ("auto", "bf16") and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if amp == "bf16":
            raise UserError("--amp bf16: this GPU has no bf16; use --amp fp16 or off")
        return torch.float16
    if amp == "fp16" and device.type == "cpu":
        raise UserError("--amp fp16 needs a GPU (float16 autocast is slow and lossy on CPUs); "
                        "use --amp bf16 or --amp off")
    if amp == "auto":
        return torch.bfloat16 if cpu_has_native_bf16() else None
    return torch.bfloat16 if amp == "bf16" else torch.float16


def autocast(device, dtype):
    """The autocast context for a dtype from pick_amp (a no-op for float32)."""
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def maybe_compile(model, device, flag):
    """torch.compile(model) when `flag` (None: on for CUDA). Compiling happens at the first
    call, where a missing C++ compiler shows up: then one warning, and the model runs eagerly."""
    if not (device.type == "cuda" if flag is None else flag):
        return model
    compiled = torch.compile(model)

    def call(*args, **kwargs):
        nonlocal compiled
        if compiled is not None:
            try:
                return compiled(*args, **kwargs)
            except Exception as e:          # the model's own errors recur below, eagerly
                if is_oom(e):
                    raise
                print(f"warning: torch.compile failed ({type(e).__name__}: "
                      f"{(str(e).strip().splitlines() or [''])[0][:160]}); running eagerly",
                      file=sys.stderr, flush=True)
                compiled = None
        return model(*args, **kwargs)
    call._orig_mod = model                    # as torch.compile's wrapper: the model behind it
    return call


def synchronizer(device):
    """A function that waits for the device's queued work (a no-op on CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return torch.mps.synchronize if device.type == "mps" else (lambda: None)


def median_time(fn, warmup=2, repeats=3, sync=lambda: None, clock=time.perf_counter):
    """Median seconds of one fn() call: `warmup` untimed calls (compiling, warming caches), then
    `repeats` timed ones. sync() runs before each clock reading, so queued GPU work is inside its
    own measurement."""
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


def is_oom(e):
    """True for an out-of-memory error of any allocator."""
    text = str(e).lower()
    return isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)) or \
        "out of memory" in text or "can't allocate memory" in text


def set_threads(threads=None):
    """Set torch's CPU threads: --threads, else OMP_NUM_THREADS when set (how people run jobs
    side by side), else the physical cores. Returns the line that says so, with a note when the
    machine is busy (a second torch job on the same cores slows both several times)."""
    cores = _physical_cores()
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if threads:
        chosen, why = threads, "--threads"
    elif omp.isdigit() and int(omp) > 0:
        chosen, why = int(omp), "OMP_NUM_THREADS"
    else:
        chosen, why = cores, f"{cores} physical cores"
    torch.set_num_threads(chosen)
    line = f"CPU threads: {chosen} ({why})"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > cores + 0.5:
        line += (f"; note: this machine is busy (load average {load:.1f} on {cores} cores): "
                 f"expect slower steps, and run no second torch job beside this one")
    return line


def _physical_cores():
    """Cores this process may use, each physical core once (a hyper-thread adds little to
    matmuls): /proc/cpuinfo's (physical id, core id) pairs where Linux has them."""
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        with open("/proc/cpuinfo") as f:
            blocks = f.read().split("\n\n")
        cores = {(b.split("physical id")[1].split("\n")[0], b.split("core id")[1].split("\n")[0])
                 for b in blocks if "core id" in b and "physical id" in b}
    except (OSError, IndexError):
        cores = set()
    return max(1, min(allowed or 1, len(cores) or allowed or 1))


# ---------------------------------------------------------------------------------------------
# Files

SIGNALS = (signal.SIGINT, signal.SIGTERM)     # the signals a run saves on (runs.Run)


@contextmanager
def _signals_deferred():
    """SIGINT and SIGTERM wait until the block is done, then reach their handlers as usual."""
    if threading.current_thread() is not threading.main_thread():
        yield                                         # signals reach the main thread only
        return
    pending = []
    old = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        for signum in pending:
            signal.raise_signal(signum)


def atomic_write(path, write, what="file", replace=True):
    """write(f) into a temporary file beside `path`, fsync, then rename it into place, with
    SIGINT/SIGTERM deferred: a crash, a signal or a full disk leaves the old file or the new one,
    never a torn one. A symlink at `path` is replaced, never written through. With replace=False
    an existing `path` is never replaced, even one made a moment ago by another process (the
    rename is a hard link, which fails where a file exists)."""
    path = Path(path)
    tmp = None
    try:
        with _signals_deferred():
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
                with os.fdopen(fd, "wb") as f:
                    write(f)
                    f.flush()
                    os.fsync(f.fileno())
                os.chmod(tmp, 0o666 & ~_umask())           # mkstemp's 0600 -> like open()
                if replace:
                    os.replace(tmp, path)
                else:
                    os.link(tmp, path)
                for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
                    if re.fullmatch(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp", stale.name):
                        stale.unlink(missing_ok=True)          # our temporary, a killed run's
            except BaseException as e:
                if isinstance(e, FileExistsError) and not replace:
                    raise UserError(f"{path} appeared while this command ran (another command "
                                    f"wrote it); nothing replaced it: choose another path")
                if isinstance(e, (OSError, RuntimeError)) and (
                        isinstance(e, OSError) or "inline_container" in str(e)):
                    raise UserError(f"could not write {path} ({_why(e, path.parent)}); the "
                                    f"previous {what}, if any, is intact: free disk space or "
                                    f"choose another --out")
                raise
            finally:
                if tmp is not None and os.path.lexists(tmp):
                    os.remove(tmp)
    except UserError as e:
        raise UserError(str(e)) from None


def _why(e, folder):
    """Why a write failed, in words; torch reports a full disk vaguely ("enforce fail")."""
    try:
        if getattr(e, "errno", None) == errno.ENOSPC or shutil.disk_usage(folder).free < 2 ** 20:
            return "no space left on device"
    except OSError:
        pass
    return e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0][:160]


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def quoted(path):
    """`path` as one word of a printed command, quoted where a shell needs it (a space, ...).
    On Windows in "...", which cmd.exe and PowerShell both read (a $, ` or % stays special)."""
    text = str(path)
    if os.name == "nt":
        return f'"{text}"' if re.search(r"[^\w\-./\\:]", text) else text
    return shlex.quote(text)


def write_json(path, obj, what="file"):
    """obj as indented JSON, atomically."""
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()), what)


def check_output(path, flag, overwrite=False, inputs=()):
    """Check an output file before the work: a writable folder; never one of the command's
    `inputs` ((flag, path) pairs), even with --overwrite; and, unless `overwrite`, no file there
    yet. Returns the path."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a folder; name a file")
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: cannot write there ({folder} is not a writable folder)")
    target = os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(path))), path.name)
    for name, source in inputs:
        if source is not None and target == os.path.realpath(source):
            raise UserError(f"{flag} {path} is the file this command reads as {name}; choose "
                            f"another path")
    if not overwrite and os.path.lexists(path):
        raise UserError(f"{flag} {path} exists and this command did not write it; choose another "
                        f"path, or pass --overwrite to replace it")
    return path


# ---------------------------------------------------------------------------------------------
# Progress

class Progress:
    """The progress line of long work: `update(done, terms)` prints "what done/total terms | N
    img/s | ETA" every `every` seconds, at the end, and whenever forced (a training loop's log
    steps), and returns the line's numbers (None when it printed nothing). Time inside
    `paused()` (checkpoints, sample grids) is left out of the rate. `elapsed0`: seconds a
    resumed run had trained before."""

    def __init__(self, what, total, start=0, images_per_unit=1, every=5.0, elapsed0=0.0):
        self.what, self.total, self.start, self.per = what, total, start, images_per_unit
        self.every, self.elapsed0, self.paused_s = every, elapsed0, 0.0
        self.t0 = self.last = time.perf_counter()

    @contextmanager
    def paused(self):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - t

    def elapsed(self):
        """Seconds of this work so far, a resumed run's earlier ones included."""
        return self.elapsed0 + time.perf_counter() - self.t0

    def update(self, done, terms=None, force=False):
        now = time.perf_counter()
        end = done >= self.total and now - self.t0 >= self.every
        if not (force or end or now - self.last >= self.every):
            return None
        self.last, seconds, count = now, now - self.t0, max(done - self.start, 1)
        rate = (done - self.start) * self.per / max(seconds - self.paused_s, 1e-9)
        eta = (self.total - done) * seconds / count
        text = "".join(f" {k} {v:.4g}" for k, v in (terms or {}).items())
        print(f"{self.what} {done}/{self.total}{text} | {rate:.0f} img/s | "
              f"{f'ETA {eta / 60:.1f} min' if done < self.total else f'{seconds:.0f} s'}",
              flush=True)
        return {"step": done, **(terms or {}), "img_per_s": round(rate, 2),
                "time": round(self.elapsed(), 2)}
