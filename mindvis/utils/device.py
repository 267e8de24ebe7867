"""Where models run: the one module that picks the accelerator and the precision.

Every stage that runs a model asks :func:`select_device` for its device and
:func:`resolve_precision` / :func:`autocast` for its precision, so no other
module names ``cuda``: the training engine through Accelerate's ``Accelerator``
(which this module tells whether an accelerator exists), ``generate`` and
``evaluate`` through :func:`select_device`, which returns the device Accelerate's
process state picks (under ``accelerate launch`` or SLURM each process gets
its local GPU; ``CUDA_VISIBLE_DEVICES`` is honoured).

Precision: ``auto`` is bf16 autocast on a GPU that runs bf16 natively
(Ampere and later), fp16 autocast on an older GPU, and float32 on the CPU,
where bf16 is emulated on most cores and slowed the small models down
(``benchmarks/results/mbm.md``). Weights stay float32; autocast runs the
matrix products in the low precision.
"""

from __future__ import annotations

import contextlib

from mindvis.errors import MindvisError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "no", "bf16", "fp16")


def accelerator_available():
    """True when torch sees a CUDA GPU or Apple's MPS device."""
    import torch

    return bool(torch.cuda.is_available() or torch.backends.mps.is_available())


def select_device(preference="auto"):
    """The ``torch.device`` a stage runs its models on.

    Parameters
    ----------
    preference : str
        ``auto`` (the device Accelerate picks for this process: its GPU when there
        is one, else the CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.

    Raises
    ------
    MindvisError
        When the preferred accelerator is not available here.
    """
    import torch

    preference = str(preference or "auto")
    if preference == "auto":
        from accelerate import PartialState

        return torch.device(PartialState(cpu=not accelerator_available()).device)
    kind = preference.split(":")[0]
    if kind not in DEVICE_CHOICES:
        raise MindvisError(f"unknown device '{preference}'", key="--device",
                           fix=f"use one of {', '.join(DEVICE_CHOICES)} (or cuda:N).")
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}[kind]
    if not available:
        raise MindvisError(f"device '{preference}' is not available (torch {torch.__version__}, "
                           f"CUDA build: {torch.version.cuda or 'no'})", key="--device",
                           fix="use --device auto or cpu, or install a CUDA build of torch (README, 'Two commands').")
    return torch.device(preference)


def resolve_precision(value, device):
    """Turn ``auto`` into ``bf16``, ``fp16`` or ``no`` for ``device`` (see the module docstring).

    Parameters
    ----------
    value : {'auto', 'no', 'bf16', 'fp16'}
    device : torch.device or str
    """
    import torch

    if value not in PRECISIONS:
        raise MindvisError(f"unknown precision '{value}'", key="mixed_precision",
                           fix=f"use one of {', '.join(PRECISIONS)}.")
    if value != "auto":
        return value
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def autocast_dtype(precision):
    """``torch.bfloat16`` / ``torch.float16`` for ``bf16`` / ``fp16``; None for ``no``."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def autocast(device, precision):
    """A ``torch.autocast`` context for a resolved precision on ``device`` (a no-op for ``no``)."""
    import torch

    dtype = autocast_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def device_name(device):
    """A readable name of ``device`` for summaries: the GPU's model, or ``cpu``."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def synchronize(device):
    """Wait for queued work on ``device`` (before reading a timer)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def is_cuda(device):
    """True for a CUDA device (e.g. for CUDA-only kernels such as bitsandbytes' 8-bit optimizers)."""
    import torch

    return torch.device(device).type == "cuda"


def is_main_process():
    """Whether this is the process that writes outputs: always, unless under a multi-process launch
    (``accelerate launch`` / torchrun set ``RANK``), where only rank 0 is."""
    import os

    return int(os.environ.get("RANK", "0")) == 0


def math_attention_only():
    """Turn off the fused (flash, memory-efficient) attention kernels, whose CUDA backward passes accumulate with
    atomics, leaving the deterministic math kernel (``MINDVIS_DETERMINISTIC=1``; no effect on the CPU)."""
    import torch

    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_mem_efficient_sdp(False)
