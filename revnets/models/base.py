"""The contract every model of the zoo follows."""

from __future__ import annotations

from torch import Tensor, nn

from ..nn.base import set_mode


def check_num_classes(num_classes: int) -> int:
    """Validate ``num_classes``: an integer ≥ 1."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1; got {num_classes!r}")
    return num_classes


class ZooModel(nn.Module):
    """An image classifier: ``forward(x) = forward_head(forward_features(x))``.

    Subclasses provide :meth:`forward_features` (``(B, C, H, W)`` images to ``(B, num_features)``
    pooled features); the ``head`` maps ``(B, num_features)`` to ``(B, num_classes)`` logits.
    :meth:`set_mode` switches the memory strategy of every stack inside the model.
    """

    def __init__(self, num_classes: int, num_features: int):
        super().__init__()
        self.num_classes = check_num_classes(num_classes)
        self.num_features = num_features
        self.head = nn.Linear(num_features, self.num_classes)

    def initialise_weights(self) -> None:
        """He (fan-out) initialisation of every convolution; BatchNorm scales 1 and shifts 0."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward_head(self, features: Tensor) -> Tensor:
        """``(B, num_features)`` features to ``(B, num_classes)`` logits."""
        return self.head(features)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` images to ``(B, num_classes)`` logits."""
        return self.forward_head(self.forward_features(x))

    def set_mode(self, mode: str, *, memory_budget: float | None = None) -> ZooModel:
        """Switch every stack to ``mode`` (``"reversible"``, ``"autograd"`` or ``"checkpoint"``), and its
        reversible stacks to ``memory_budget`` if given (see :func:`revnets.set_mode`); returns self.

        All stacks are checked before any is changed: on error the model is left as it was.
        """
        return set_mode(self, mode, memory_budget=memory_budget)
