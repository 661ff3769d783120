"""Run folders and the files in them: a run's files are written whole, never mixed, and no
command replaces a file it did not make.

Nothing here is in the lecture; it is what makes a long run safe to stop, resume and look at:

- `atomic_write` (a crash, a signal or a full disk never leaves a torn file; a symlink in the
  way is replaced, never written through) and the writers on it, `write_json` (args.json,
  results), `write_prompts` (one prompt a line) and `plot_loss` (loss.png from log.jsonl);
  `append_json` adds a line to log.jsonl the same careful way, `read_log` reads it back past a
  torn line; `signals_deferred` keeps SIGINT/SIGTERM out of a write;
- one rule for every file a command writes: `check_output` refuses, before any work, to replace
  a file the command did not make (one that exists, or one of its own inputs) unless the user
  says so (--overwrite);
- `RunFolder` (one run per folder: a lock no two runs can hold, no silent overwrite or reuse,
  --overwrite deletes only the run's own files, `RUN_FILES`; a run stopped before its first
  checkpoint starts again), `run_files`, `check_writable`, and `trim_log` (a resumed run drops
  the log lines it repeats);
- the run's settings: `parse_with_given` (which flags the command line set; the paths among
  them made absolute, `PATH_SETTINGS`, so a run resumes from any folder), `settings_of` and
  `restore_settings` (--resume takes the run's stored settings as defaults).

Offers: SIGNALS, signals_deferred, atomic_write, write_json, write_prompts, plot_loss,
append_json, read_log, check_output, RUN_FILES, RunFolder, run_files, check_writable, trim_log,
parse_with_given, PATH_SETTINGS, NOT_SETTINGS, settings_of, restore_settings
"""
import argparse
import fcntl
import json
import math
import os
import re
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


def write_prompts(path, prompts):
    """The prompts one per line, atomically (OUT.prompts.txt, prompts.txt): a line break inside a
    prompt is written as its escape (\\n), so that line i is always row i's prompt."""
    breaks = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"       # what str.splitlines splits on
    lines = ["".join(c.encode("unicode_escape").decode() if c in breaks else c for c in prompt)
             for prompt in prompts]
    atomic_write(path, lambda f: f.write("".join(line + "\n" for line in lines).encode()), "file")


def append_json(path, entry):
    """Append one JSON line to a log (log.jsonl). A symlink there is first replaced by a copy of
    what it points to (a log is never written through a link, into another file); a failed write
    (a full disk) is one line naming the file."""
    path = Path(path)
    line = (json.dumps(entry) + "\n").encode()
    try:
        if path.is_symlink():
            old = path.read_bytes() if path.exists() else b""
            atomic_write(path, lambda f: f.write(old), "log")
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        try:
            while line:
                line = line[os.write(fd, line):]
        finally:
            os.close(fd)
    except OSError as e:
        raise UserError(f"could not append to {path} ({e.strerror or e}); the checkpoint, if any, "
                        f"is intact: free disk space or choose another --out")


def read_log(path):
    """The entries (dicts) of a log.jsonl, and the number of lines that are not one: a line torn
    by a kill or a full disk, a blank or edited line."""
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
    """Draw log.jsonl's `key` against the step (log-scale step axis, log-scale loss) with Pillow:
    the logged values (light) and their running mean (dark), with the step and loss ranges
    written on the axes. Written atomically, from the first logged point on (one point is drawn
    as a dot), so every run folder has one as soon as its first progress line."""
    points = []
    for entry in read_log(log_path)[0]:
        value = entry.get(key)
        if isinstance(value, (int, float)) and entry.get("step", 0) > 0 and value > 0 and \
                math.isfinite(value):
            points.append((entry["step"], value))
    if not points:
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
    if len(points) == 1:
        (px, py), r = xy(*points[0]), 3
        draw.ellipse([px - r, py - r, px + r, py + r], fill=(20, 60, 160))
    draw.line([xy(x, y) for x, y in points], fill=(170, 200, 240), width=1)
    draw.line([xy(x, y) for (x, _), y in zip(points, smooth)], fill=(20, 60, 160), width=2)
    draw.text((left, H - bottom + 6), f"step {points[0][0]}", fill="black")
    draw.text((W - pad - 90, H - bottom + 6), f"step {points[-1][0]} (log)", fill="black")
    draw.text((4, pad), f"{10 ** y1:.3g}", fill="black")
    draw.text((4, H - bottom - 12), f"{10 ** y0:.3g}", fill="black")
    draw.text((left + 8, pad + 4), f"{key} (log scale): logged, running mean", fill="black")
    atomic_write(png_path, lambda f: image.save(f, format="PNG"), "picture")


