"""Checkpoints: how a run is saved, checked, resumed and loaded back into models.

A checkpoint is a dict of tensors and plain data written by `torch.save`:
    format, version   "latent-flow", FORMAT_VERSION (an unknown version is refused)
    kind              "vae" (train_vae.py) or "flow" (train_flow.py)
    step, config      the optimizer step, and the model's dataclass config as a plain dict
    model, ema        state_dicts of the trained and of the averaged weights
    optimizer, scaler, rng   what --resume needs to continue bit-exactly
    digest            sha256 of everything above (`payload_digest`), added by save_checkpoint
plus what each script adds (the VAE's beta, sigma and latent statistics; the flow model's VAE,
image size and sample prompts).

Writing is atomic (temporary file, fsync, rename), so a crash never leaves a torn file. Loading
proves the bytes: it checks every CRC-32 of the zip file torch writes, then recomputes the
digest of what torch read and compares it with the stored one, so that neither bit rot nor a
damaged zip directory (torch reads a flipped "directory" flag as an empty entry and returns
uninitialised memory for that tensor) is ever used; every such file, and every zip error, is one
line naming it. Checkpoints written before the digest (none stored) still load, with the CRC
check alone, which misses such directory damage. `torch.load(weights_only=True)`: a file that
would run code is refused without running it.
A VAE checkpoint is `vae_finished` only once its training reached its target step and its latent
statistics are stored; the periodic saves before that are resumed, never used.
`load_vae` and `load_flow` rebuild the EMA models a checkpoint describes, with no flags needed,
after `config_problem` and a build on the meta device (no memory) have proven that the stored
configuration is well-formed and describes exactly the stored weights, which must be finite: a
damaged or hostile file makes this code allocate nothing beyond what it holds.
`export_flow` writes the EMA DiT and its VAE alone into one small file (kind "export", fp32 or
bf16 weights) that load_flow reads the same way.

Offers: FORMAT, FORMAT_VERSION, save_checkpoint, payload_digest, load_checkpoint, safe_load,
config_mismatch, flatten, rng_state, set_rng_state, training_state, restore_training,
vae_finished, CONFIG_MAX, config_problem, load_vae, load_flow, export_flow
"""
import dataclasses
import hashlib
import math
import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch

from common import UserError, available_memory
from runs import atomic_write, check_output
from dit import DiT, DiTConfig
from vae import VAE, VAEConfig

FORMAT = "latent-flow"
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------
# Writing and reading files

def save_checkpoint(path, obj, what="checkpoint"):
    """torch.save, atomically (runs.atomic_write): a crash, a signal or a full disk at any
    moment leaves either the old file or the new one, never a torn one. A dict is saved with its
    `digest` (payload_digest), which every load verifies."""
    if isinstance(obj, dict):
        obj = {**{k: v for k, v in obj.items() if k != "digest"}, "digest": payload_digest(obj)}
    atomic_write(path, lambda f: torch.save(obj, f), what)


