"""Training loop for PromptIR / CPL / PIP / DPPD models (SPEC §6).

Per step, with x the degraded batch, y the clean batch and ŷ = model(x)::

    loss = L1(ŷ, y)                                   (mean absolute error; PromptIR / CPL)
         + CPR(ŷ, y, negatives)                       (cpl with num_negatives > 0: ContrastivePromptLoss)
         + Σ aux["losses"]                            (pip / dppd regularisers, already weighted)

``pixel_loss`` ``"auto"`` (default) is ``"smoothl1"`` for pip — the official PIP trainer's
``SmoothL1Loss()`` (β = 1, so on [0, 1] images it is half the squared error) — and ``"l1"`` otherwise;
``"l1"`` / ``"smoothl1"`` choose either for any variant. (The official PIP trainer also rescales a step's
loss when it exceeds 5x the smallest of the last 100; cplfast clips the gradient norm instead.)
``pixel_loss="psnr"`` replaces the L1 term by ``mean_i 10 log10(MSE_i + 1e-8)`` over the images i of
the batch (= −mean PSNR at data range 1): every image's gradient is divided by its own error, so images that
are already close (mild blur) weigh as much as badly degraded ones (low light) — the weighting of a
mean-PSNR score. ``zero_init_output`` zeroes the last convolution so the network starts as the
identity (PromptIR adds its input to the output).

AdamW; learning rate ``lr · min(p / warmup, 1)`` during warm-up, then a cosine from ``lr`` to
``min_lr`` over the rest, where the progress ``p`` is ``step / steps`` — or, with a ``time_budget``
(seconds), ``max(step / steps, min(elapsed / time_budget, step / min_steps), elapsed / time_limit)``:
the run ends on time with a finished schedule, but on a slow (e.g. shared) machine goes on past the
budget until it has made ``min_steps`` steps, never longer than ``time_limit``.
bf16 autocast on CUDA; gradient-norm clipping; an exponential moving average (EMA) of the weights
with warm-up ``decay_n = min(decay, (1 + n) / (10 + n))``; a tqdm bar with the loss and it/s.

Reproducibility: batch ``s`` holds dataset items ``s·B … s·B+B−1`` (the datasets are index-addressed,
:mod:`cplfast.data.datasets`), and the training state file stores the raw weights, AdamW moments,
EMA, schedule position and torch RNG states, so ``resume`` continues bit for bit (CPU, fixed thread
count, no time budget) — the same weights as an uninterrupted run.

Distributed (``torchrun``; the process group is set up by :func:`init_distributed`): the model is
wrapped in ``DistributedDataParallel`` (no ``find_unused_parameters``: every trainable parameter is
used in every step). ``batch`` is the *global* batch of one optimizer step: each of the ``W`` ranks runs
``grad_accum`` micro-batches of ``batch / (W · grad_accum)`` images, and step ``s`` still consumes
items ``s·B … s·B+B−1`` (a ``DistributedSampler`` over that window hands rank ``r`` every W-th item),
so a run gives the same weights on any number of GPUs and accumulation steps, up to float rounding.
Rank 0 writes checkpoints, the progress bar and the log; resume reads the state on rank 0 and
broadcasts it (the run folder need not be visible from other nodes); every rank's RNG state is saved
and restored.

Log: ``train_log.jsonl`` in the run folder, one JSON line every ``log_every`` steps — step, loss and its
terms (averaged over micro-batches and ranks), lr, elapsed seconds, images/s, and ``routing_health``:
per router key, :func:`cplfast.routing.routing_health` of the prompts the training images chose since
the previous line (per-task distribution, entropy, mutual information between task and prompt in bits).
A resume drops the lines of steps after its checkpoint, so the log always matches the weights.

CPR (cpl with ``num_negatives`` > 0): the negatives are restored with unselected prompts drawn at random
per image, slot and step (``cpr_negatives="random"``, the paper's choice; ``"ordered"`` takes them in
index order), from per-image seeds (the run seed and the image's index in the data stream), so a
resumed run, or one on any number of processes, draws the same negatives. ``cpr_form`` /
``cpr_features`` pick the loss form and feature space (:class:`cplfast.ContrastivePromptLoss`);
``load_balance`` and ``gate_noise`` are opt-in extensions against routing collapse that CPL does not
have (:class:`cplfast.SparsePromptModule`).

``prompt="promptir"`` with ``cpr_negatives="batch"`` is CPR without SPM (the CPL paper's "CPR only"
ablation): negative j restores each image with the dense prompt weights of the image j places before it
in the micro-batch (always another degradation with the embedded data's task cycling); promptir trains
without CPR under any other ``cpr_negatives``. The negatives are restored without autograd
(``cpr_negative_grad=False``, as CPL's official code computes them under ``no_grad``): CPR moves the
output away from them but never trains a prompt to restore badly. With ``cpr_negative_grad=True`` the
InfoNCE gradient also reaches the negatives; ``cplfast study`` found that this teaches the unselected
prompts to ruin images: a router that picked another prompt on other image sizes (trained on 32²
patches, evaluated on 128² crops) restored held-out crops to 12.4 dB from an 18.7 dB input.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from . import checkpoint as ckpt
from .data import TASKS, embedded_train_dataset, folder_dataset
from .data.degradations import derive_seed
from .distributed import on_rank0, world

TRAIN_STATE_KIND = "train_state"
LOG_FILE = "train_log.jsonl"
# TrainConfig fields a resumed run may change: the schedule's length, how the batch is split, I/O.
RESUME_CHANGES = ("steps", "time_budget", "grad_accum", "log_every", "save_every", "workers")


PIXEL_LOSSES = ("auto", "l1", "smoothl1", "psnr")


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved with every checkpoint)."""

    preset: str = "tiny"
    prompt: str = "cpl"
    top_k: int = 1
    model_overrides: dict[str, Any] = field(default_factory=dict)
    data: str | None = None  # None: the embedded scikit-image photographs
    tasks: tuple[str, ...] = TASKS
    steps: int = 1000
    batch: int = 8  # global: images per optimizer step over all ranks and accumulation micro-batches
    grad_accum: int = 1  # micro-batches per optimizer step on each rank
    patch: int = 64
    lr: float = 2e-4
    min_lr: float = 1e-6
    warmup: float = 0.05  # fraction of the schedule
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0  # 0 disables
    ema: float = 0.999  # 0 disables
    num_negatives: int = 2  # CPR negatives per image (cpl); 0 disables CPR
    cpr_weight: float = 0.1
    cpr_temperature: float = 0.1
    cpr_batch_negatives: bool = False  # the other images of the (global) batch are CPR negatives too
    cpr_negative_grad: bool = False  # False: negatives restored without autograd (official CPL); True: CPR trains them
    cpr_negatives: str = "random"  # cpl: "random" (paper) | "ordered"; "batch": CPR on dense promptir prompts
    cpr_form: str = "infonce"  # "infonce" (cplfast, fused) | "l1-push" (the CPL authors' template)
    cpr_features: str = "filterbank"  # "filterbank" (cplfast, no weights) | "vgg16" (the paper's)
    cpr_vgg_weights: str | None = None  # VGG16 state_dict file; None: torchvision's weight cache
    load_balance: float = 0.0  # cpl: weight of the Switch load-balancing loss (not in CPL); 0 = off
    gate_noise: float = 0.0  # cpl: noisy top-k gating scale in training (not in CPL); 0 = off
    amp: bool = True  # bf16 autocast, CUDA only
    seed: int = 0
    device: str = "auto"
    workers: int = 0
    save_every: int = 500  # steps; 0 saves only at the end
    log_every: int = 10  # steps between lines of train_log.jsonl; 0 writes none
    time_budget: float | None = None  # seconds of training; None: run all steps
    min_steps: int = 0  # with time_budget: keep going past the budget until this many steps ...
    time_limit: float | None = None  # ... but never past this many seconds (default: the budget)
    deterministic: bool = False
    pixel_loss: str = "auto"  # "auto": smoothl1 for pip (official PIP), else l1 | "l1" | "smoothl1" | "psnr"
    zero_init_output: bool = False  # start as the identity (output conv zeroed; PromptIR adds the input)

    def validate(self) -> "TrainConfig":
        def positive_int(name: str, value, minimum: int = 1) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")

        positive_int("steps", self.steps)
        positive_int("batch", self.batch)
        positive_int("grad_accum", self.grad_accum)
        if self.batch % self.grad_accum:
            raise ValueError(f"batch ({self.batch}) must be a multiple of grad_accum ({self.grad_accum})")
        positive_int("patch", self.patch, 8)
        if self.patch % 8:
            raise ValueError(f"patch must be a multiple of 8 (the U-net downsamples 3 times), got {self.patch}")
        positive_int("num_negatives", self.num_negatives, 0)
        positive_int("workers", self.workers, 0)
        positive_int("save_every", self.save_every, 0)
        positive_int("log_every", self.log_every, 0)
        for name in ("lr", "cpr_temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("min_lr", "weight_decay", "grad_clip", "cpr_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup must be a fraction in [0, 1), got {self.warmup!r}")
        if not 0 <= self.ema < 1:
            raise ValueError(f"ema must be in [0, 1), got {self.ema!r}")
        if self.time_budget is not None and not self.time_budget > 0:
            raise ValueError(f"time_budget must be > 0 seconds or None, got {self.time_budget!r}")
        positive_int("min_steps", self.min_steps, 0)
        if self.time_limit is not None and not (self.time_budget and self.time_limit >= self.time_budget):
            raise ValueError(f"time_limit needs a time_budget and must be >= it, got {self.time_limit!r}")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if not self.tasks:
            raise ValueError("tasks must not be empty")
        for name in ("cpr_batch_negatives", "cpr_negative_grad"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.cpr_batch_negatives and not (self.prompt == "cpl" and self.num_negatives > 0):
            raise ValueError("cpr_batch_negatives extends CPR, which needs prompt='cpl' and num_negatives > 0 "
                             f"(got prompt={self.prompt!r}, num_negatives={self.num_negatives})")
        if self.cpr_negatives not in ("random", "ordered", "batch"):
            raise ValueError(f"cpr_negatives must be 'random', 'ordered' or 'batch', got {self.cpr_negatives!r}")
        if self.cpr_negatives == "batch" and self.prompt != "promptir":
            raise ValueError("cpr_negatives='batch' (other images' dense prompt weights) needs prompt='promptir'; "
                             f"got prompt={self.prompt!r}")
        if self.cpr_form not in ("infonce", "l1-push"):
            raise ValueError(f"cpr_form must be 'infonce' or 'l1-push', got {self.cpr_form!r}")
        if self.cpr_features not in ("filterbank", "filters", "vgg16"):
            raise ValueError(f"cpr_features must be 'filterbank' or 'vgg16', got {self.cpr_features!r}")
        if self.cpr_vgg_weights is not None and self.cpr_features != "vgg16":
            raise ValueError("cpr_vgg_weights needs cpr_features='vgg16'")
        if self.cpr_batch_negatives and self.cpr_form != "infonce":
            raise ValueError(f"cpr_batch_negatives extends the 'infonce' form, got cpr_form={self.cpr_form!r}")
        for name in ("load_balance", "gate_noise"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
            if value and self.prompt != "cpl":
                raise ValueError(f"{name} is an extension of CPL's sparse routing and needs prompt='cpl', "
                                 f"got prompt={self.prompt!r}")
        if self.pixel_loss not in PIXEL_LOSSES:
            raise ValueError(f"pixel_loss must be one of {PIXEL_LOSSES}, got {self.pixel_loss!r}")
        return self

    @property
    def pixel_loss_name(self) -> str:
        """The pixel loss in force: ``pixel_loss`` with ``"auto"`` resolved (smoothl1 for pip, else l1)."""
        if self.pixel_loss == "auto":
            return "smoothl1" if self.prompt == "pip" else "l1"
        return self.pixel_loss

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["tasks"] = list(self.tasks)
        out["betas"] = list(self.betas)
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(obj) - names)
        if unknown:
            raise ckpt.CheckpointError(f"training config has unknown fields {unknown}")
        obj = dict(obj)
        if "tasks" in obj:
            obj["tasks"] = tuple(obj["tasks"])
        if "betas" in obj:
            obj["betas"] = tuple(obj["betas"])
        return cls(**obj)


# ------------------------------------------------------------------------------------ components
def cpu_threads() -> int:
    """CPU threads worth using now: the cores not already busy (1-minute load average), at least 1.

    Oversubscribed OpenMP threads wait on each other at every barrier, which on a shared machine
    makes small convolutions many times slower than one thread. ``OMP_NUM_THREADS`` wins if set.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        load = 0.0
    return max(1, min(cores, int(cores - load + 0.5)))


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` is CUDA when available; under ``torchrun`` a bare ``cuda`` is this process's local GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> bool:
    """Join the process group that ``torchrun`` describes (``WORLD_SIZE`` > 1 in the environment).

    NCCL when this process trains on CUDA, gloo on CPU. Returns whether a process group is up; a
    no-op outside ``torchrun`` or when one is already initialised.
    """
    import datetime

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return dist.is_available() and dist.is_initialized()
    if dist.is_initialized():
        return True
    resolved = resolve_device(device)
    if resolved.type == "cuda":
        if ":" in str(device) and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
            raise ValueError(f"device {device!r} would put every process of this node on one GPU; pass 'cuda' "
                             "(each process takes the GPU of its LOCAL_RANK)")
        torch.cuda.set_device(resolved)
    # device_id binds NCCL to this process's GPU (collectives and barrier need not guess it)
    dist.init_process_group("nccl" if resolved.type == "cuda" else "gloo", timeout=datetime.timedelta(seconds=timeout_s),
                            device_id=resolved if resolved.type == "cuda" else None)
    return True


def model_spec(config: TrainConfig, num_tasks: int) -> dict[str, Any]:
    """The JSON description :func:`build_model` rebuilds a model from."""
    overrides = dict(config.model_overrides)
    if config.gate_noise:
        overrides["gate_noise"] = float(config.gate_noise)
    if config.load_balance:
        overrides["loss_weights"] = {**overrides.get("loss_weights", {}), "load_balance": float(config.load_balance)}
    if config.prompt in ("pip", "dppd") and "num_degradations" not in overrides:
        overrides["num_degradations"] = max(1, num_tasks)
    return {"prompt": config.prompt, "preset": config.preset, "top_k": config.top_k, "overrides": overrides}


def build_model(spec: dict[str, Any]) -> nn.Module:
    """A :class:`cplfast.models.PromptIR` from a :func:`model_spec` dict."""
    from .models import PromptIR

    try:
        return PromptIR(
            prompt=spec["prompt"], preset=spec["preset"], top_k=int(spec.get("top_k", 1)), **dict(spec.get("overrides", {}))
        )
    except KeyError as err:
        raise ckpt.CheckpointError(f"model config lacks {err.args[0]!r}") from None


class EMA:
    """Exponential moving average of a model's floating-point parameters and buffers (fp32).

    ``shadow = d · shadow + (1 − d) · current`` with ``d = min(decay, (1 + n) / (10 + n))`` after
    update n, so early averages are not dominated by the initial weights.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = float(decay)
        self.updates = 0
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        state = model.state_dict()
        names = list(self.shadow)
        # shadow + (1 − d)(current − shadow) in one multi-tensor launch instead of two kernels per tensor
        torch._foreach_lerp_([self.shadow[k] for k in names], [state[k].detach().float() for k in names], 1 - d)

    def state_dict_for(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's state_dict with the averaged values in place of the floating-point entries."""
        return {k: (self.shadow[k].to(v.dtype) if k in self.shadow else v) for k, v in model.state_dict().items()}


def lr_at(progress: float, config: TrainConfig) -> float:
    """Warm-up then cosine, as a function of the schedule progress in [0, 1]."""
    progress = min(max(progress, 0.0), 1.0)
    if config.warmup > 0 and progress < config.warmup:
        return config.lr * max(progress / config.warmup, 1e-3)
    rest = (progress - config.warmup) / max(1e-12, 1 - config.warmup)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * rest))


def schedule_progress(step: int, elapsed: float, config: TrainConfig) -> float:
    """Schedule progress in [0, ∞) after ``step`` steps and ``elapsed`` seconds (module docstring)."""
    p = step / config.steps
    if config.time_budget:
        by_time = elapsed / config.time_budget
        if config.min_steps:
            by_time = min(by_time, step / config.min_steps)
        p = max(p, by_time, elapsed / (config.time_limit or config.time_budget))
    return p


def make_train_dataset(config: TrainConfig) -> Dataset:
    if config.data is None:
        return embedded_train_dataset(config.tasks, patch=config.patch, seed=config.seed)
    from .data.datasets import validate_dataset

    dataset = folder_dataset(config.data, patch=config.patch, seed=config.seed, tasks=config.tasks)
    # every file decoded once now, not when a step first draws it; bad ones reported and skipped
    dataset.skipped = validate_dataset(dataset)
    if dataset.skipped and world()[0] == 0:
        for path, reason in dataset.skipped:
            print(f"skipping {path}: {reason}", file=__import__("sys").stderr, flush=True)
    return dataset


class _Indexed(Dataset):
    """Items of ``dataset`` with their index in the whole data stream (``first`` + position) added."""

    def __init__(self, dataset: Dataset, first: int):
        self.dataset, self.first = dataset, first

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        return {**self.dataset[i], "index": self.first + i}


@dataclass
class TrainResult:
    out_dir: Path
    model_path: Path
    steps: int
    seconds: float
    last_loss: float
    stopped_early: bool


def train_state_path(run: str | os.PathLike) -> Path:
    """The training state file of a run: ``run`` itself, or ``run/train_state.safetensors`` for a run folder."""
    run = Path(run)
    return run / ckpt.STATE_FILE if run.is_dir() else run


def _read_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, meta)`` of a training state file: read on rank 0, broadcast to the other ranks."""

    def read():
        if not Path(path).exists():
            raise FileNotFoundError(f"no training state to resume: {path}")
        return ckpt.load_tensors(path)

    return on_rank0(read)


# ------------------------------------------------------------------------------------------ trainer
class Trainer:
    """Owns the model, optimizer, EMA, data and checkpoints of one run folder ``out_dir``."""

    def __init__(self, config: TrainConfig, out_dir: str | os.PathLike, *, dataset: Dataset | None = None,
                 progress: bool = True):
        self.config = config.validate()
        self.out_dir = Path(out_dir)
        self.rank, self.world_size = world()
        self.is_main = self.rank == 0
        if config.batch % (self.world_size * config.grad_accum):
            raise ValueError(f"batch ({config.batch}) must be a multiple of world size x grad_accum "
                             f"({self.world_size} x {config.grad_accum})")
        self.micro_batch = config.batch // (self.world_size * config.grad_accum)
        self.progress = progress and self.is_main
        self.device = resolve_device(config.device)
        if config.deterministic:
            torch.use_deterministic_algorithms(True)
            if self.device.type == "cuda":
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
                torch.backends.cudnn.benchmark = False
        torch.manual_seed(config.seed)
        self.dataset = dataset if dataset is not None else make_train_dataset(config)
        self.tasks = list(getattr(self.dataset, "tasks", config.tasks))
        self.spec = model_spec(config, len(self.tasks))
        self.model = build_model(self.spec).to(self.device)
        if config.zero_init_output:
            with torch.no_grad():
                for p in self.model.output.parameters():
                    p.zero_()
        if config.num_negatives and (config.prompt == "cpl" or config.cpr_negatives == "batch"):
            from .losses import ContrastivePromptLoss

            if config.prompt == "cpl":
                limit = min(getattr(self.model, f"prompt{i}").max_negatives() for i in (1, 2, 3))
                what = "this model (prompt_len, top_k)"
            else:
                limit, what = self.micro_batch - 1, "dense-prompt CPR (the micro-batch's other images)"
            if config.num_negatives > limit:
                raise ValueError(f"num_negatives must be <= {limit} for {what}, got {config.num_negatives}")
            self.cpr = ContrastivePromptLoss(temperature=config.cpr_temperature, weight=config.cpr_weight,
                                             features=config.cpr_features, vgg_weights=config.cpr_vgg_weights,
                                             form=config.cpr_form, batch_negatives=config.cpr_batch_negatives,
                                             detach_negatives=not config.cpr_negative_grad,
                                             gather=config.cpr_batch_negatives).to(self.device)
        else:
            self.cpr = None
        self.ddp: DistributedDataParallel | None = None
        if self.world_size > 1:
            # Depthwise-conv weight grads come back with a different stride on their size-1 dimension;
            # DDP then copies instead of aliasing that bucket (harmless) and warns on every rank.
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
            # Same initial weights everywhere (DDP also broadcasts rank 0's); then per-rank randomness.
            self.ddp = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=False, gradient_as_bucket_view=True,
            )
            torch.manual_seed(derive_seed("train-rank", config.seed, self.rank))
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, betas=tuple(config.betas), weight_decay=config.weight_decay)
        self.ema = EMA(self.model, config.ema) if config.ema > 0 else None
        self.step = 0
        self.elapsed = 0.0  # training seconds spent in earlier sessions of this run
        self.last_loss = float("nan")
        self._log_source: Path | None = None  # a resumed run's folder, whose log this run continues
        self.use_amp = bool(config.amp) and self.device.type == "cuda"
        self._routing_counts: dict[str, torch.Tensor] = {}  # router key -> (T, N) choices since the last log line

    # ------------------------------------------------------------------ checkpoints
    def model_config(self) -> dict[str, Any]:
        return {
            "format": ckpt.FORMAT, "model": self.spec, "tasks": self.tasks, "step": self.step,
            "train": self.config.to_json(), "weights": "ema" if self.ema is not None else "raw",
        }

    def inference_state_dict(self) -> dict[str, torch.Tensor]:
        return self.ema.state_dict_for(self.model) if self.ema is not None else self.model.state_dict()

    def model_for_eval(self) -> nn.Module:
        """A separate copy of the model holding the inference weights (EMA if on), in eval mode."""
        model = build_model(self.spec).to(self.device)
        model.load_state_dict(self.inference_state_dict())
        return model.eval()

    def save(self, extra_config: dict[str, Any] | None = None) -> Path:
        """Write the training state, then the model file and config.json (each atomically).

        Under DDP every rank calls this (the RNG states are gathered); rank 0 writes.
        """
        rng_states = self._rng_states()
        if not self.is_main:
            return self.out_dir / ckpt.MODEL_FILE
        tensors: dict[str, torch.Tensor] = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        if self.ema is not None:
            tensors.update({f"ema.{k}": v for k, v in self.ema.shadow.items()})
        opt_tensors, opt_meta = ckpt.flatten_optimizer_state(self.optimizer.state_dict())
        tensors.update(opt_tensors)
        tensors.update(rng_states)
        meta = {
            "kind": TRAIN_STATE_KIND, "step": self.step, "elapsed": self.elapsed,
            "last_loss": self.last_loss if math.isfinite(self.last_loss) else None,
            "config": self.config.to_json(), "model": self.spec, "tasks": self.tasks, "optimizer": opt_meta,
            "ema_updates": self.ema.updates if self.ema is not None else 0, "world_size": self.world_size,
        }
        ckpt.save_tensors(self.out_dir / ckpt.STATE_FILE, tensors, meta)
        config = self.model_config()
        if extra_config:
            config.update(extra_config)
        return ckpt.save_model(self.out_dir, self.inference_state_dict(), config)

    def _rng_states(self) -> dict[str, torch.Tensor]:
        """This process's RNG states; under DDP every rank's (a collective: call it on all ranks).

        Keys: ``rng.torch`` (rank 0), ``rng.torch.rank{r}`` (r > 0), ``rng.cuda.{i}`` (every device of a
        single-process run) or ``rng.cuda.rank{r}`` (the device of rank r).
        """
        if self.world_size == 1:
            states = {"rng.torch": torch.get_rng_state()}
            if self.device.type == "cuda":
                states.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
            return states
        mine = (torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None)
        everyone: list = [None] * self.world_size
        dist.all_gather_object(everyone, mine)
        states = {}
        for r, (cpu, cuda) in enumerate(everyone):
            states["rng.torch" if r == 0 else f"rng.torch.rank{r}"] = cpu
            if cuda is not None:
                states[f"rng.cuda.rank{r}"] = cuda
        return states

    def _set_rng_states(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`_rng_states` saved; a rank the saved run did not have keeps its own seed."""
        key = "rng.torch" if self.rank == 0 else f"rng.torch.rank{self.rank}"
        if key in tensors:
            torch.set_rng_state(tensors[key])
        if self.device.type != "cuda":
            return
        if self.world_size > 1:
            if f"rng.cuda.rank{self.rank}" in tensors:
                torch.cuda.set_rng_state(tensors[f"rng.cuda.rank{self.rank}"], self.device)
            return
        states = [tensors[k] for k in sorted(t for t in tensors if t.startswith("rng.cuda.") and "rank" not in t)]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)

    def load_state(self, path: str | os.PathLike) -> None:
        """Restore everything :meth:`save` wrote (the run's config must match); a collective under DDP."""
        tensors, meta = _read_state(path)
        self._apply_state(tensors, meta, path)

    def _apply_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any], path: str | os.PathLike) -> None:
        if meta.get("kind") != TRAIN_STATE_KIND:
            raise ckpt.CheckpointError(f"{path} is not a cplfast training state")
        if meta.get("model") != self.spec:
            raise ckpt.CheckpointError(f"{path} was written for model {meta.get('model')}, this run builds {self.spec}")
        model_state = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        try:
            self.model.load_state_dict(model_state, strict=True)
            self.optimizer.load_state_dict(ckpt.unflatten_optimizer_state(tensors, meta["optimizer"]))
        except (RuntimeError, KeyError, ValueError) as err:
            raise ckpt.CheckpointError(f"{path} does not fit this model ({str(err).splitlines()[0][:120]})") from None
        if self.ema is not None:
            for k in self.ema.shadow:
                if f"ema.{k}" not in tensors:
                    raise ckpt.CheckpointError(f"{path} lacks the EMA weights")
                self.ema.shadow[k] = tensors[f"ema.{k}"].to(self.device, torch.float32).clone()
            self.ema.updates = int(meta.get("ema_updates", 0))
        self._set_rng_states(tensors)
        self.step = int(meta["step"])
        self.elapsed = float(meta.get("elapsed", 0.0))
        self.last_loss = float(meta.get("last_loss") if meta.get("last_loss") is not None else "nan")

    @classmethod
    def resume(cls, path: str | os.PathLike, *, out_dir: str | os.PathLike | None = None, progress: bool = True,
               dataset: Dataset | None = None, **changes) -> "Trainer":
        """A trainer continuing the run saved at ``path`` (a run folder or its ``train_state.safetensors``).

        ``changes`` may set the fields of :data:`RESUME_CHANGES` (``None`` keeps the saved value): ``steps``
        extends the run, ``time_budget`` gives it more time, ``grad_accum`` re-splits its global batch (e.g.
        on fewer GPUs); the rest do not change the weights. Under DDP only rank 0 reads the file; the run
        may continue on a different number of ranks. When training goes on, the log of ``path`` up to the
        restored step becomes the log of ``out_dir``.
        """
        unknown = sorted(set(changes) - set(RESUME_CHANGES))
        if unknown:
            raise TypeError(f"resume cannot change {unknown}; it can change {list(RESUME_CHANGES)}")
        state_path = train_state_path(path)
        tensors, meta = _read_state(state_path)
        if meta.get("kind") != TRAIN_STATE_KIND or "config" not in meta:
            raise ckpt.CheckpointError(f"{state_path} is not a cplfast training state")
        config = TrainConfig.from_json(meta["config"])
        changes = {name: value for name, value in changes.items() if value is not None}
        if changes.get("time_budget") and config.time_limit is not None:
            changes["time_limit"] = max(config.time_limit, changes["time_budget"])
        config = dataclasses.replace(config, **changes)
        trainer = cls(config, out_dir or state_path.parent, dataset=dataset, progress=progress)
        trainer._apply_state(tensors, meta, state_path)
        trainer._log_source = state_path.parent  # carried over when training goes on (fit)
        return trainer

    # ------------------------------------------------------------------ log
    @property
    def log_path(self) -> Path:
        return self.out_dir / LOG_FILE

    def _log(self, record: dict[str, Any]) -> None:
        """Append one JSON line to ``train_log.jsonl`` (rank 0 only)."""
        if not self.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def _carry_log(self, source_dir: Path) -> None:
        """The log of ``source_dir`` up to the restored step, as this run's log.

        Drops the lines written after the last checkpoint of a crashed run, so the log matches the weights.
        """
        source = Path(source_dir) / LOG_FILE
        if not self.is_main or not source.exists():
            return
        lines = source.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= self.step]
        if len(kept) != len(lines) or source.resolve() != self.log_path.resolve():
            ckpt.atomic_write_bytes(self.log_path, "".join(kept).encode("utf-8"))

    # ------------------------------------------------------------------ training
    def _progress(self, step: int, elapsed: float) -> float:
        return schedule_progress(step, elapsed, self.config)

    def _loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(loss, its terms)`` of one micro-batch; the terms are detached 0-d tensors (no device sync)."""
        x = batch["input"].to(self.device, non_blocking=True)
        y = batch["target"].to(self.device, non_blocking=True)
        labels = batch["task"].to(self.device) if self.config.prompt in ("pip", "dppd") else None
        k = self.config.num_negatives if self.cpr is not None else 0
        negative_args = {}
        if k:
            negative_args["negative_mode"] = self.config.cpr_negatives
            negative_args["negative_grad"] = self.config.cpr_negative_grad
            if "index" in batch:  # per-image seeds: the same negatives on any number of processes
                negative_args["generator"] = torch.tensor(
                    [derive_seed("cpr-negatives", self.config.seed, int(i)) >> 4 for i in batch["index"]])
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_amp):
            out, aux = (self.ddp or self.model)(x, labels=labels, num_negatives=k, return_aux=True, **negative_args)
        self._count_routing(batch["task"], aux.get("routing", {}))
        out = out.float()
        pixel_loss = self.config.pixel_loss_name
        if pixel_loss == "l1":
            pixel = (out - y).abs().mean()
        elif pixel_loss == "smoothl1":
            pixel = F.smooth_l1_loss(out, y, beta=1.0)
        else:  # per-image PSNR loss: each image's gradient is scaled by its own error, as PSNR weighs them
            mse = (out - y).pow(2).flatten(1).mean(1)
            pixel = (10 / math.log(10)) * torch.log(mse + 1e-8).mean()
        parts = {pixel_loss: pixel.detach()}
        loss = pixel
        if k:
            cpr = self.cpr(out, y, aux["negatives"].float())
            loss = loss + cpr
            parts["cpr"] = cpr.detach()
        for name, value in aux.get("losses", {}).items():
            loss = loss + value.float()
            parts[name] = value.detach().float()
        return loss, parts

    def _count_routing(self, tasks: torch.Tensor, routing: dict[str, torch.Tensor]) -> None:
        """Add this micro-batch's chosen prompts per task to the routing-health counts (no device sync)."""
        if not self.config.log_every:
            return
        tasks = tasks.to(self.device, torch.long)
        for key, weights in routing.items():
            weights = weights.detach()
            n = weights.shape[1]
            choice = torch.sort(weights.float(), dim=1, descending=True, stable=True).indices[:, 0]
            counts = self._routing_counts.get(key)
            if counts is None:
                counts = self._routing_counts[key] = torch.zeros(len(self.tasks) * n, dtype=torch.float64,
                                                                 device=weights.device)
            counts.index_add_(0, tasks * n + choice, torch.ones_like(choice, dtype=torch.float64))

    def _routing_health(self) -> dict[str, Any]:
        """Routing health (:func:`cplfast.routing.routing_health`) of the choices since the last log line."""
        from .routing import routing_health

        health = {}
        for key in sorted(self._routing_counts):
            counts = self._routing_counts[key]
            if self.world_size > 1:
                dist.all_reduce(counts)
            health[key] = routing_health(counts.view(len(self.tasks), -1), self.tasks)
        self._routing_counts = {}
        return health

    def _batches(self, stop: int):
        """Micro-batches for steps ``self.step … stop−1`` on this rank (module docstring)."""
        cfg = self.config
        window = _Indexed(Subset(self.dataset, range(self.step * cfg.batch, stop * cfg.batch)),
                          self.step * cfg.batch)
        sampler = DistributedSampler(window, num_replicas=self.world_size, rank=self.rank, shuffle=False, drop_last=True)
        return DataLoader(
            window, batch_size=self.micro_batch, sampler=sampler, num_workers=cfg.workers,
            pin_memory=self.device.type == "cuda", drop_last=True, persistent_workers=False,
        )

    def _rank_mean(self, values: torch.Tensor) -> list[float]:
        """The mean over ranks of each entry of ``values`` (1-D), as floats: one device sync."""
        values = values.double()
        if self.world_size > 1:
            dist.all_reduce(values)
            values = values / self.world_size
        return values.tolist()

    def _synced_progress(self, elapsed: float) -> float:
        """Schedule progress; with a time budget under DDP the slowest clock decides, so all ranks agree."""
        progress = self._progress(self.step, elapsed)
        if self.world_size > 1 and self.config.time_budget:
            t = torch.tensor([progress], dtype=torch.float64, device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            progress = float(t)
        return progress

    def _accumulate_gradients(self, batches) -> dict[str, float]:
        """Forward/backward ``grad_accum`` micro-batches; DDP all-reduces the gradients on the last one.

        Returns the loss terms averaged over micro-batches and ranks (``"loss"`` is their sum).
        """
        accum = self.config.grad_accum
        sums: dict[str, torch.Tensor] = {}
        for j in range(accum):
            batch = next(batches)
            last = j == accum - 1
            with contextlib.nullcontext() if last or self.ddp is None else self.ddp.no_sync():
                loss, parts = self._loss(batch)
                (loss / accum).backward()
            for name, value in {"loss": loss.detach(), **parts}.items():
                sums[name] = sums.get(name, 0.0) + value.float() / accum
        names = list(sums)
        return dict(zip(names, self._rank_mean(torch.stack([sums[n] for n in names]))))

    def fit(self, until: int | None = None) -> TrainResult:
        """Train from the current step to ``config.steps`` (or ``until``, or the time budget)."""
        cfg = self.config
        stop = min(cfg.steps, until) if until is not None else cfg.steps
        self.model.train()
        if self.is_main:
            ckpt.remove_stale_temp_files(self.out_dir)  # left by saves of a killed process
        if self._log_source is not None:
            self._carry_log(self._log_source)
            self._log_source = None
        elif self.step == 0 and self.is_main and self.log_path.exists():
            self.log_path.unlink()  # a fresh run starts its own log, never another (killed) run's
        # Creating the loader's iterator draws its base seed from torch's default generator; fork it so a
        # resumed run's generator (restored from the checkpoint) continues exactly where the saved one was.
        with torch.random.fork_rng(devices=[]):
            batches = iter(self._batches(stop)) if stop > self.step else iter(())
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            if cfg.time_budget:  # the step count depends on speed: show the schedule in percent
                bar = tqdm(total=100, initial=0, desc="train", unit="%", dynamic_ncols=True, leave=True,
                           bar_format="{l_bar}{bar}| {n:.0f}/{total}% [{elapsed}<{remaining}{postfix}]")
            else:
                bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="it", dynamic_ncols=True, leave=True)
        start = time.perf_counter()
        base_elapsed = self.elapsed
        params = [p for p in self.model.parameters() if p.requires_grad]
        stopped_early = False
        logged_step, logged_time = self.step, start
        try:
            while self.step < stop:
                progress = self._synced_progress(base_elapsed + time.perf_counter() - start)
                if progress >= 1.0:
                    stopped_early = self.step < cfg.steps
                    break
                lr = lr_at(progress, cfg)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                self.optimizer.zero_grad(set_to_none=True)
                parts = self._accumulate_gradients(batches)
                loss = parts.pop("loss")
                if not math.isfinite(loss):
                    raise RuntimeError(f"training diverged at step {self.step}: loss is {loss} ({parts})")
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                self.optimizer.step()
                if self.ema is not None:
                    self.ema.update(self.model)
                self.step += 1
                self.last_loss = loss
                self.elapsed = base_elapsed + time.perf_counter() - start
                if bar is not None:
                    step_info = {"step": self.step} if cfg.time_budget else {}
                    bar.set_postfix({**step_info, "loss": f"{self.last_loss:.4f}",
                                     **{k: f"{v:.4f}" for k, v in parts.items()}, "lr": f"{lr:.2e}"}, refresh=False)
                    if cfg.time_budget:
                        bar.update(min(100.0, 100.0 * self._progress(self.step, self.elapsed)) - bar.n)
                    else:
                        bar.update(1)
                if cfg.log_every and (self.step % cfg.log_every == 0 or self.step == stop):
                    now = time.perf_counter()
                    health = self._routing_health()
                    self._log({"step": self.step, "loss": loss, **parts, "lr": lr, "elapsed_s": round(self.elapsed, 3),
                               "images_per_s": round((self.step - logged_step) * cfg.batch / max(now - logged_time, 1e-9), 2),
                               **({"routing_health": health} if health else {})})
                    logged_step, logged_time = self.step, now
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < stop:
                    self.save()
        except KeyboardInterrupt as interrupt:
            if self.world_size == 1 and self.step > 0:  # under DDP the save would be a collective
                self.save()  # --resume continues from this step, not from the last --save-every
                interrupt.cplfast_checkpoint = (self.step, self.out_dir)
            raise
        finally:
            if bar is not None:
                bar.close()
        model_path = self.save()
        return TrainResult(self.out_dir, model_path, self.step, self.elapsed, self.last_loss, stopped_early)