# ---------------------------------------------------------------------------------------------
# Outputs and run folders

def check_output(path, flag, overwrite=False, inputs=()):
    """An output file, checked before the work: its folder must be writable, and unless
    `overwrite` (the user's --overwrite) it must neither exist nor be one of the command's
    `inputs` ((flag, path) pairs). A symlink there counts as a file; writing replaces the link
    (atomic_write), never what it points to. Returns the path."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a folder; name a file")
    check_writable(path.parent, flag)
    if overwrite:
        return path
    for name, source in inputs:
        if source is not None and _same_file(path, source):
            raise UserError(f"{flag} {path} is the file this command reads as {name}; choose "
                            f"another path (--overwrite replaces it)")
    if os.path.lexists(path):
        raise UserError(f"{flag} {path} exists and this command did not write it; choose another "
                        f"path, or pass --overwrite to replace it")
    return path


def _same_file(path, source, within=False):
    """True when writing `path` (its last part not followed: a link there is replaced) would
    replace the file `source` (or, `within`, a file inside the folder `source`)."""
    target = os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(path))),
                          os.path.basename(path))
    source = os.path.realpath(source)
    return target == source or (within and target.startswith(source.rstrip(os.sep) + os.sep))


# A run's own files, the only ones --overwrite deletes: fixed names, and the sample grids
# samples_<step>.png that train_flow.py writes (no other picture that starts "samples_").
RUN_FILES = re.compile(r"ckpt\.pt|log\.jsonl|args\.json|loss\.png|recon\.png|prompts\.txt|"
                       r"samples_\d{6,}\.png")


class RunFolder:
    """A run folder belongs to one run.

    Made when the run is ready to write (`claim`), never by a command that fails before; then
    locked, so that a second writer is refused: `.lock` holds the owner's pid and start time from
    the moment it exists (it is linked into place whole) and is flock'ed while its owner lives, so
    no two runs can hold it, and the lock of a killed process is taken over. A folder that holds
    a run (RUN_FILES) is refused unless --resume (continue it) or --overwrite (delete its files,
    listed first; nothing else). A run stopped before its first checkpoint (its args.json, no
    ckpt.pt) is started again by the same command: its files are replaced, with a note.
    `settings`: this command's settings (settings_of), compared with args.json; `inputs`: the
    command's (flag, path) inputs, never deleted. `release` unlocks, and removes the folder again
    if this command made it and left it empty."""

    def __init__(self, out, resume=False, overwrite=False, settings=None, inputs=()):
        self.path, self.resume, self.overwrite = Path(out), resume, overwrite
        self.settings, self.inputs = settings, inputs
        self.lock = self.path / ".lock"
        self.made = self.locked = False
        self.replaced = []                           # an earlier run's files that claim deletes
        self._fd = None
        if resume and overwrite:
            raise UserError("--resume and --overwrite exclude each other: continue the run, or "
                            "start it over")
        check_writable(self.path)
        self._check_contents()                       # fail before the slow work, nothing made
        if self.overwrite and self.replaced:         # say now, before the slow work starts
            changed = self._changed_settings(limit=None) if "args.json" in self.replaced else ""
            print(f"note: --overwrite replaces the run in {self.path}"
                  f"{f' (settings that differ from its args.json: {changed})' if changed else ''}; "
                  f"its files {', '.join(self.replaced)} are deleted when this run starts",
                  file=sys.stderr, flush=True)

    def _check_contents(self):
        found = self.run_files()
        ckpt = self.path / "ckpt.pt"
        stopped = not ckpt.is_file() and "args.json" in found
        self.replaced = []
        if self.resume:
            if stopped:
                raise UserError(f"--resume {ckpt}: the run in {self.path} stopped before its "
                                f"first checkpoint, there is nothing to resume; start it again "
                                f"with its command without --resume (its files are replaced)")
            if not ckpt.is_file():
                raise UserError(f"--resume {ckpt}: file not found; nothing to resume (drop "
                                f"--resume to start a new run)")
            return
        if not found:
            return
        if not self.overwrite:
            if not stopped:
                resume = "continue it with --resume, " if ckpt.is_file() else ""
                raise UserError(f"--out {self.path} already holds a run ({_listing(found)}); "
                                f"{resume}start over with --overwrite (deletes these files), or "
                                f"choose another --out")
            changed = self._changed_settings()
            if changed:
                raise UserError(f"--out {self.path} holds a run stopped before its first "
                                f"checkpoint, with other settings ({changed}); start it again "
                                f"with its settings, start over with --overwrite, or choose "
                                f"another --out")
        for name in found:
            for flag, source in self.inputs:
                if source is not None and _same_file(self.path / name, source, within=True):
                    raise UserError(f"--out {self.path}: starting over would delete {name}, which "
                                    f"this command reads as {flag}; choose another --out")
        self.replaced = found

    def _changed_settings(self, limit=4):
        """How this command's settings differ from the previous run's args.json ('' if not):
        the first `limit` of them (all with None)."""
        try:
            stored = json.loads((self.path / "args.json").read_text())
        except (OSError, ValueError):
            return "its args.json is unreadable"
        now = json.loads(json.dumps(self.settings))
        if not isinstance(stored, dict) or now is None:
            return "its args.json is unreadable"
        keys = [k for k in sorted(set(stored) | set(now)) if stored.get(k) != now.get(k)]
        return ", ".join(f"{_flag(k)} {now.get(k)} (was {stored.get(k)})" for k in keys[:limit])

    def run_files(self):
        return run_files(self.path)

    def claim(self):
        """Make and lock the folder (again checking its contents: another run may have finished
        there meanwhile); with --overwrite, or for a run stopped before its first checkpoint,
        delete the previous run's files, listed first. Returns the path."""
        try:
            self.made = not self.path.exists()
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"--out {self.path}: cannot write there ({e.strerror or e}); choose "
                            f"another folder")
        self._lock()
        self._check_contents()
        if self.replaced:
            why = ("--overwrite" if self.overwrite else
                   "it holds a run stopped before its first checkpoint, with these settings: "
                   "starting it again")
            print(f"note: {self.path}: {why}; deleting the previous run's files "
                  f"{', '.join(self.replaced)}", file=sys.stderr, flush=True)
            for name in self.replaced:
                (self.path / name).unlink(missing_ok=True)
        return self.path

    def _lock(self):
        """Take .lock: a new file holding our pid, flock'ed, then linked into place whole
        (os.link fails where a lock exists). A lock whose flock is free belongs to a process
        that is gone: it is replaced (os.replace) while we hold its flock, so that no other
        process can take it meanwhile."""
        me = _process_id(os.getpid())
        fd = tmp = None
        try:
            fd, tmp = tempfile.mkstemp(prefix=".lock.", suffix=".tmp", dir=self.path)
            os.fchmod(fd, 0o644)
            os.write(fd, (me + "\n").encode())
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)   # a new file: nobody else holds it
            for _ in range(10):
                try:
                    os.link(tmp, self.lock)
                    break
                except FileExistsError:
                    pass
                if self._take_stale(tmp, me):
                    break
            else:
                raise UserError(f"--out {self.path}: could not take its lock {self.lock}; remove "
                                f"it if no run is using the folder")
        except BaseException as e:
            if fd is not None:
                os.close(fd)
            if isinstance(e, OSError):
                raise UserError(f"--out {self.path}: cannot write there ({e.strerror or e}); "
                                f"choose another folder")
            raise
        finally:
            if tmp is not None and os.path.lexists(tmp):
                os.unlink(tmp)
        self._fd, self.locked = fd, True

    def _take_stale(self, tmp, me):
        """Replace an existing lock by ours if its owner is gone; refuse if it lives. False when
        the lock changed meanwhile (try again)."""
        try:
            held = os.open(self.lock, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return False
        try:
            owner = os.read(held, 256).decode(errors="replace").strip()
            pid = _pid_of(owner)
            try:
                fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UserError(f"--out {self.path} is in use by another run (pid "
                                f"{pid if pid is not None else 'unknown'}); wait for it to "
                                f"finish or choose another --out")
            if pid is not None and owner != me and _process_id(pid) == owner:   # an older lock
                raise UserError(f"--out {self.path} is in use by another run (pid {pid}); wait "
                                f"for it to finish or choose another --out")
            try:
                if os.lstat(self.lock).st_ino != os.fstat(held).st_ino:
                    return False                         # replaced meanwhile: look again
            except FileNotFoundError:
                return False
            os.replace(tmp, self.lock)
            print(f"note: removed a stale lock of a process that is gone ({self.lock})",
                  file=sys.stderr)
            return True
        finally:
            os.close(held)

    def release(self):
        if self.locked:
            self.lock.unlink(missing_ok=True)           # while holding its flock, then let go
            os.close(self._fd)
            self._fd, self.locked = None, False
        if self.made and self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()                          # a failed command leaves no empty folder
            self.made = False


def run_files(folder):
    """Names of the files in a folder that belong to a run (RUN_FILES), links included."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(name for name in os.listdir(folder) if RUN_FILES.fullmatch(name)
                  and not (folder / name).is_dir())


def _listing(names):
    """Names for a message; many sample grids are counted, not listed."""
    grids = [n for n in names if n.startswith("samples_")]
    if len(grids) > 2:
        names = [n for n in names if n not in grids] + [f"{len(grids)} sample grids {grids[0]} "
                                                        f"... {grids[-1]}"]
    return ", ".join(names)


def _pid_of(owner):
    """The pid a lock file names ('pid start-time'), or None when it names none a system has."""
    first = owner.split()[0] if owner.split() else ""
    return int(first) if first.isdigit() and 0 < int(first) < 2 ** 31 else None


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


def check_writable(path, flag="--out"):
    """A folder we can write, or one we can make (no folder is made here); `flag` names it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path}: cannot write there (it is a file, not a folder); choose "
                        f"another folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        why = "not a folder" if not existing.is_dir() else "permission denied"
        raise UserError(f"{flag} {path}: cannot write there ({why}: {existing}); choose another "
                        f"folder")
    return path