def payload_digest(obj):
    """sha256 (hex) of a checkpoint dict but its "digest" entry: every key and plain value, and
    every tensor's dtype, shape and bytes, in order."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in obj.items() if k != "digest"})
    return h.hexdigest()


def _feed(h, value):
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())          # the raw bytes
    elif isinstance(value, dict):
        h.update(f"D{len(value)};".encode())
        for k, v in value.items():
            _feed(h, k)
            _feed(h, v)
    elif isinstance(value, (list, tuple)):
        h.update(f"{type(value).__name__}{len(value)};".encode())
        for v in value:
            _feed(h, v)
    else:                                   # str, int, float, bool, None: repr round-trips them
        text = repr(value)
        h.update(f"{type(value).__name__}{len(text)}:{text}".encode())


def load_checkpoint(path, kind, flag="--ckpt"):
    """Load a checkpoint safely (weights_only: no code runs), verify it, check format and kind
    (`kind`: one kind, or a tuple of the kinds accepted)."""
    path = Path(path)
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "file not found"
        make = {"flow": "; train one with python train_flow.py (13-14 min on 2 CPU cores), or in "
                        "under a minute a smoke-test one: python train_flow.py --steps 20 "
                        "--vae-steps 20 --n-builtin 500 --sample-steps 10 --out runs/smoke "
                        "(then --ckpt runs/smoke/ckpt.pt)",
                "vae": "; train one with python train_vae.py"}.get(kinds[0], "")
        raise UserError(f"{flag} {path}: {what}{make if flag != '--resume' else ''}")
    ckpt = safe_load(path, flag)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{flag} {path}: not a latent-flow checkpoint")
    if ckpt.get("version") != FORMAT_VERSION:
        raise UserError(f"{flag} {path}: checkpoint format version {ckpt.get('version')} is not "
                        f"supported by this code (version {FORMAT_VERSION}); use the matching code")
    if ckpt.get("kind") not in kinds:
        other = {"vae": "train_vae.py (pass it as --vae)", "flow": "train_flow.py (pass it as --ckpt)",
                 "export": "sample.py --export (pass it as --ckpt)"}
        raise UserError(f"{flag} {path}: this is {_a(ckpt.get('kind'))} checkpoint from "
                        f"{other.get(ckpt.get('kind'), 'elsewhere')}; {_a(kinds[0])} checkpoint is "
                        f"needed here")
    step = ckpt.get("step", 0)
    if not (isinstance(step, int) and not isinstance(step, bool) and step >= 0):
        raise UserError(f"{flag} {path}: damaged checkpoint: its step is {step!r:.40}; use another "
                        f"file or retrain")
    return ckpt


def _a(word):
    word = str(word)
    return f"{'an' if word[:1] in 'aeiou' else 'a'} {word}"


def safe_load(path, flag):
    """torch.load(weights_only=True): tensors and plain data only, never code, after checking
    every stored CRC-32 (torch.load itself does not: a flipped bit would load silently); then the
    stored digest, when there is one, against what torch read (a damaged zip directory passes
    the CRCs). Refusals, damaged and unreadable files become a UserError naming the file;
    torch's warnings are silenced (one line, not ten). Returns the payload, digest removed."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()                   # reads every member, compares its CRC-32
    except PermissionError:
        raise UserError(f"{flag} {path}: cannot read it (permission denied); check its permissions")
    except Exception as e:      # BadZipFile, EOFError, "encrypted", zlib.error, NotImplementedError...
        with open(path, "rb") as f:
            zip_start = f.read(4) == b"PK\x03\x04"
        if not zip_start:                              # torch.save always writes a zip file
            raise UserError(f"{flag} {path}: not a checkpoint (not a PyTorch file); use another "
                            f"file or retrain")
        raise UserError(f"{flag} {path}: not a readable checkpoint (truncated or corrupt: "
                        f"{type(e).__name__}); use another file or retrain")
    if bad is not None:
        raise UserError(f"{flag} {path}: damaged file (checksum mismatch in {bad}): the disk or a "
                        f"copy changed it; use another copy or retrain")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        code = re.search(r"GLOBAL ([\w.]+)", str(e))
        if code:
            raise UserError(f"{flag} {path}: refused to load: it would run Python code "
                            f"({code.group(1)}), which no latent-flow checkpoint holds; only load "
                            f"checkpoints written by train_vae.py or train_flow.py")
        raise UserError(f"{flag} {path}: not a checkpoint (not a PyTorch file, or corrupt); "
                        f"use another file or retrain")
    except Exception as e:
        raise UserError(f"{flag} {path}: not a readable checkpoint (truncated or corrupt: "
                        f"{type(e).__name__}); use another file or retrain")
    if isinstance(obj, dict) and "digest" in obj:
        try:
            same = payload_digest(obj) == obj["digest"]
        except Exception:
            same = False
        if not same:
            raise UserError(f"{flag} {path}: damaged file (what it holds does not match the "
                            f"digest stored in it): the disk, a copy or an edit changed it; use "
                            f"another copy or retrain")
        obj = {k: v for k, v in obj.items() if k != "digest"}
    return obj


def config_mismatch(saved, current, flags=None):
    """Name the first config field that differs between a checkpoint and the current flags, and
    (with `flags`, field -> flag, "" for the default) the flag that sets it."""
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            text = f"{key}: checkpoint has {saved.get(key)!r}, now {current.get(key)!r}"
            if flags is not None:
                text += f"; set by {flags.get(key, flags.get(''))}"
            return text
    return None


def flatten(d, prefix=""):
    """{"config": {"image_size": 32}} -> {"config.image_size": 32} (tuples become lists)."""
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(flatten(v, f"{prefix}{k}."))
        else:
            flat[prefix + k] = list(v) if isinstance(v, tuple) else v
    return flat


# ---------------------------------------------------------------------------------------------
# Training state: what --resume needs

def rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def training_state(kind, step, config, model, ema, opt, scaler, rng, settings=None, **extra):
    """The checkpoint dict of a training run: format, kind, step, config (a plain dict), the
    loss `settings` beside it (the VAE's beta and sigma), model, EMA, optimizer and GradScaler
    state, RNG state `rng`, then the script's `extra` entries."""
    return {"format": FORMAT, "version": FORMAT_VERSION, "kind": kind, "step": step,
            "config": config, **(settings or {}), "model": model.state_dict(),
            "ema": ema.model.state_dict(), "optimizer": opt.state_dict(),
            "scaler": scaler.state_dict(), "rng": rng, **extra}


