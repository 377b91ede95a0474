"""What a training run is: :class:`TrainConfig`, the papers' named recipes, and configuration files.

A configuration is resolved in layers, each overriding the one before: the defaults of
:class:`TrainConfig`, a named recipe (:data:`RECIPES`), a configuration file (TOML, YAML or JSON,
keys are the field names, ``-`` or ``_``), then the options given on the command line. The resolved
configuration is written into the run directory (``config.json``) and is what ``--resume`` reads.

Every field is declared once, with its help text and accepted values (:func:`option`): the
``revnets train`` options are generated from these declarations, and a value of the wrong type, from
Python, a file or the command line, is refused with the field's name and what it accepts.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..autograd import MODES

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "multistep", "constant")
AUGMENTATIONS = ("auto", "none", "crop-flip")
PRECISIONS = ("32", "bf16", "16-mixed")
PARALLEL = ("ddp", "fsdp")

#: Fields that do not change what is computed, only where and how fast: the only ones a resumed run
#: may set differently from its saved configuration.
RUNTIME_FIELDS = frozenset({"device", "num_workers", "checkpoint_every", "tensorboard", "download"})


def option(default: Any, help: str, *, choices: tuple[str, ...] | None = None, shown: str | None = None,
           cli: bool = True) -> Any:
    """A :class:`TrainConfig` field: its ``default``, the ``help`` text of its command-line option,
    the ``choices`` it accepts (if a closed set), how its default is ``shown`` in the help (when
    ``str(default)`` would not say it) and whether it is a ``cli`` option at all."""
    metadata = {"help": help, "choices": choices, "shown": shown, "cli": cli}
    if isinstance(default, dict):
        return dataclasses.field(default_factory=dict, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class TrainConfig:
    """What to train, on what, and how: each field's help text is in its declaration (and in
    ``revnets train --help``).

    ``model_options`` go to the model's builder (``gamma``, ``init_velocity``, ``h``, ``exact``...),
    ``dataset_options`` to :func:`revnets.data.load_dataset` (``image_size`` of an image folder,
    ``normalize``...). ``batch_size`` is the global batch: under ``torchrun`` each of the N processes
    takes ``batch_size / N`` images of it. After the warm-up the learning rate follows ``schedule``:
    ``cosine`` to 0, ``multistep`` (× ``lr_decay`` at each epoch of ``milestones``) or ``constant``.
    BatchNorm recalibration (``bn_recalibration``) matters: running averages lag behind weights that
    still move fast; after one epoch of mnist5k at lr 0.1 they give 10 % test accuracy, recomputed
    ones 82 %.

    Raises:
        ValueError: a field of the wrong type or out of its range, naming the field and what it accepts.
    """

    model: str = option(None, "A model of the zoo (`revnets models` lists them), e.g. momentum_resnet18.",
                        shown="none: required")
    dataset: str = option(None, "A dataset with images (`revnets datasets` lists them), e.g. digits.",
                          shown="none: required")
    root: str | None = option(None, "Directory of a dataset read from disk (cifar10, stl10, imagefolder...).",
                              shown="none")
    epochs: int = option(10, "Passes over the training set.")
    batch_size: int = option(128, "Images per step, over all processes.")
    lr: float = option(0.1, "Peak learning rate (reached after the warm-up).")
    optimizer: str = option("sgd", "Optimizer: sgd (with --momentum) or adamw.", choices=OPTIMIZERS)
    momentum: float = option(0.9, "SGD momentum.")
    weight_decay: float = option(5e-4, "Weight decay.")
    schedule: str = option("cosine", "Learning-rate schedule after the warm-up: cosine (to 0), multistep "
                           "(× --lr-decay at each of --milestones) or constant.", choices=SCHEDULES)
    milestones: tuple[int, ...] = option((), "Epochs of the multistep schedule, comma-separated, e.g. 80,120,160.",
                                         shown="none")
    lr_decay: float = option(0.1, "Factor of the multistep schedule at each milestone.")
    warmup_epochs: float = option(0.0, "Epochs of linear learning-rate warm-up (fractions allowed).")
    label_smoothing: float = option(0.0, "Label smoothing of the cross-entropy, in [0, 1).")
    grad_clip: float | None = option(None, "Clip the global gradient norm to this value.", shown="none: no clipping")
    smoothness: float = option(0.0, "Weight of Chang et al.'s kernel smoothness penalty (model.smoothness_penalty()).")
    augment: str = option("auto", "Augmentation: auto (random crop with 4-pixel padding and flip for CIFAR, STL-10 "
                          "and image folders, none for digits), none or crop-flip.", choices=AUGMENTATIONS)
    bn_recalibration: int = option(16, "Training batches over which BatchNorm running statistics are recomputed "
                                   "as a plain average after every epoch (0: keep the running averages).")
    mode: str = option("reversible", "Memory strategy of the model's stacks.", choices=MODES)
    precision: str = option("32", "32, bf16 (autocast) or 16-mixed (float16 autocast with loss scaling).",
                            choices=PRECISIONS)
    seed: int = option(0, "Random seed (weights, data order, augmentation).")
    limit: int | None = option(None, "Train on the first LIMIT training images only.", shown="all")
    eval_split: str = option("test", "Split evaluated after every epoch (e.g. val for an image folder).")
    model_options: dict = option({}, "Options of the model's builder.", cli=False)
    dataset_options: dict = option({}, "Options of the dataset's reader.", cli=False)
    device: str = option("auto", "auto (CUDA if available), cpu, cuda, cuda:N or mps.")
    num_workers: int = option(0, "Data-loading worker processes.")
    checkpoint_every: int = option(0, "Also checkpoint every N steps (0: at the end of every epoch only).")
    sync_bn: bool = option(False, "SyncBatchNorm under torchrun (DDP).")
    parallel: str = option("ddp", "Under torchrun: ddp or fsdp.", choices=PARALLEL)
    tensorboard: bool = option(False, "Also log to TensorBoard (a tensorboard/ folder in the run directory).")
    download: bool = option(False, "Fetch the dataset's official archive into --root if its files are missing "
                            "(cifar10, cifar100, stl10).")

    def __post_init__(self) -> None:
        for spec in dataclasses.fields(self):
            object.__setattr__(self, spec.name, checked_value(spec.name, getattr(self, spec.name)))
        for name in ("model", "dataset"):
            if getattr(self, name) is None:
                raise ValueError(f"no {name} given: pass --{name}, a --recipe, or a --config file that sets it")
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
        return cls(**checked_options(data))


FIELDS: dict[str, dataclasses.Field] = {spec.name: spec for spec in dataclasses.fields(TrainConfig)}
FIELD_TYPES: dict[str, Any] = typing.get_type_hints(TrainConfig)


def checked_options(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with keys as field names (``-`` becomes ``_``) and values checked by :func:`checked_value`.

    Raises:
        ValueError: an unknown key (listing the accepted ones) or a value of the wrong type.
    """
    data = {str(key).replace("-", "_"): value for key, value in data.items()}
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown configuration key(s) {', '.join(unknown)}; accepted: {', '.join(sorted(FIELDS))}")
    return {key: checked_value(key, value) for key, value in data.items()}


