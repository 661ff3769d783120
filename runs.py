"""Run folders and the files in them: a run's files are written whole and never mixed.

Nothing here is in the lecture; it is what makes a long run safe to stop, resume and look at:

- `atomic_write` (a crash, a signal or a full disk never leaves a torn file) and the writers on
  it, `write_json` (args.json, results) and `plot_loss` (loss.png from log.jsonl);
  `signals_deferred` keeps SIGINT/SIGTERM out of a write;
- `RunFolder` (one run per folder: a pid lock, no silent overwrite or reuse), `run_files`,
  `check_writable`, and `trim_log` (a resumed run drops the log lines it repeats);
- the run's settings: `parse_with_given` (which flags the command line set), `settings_of` and
  `restore_settings` (--resume takes the run's stored settings as defaults).

Offers: SIGNALS, signals_deferred, atomic_write, write_json, plot_loss, RUN_FILES, RunFolder,
run_files, check_writable, trim_log, parse_with_given, NOT_SETTINGS, settings_of, restore_settings
"""
import argparse
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

from PIL import Image, ImageDraw

from common import UserError

SIGNALS = (signal.SIGINT, signal.SIGTERM)   # the signals a run saves on (training.StopFlag)


# ---------------------------------------------------------------------------------------------
# Writing files

@contextmanager
def signals_deferred():
    """SIGINT and SIGTERM wait until the block is done, then reach their handlers as usual: a file
    being written is always finished (or cleaned up) before a signal can stop the process."""
    if threading.current_thread() is not threading.main_thread():
        yield                                         # signals only reach the main thread
        return
    pending = []
    old = {s: signal.signal(s, lambda signum, frame: pending.append(signum))
           for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        for signum in pending:
            signal.raise_signal(signum)


def atomic_write(path, write, what="file"):
    """Write a file atomically: write(f) into a temporary file in the same folder, flush, fsync,
    rename, with SIGINT/SIGTERM deferred until done. A crash, a signal or a full disk at any moment
    leaves either the old file or the new one, never a torn or empty one. Write errors (torch.save
    reports a full disk as a RuntimeError) become a UserError: one line, exit status 2."""
    path = Path(path)
    tmp = None
    try:
        with signals_deferred():
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
                with os.fdopen(fd, "wb") as f:
                    os.fchmod(f.fileno(), 0o666 & ~_umask())     # mkstemp's 0600 -> like open()
                    write(f)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
                tmp = None
                for stale in path.parent.glob(f"{path.name}.*.tmp"):   # of a killed earlier run
                    stale.unlink(missing_ok=True)
                dir_fd = os.open(path.parent, os.O_RDONLY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
            finally:
                if tmp is not None and os.path.exists(tmp):
                    os.remove(tmp)
    except (OSError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and "inline_container" not in str(e):
            raise                                     # not a write failure: a bug, not the disk
        raise UserError(f"could not write {path} ({_write_failure(e, path.parent)}); the previous "
                        f"{what}, if any, is intact: free disk space or choose another --out")


def _write_failure(e, folder):
    """Why a write failed, in words: the OS's reason, or a full disk torch reported vaguely."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    if free is not None and free < 64 * 2 ** 20:
        return f"No space left on device: {free / 2 ** 20:.1f} MiB free"
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:160]


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path, obj, what="file"):
    """obj as indented JSON, atomically (args.json, evaluation results)."""
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()), what)


def plot_loss(log_path, png_path, key="loss", size=(640, 400)):
    """Draw log.jsonl's `key` against the step (log-scale step axis, log-scale loss) with Pillow:
    the logged values (light) and their running mean (dark), with the step and loss ranges
    written on the axes. Written atomically; nothing is drawn before two logged points."""
    points = []
    for line in Path(log_path).read_text().splitlines():
        entry = json.loads(line)
        if key in entry and entry.get("step", 0) > 0 and entry[key] > 0 and math.isfinite(entry[key]):
            points.append((entry["step"], entry[key]))
    if len(points) < 2:
        return
    smooth, mean = [], None
    for _, y in points:
        mean = y if mean is None else 0.8 * mean + 0.2 * y
        smooth.append(mean)
    W, H, left, bottom, pad = size[0], size[1], 60, 30, 12
    lx = [math.log10(x) for x, _ in points]
    ly = [math.log10(y) for _, y in points]
    x0, x1 = min(lx), max(lx) + 1e-9
    y0, y1 = min(ly), max(ly) + 1e-9

    def xy(x, y):
        return (left + (math.log10(x) - x0) / (x1 - x0) * (W - left - pad),
                pad + (y1 - math.log10(y)) / (y1 - y0) * (H - bottom - pad))
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([left, pad, W - pad, H - bottom], outline=(160, 160, 160))
    draw.line([xy(x, y) for x, y in points], fill=(170, 200, 240), width=1)
    draw.line([xy(x, y) for (x, _), y in zip(points, smooth)], fill=(20, 60, 160), width=2)
    draw.text((left, H - bottom + 6), f"step {points[0][0]}", fill="black")
    draw.text((W - pad - 90, H - bottom + 6), f"step {points[-1][0]} (log)", fill="black")
    draw.text((4, pad), f"{10 ** y1:.3g}", fill="black")
    draw.text((4, H - bottom - 12), f"{10 ** y0:.3g}", fill="black")
    draw.text((left + 8, pad + 4), f"{key} (log scale): logged, running mean", fill="black")
    atomic_write(png_path, lambda f: image.save(f, format="PNG"), "picture")


# ---------------------------------------------------------------------------------------------
# Run folders

RUN_FILES = ("ckpt.pt", "log.jsonl", "args.json", "loss.png", "recon.png", "samples_*.png",
             "prompts.txt")


class RunFolder:
    """A run folder belongs to one run.

    Made when the run is ready to write (`claim`), never by a command that fails before; then
    locked (`.lock` holds the owner's pid and start time) so a second writer is refused, and a
    lock left by a killed process is recovered. A folder that holds a run (a checkpoint, a log, a
    picture) is refused unless --resume (continue it) or --overwrite (delete its files first).
    `release` unlocks, and removes the folder again if this command made it and left it empty."""

    def __init__(self, out, resume=False, overwrite=False):
        self.path, self.resume, self.overwrite = Path(out), resume, overwrite
        self.lock = self.path / ".lock"
        self.made = self.locked = False
        if resume and overwrite:
            raise UserError("--resume and --overwrite exclude each other: continue the run, or "
                            "start it over")
        check_writable(self.path)
        self._check_contents()                       # fail before the slow work, nothing made

    def _check_contents(self):
        found = self.run_files()
        ckpt = self.path / "ckpt.pt"
        if self.resume and not ckpt.is_file():
            raise UserError(f"--resume {ckpt}: file not found; nothing to resume (drop --resume "
                            f"to start a new run)")
        if found and not (self.resume or self.overwrite):
            raise UserError(f"--out {self.path} already holds a run ({', '.join(found[:3])}); "
                            f"continue it with --resume, start over with --overwrite, or choose "
                            f"another --out")

    def run_files(self):
        return run_files(self.path)

    def claim(self):
        """Make and lock the folder (again checking its contents: another run may have finished
        there meanwhile); with --overwrite, delete the previous run's files. Returns the path."""
        try:
            self.made = not self.path.exists()
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"--out {self.path}: cannot write there ({e.strerror or e}); choose "
                            f"another folder")
        self._lock()
        self._check_contents()
        if self.overwrite:
            for name in self.run_files():
                (self.path / name).unlink()
        return self.path

    def _lock(self):
        me = _process_id(os.getpid())
        for _ in range(2):
            try:
                fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self.lock.read_text().strip() if self.lock.exists() else ""
                pid = int(owner.split()[0]) if owner[:1].isdigit() else None
                if pid is not None and owner != me and _process_id(pid) == owner:
                    raise UserError(f"--out {self.path} is in use by another run (pid {pid}); "
                                    f"wait for it to finish or choose another --out")
                print(f"note: removed a stale lock of a process that is gone ({self.lock})",
                      file=sys.stderr)
                self.lock.unlink(missing_ok=True)
                continue
            except OSError as e:
                raise UserError(f"--out {self.path}: cannot write there ({e.strerror or e}); "
                                f"choose another folder")
            with os.fdopen(fd, "w") as f:
                f.write(me + "\n")
            self.locked = True
            return
        raise UserError(f"--out {self.path}: could not take its lock {self.lock}; remove it if no "
                        f"run is using the folder")

    def release(self):
        if self.locked:
            self.lock.unlink(missing_ok=True)
            self.locked = False
        if self.made and self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()                          # a failed command leaves no empty folder
            self.made = False


def run_files(folder):
    """Names of the files in a folder that belong to a run (RUN_FILES)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted({p.name for pattern in RUN_FILES for p in folder.glob(pattern)})


def _process_id(pid):
    """'pid start-time' of a live process ('pid' where /proc has no start time), '' if gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return ""
    except PermissionError:
        pass                                           # alive, owned by someone else
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return f"{pid} {stat.rsplit(')', 1)[1].split()[19]}"   # field 22: start time
    except (OSError, IndexError):
        return str(pid)


def check_writable(path):
    """--out must be a folder we can write, or one we can make (no folder is made here)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {path}: cannot write there (it is a file, not a folder); choose "
                        f"another folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        why = "not a folder" if not existing.is_dir() else "permission denied"
        raise UserError(f"--out {path}: cannot write there ({why}: {existing}); choose another "
                        f"folder")
    return path


def trim_log(path, step):
    """Drop the lines of log.jsonl after `step` (a resumed run repeats them; they were logged by
    the interrupted process after its last checkpoint)."""
    path = Path(path)
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = [line for line in lines if json.loads(line).get("step", 0) <= step]
    if len(keep) != len(lines):
        atomic_write(path, lambda f: f.write("".join(keep).encode()), "log")


# ---------------------------------------------------------------------------------------------
# A run's settings

def parse_with_given(parser, argv=None):
    """(args, given): the parsed flags, and the set of dests the command line set explicitly
    (not by default), so that --resume can tell a stored setting from a changed one."""
    args = parser.parse_args(argv)
    for action in parser._actions:                   # parse again with no defaults at all
        action.default = argparse.SUPPRESS
    return args, set(vars(parser.parse_args(argv)))


# Settings that are not the run's: how this command was asked to run, not what it trains.
NOT_SETTINGS = {"resume", "overwrite", "allow_changes", "out", "threads"}


def settings_of(args):
    """The run's settings from parsed flags (plain values), as stored in its checkpoint."""
    return {k: v for k, v in vars(args).items() if k not in NOT_SETTINGS}


def restore_settings(args, given, saved, experiment, allow_changes, flag="--resume", verbose=True):
    """--resume: every stored setting the command line does not set becomes the value; the ones it
    sets differently are listed in one line. A difference in an `experiment` setting (data,
    seed, ...) makes another experiment: refused unless `allow_changes`. Returns the changes."""
    changes = {}
    for key, old in saved.items():
        if key in NOT_SETTINGS or not hasattr(args, key):
            continue
        if key not in given:
            setattr(args, key, old)
        elif getattr(args, key) != old:
            changes[key] = old
    text = ", ".join(f"--{k.replace('_', '-')} {getattr(args, k)} (was {v})" for k, v in changes.items())
    refused = [k for k in changes if k in experiment]
    if refused and not allow_changes:
        raise UserError(f"{flag}: {text}; {', '.join('--' + k.replace('_', '-') for k in refused)} "
                        f"would make another experiment: use the run's values, another --out, or "
                        f"--allow-changes to resume anyway")
    if changes and verbose:
        print(f"resuming with changed settings: {text}", flush=True)
    return changes