def restore_training(ckpt, model, ema, opt, scaler, rng):
    """Load model, EMA, optimizer and GradScaler state and this process's RNG state from a
    checkpoint written by either training script; returns the step to continue from."""
    model.load_state_dict(ckpt["model"])
    ema.model.load_state_dict(ckpt["ema"])
    opt.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(rng)
    return ckpt["step"]


# ---------------------------------------------------------------------------------------------
# Models from checkpoints

def vae_finished(ckpt):
    """True for a VAE checkpoint whose training is complete and whose latent statistics are
    stored. (Checkpoints from before the "finished" mark: the statistics tell, since periodic
    saves carry the untouched mean 0 and std 1.)"""
    if "finished" in ckpt:
        return bool(ckpt["finished"])
    mean, std = ckpt.get("latent_mean"), ckpt.get("latent_std")
    return mean is not None and not (bool((mean == 0).all()) and bool((std == 1).all()))


# Bounds of a model configuration read from a file: any size or count, and any number of blocks.
CONFIG_MAX = {"size": 2 ** 16, "depth": 256}


def config_problem(config_class, config):
    """What is wrong with a model configuration read from a file, in words ("" if nothing):
    a field the dataclass lacks, a value of the wrong type (text for a number, a bool for an
    int), a size outside [1, CONFIG_MAX] (0 where 0 is the default: "unset"), a depth over
    CONFIG_MAX["depth"] blocks. What sizes must divide is checked by building the model."""
    if not isinstance(config, dict):
        return f"a {type(config).__name__}, not a dict"
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    for key, value in config.items():
        if key not in fields:
            return f"unknown field {key!r:.40}"
        kind, default = fields[key].type, fields[key].default
        top = CONFIG_MAX["depth"] if "depth" in key or "blocks" in key else CONFIG_MAX["size"]
        if kind is bool:
            ok = isinstance(value, bool)
        elif kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool) and \
                (0 if default == 0 else 1) <= value <= top
        elif kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and \
                math.isfinite(value) and 0 < value <= top
        elif kind is tuple:
            ok = isinstance(value, (list, tuple)) and 1 <= len(value) <= 8 and all(
                isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 64 for v in value)
        else:
            ok = True
        if not ok:
            return f"{key} = {value!r:.40}"
    return ""


def _build(model_class, config_class, config, state, flag, path, what="checkpoint"):
    """model_class(config) holding the weights `state` (bf16 ones back in float32), in eval mode
    on the CPU. Before any memory is allocated: the configuration is checked (config_problem),
    built on the meta device and compared, name by name and shape by shape, with the stored
    weights, which must be finite; so the model is never larger than what the file holds."""
    problem = config_problem(config_class, config)
    if problem:
        raise UserError(f"{flag} {path}: damaged {what}: its configuration is invalid ({problem}); "
                        f"use another file or retrain")
    try:
        config = config_class.from_dict(config)
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in model_class(config).state_dict().items()}
    except Exception as e:      # a size that does not divide another: ValueError, ZeroDivision...
        raise UserError(f"{flag} {path}: damaged {what}: its configuration describes no model "
                        f"({type(e).__name__}: {str(e)[:80]}); use another file or retrain")
    fits = isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values()) \
        and {k: tuple(v.shape) for k, v in state.items()} == shapes
    if not fits:
        raise UserError(f"{flag} {path}: damaged {what}: its weights do not fit its "
                        f"configuration; use another file or retrain")
    if not all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point()):
        raise UserError(f"{flag} {path}: its weights hold inf/NaN (a diverged training or a "
                        f"changed file); use another checkpoint")
    need = 4 * sum(v.numel() for v in state.values())
    if need > 0.8 * available_memory():
        raise UserError(f"{flag} {path}: its model needs about {need / 2 ** 30:.1f} GiB, more "
                        f"than the memory available")
    model = model_class(config)
    model.load_state_dict(_float32(state))
    return model.eval().requires_grad_(False)


def load_vae(path, device, flag="--vae"):
    """The EMA VAE of a finished checkpoint (with its latent statistics), in eval mode on
    `device`. An unfinished one (a periodic save of a VAE still training) is refused."""
    ckpt = load_checkpoint(path, "vae", flag=flag)
    if not vae_finished(ckpt):
        raise UserError(f"{flag} {path}: this VAE is unfinished (step {ckpt.get('step')}"
                        f"{' of ' + str(ckpt['target_steps']) if 'target_steps' in ckpt else ''}, "
                        f"no latent statistics yet); finish it with python train_vae.py --resume "
                        f"--out {Path(path).parent}")
    vae = _build(VAE, VAEConfig, ckpt.get("config"), ckpt.get("ema"), flag, path)
    return vae.to(device), ckpt


