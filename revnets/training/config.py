"""What a training run is: :class:`TrainConfig`, the papers' named recipes, and configuration files.

A configuration is resolved in layers, each overriding the one before: the defaults of
:class:`TrainConfig`, a named recipe (:data:`RECIPES`), a configuration file (TOML or YAML, keys
are the field names, ``-`` or ``_``), then the options given on the command line. The resolved
configuration is written into the run directory (``config.json``) and is what ``--resume`` reads.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "multistep", "constant")
AUGMENTATIONS = ("auto", "none", "crop-flip")
PRECISIONS = ("32", "bf16", "16-mixed")
MODES = ("reversible", "autograd", "checkpoint")
PARALLEL = ("ddp", "fsdp")

#: Fields that do not change what is computed, only where and how fast: the only ones a resumed run
#: may set differently from its saved configuration.
RUNTIME_FIELDS = frozenset({"device", "num_workers", "checkpoint_every", "tensorboard"})


@dataclass(frozen=True)
class TrainConfig:
    """What to train, on what, and how.

    Model and data: ``model_options`` go to the model's builder (``gamma``, ``init_velocity``, ``h``,
    ``exact``...), ``dataset_options`` to :func:`revnets.data.load_dataset` (``image_size`` of an image
    folder, ``normalize``...); the model is evaluated on ``eval_split`` after every epoch; ``limit``
    keeps the first ``limit`` training images (``None``: all). ``batch_size`` is the global batch: under
    ``torchrun`` each of the N processes takes ``batch_size / N`` images of it.

    Optimisation: ``optimizer`` (``sgd`` with ``momentum``, or ``adamw``), ``lr`` reached after a linear
    warm-up of ``warmup_epochs`` (fractions allowed), then the ``schedule``: ``cosine`` to 0,
    ``multistep`` (× ``lr_decay`` at each epoch of ``milestones``) or ``constant``; ``label_smoothing``
    of the cross-entropy; ``grad_clip``: maximum global gradient norm (``None``: no clipping);
    ``smoothness``: weight of ``model.smoothness_penalty()`` (Chang et al.'s kernel regulariser).
    ``augment``: ``auto`` (random crop with 4-pixel padding and horizontal flip for CIFAR, STL-10 and
    image folders, none for digits), ``none`` or ``crop-flip``. ``bn_recalibration``: at the end of every
    epoch, BatchNorm running statistics are recomputed as the plain average over this many training
    batches (``torch.optim.swa_utils.update_bn``; 0: keep the running averages). Running averages lag
    behind weights that still move fast: after one epoch of mnist5k at lr 0.1 they give 10 % test
    accuracy, recomputed ones 82 %.

    Execution: ``mode`` (memory strategy), ``precision`` (``32``, ``bf16`` autocast, ``16-mixed``
    float16 autocast with a gradient scaler), ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``),
    ``num_workers`` of the data loaders, ``checkpoint_every`` (steps between mid-epoch checkpoints; 0:
    at the end of every epoch only), ``sync_bn`` (SyncBatchNorm under DDP), ``parallel`` (``ddp`` or
    ``fsdp`` under torchrun), ``tensorboard`` (also log to TensorBoard).
    """

    model: str
    dataset: str
    root: str | None = None
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    milestones: tuple[int, ...] = ()
    lr_decay: float = 0.1
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    grad_clip: float | None = None
    smoothness: float = 0.0
    augment: str = "auto"
    bn_recalibration: int = 16
    mode: str = "reversible"
    precision: str = "32"
    seed: int = 0
    limit: int | None = None
    eval_split: str = "test"
    model_options: dict = field(default_factory=dict)
    dataset_options: dict = field(default_factory=dict)
    device: str = "auto"
    num_workers: int = 0
    checkpoint_every: int = 0
    sync_bn: bool = False
    parallel: str = "ddp"
    tensorboard: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "milestones", tuple(self.milestones))
        object.__setattr__(self, "precision", str(self.precision))
        for name, accepted in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("augment", AUGMENTATIONS),
                               ("precision", PRECISIONS), ("mode", MODES), ("parallel", PARALLEL)):
            if getattr(self, name) not in accepted:
                raise ValueError(f"{name} must be one of {', '.join(accepted)}; got {getattr(self, name)!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1; got epochs={self.epochs}, "
                             f"batch_size={self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 (images kept for training) or None; got {self.limit}")
        for name in ("lr", "weight_decay", "warmup_epochs", "label_smoothing", "smoothness", "num_workers",
                     "checkpoint_every", "momentum", "bn_recalibration"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)}")
        if self.label_smoothing >= 1:
            raise ValueError(f"label_smoothing must be in [0, 1); got {self.label_smoothing}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be > 0 (maximum gradient norm) or None; got {self.grad_clip}")
        if self.schedule == "multistep" and not self.milestones:
            raise ValueError("schedule='multistep' needs milestones (epochs at which the lr is multiplied by lr_decay)")
        if list(self.milestones) != sorted(set(self.milestones)) or any(m < 1 for m in self.milestones):
            raise ValueError(f"milestones must be increasing epochs >= 1; got {list(self.milestones)}")

    def to_dict(self) -> dict[str, Any]:
        """The configuration as JSON-compatible data (``from_dict`` inverts it)."""
        data = dataclasses.asdict(self)
        data["milestones"] = list(self.milestones)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """A configuration from ``data`` (field names, ``-`` or ``_``); unknown keys are refused by name."""
        data = {key.replace("-", "_"): value for key, value in data.items()}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown configuration key(s) {', '.join(unknown)}; accepted: {', '.join(sorted(known))}")
        return cls(**data)


#: The papers' protocols, as overrides of the defaults. The model and dataset may still be changed.
RECIPES: dict[str, dict[str, Any]] = {
    # Sander et al. (2021), CIFAR-10, as the authors' code runs it (michaelsdr/momentumnet:
    # trainer_CIFAR_10.py and its script): Momentum ResNet-18 with γ = 0.9, SGD with momentum 0.9, batch
    # 128, weight decay 5e-4, lr 0.01 for 180 epochs then 0.001 to epoch 220, random crop (padding 4) and
    # flip, normalised images (their std differs from ours in the third decimal).
    "sander-cifar": {
        "model": "momentum_resnet18", "dataset": "cifar10", "model_options": {"gamma": 0.9}, "optimizer": "sgd",
        "momentum": 0.9, "lr": 0.01, "batch_size": 128, "weight_decay": 5e-4, "schedule": "multistep",
        "milestones": (180,), "lr_decay": 0.1, "epochs": 220, "warmup_epochs": 0.0, "augment": "crop-flip",
        "dataset_options": {"normalize": True},
    },
    # Chang et al. (2018), CIFAR-10, as the paper describes it: Hamiltonian-74, SGD with momentum 0.9,
    # batch 100, weight decay 2e-4, smoothness penalty 2e-4, lr 0.1 divided by 10 at epochs 80, 120 and 160
    # of 200, random crop and flip.
    "chang-cifar": {
        "model": "hamiltonian74", "dataset": "cifar10", "optimizer": "sgd", "momentum": 0.9, "lr": 0.1,
        "batch_size": 100, "weight_decay": 2e-4, "smoothness": 2e-4, "schedule": "multistep",
        "milestones": (80, 120, 160), "lr_decay": 0.1, "epochs": 200, "warmup_epochs": 0.0, "augment": "crop-flip",
        "dataset_options": {"normalize": True},
    },
}


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The options in a TOML (``.toml``) or YAML (``.yaml``, ``.yml``) file, as a dict of field names."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"configuration file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        data = tomllib.loads(path.read_text())
    elif suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(path.read_text()) or {}
    elif suffix == ".json":
        data = json.loads(path.read_text())
    else:
        raise ValueError(f"configuration file {path}: the suffix must be .toml, .yaml, .yml or .json; got {suffix!r}")
    if not isinstance(data, dict):
        raise ValueError(f"configuration file {path} must hold a table of options; got {type(data).__name__}")
    return {key.replace("-", "_"): value for key, value in data.items()}


def resolve(options: dict[str, Any], *, recipe: str | None = None,
            config_file: str | Path | None = None) -> TrainConfig:
    """Defaults, then ``recipe``, then ``config_file``, then ``options`` (those not ``None``); the
    ``model_options`` and ``dataset_options`` dicts are merged key by key.

    A ``recipe`` key inside the file is used when no ``recipe`` is passed.
    """
    from_file = read_config_file(config_file) if config_file is not None else {}
    recipe = recipe or from_file.pop("recipe", None)
    from_file.pop("recipe", None)
    if recipe is not None and recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; known recipes: {', '.join(RECIPES)}")
    layers: dict[str, Any] = {}
    for layer in (RECIPES.get(recipe, {}), from_file, options):
        for key, value in layer.items():
            if value is None:
                continue
            # option dicts merge key by key: a recipe's normalize=True survives a command line's image_size
            layers[key] = {**layers.get(key, {}), **value} if key in ("model_options", "dataset_options") else value
    for key in ("model", "dataset"):
        if key not in layers:
            raise ValueError(f"no {key} given: pass --{key}, a --recipe, or a --config file that sets it")
    return TrainConfig.from_dict(layers)
