"""The one training step (:func:`revnets.training.step.training_step`) that the trainer and the experiments
share, and the experiments' in-memory data source (:class:`revnets.training.data.InMemoryBatches`): each
does, bit for bit, what the hand-written loops it replaced did."""

from __future__ import annotations

import copy
import itertools
import weakref

import pytest
import torch
from torch import Tensor, nn

from revnets.experiments._common import TrainSettings, cosine, train_classifier
from revnets.training.data import InMemoryBatches, crop_flip, on_device
from revnets.training.step import training_step

pytestmark = pytest.mark.usefixtures("one_thread")


def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def loss_of(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(model(x), y)


def make_optimizer(kind: str, model: nn.Module) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    return torch.optim.Adam(model.parameters(), lr=0.05)


def make_scaler(kind: str) -> torch.amp.GradScaler | None:
    """No scaler, a disabled one (the trainer's in float32), or an enabled one (float16's loss scaling)."""
    return None if kind == "none" else torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=kind == "enabled")


def batches(count: int) -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 6, generator=generator), torch.randint(0, 3, (8,), generator=generator))
            for _ in range(count)]


def factor(step: int) -> float:
    return 0.5 ** (step // 2)


@pytest.mark.parametrize("optimizer_kind", ["sgd", "adam"])
@pytest.mark.parametrize("scaler_kind", ["none", "disabled", "enabled"])
@pytest.mark.parametrize("grad_clip", [None, 0.05])
@pytest.mark.parametrize("scheduled", [False, True])
def test_step_is_the_hand_written_loop(optimizer_kind, scaler_kind, grad_clip, scheduled):
    """Five steps equal, bit for bit (losses, weights, optimizer state, learning rate), the loop the
    experiments wrote by hand (learning rate set before the forward, gradients zeroed after it) with the
    trainer's scaling and clipping."""
    model, reference = small_model(), small_model()
    optimizer, reference_optimizer = make_optimizer(optimizer_kind, model), make_optimizer(optimizer_kind, reference)
    scaler, reference_scaler = make_scaler(scaler_kind), make_scaler(scaler_kind)
    base_lr = optimizer.param_groups[0]["lr"]
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor) if scheduled else None
    losses, reference_losses = [], []
    for step, (x, y) in enumerate(batches(5)):
        losses.append(training_step(optimizer, lambda x, y: loss_of(model, x, y), x, y, scaler=scaler,
                                    grad_clip=grad_clip, schedule=schedule))
        if scheduled:
            for group in reference_optimizer.param_groups:
                group["lr"] = base_lr * factor(step)
        loss = loss_of(reference, x, y)
        reference_optimizer.zero_grad()
        (loss if reference_scaler is None else reference_scaler.scale(loss)).backward()
        if grad_clip is not None:
            if reference_scaler is not None:
                reference_scaler.unscale_(reference_optimizer)
            nn.utils.clip_grad_norm_(reference.parameters(), grad_clip)
        if reference_scaler is None:
            reference_optimizer.step()
        else:
            reference_scaler.step(reference_optimizer)
            reference_scaler.update()
        reference_losses.append(loss.detach())
    assert torch.equal(torch.stack(losses), torch.stack(reference_losses))
    assert not any(loss.requires_grad for loss in losses)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q) and torch.equal(p.grad, q.grad)
    for state, reference_state in zip(optimizer.state.values(), reference_optimizer.state.values(), strict=True):
        assert all(torch.equal(torch.as_tensor(state[k]), torch.as_tensor(reference_state[k])) for k in state)
    if scheduled:  # the step after the last: the schedule has moved on to it
        assert optimizer.param_groups[0]["lr"] == base_lr * factor(5)
    if scaler is not None:
        assert scaler.get_scale() == reference_scaler.get_scale()


def test_gradients_are_freed_before_the_forward():
    """The previous step's gradients are gone (``None``) while the next forward runs, not merely zero."""
    model = small_model()
    optimizer = make_optimizer("sgd", model)
    seen = []

    def loss_fn(x: Tensor, y: Tensor) -> Tensor:
        seen.append([p.grad for p in model.parameters()])
        return loss_of(model, x, y)

    for x, y in batches(2):
        training_step(optimizer, loss_fn, x, y)
    assert all(grad is None for grads in seen for grad in grads)
    assert all(p.grad is not None for p in model.parameters())  # the last step's stay until the next


def test_graph_is_freed_before_the_update():
    """What the loss's graph holds (here a plain ``ctx`` attribute, kept until the graph goes) is released
    after the backward, before the optimizer's step."""
    held: list[weakref.ref] = []

    class Keeps(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x: Tensor) -> Tensor:
            ctx.buffer = torch.ones(1000)
            held.append(weakref.ref(ctx.buffer))
            return x.clone()

        @staticmethod
        def backward(ctx, grad: Tensor) -> Tensor:
            return grad

    alive_at_update = []

    class Watched(torch.optim.SGD):
        def step(self, closure=None):
            alive_at_update.append(held[-1]() is not None)
            return super().step(closure)

    model = small_model()
    optimizer = Watched(model.parameters(), lr=0.1)
    (x, y), = batches(1)
    training_step(optimizer, lambda x, y: nn.functional.cross_entropy(Keeps.apply(model(x)), y), x, y)
    assert alive_at_update == [False]


