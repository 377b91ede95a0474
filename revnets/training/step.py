"""One training step, shared by the trainer (:class:`~revnets.training.loop.Trainer`) and every
experiment's optimisation loop (:mod:`revnets.experiments`), so that a change to how a step trains
reaches all of them; the trainer's loss (:func:`training_loss`, :func:`forward_backward`); and the
peak memory of such a step (:func:`sgd_step_peak`).

A step is given the loss as a function of the batch, ``loss_fn(*batch)``: the caller's forward and
loss, under whatever autocast it enters. What the step adds is the part every loop shares: the
gradients' lifetime, loss scaling, clipping, the update and the schedule.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LRScheduler

from ..memory import StorageTracker
from .config import TrainConfig
from .devices import autocast


def backward(loss: Tensor, scaler: torch.amp.GradScaler | None = None) -> None:
    """Backward of the scalar ``loss``, multiplied by ``scaler``'s scale first (float16 loss scaling;
    a disabled scaler passes it through): the gradients accumulate into the parameters' ``.grad``."""
    (loss if scaler is None else scaler.scale(loss)).backward()


def _parameters(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The parameters ``optimizer`` updates, group by group, in its order."""
    return [parameter for group in optimizer.param_groups for parameter in group["params"]]


def training_step(optimizer: torch.optim.Optimizer, loss_fn: Callable[..., Tensor], *batch: Tensor,
                  scaler: torch.amp.GradScaler | None = None, grad_clip: float | None = None,
                  schedule: LRScheduler | None = None,
                  check: Callable[[Tensor], None] | None = None) -> Tensor:
    """One optimizer step on the scalar loss ``loss_fn(*batch)``; returns that loss, detached.

    In order:

    1. the gradients of the optimizer's parameters are set to ``None`` (before the forward, so the
       previous step's gradients are not held through it);
    2. ``loss = loss_fn(*batch)``: the forward and the loss (``loss_fn`` enters the autocast it wants,
       so that the backward runs outside it);
    3. the backward of ``loss``, multiplied by ``scaler``'s scale first (:func:`backward`); then
       ``loss`` is detached, so that its graph is freed before the update;
    4. ``check(loss)`` if given: raising there abandons the step before any update (weights,
       optimizer, scaler and schedule untouched);
    5. with ``grad_clip``: the gradients unscaled (``scaler.unscale_``), then clipped to total norm
       ``grad_clip`` over the optimizer's parameters (``clip_grad_norm_``);
    6. the optimizer's step (through ``scaler.step``, which skips it where float16 gradients
       overflowed), then ``scaler.update()``;
    7. ``schedule.step()``: the learning rate of the next step.

    The gradients stay in ``.grad`` until the next step (under DDP, averaged over the processes).
    """
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(*batch)
    backward(loss, scaler)
    loss = loss.detach()  # the graph, and whatever its nodes hold, goes before the update
    if check is not None:
        check(loss)
    if grad_clip is not None:
        if scaler is not None:
            scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(_parameters(optimizer), grad_clip)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    if schedule is not None:
        schedule.step()
    return loss


def training_loss(model: nn.Module, images: Tensor, labels: Tensor, config: TrainConfig, *,
                  penalised: nn.Module | None = None, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """The trainer's loss on ``images (B, C, H, W)`` with ``labels (B,)``, and the logits ``(B, classes)``.

    The loss is the cross-entropy (``label_smoothing``) plus ``smoothness`` times
    ``penalised.smoothness_penalty()`` (``penalised``: the unwrapped model; ``model`` itself by
    default), the forward under the autocast of ``config.precision``.
    """
    device = images.device if device is None else device
    with autocast(config.precision, device):
        logits = model(images)
        loss = nn.functional.cross_entropy(logits.float(), labels, label_smoothing=config.label_smoothing)
    if config.smoothness:
        loss = loss + config.smoothness * (penalised or model).smoothness_penalty()
    return loss, logits


def forward_backward(model: nn.Module, images: Tensor, labels: Tensor, config: TrainConfig, *,
                     scaler: torch.amp.GradScaler | None = None, penalised: nn.Module | None = None,
                     device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """One step's loss and its gradients, as the trainer's step computes them: :func:`training_loss`,
    then its backward (:func:`backward`: ``scaler`` scales it first, float16);
    returns ``(loss, logits)``, detached. Gradients are accumulated into ``.grad``."""
    loss, logits = training_loss(model, images, labels, config, penalised=penalised, device=device)
    backward(loss, scaler)
    return loss.detach(), logits.detach()


def sgd_step_peak(model: nn.Module, inputs: Tensor, labels: Tensor) -> int:
    """Peak bytes (:class:`~revnets.memory.StorageTracker`) created by one :func:`training_step` of a
    classifier: cross-entropy of ``model(inputs)`` (``(B, ...)``) against ``labels`` (``(B,)``, int64),
    SGD with momentum (lr 0.1, momentum 0.9).

    The step measured is the second: the first creates the momentum buffers, which then exist before
    the window like the weights. Gradients are set to ``None`` before each step, so their creation counts.
    """
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def step() -> None:
        training_step(optimizer, lambda x, y: nn.functional.cross_entropy(model(x), y), inputs, labels)

    step()
    with StorageTracker() as tracker:
        step()
    return tracker.peak_bytes
