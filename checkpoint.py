"""Checkpoints: files that prove their bytes, and the models they hold. Not in the lecture.

A checkpoint is a dict written by `torch.save`: format and version, its kind ("vae" from
train_vae.py, "flow" from train_flow.py), the step, the model's config as a plain dict, the
weights ("model" and the averaged "ema"), what --resume needs (optimizer, scaler, RNG states, the
run's settings "args"), and a sha256 `digest` of all of it.

Saving is atomic (common.atomic_write). Loading proves the bytes before anything is used: every
CRC-32 of torch's zip file, then `torch.load(weights_only=True)` (a file that would run code is
refused without running it), then the digest of what torch read. A configuration read from a
file is checked and built on the meta device, and must describe exactly the stored weights,
before any memory is allocated. Every refusal is one line naming the file.

Offers: FORMAT, FORMAT_VERSION, KEYS, save_checkpoint, load_checkpoint, load_vae, load_flow
"""
import dataclasses
import hashlib
import pickle
import warnings
import zipfile
from pathlib import Path

import torch

from common import UserError, atomic_write, quoted
from dit import DiT, DiTConfig
from vae import VAE, VAEConfig

FORMAT, FORMAT_VERSION = "latent-flow", 2
# What each kind of checkpoint must hold besides format, version, kind, step, config and ema.
KEYS = {"vae": ("model", "optimizer", "scaler", "rng", "args", "finished"),
        "flow": ("model", "optimizer", "scaler", "rng", "args", "vae", "image_size",
                 "sample_prompts", "caption_words")}
RETRAIN = "use another file or retrain"


def save_checkpoint(path, ckpt, what="checkpoint"):
    """torch.save(ckpt + its digest), atomically."""
    ckpt = {**{k: v for k, v in ckpt.items() if k != "digest"}, "digest": _digest(ckpt)}
    atomic_write(path, lambda f: torch.save(ckpt, f), what)


def _digest(obj):
    """sha256 of every key, plain value and tensor (dtype, shape, bytes) but the digest."""
    h = hashlib.sha256()

    def feed(value):
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(value, dict):
            h.update(f"D{len(value)};".encode())
            for k, v in value.items():
                feed(k)
                feed(v)
        elif isinstance(value, (list, tuple)):
            h.update(f"{type(value).__name__}{len(value)};".encode())
            for v in value:
                feed(v)
        else:                                 # str, int, float, bool, None: repr round-trips
            h.update(f"{type(value).__name__}:{value!r};".encode())
    feed({k: v for k, v in obj.items() if k != "digest"})
    return h.hexdigest()


def load_checkpoint(path, kind, flag="--ckpt"):
    """The checkpoint at `path`, proven and of this `kind` ("vae" or "flow")."""
    path = Path(path)
    if not path.is_file():
        make = {"flow": "; train one with python train_flow.py, or in a minute a smoke-test one: "
                        "python train_flow.py --steps 10 --vae-steps 10 --n-builtin 500 "
                        "--sample-steps 5 --out runs/smoke",
                "vae": "; train one with python train_vae.py"}.get(kind, "")
        raise UserError(f"{flag} {path}: {'is a folder' if path.is_dir() else 'file not found'}"
                        f"{make if flag != '--resume' else ''}")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()                   # every member's CRC-32
        if bad is not None:
            raise UserError(f"{flag} {path}: damaged file (checksum mismatch in {bad}); {RETRAIN}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        why = "it would run code, which no checkpoint holds" if "GLOBAL" in str(e) else "corrupt"
        raise UserError(f"{flag} {path}: refused to load ({why}); {RETRAIN}")
    except PermissionError:
        raise UserError(f"{flag} {path}: cannot read it (permission denied)")
    except UserError:
        raise
    except Exception as e:                  # BadZipFile, EOFError, zlib.error, RuntimeError, ...
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":          # torch.save always writes a zip file
                raise UserError(f"{flag} {path}: not a checkpoint (not a PyTorch file); {RETRAIN}")
        raise UserError(f"{flag} {path}: not a readable checkpoint (truncated or corrupt: "
                        f"{type(e).__name__}); {RETRAIN}")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{flag} {path}: not a latent-flow checkpoint")
    if ckpt.get("version") != FORMAT_VERSION:          # (an older format's digest differs too)
        raise UserError(f"{flag} {path}: checkpoint format {ckpt.get('version')!r:.20}, this code "
                        f"reads {FORMAT_VERSION}; retrain it with this code")
    try:
        proven = ckpt.get("digest") == _digest(ckpt)
    except Exception:
        proven = False
    ckpt.pop("digest", None)
    if not proven:
        raise UserError(f"{flag} {path}: damaged file (what it holds does not match its digest: "
                        f"the disk, a copy or an edit changed it); {RETRAIN}")
    if ckpt.get("kind") != kind:
        raise UserError(f"{flag} {path}: a checkpoint of kind {ckpt.get('kind')!r:.20}, where "
                        f"one of kind {kind!r} is needed (a VAE goes to --vae, a flow model "
                        f"to --ckpt)")
    step = ckpt.get("step")
    missing = [k for k in ("config", "ema") + KEYS[ckpt["kind"]] if k not in ckpt]
    if missing or not (type(step) is int and step >= 0):
        raise UserError(f"{flag} {path}: damaged checkpoint ({missing or 'step'} missing or "
                        f"wrong); {RETRAIN}")
    return ckpt


# Largest values a configuration read from a file may hold: sizes, blocks, latent grid, prompt.
LIMITS = {"depth": 256, "num_res_blocks": 256, "prompt_depth": 256, "input_size": 512,
          "input_width": 512, "max_prompt_len": 1024, "prompt_word_bytes": 64,
          "prompt_buckets": 2 ** 20, "": 2 ** 14}


def _config_problem(cls, config):
    """What is wrong with a config dict read from a file ('' if nothing)."""
    if not isinstance(config, dict):
        return "not a dict"
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in config.items():
        field = fields.get(key)
        top = LIMITS.get(key, LIMITS[""])
        if field is None:
            return f"unknown field {key!r:.40}: from another version of this code?"
        if field.type is bool:
            ok = type(value) is bool
        elif field.type is int:
            ok = type(value) is int and (0 if field.default == 0 else 1) <= value <= top
        elif field.type is float:
            ok = type(value) in (int, float) and 0 < value <= top
        else:                                 # tuple
            ok = isinstance(value, (list, tuple)) and 1 <= len(value) <= 8 and \
                all(type(v) is int and 1 <= v <= 64 for v in value)
        if not ok:
            return f"{key} = {value!r:.40}"
    return ""


def _build(model_class, config_class, config, state, flag, path):
    """model_class(config) holding `state` (bf16 weights back in float32), eval mode, CPU; the
    config and the weights are proven to fit each other before any memory is allocated."""
    problem = _config_problem(config_class, config)
    try:
        config = config_class.from_dict(config) if not problem else None
        if config is not None and model_class is DiT:       # the fixed position table's size
            tokens = (config.height // config.patch_size) * (config.width // config.patch_size)
            if tokens * config.dim > 2 ** 26:
                problem = f"{tokens} tokens of width {config.dim}"
        if not problem:
            with torch.device("meta"):
                shapes = {k: tuple(v.shape) for k, v in model_class(config).state_dict().items()}
    except Exception as e:          # a size that does not divide another: ValueError, ...
        problem = f"{type(e).__name__}: {str(e)[:80]}"
    if problem:
        raise UserError(f"{flag} {path}: damaged checkpoint: its configuration describes no "
                        f"model ({problem}); {RETRAIN}")
    if not (isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())
            and {k: tuple(v.shape) for k, v in state.items()} == shapes):
        raise UserError(f"{flag} {path}: damaged checkpoint: its weights do not fit its "
                        f"configuration; {RETRAIN}")
    if not all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point()):
        raise UserError(f"{flag} {path}: its weights hold inf/NaN (a diverged training or a "
                        f"changed file); use another checkpoint")
    model = model_class(config)
    model.load_state_dict({k: v.float() if v.dtype == torch.bfloat16 else v
                           for k, v in state.items()})
    return model.eval().requires_grad_(False)


