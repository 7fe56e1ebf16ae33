"""Computational cost of a model (paper Table 2): parameters, GFLOPs, peak memory, time per step.

Conventions
-----------
* **Parameters** are counted over ``model.parameters()`` (shared tensors once), reported in
  millions (``params_m``).
* **GFLOPs per image** come from ``torch.utils.flop_counter.FlopCounterMode`` on one forward pass
  of a 1-image batch under ``torch.no_grad()`` in eval mode. FlopCounterMode counts a
  multiply-add as 2 FLOPs and covers matrix products and convolutions (``mm``, ``addmm``, ``bmm``,
  ``convolution``, attention ...), not element-wise ops, norms or activations, which are small
  next to them for convolutional VAEs. GFLOPs = FLOPs / 1e9. Papers that quote "FLOPs" for
  multiply-accumulates report half of this number.
* **Peak memory** of a callable: on CUDA, ``torch.cuda.max_memory_allocated`` after
  ``reset_peak_memory_stats`` (tensor memory held by PyTorch's allocator, weights and optimiser
  state included: ``peak_memory_mib``; the rise above what was allocated before the call:
  ``peak_memory_increase_mib``). On CPU PyTorch keeps no allocator statistics, so gem reports the
  process's peak resident set size during the call (Linux ``VmHWM``, reset first through
  ``/proc/self/clear_refs``), which counts everything the process touches (Python objects,
  libraries, allocator caches) and not tensors alone; ``memory_kind`` says which was measured.
  Where the peak cannot be reset (not Linux), the lifetime peak (``ru_maxrss``) is reported and
  ``memory_kind`` says so. Resetting ``VmHWM`` also resets what ``getrusage`` reports as the
  process's ``ru_maxrss`` from then on.
* **Time per step**: ``warmup`` untimed calls, then ``n_steps`` calls timed one by one with
  ``time.perf_counter`` (CUDA synchronised before and after each call when CUDA is in use);
  per epoch = mean time per step × steps per epoch.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

__all__ = ["count_parameters", "gflops_per_image", "peak_memory", "time_steps", "efficiency_report"]

_MIB = 1024.0 ** 2


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (each shared tensor once); only those with ``requires_grad`` if asked."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def gflops_per_image(forward: Callable[[torch.Tensor], Any], example: torch.Tensor,
                     model: Optional[nn.Module] = None) -> float:
    """GFLOPs (FlopCounterMode convention: a multiply-add is 2 FLOPs) of one forward on one image.

    Parameters
    ----------
    forward : the computation to count, e.g. ``model`` or
        ``lambda x: model.decode(model.encode(x)[0])`` for a VAE's reconstruction.
    example : an input batch; only its first image is used (a 1-image batch).
    model : put in eval mode while counting and restored afterwards (``forward`` itself when it
        is a module and ``model`` is None).

    Returns
    -------
    float: FLOPs / 1e9 for one image.
    """
    from torch.utils.flop_counter import FlopCounterMode

    module = model if model is not None else (forward if isinstance(forward, nn.Module) else None)
    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            forward(example[:1])
        return counter.get_total_flops() / 1e9
    finally:
        if module is not None:
            module.train(was_training)


def _status_kib(field: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _cuda_device(device: Any) -> Optional[torch.device]:
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


def peak_memory(fn: Callable[[], Any], device: Any = None) -> dict[str, Any]:
    """Peak memory while ``fn()`` runs (see the module notes for what is measured where).

    Parameters
    ----------
    fn : a callable without arguments (e.g. one training step)
    device : where the work runs; None = the current CUDA device when CUDA is available, else CPU

    Returns
    -------
    dict: ``peak_memory_mib``, ``peak_memory_increase_mib`` (floats, MiB) and ``memory_kind``:
    ``"cuda_max_allocated"``, ``"cpu_peak_rss"`` or ``"cpu_lifetime_peak_rss"``.
    """
    cuda = _cuda_device(device)
    if cuda is not None:
        torch.cuda.synchronize(cuda)
        torch.cuda.reset_peak_memory_stats(cuda)
        before = torch.cuda.memory_allocated(cuda)
        fn()
        torch.cuda.synchronize(cuda)
        peak = torch.cuda.max_memory_allocated(cuda)
        return {"peak_memory_mib": peak / _MIB, "peak_memory_increase_mib": (peak - before) / _MIB,
                "memory_kind": "cuda_max_allocated"}
    before = _status_kib("VmRSS")
    if before is not None and _reset_peak_rss():
        fn()
        peak = _status_kib("VmHWM")
        if peak is not None:
            return {"peak_memory_mib": peak / 1024.0, "peak_memory_increase_mib": max(peak - before, 0) / 1024.0,
                    "memory_kind": "cpu_peak_rss"}
    else:
        fn()
    # ru_maxrss is KiB on Linux, bytes on macOS
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_mib = maxrss / _MIB if sys.platform == "darwin" else maxrss / 1024.0
    return {"peak_memory_mib": peak_mib, "peak_memory_increase_mib": math.nan, "memory_kind": "cpu_lifetime_peak_rss"}


def time_steps(step: Callable[[], Any], n_steps: int = 20, warmup: int = 3, steps_per_epoch: Optional[int] = None,
               device: Any = None) -> dict[str, float]:
    """Wall-clock time of a training step.

    Parameters
    ----------
    step : a callable without arguments running one step (forward, backward, optimiser step)
    n_steps : timed calls; warmup : untimed calls before them (allocator, cuDNN autotuning)
    steps_per_epoch : when given, ``seconds_per_epoch`` = mean seconds per step × this
    device : CUDA is synchronised around each call when it runs there (None: when available)

    Returns
    -------
    dict: ``seconds_per_step`` (mean), ``seconds_per_step_median``, ``seconds_per_step_std``,
    ``n_steps``, and ``seconds_per_epoch`` (nan without ``steps_per_epoch``).
    """
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1; got {n_steps}")
    cuda = _cuda_device(device)

    def sync():
        if cuda is not None:
            torch.cuda.synchronize(cuda)

    for _ in range(warmup):
        step()
    times = []
    for _ in range(n_steps):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    mean = float(np.mean(times))
    return {
        "seconds_per_step": mean,
        "seconds_per_step_median": float(np.median(times)),
        "seconds_per_step_std": float(np.std(times)),
        "n_steps": float(n_steps),
        "seconds_per_epoch": mean * steps_per_epoch if steps_per_epoch else math.nan,
    }


def efficiency_report(model: nn.Module, example: torch.Tensor, *, forward: Optional[Callable[[torch.Tensor], Any]] = None,
                      step: Optional[Callable[[], Any]] = None, n_steps: int = 20, warmup: int = 3,
                      steps_per_epoch: Optional[int] = None, device: Any = None) -> dict[str, Any]:
    """Table 2 of the paper for one model, as a flat dict.

    Parameters
    ----------
    model : the model (its parameters are counted)
    example : an input batch on the model's device (its first image is used for FLOPs)
    forward : what one inference is (default: ``model`` itself)
    step : one training step; when given, its peak memory (first call) and time are measured
    n_steps, warmup, steps_per_epoch, device : see :func:`time_steps`

    Returns
    -------
    dict: ``params_m``, ``trainable_params_m``, ``gflops_per_image`` and, with ``step``,
    the keys of :func:`peak_memory` and :func:`time_steps`.
    """
    out: dict[str, Any] = {
        "params_m": count_parameters(model) / 1e6,
        "trainable_params_m": count_parameters(model, trainable_only=True) / 1e6,
        "gflops_per_image": gflops_per_image(forward if forward is not None else model, example, model=model),
    }
    if step is not None:
        out.update(peak_memory(step, device=device))
        out.update(time_steps(step, n_steps=n_steps, warmup=warmup, steps_per_epoch=steps_per_epoch, device=device))
    return out
