"""Instruments (time of one step, memory of one step) and the statistics of their results.

Time
    :func:`time_step`: wall-clock seconds of one forward + backward (``Instance.step``), with the
    garbage collector off during the call and, on CUDA, a synchronisation before and after.
    Trials are interleaved by the caller (:mod:`.plan`): every trial runs every contender once, in
    an order rotated from trial to trial, so drift and position effects spread over all of them;
    warm-up trials are dropped. :func:`summary` gives median, interquartile range and min–max;
    :func:`ratio` the median of the per-trial (paired) ratios with their IQR and min–max: the two
    times of a pair come from the same round, so load that changes between rounds cancels.

Memory (:func:`memory`), for one step of one contender, with ``revnets.memory``:
    * ``held_after_forward``: bytes of live storages created by the forward and still alive after
      it (``StorageTracker.recount()``): what the network holds for its backward;
    * ``peak``: peak live bytes created during forward + backward (``StorageTracker.peak_bytes``),
      parameter gradients included;
    * ``saved``: bytes autograd packed for the backward (``saved_tensors``, parameters and input
      excluded);
    * on CUDA, ``cuda_held_after_forward`` and ``cuda_peak``: ``torch.cuda.memory_allocated`` after
      the forward minus before it, and ``torch.cuda.max_memory_allocated`` during the step minus the
      allocation before it;
    * ``allocator_held_after_forward``, ``allocator_peak`` (optional, and always where the tracker
      fails): the CPU allocator's own events (``allocator_held``, via the profiler).
    The gradients (input first, then parameters) of the tracked step are returned for comparison.
"""

from __future__ import annotations

import gc
import statistics
import time

import torch
from torch import Tensor

from revnets.memory import StorageTracker, allocator_held, saved_tensors

from .contenders import Instance


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_step(instance: Instance, device: str) -> float:
    """Seconds of one ``instance.step`` (a fresh input copy and cleared gradients, not timed)."""
    x = instance.fresh_input()
    instance.clear_grads()
    gc.collect()
    synchronize(device)
    gc.disable()
    try:
        start = time.perf_counter()
        instance.step(x)
        synchronize(device)
        return time.perf_counter() - start
    finally:
        gc.enable()


def _flat_grads(x: Tensor, instance: Instance) -> Tensor:
    grads = [x.grad] + [p.grad for p in instance.params]
    return torch.cat([torch.zeros(0, device=x.device) if g is None else g.detach().reshape(-1) for g in grads])


def memory(instance: Instance, device: str, allocator: bool = False) -> tuple[dict, Tensor | None]:
    """The memory numbers of one step (see the module docstring) and its flattened gradients."""
    result: dict = {}
    grads = None
    cuda = device.startswith("cuda")
    instance.clear_grads()
    x = instance.fresh_input()
    gc.collect()
    try:
        if cuda:
            synchronize(device)
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        with StorageTracker() as tracker:
            with saved_tensors(exclude=[*instance.params, x]) as saved:
                y = instance.model(x)
            gc.collect()
            result["held_after_forward"] = tracker.recount()
            if cuda:
                synchronize(device)
                result["cuda_held_after_forward"] = torch.cuda.memory_allocated() - base
            y.backward(instance.grad_output)
            del y
            gc.collect()
        result["peak"] = tracker.peak_bytes
        result["saved"] = saved.bytes
        if cuda:
            synchronize(device)
            result["cuda_peak"] = torch.cuda.max_memory_allocated() - base
        grads = _flat_grads(x, instance)
    except Exception as error:  # e.g. a compiled graph under the dispatch mode
        result["tracker_error"] = f"{type(error).__name__}: {str(error)[:300]}"
        allocator = True
    del x
    if allocator and not cuda:
        instance.clear_grads()
        x = instance.fresh_input()
        y, held, _ = allocator_held(lambda: instance.model(x))
        del y, x
        instance.clear_grads()
        x = instance.fresh_input()
        _, _, peak = allocator_held(lambda: instance.step(x))
        result["allocator_held_after_forward"], result["allocator_peak"] = held, peak
        if "held_after_forward" not in result:
            result["held_after_forward"], result["peak"] = held, peak
            result["instrument"] = "allocator"
    instance.clear_grads()
    gc.collect()
    return result, grads


# --------------------------------------------------------------------------------------------------
# statistics


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(25th percentile, median, 75th percentile), inclusive method."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def summary(values: list[float]) -> dict:
    q1, med, q3 = quartiles(values)
    return {"median": med, "iqr": [q1, q3], "min": min(values), "max": max(values), "n": len(values)}


def ratio(numerator: list[float], denominator: list[float]) -> dict:
    """Median of the per-trial (paired) ratios with their IQR and min–max; the ratio of medians too."""
    paired = [a / b for a, b in zip(numerator, denominator, strict=True)]
    q1, med, q3 = quartiles(paired)
    return {"ratio": med, "iqr": [q1, q3], "min": min(paired), "max": max(paired),
            "ratio_of_medians": statistics.median(numerator) / statistics.median(denominator)}


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least squares ``y = a + b·x``: (a, b, largest absolute residual)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    a = my - b * mx
    return a, b, max(abs(y - (a + b * x)) for x, y in zip(xs, ys))


def largest_batch(batches: list[int], peaks: list[float], budget_bytes: float) -> dict:
    """Fit ``peak(B) = fixed + per_sample·B`` and read off the largest batch whose peak fits the budget."""
    fixed, per_sample, residual = fit_line(batches, peaks)
    best = int((budget_bytes - fixed) // per_sample) if per_sample > 0 and budget_bytes > fixed else 0
    return {"fixed_bytes": fixed, "per_sample_bytes": per_sample, "fit_max_residual_bytes": residual,
            "largest_batch": best}