def load_vae(path, device, flag="--vae"):
    """(EMA VAE with its latent statistics, checkpoint) of a finished train_vae.py run. An
    unfinished one (a periodic save of a VAE still training) is refused."""
    ckpt = load_checkpoint(path, "vae", flag)
    if ckpt["finished"] is not True:
        raise UserError(f"{flag} {path}: this VAE is unfinished (step {ckpt['step']}, no latent "
                        f"statistics yet); finish it with python train_vae.py --resume --out "
                        f"{quoted(Path(path).parent)}")
    return _build(VAE, VAEConfig, ckpt["config"], ckpt["ema"], flag, path).to(device), ckpt


def load_flow(path, device="cpu", vae_path=None, flag="--ckpt"):
    """(EMA DiT, VAE, checkpoint) of a flow checkpoint; the VAE is the one it names, or
    `vae_path`, and must fit the latents the DiT was trained on."""
    ckpt = load_checkpoint(path, "flow", flag)
    info, size, prompts = ckpt["vae"], ckpt["image_size"], ckpt["sample_prompts"]
    if not (isinstance(info, dict) and isinstance(info.get("path"), str)
            and all(isinstance(info.get(k), torch.Tensor) and info[k].dim() == 1
                    for k in ("latent_mean", "latent_std"))
            and type(size) is int and 8 <= size <= 4096 and isinstance(prompts, list)
            and all(isinstance(p, str) for p in prompts)):
        raise UserError(f"{flag} {path}: damaged checkpoint: its VAE, image size or prompts are "
                        f"malformed; {RETRAIN}")
    model = _build(DiT, DiTConfig, ckpt["config"], ckpt["ema"], flag, path)
    vae_path = vae_path or info["path"]
    if not Path(vae_path).is_file():
        raise UserError(f"{flag} {path} was trained with the VAE {vae_path}, which is not there "
                        f"any more; pass that VAE (or a copy) with --vae")
    vae = load_vae(vae_path, device)[0]
    fits = (vae.config.latent_channels == model.config.in_channels
            and (size // vae.config.factor, size // vae.config.factor)
            == (model.config.height, model.config.width)
            and vae.latent_mean.shape == info["latent_mean"].shape
            and torch.allclose(vae.latent_mean.cpu(), info["latent_mean"], atol=1e-5)
            and torch.allclose(vae.latent_std.cpu(), info["latent_std"], atol=1e-5))
    if not fits:
        raise UserError(f"--vae {vae_path} is not the VAE the flow model {path} was trained "
                        f"with (latent shape or statistics differ); pass that one via --vae")
    return model.to(device), vae.to(device), ckpt