def load_flow(path, device="cpu", vae_path=None, flag="--ckpt"):
    """(EMA DiT, VAE, checkpoint) from a flow checkpoint or an `export_flow` file; the VAE is the
    one it names or holds (or vae_path), and must match the latent shape and statistics the flow
    model was trained on."""
    ckpt = load_checkpoint(path, ("flow", "export"), flag=flag)
    info, image_size, prompts = ckpt.get("vae"), ckpt.get("image_size"), ckpt.get("sample_prompts")
    well_formed = (isinstance(info, dict) and isinstance(info.get("path"), str)
                   and all(isinstance(info.get(k), torch.Tensor) and info[k].dim() == 1
                           and info[k].is_floating_point() for k in ("latent_mean", "latent_std"))
                   and isinstance(image_size, int) and not isinstance(image_size, bool)
                   and 1 <= image_size <= CONFIG_MAX["size"]
                   and isinstance(prompts, list) and all(isinstance(p, str) for p in prompts))
    if not well_formed:
        raise UserError(f"{flag} {path}: damaged checkpoint: its VAE, image size or prompts are "
                        f"missing or malformed; use another file or retrain")
    model = _build(DiT, DiTConfig, ckpt.get("config"), ckpt.get("ema"), flag, path)
    if vae_path is None and ckpt["kind"] == "export":
        vae = _build(VAE, VAEConfig, info.get("config"), info.get("ema"), flag, path, "export")
        vae_file = path
    else:
        if vae_path is None and not Path(info["path"]).is_file():
            raise UserError(f"{flag} {path} was trained with the VAE {info['path']}, which is not "
                            f"there any more; pass that VAE with --vae")
        vae_file = vae_path or info["path"]
        vae, _ = load_vae(vae_file, device, flag="--vae")
    problems = _vae_mismatch(vae, model.config, image_size, info)
    if problems:
        raise UserError(f"--vae {vae_file} does not match the flow checkpoint {path} "
                        f"({'; '.join(problems)}); pass the VAE it was trained with via --vae")
    return model.to(device), vae.to(device), ckpt


def export_flow(path, out, dtype="fp32", vae_path=None, overwrite=False):
    """Write the EMA DiT of a flow checkpoint and its VAE into one file for sampling only (no
    optimizer, no training weights), its floating weights in float32 or bfloat16 ("bf16": half
    the size; the latent statistics stay float32). load_flow reads it like a flow checkpoint.
    `out` must be a new file, not the checkpoint or a VAE this reads (runs.check_output), unless
    `overwrite`."""
    inputs = [("--ckpt", path), ("--vae", vae_path)]
    check_output(out, "--export", overwrite, inputs)
    model, vae, ckpt = load_flow(path, "cpu", vae_path)
    check_output(out, "--export", overwrite, inputs + [("its VAE", ckpt["vae"]["path"])])
    cast = torch.bfloat16 if dtype == "bf16" else torch.float32

    def weights(module, keep=()):
        return {k: v.to(cast) if v.is_floating_point() and k not in keep else v
                for k, v in module.state_dict().items()}
    info = dict(ckpt["vae"], config=dataclasses.asdict(vae.config),
                ema=weights(vae, keep=("latent_mean", "latent_std")))
    export = {"format": FORMAT, "version": FORMAT_VERSION, "kind": "export", "dtype": dtype,
              "step": ckpt["step"], "config": model.config.to_dict(), "ema": weights(model),
              "image_size": ckpt["image_size"], "data": ckpt.get("data"),
              "sample_prompts": ckpt["sample_prompts"], "vae": info,
              "caption_words": ckpt.get("caption_words"), "args": ckpt.get("args", {})}
    save_checkpoint(out, export, "export")
    return Path(out)


def _float32(state):
    """A state_dict with bf16 tensors (an export) back in float32, the dtype the models run in."""
    return {k: v.float() if v.dtype == torch.bfloat16 else v for k, v in state.items()}


def _vae_mismatch(vae, config, image_size, info):
    """What differs between a VAE and the one a flow model was trained with (empty: none)."""
    vae_config, problems = vae.config, []
    if vae_config.latent_channels != config.in_channels:
        problems.append(f"latent channels {vae_config.latent_channels} vs {config.in_channels}")
    lat_h, lat_w = image_size // vae_config.factor, image_size // vae_config.factor
    if (lat_h, lat_w) != (config.height, config.width):
        problems.append(f"latent size {lat_h}x{lat_w} vs {config.height}x{config.width}")
    same_stats = (vae.latent_mean.shape == info["latent_mean"].shape
                  and torch.allclose(vae.latent_mean.cpu(), info["latent_mean"], atol=1e-5)
                  and torch.allclose(vae.latent_std.cpu(), info["latent_std"], atol=1e-5))
    if not same_stats:
        problems.append("latent statistics differ")
    return problems