def trim_log(path, step):
    """Drop the lines of log.jsonl after `step` (a resumed run repeats them; they were logged by
    the interrupted process after its last checkpoint), and the lines that are no log entry (a
    line torn by a kill or a full disk), with a note."""
    path = Path(path)
    if not path.is_file():
        return
    entries, bad = read_log(path)
    keep = [entry for entry in entries if entry.get("step", 0) <= step]
    if bad:
        print(f"note: {path}: dropped {bad} line{'s' * (bad > 1)} that {'are' if bad > 1 else 'is'} "
              f"no log entry (torn by a kill or a full disk, or edited)", file=sys.stderr)
    if bad or len(keep) != len(entries):
        atomic_write(path, lambda f: f.write("".join(json.dumps(e) + "\n" for e in keep).encode()),
                     "log")


# ---------------------------------------------------------------------------------------------
# A run's settings

# Settings that name files or folders: stored as absolute paths, so that a run resumes from any
# working folder and ./runs/v/ckpt.pt is the same VAE as runs/v/ckpt.pt.
PATH_SETTINGS = {"data", "vae"}


def parse_with_given(parser, argv=None):
    """(args, given): the parsed flags, and the set of dests the command line set explicitly
    (not by default), so that --resume can tell a stored setting from a changed one. The
    PATH_SETTINGS among them are made absolute (~ expanded; links kept as named)."""
    args = parser.parse_args(argv)
    for key in PATH_SETTINGS:
        if getattr(args, key, None) is not None:
            setattr(args, key, _absolute(getattr(args, key)))
    for action in parser._actions:                   # parse again with no defaults at all
        action.default = argparse.SUPPRESS
    return args, set(vars(parser.parse_args(argv)))