def inference_model(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """``(model in eval mode, config)`` from a cplfast checkpoint (file or run folder).

    Official PromptIR files (``.ckpt``, ``.pth``, ``.pt``) load as the ``base`` PromptIR model.
    """
    path = Path(path)
    if path.is_file() and path.suffix.lower() in ckpt.TORCH_SUFFIXES:
        from .models import PromptIR

        try:
            model = PromptIR.from_official(path)
        except (RuntimeError, ValueError, TypeError) as err:
            raise ckpt.CheckpointError(str(err).splitlines()[0]) from None
        ckpt.check_finite(model.state_dict(), path)
        overrides = {} if model.config.official_unused_layers else {"official_unused_layers": False}
        config = {"model": {"prompt": model.prompt_type, "preset": "base", "top_k": 1, "overrides": overrides},
                  "tasks": [], "official_source": getattr(model, "official_source", None)}
        return model.to(device).eval(), config
    state, config = ckpt.load_model_file(path)
    if not isinstance(config.get("model"), dict):
        raise ckpt.CheckpointError(f"{path} has no model description in its config")
    try:
        model = build_model(config["model"])
    except (TypeError, ValueError) as err:
        raise ckpt.CheckpointError(f"{path}: cannot build its model ({err})") from None
    ckpt.load_weights(model, state, path)
    return model.to(device).eval(), config


def train(config: TrainConfig, out_dir: str | os.PathLike, *, progress: bool = True) -> TrainResult:
    """Train a model from scratch into ``out_dir`` (see :class:`Trainer`)."""
    return Trainer(config, out_dir, progress=progress).fit()


__all__ = ["EMA", "RESUME_CHANGES", "cpu_threads", "TrainConfig", "TrainResult", "Trainer", "build_model", "inference_model", "init_distributed",
           "lr_at", "model_spec", "resolve_device", "schedule_progress", "train"]
