"""Loading a model for the tools (bench, perf, search, training, viz): :func:`load_model` (the embedded tiny
LLaVA, a local folder or a cached hub id), ``--device`` / ``--dtype`` resolution and transformers' logs and
progress bars kept quiet while it loads."""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

import torch

from .adapters import get_adapter
from .cliargs import UsageError, check_model_spec


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` = cuda if available, else cpu; a name torch does not know or a device this machine lacks
    is a :class:`UsageError`."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"--device {device!r}: not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: this torch ({torch.__version__}) sees no CUDA GPU; "
                             "use --device cpu (or install a CUDA build of torch)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s); "
                             f"use cuda:0..cuda:{torch.cuda.device_count() - 1}")
    elif dev.type != "cpu":
        backend = getattr(torch.backends, dev.type, None) or getattr(torch, dev.type, None)
        if not getattr(backend, "is_available", lambda: False)():
            raise UsageError(f"--device {device}: not available on this machine; use cpu or cuda")
    if dev.type == "cuda" and dev.index is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; expected auto, float32, float16 or bfloat16")
    return table[dtype]


@contextlib.contextmanager
def num_threads(n: int | None):
    """torch.set_num_threads(n) for the block (n None or 0: leave it), restored afterwards."""
    if not n:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextlib.contextmanager
def quiet_hf_logging():
    """transformers' info logs and progress bars (its "Loading weights" bar) off inside the ``with``; restored
    after. A CLI's stderr then holds only its own lines (a user error stays one line)."""
    from transformers.utils import logging as hf_logging

    old_verbosity, old_bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(old_verbosity)
        if old_bars:
            hf_logging.enable_progress_bar()


def load_model(spec: str | None = None, dtype: str = "auto", device: str = "auto"):
    """(model, processor, description). ``spec`` None = the shipped tiny LLaVA, or a random-init one (with a
    warning) while no trained checkpoint is shipped; else a local folder or a hub id (offline: cached only).
    A ``spec`` that does not load is a :class:`UsageError`. transformers' logs and bars are off meanwhile."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    with quiet_hf_logging():
        model, processor, desc = _load(spec, dt)
    model = model.to(dev).eval()
    desc.update({"class": type(model).__name__, "dtype": str(dt).replace("torch.", ""), "device": str(dev),
                 "parameters": int(sum(p.numel() for p in model.parameters()))})
    return model, processor, desc


def _load(spec: str | None, dt: torch.dtype):
    """(model, processor, description) of :func:`load_model`, on the CPU."""
    if spec is None:
        from .embedded import tiny_llava

        try:
            model, processor = tiny_llava.load_tiny_llava(dtype=dt)
            desc = {"name": "tiny-llava", "path": str(tiny_llava.DEFAULT_ASSET_DIR), "trained": True}
        except FileNotFoundError as err:
            warnings.warn(f"vtprune bench: {err}; using a random-init tiny LLaVA instead (scores are meaningless)",
                          stacklevel=3)  # the caller of load_model
            model, processor = tiny_llava.build_untrained_tiny_llava(seed=0)
            model = model.to(dt)
            desc = {"name": "tiny-llava (untrained: no shipped checkpoint)", "path": None, "trained": False}
    else:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        check_model_spec(spec)
        local = Path(spec).expanduser().is_dir()
        spec = str(Path(spec).expanduser()) if local else spec
        offline = local or os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
        try:
            model = AutoModelForImageTextToText.from_pretrained(spec, dtype=dt, local_files_only=offline)
            processor = AutoProcessor.from_pretrained(spec, local_files_only=offline)
        except (OSError, ValueError) as err:  # no config.json, an unknown architecture, not cached offline
            raise UsageError(f"--model {spec}: cannot load it as an image-text model ({err})") from None
        desc = {"name": Path(spec).name if local else spec, "path": str(Path(spec).resolve()) if local else spec}
    return model, processor, desc


def visual_tokens_of(model) -> int:
    """Visual tokens of one standard image for this model (the reference for ``keep``). Dynamic-resolution models
    (Qwen-VL) have none: ``keep`` counts per image there, and default sweeps use LLaVA-1.5's 576 as reference
    (keeps 192 / 128 / 64)."""
    nominal = get_adapter(model).image_nominal
    return int(nominal) if nominal is not None else 576