def field_type(name: str) -> tuple[Any, bool]:
    """The type field ``name`` holds (``X`` of ``X | None``) and whether it may be ``None``."""
    annotation = FIELD_TYPES[name]
    optional = isinstance(annotation, types.UnionType) and type(None) in typing.get_args(annotation)
    if optional:
        (annotation,) = (arg for arg in typing.get_args(annotation) if arg is not type(None))
    return annotation, optional


def checked_value(name: str, value: Any) -> Any:
    """``value`` as field ``name`` holds it, or a :class:`ValueError` naming the field and what it accepts.

    Numbers written as strings are read as numbers (YAML 1.1 reads ``5e-4`` as a string); a list of
    milestones may be a comma-separated string; a choice may be written as a number (``precision: 32``).
    """
    annotation, optional = field_type(name)
    if value is None and (optional or FIELDS[name].default is None):
        return None
    choices = FIELDS[name].metadata["choices"]
    try:
        converted = _convert(annotation, value)
    except (TypeError, ValueError):
        converted = _INVALID
    if converted is _INVALID or (choices is not None and converted not in choices):
        accepted = f"one of {', '.join(choices)}" if choices else _DESCRIPTIONS[typing.get_origin(annotation)
                                                                                or annotation]
        raise ValueError(f"{name} must be {accepted}{' or none' if optional else ''}; got {value!r}"
                         f" ({type(value).__name__})")
    return converted


_INVALID = object()
_DESCRIPTIONS = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
                 tuple: "a list of integers (e.g. [80, 120] or \"80,120\")", dict: "a table of options"}


def _convert(annotation: Any, value: Any) -> Any:
    """``value`` as an ``annotation`` (raises TypeError or ValueError, or returns :data:`_INVALID`)."""
    if isinstance(value, bool) and annotation is not bool:
        return _INVALID
    if annotation is bool:
        return value if isinstance(value, bool) else _INVALID
    if annotation is int:
        return value if isinstance(value, int) else int(value) if isinstance(value, str) else _INVALID
    if annotation is float:
        return float(value) if isinstance(value, (int, float, str)) else _INVALID
    if annotation is str:
        return value if isinstance(value, str) else str(value) if isinstance(value, (int, float)) else _INVALID
    if annotation is dict:
        return dict(value) if isinstance(value, dict) else _INVALID
    if typing.get_origin(annotation) is tuple:
        parts = value.split(",") if isinstance(value, str) else value
        if not isinstance(parts, (list, tuple)):
            return _INVALID
        items = tuple(_convert(int, part.strip() if isinstance(part, str) else part) for part in parts
                      if not (isinstance(part, str) and not part.strip()))
        return _INVALID if _INVALID in items else items
    raise TypeError(f"no conversion to {annotation}")


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
    """The options in a TOML (``.toml``), YAML (``.yaml``, ``.yml``) or JSON (``.json``) file, as a dict
    of field names with checked values (plus ``recipe`` if the file names one).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a file that cannot be parsed (with the parser's line and column), that is not a table
            of options, or an unknown key or a value of the wrong type, each naming the file and the key.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"configuration file {path} does not exist" +
                                (" (it is a directory)" if path.is_dir() else ""))
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise ValueError(f"configuration file {path}: the suffix must be .toml, .yaml, .yml or .json; got {suffix!r}")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"configuration file {path} cannot be read: {error}") from None
    if suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        parse, errors, language = tomllib.loads, (tomllib.TOMLDecodeError,), "TOML"
    elif suffix == ".json":
        parse, errors, language = json.loads, (json.JSONDecodeError,), "JSON"
    else:
        import yaml

        parse, errors, language = yaml.safe_load, (yaml.YAMLError,), "YAML"
    try:
        data = parse(text)
    except errors as error:
        problem = " ".join(str(error).split())
        raise ValueError(f"configuration file {path} is not valid {language}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"configuration file {path} must hold a table of options (key: value lines); "
                         f"got {type(data).__name__}")
    recipe = data.pop("recipe", None)
    try:
        options = checked_options(data)
    except ValueError as error:
        raise ValueError(f"configuration file {path}: {error}") from None
    return options if recipe is None else {**options, "recipe": recipe}


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
    return TrainConfig.from_dict(layers)