def test_check_raising_leaves_everything_untouched():
    """``check`` sees the detached loss after the backward; raising there skips the update, the scaler's
    update and the schedule."""
    model = small_model()
    optimizer = make_optimizer("adam", model)
    scaler = make_scaler("enabled")
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    (x, y), = batches(1)
    training_step(optimizer, lambda x, y: loss_of(model, x, y), x, y, scaler=scaler, schedule=schedule)
    before = (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()), scaler.state_dict(),
              schedule.state_dict())
    checked = []

    def check(loss: Tensor) -> None:
        checked.append(loss)
        raise FloatingPointError("stop")

    with pytest.raises(FloatingPointError, match="stop"):
        training_step(optimizer, lambda x, y: loss_of(model, x, y), x, y, scaler=scaler, schedule=schedule, check=check)
    assert not checked[0].requires_grad and all(p.grad is not None for p in model.parameters())
    weights, state, scaler_state, schedule_state = before
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert str(optimizer.state_dict()) == str(state)
    assert scaler.state_dict() == scaler_state and schedule.state_dict() == schedule_state


# --------------------------------------------------------------------------------------------------
# The experiments' in-memory batches


def old_batches(x: Tensor, y: Tensor, batch_size: int, generator: torch.Generator, steps: int,
                augment: bool) -> list[tuple[Tensor, Tensor]]:
    """The minibatches of the experiments' former hand-written loop (``train_classifier`` before the shared
    step), written out: one generator for the orders and the crops."""
    batch_size = min(batch_size, len(x))
    order, position, out = torch.randperm(len(x), generator=generator), 0, []
    for _ in range(steps):
        if position + batch_size > len(x):
            order, position = torch.randperm(len(x), generator=generator), 0
        index = order[position:position + batch_size]
        position += batch_size
        images = x[index]
        out.append((crop_flip(images, generator) if augment else images, y[index]))
    return out


def images(count: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(2)
    return torch.randn(count, 3, 8, 8, generator=generator), torch.randint(0, 4, (count,), generator=generator)


@pytest.mark.parametrize("augment", [False, True])
@pytest.mark.parametrize("batch_size", [7, 10, 64])
def test_in_memory_batches_are_the_old_loops(augment, batch_size):
    """Same items, same order, same reshuffles (when fewer than a batch are left), same crops and flips, and
    the generator left in the same state, over several passes; a batch larger than the set is the set."""
    x, y = images(30)
    generator, reference_generator = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    source = on_device(InMemoryBatches(x, y, batch_size, generator), torch.device("cpu"),
                       augment=generator if augment else None)
    got = list(itertools.islice(source, 12))
    expected = old_batches(x, y, batch_size, reference_generator, 12, augment)
    assert len(got) == 12
    for (a, b), (c, d) in zip(got, expected, strict=True):
        assert torch.equal(a, c) and torch.equal(b, d) and len(b) == min(batch_size, 30)
    assert torch.equal(generator.get_state(), reference_generator.get_state())


def test_in_memory_batches_refuse_mismatched_or_empty_data():
    x, y = images(4)
    with pytest.raises(ValueError, match="as many inputs as targets"):
        InMemoryBatches(x, y[:3], 2, torch.Generator())
    with pytest.raises(ValueError, match="at least one"):
        InMemoryBatches(x[:0], y[:0], 2, torch.Generator())


def test_train_classifier_is_the_old_loop():
    """``train_classifier`` (in-memory batches, augmentation, cosine schedule, a penalty, the shared step)
    gives the losses and weights of the hand-written loop it replaced, bit for bit."""
    x, y = images(30)
    settings = TrainSettings(steps=9, batch_size=8, lr=0.1, augment=True)

    def model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 4))

    def penalty(network: nn.Module) -> Tensor:
        return 1e-3 * sum(p.square().sum() for p in network.parameters())

    trained = model()
    losses = train_classifier(trained, (x, y), settings, seed=3, penalty=lambda: penalty(trained))
    reference = model()
    optimizer = torch.optim.SGD(reference.parameters(), lr=settings.lr, momentum=settings.momentum,
                                weight_decay=settings.weight_decay)
    reference_losses = []
    old = old_batches(x, y, settings.batch_size, torch.Generator().manual_seed(3), settings.steps, augment=True)
    for step, (inputs, labels) in enumerate(old):
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * cosine(step, settings.steps)
        loss = nn.functional.cross_entropy(reference(inputs), labels) + penalty(reference)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        reference_losses.append(loss.item())
    assert losses == reference_losses
    assert all(torch.equal(p, q) for p, q in zip(trained.parameters(), reference.parameters(), strict=True))