def _absolute(path):
    return os.path.abspath(os.path.expanduser(path))


# Settings that are not the run's: how this command was asked to run, not what it trains.
NOT_SETTINGS = {"resume", "overwrite", "allow_changes", "out", "threads"}


def settings_of(args):
    """The run's settings from parsed flags (plain values), as stored in its checkpoint."""
    return {k: v for k, v in vars(args).items() if k not in NOT_SETTINGS}


def restore_settings(args, given, saved, experiment, allow_changes, flag="--resume", verbose=True):
    """--resume: every stored setting the command line does not set becomes the value; the ones it
    sets differently are listed in one line. A difference in an `experiment` setting (data,
    seed, ...) makes another experiment: refused unless `allow_changes`. Stored PATH_SETTINGS
    are compared as absolute paths (a relative one, from before they were stored absolute, is
    taken from the working folder). Returns the changes."""
    changes = {}
    for key, old in saved.items():
        if key in NOT_SETTINGS or not hasattr(args, key):
            continue
        if key in PATH_SETTINGS and isinstance(old, str):
            old = _absolute(old)
        if key not in given:
            setattr(args, key, old)
        elif getattr(args, key) != old and not _same_path(key, getattr(args, key), old):
            changes[key] = old
    text = ", ".join(f"{_flag(k)} {getattr(args, k)} (was {v})" for k, v in changes.items())
    refused = [k for k in changes if k in experiment]
    if refused and not allow_changes:
        raise UserError(f"{flag}: {text}; {', '.join(_flag(k) for k in refused)} "
                        f"would make another experiment: use the run's values, another --out, or "
                        f"--allow-changes to resume anyway")
    if changes and verbose:
        print(f"resuming with changed settings: {text}", flush=True)
    return changes


def _same_path(key, a, b):
    return key in PATH_SETTINGS and isinstance(a, str) and isinstance(b, str) and \
        os.path.realpath(a) == os.path.realpath(b)


def _flag(key):
    """The flag that sets a setting: --lr for lr; --cfg for cfg_scale (train_flow.py's --cfg)."""
    return {"cfg_scale": "--cfg"}.get(key, "--" + key.replace("_", "-"))
