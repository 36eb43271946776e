"""Datasets for all-in-one restoration.

Every dataset yields ``{"input": (3,H,W), "target": (3,H,W), "task": int, "name": str}`` float32 in
[0,1] and has a ``tasks`` attribute (task names; ``"task"`` indexes it).

Training datasets with a ``patch`` size are *index-addressed*: item ``i`` is a pure function of
``(seed, i)`` — which image, where the crop is, the flip/rotation and the degradation parameters —
for every non-negative ``i`` (``len`` is only a nominal epoch). Step ``s`` of a training run with
batch ``B`` reads items ``s·B … s·B+B−1``, so resuming at a step reproduces the data exactly without
saving any loader state.

Layouts:

- :class:`DegradationDataset`: clean images (tensors or files) + on-the-fly synthetic degradations.
- :class:`PairedFolderDataset`: ``root/input/`` and ``root/target/`` with matching names (also the
  pairings ``rainy/gt`` with ``rain-N``/``norain-N``, ``synthetic|hazy/original|clear|gt`` with
  ``NAME_x_y``/``NAME``, ``low/high`` and ``blur/sharp``).
- :func:`promptir_dataset`: the PromptIR / AirNet trees (``Train/Denoise``, ``Train/Derain``,
  ``Train/Dehaze``, …; ``test/denoise/<set>``, ``test/derain/<set>``, …).
- :func:`embedded_train_dataset` / :func:`embedded_eval_dataset`: the scikit-image photographs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .degradations import TASKS, degrade, derive_seed, parse_task
from .embedded import embedded_images, eval_crop_boxes
from .io import check_image_file, list_images, load_image

# Folder names of the PromptIR / AirNet trees (lower case) -> cplfast task names.
TASK_FOLDERS = {
    "denoise": "noise", "noise": "noise", "derain": "rain", "rain": "rain", "dehaze": "haze", "haze": "haze",
    "deblur": "blur", "blur": "blur", "enhance": "lowlight", "lowlight": "lowlight", "low_light": "lowlight",
    "low-light": "lowlight", "lol": "lowlight",
}
# (degraded folder, clean folder) pairs recognised inside a task folder, in priority order.
PAIR_FOLDERS = (
    ("input", "target"), ("input", "gt"), ("rainy", "gt"), ("rain", "norain"), ("synthetic", "original"),
    ("hazy", "gt"), ("hazy", "clear"), ("hazy", "original"), ("low", "high"), ("blur", "sharp"),
    ("degraded", "clean"), ("lq", "gt"),
)


def _dihedral(image: torch.Tensor, code: int) -> torch.Tensor:
    """One of the 8 flips/rotations of ``(C,H,W)``: bit 0 flips left-right, bits 1-2 rotate by 90°."""
    if code & 1:
        image = image.flip(-1)
    return torch.rot90(image, code >> 1, dims=(-2, -1)) if code >> 1 else image


def _pad_to(image: torch.Tensor, size: int) -> torch.Tensor:
    h, w = image.shape[-2:]
    ph, pw = max(0, size - h), max(0, size - w)
    if ph == 0 and pw == 0:
        return image
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(image[None], (0, pw, 0, ph), mode=mode)[0]


def random_crop(images: Sequence[torch.Tensor], size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """The same random ``size``×``size`` crop of aligned images (padded by reflection if smaller)."""
    images = [_pad_to(im, size) for im in images]
    h, w = images[0].shape[-2:]
    y = int(torch.randint(h - size + 1, (), generator=generator))
    x = int(torch.randint(w - size + 1, (), generator=generator))
    return [im[..., y : y + size, x : x + size] for im in images]


def _check_patch(patch: int | None) -> None:
    if patch is not None and (isinstance(patch, bool) or not isinstance(patch, int) or patch < 8):
        raise ValueError(f"patch must be an int >= 8 or None, got {patch!r}")


class _ImageSource:
    """A list of images given as tensors or paths, loaded lazily with a small cache."""

    def __init__(self, images: Sequence[torch.Tensor | str | os.PathLike], names: Sequence[str] | None = None):
        if len(images) == 0:
            raise ValueError("images must not be empty")
        self.items = list(images)
        self.names = list(names) if names is not None else [
            Path(i).stem if not isinstance(i, torch.Tensor) else f"image{k}" for k, i in enumerate(self.items)
        ]
        self._cache: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.items)

    def get(self, i: int) -> torch.Tensor:
        item = self.items[i]
        if isinstance(item, torch.Tensor):
            if item.dim() != 3 or item.shape[0] != 3:
                raise ValueError(f"images[{i}] must have shape (3,H,W), got {tuple(item.shape)}")
            return item
        if i not in self._cache:
            if len(self._cache) >= 64:
                self._cache.pop(next(iter(self._cache)))
            self._cache[i] = load_image(item)
        return self._cache[i]


class DegradationDataset(Dataset):
    """Clean images degraded on the fly by ``tasks`` (single names or composites).

    With ``patch``: item ``i`` is task ``tasks[i % T]`` (batches stay balanced) on a random crop of
    a random image with a random flip/rotation (``augment``), all drawn from ``seed`` and ``i``.
    Without ``patch``: a finite set of ``len(images) × T`` whole images, item ``i`` = image ``i // T``
    with task ``i % T``.
    """

    def __init__(
        self,
        images: Sequence[torch.Tensor | str | os.PathLike],
        tasks: Sequence[str] = TASKS,
        *,
        patch: int | None = 64,
        seed: int = 0,
        augment: bool = True,
        names: Sequence[str] | None = None,
        epoch_size: int | None = None,
    ):
        _check_patch(patch)
        self.tasks = [str(t) for t in tasks]
        if not self.tasks:
            raise ValueError("tasks must not be empty")
        for t in self.tasks:
            parse_task(t)
        self.source = _ImageSource(images, names)
        self.patch = patch
        self.seed = int(seed)
        self.augment = bool(augment)
        self.epoch_size = epoch_size or len(self.source) * len(self.tasks) * (100 if patch else 1)

    def __len__(self) -> int:
        return self.epoch_size if self.patch else len(self.source) * len(self.tasks)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if index < 0 or (self.patch is None and index >= len(self)):
            raise IndexError(f"index {index} out of range")
        g = torch.Generator().manual_seed(derive_seed("degradation-dataset", self.seed, index))
        t = index % len(self.tasks)
        if self.patch:
            k = int(torch.randint(len(self.source), (), generator=g))
            (clean,) = random_crop([self.source.get(k)], self.patch, g)
            if self.augment:
                clean = _dihedral(clean, int(torch.randint(8, (), generator=g)))
        else:
            k = index // len(self.tasks)
            clean = self.source.get(k)
        clean = clean.contiguous()
        return {"input": degrade(clean, self.tasks[t], g), "target": clean, "task": t, "name": self.source.names[k]}


def _norm(name: str) -> str:
    return name.lower()


def _find_subdir(folder: Path, name: str) -> Path | None:
    for child in folder.iterdir():
        if child.is_dir() and _norm(child.name) == name:
            return child
    return None


def match_target(input_path: Path, targets: dict[str, Path]) -> Path | None:
    """The clean file of a degraded one: same stem, ``rain-N`` -> ``norain-N``, or ``NAME_x_y`` -> ``NAME``."""
    stem = input_path.stem
    candidates = [stem]
    if stem.startswith("rain-"):
        candidates.append("no" + stem)
    if "_" in stem:
        candidates.append(stem.split("_")[0])
    for c in candidates:
        if c in targets:
            return targets[c]
    return None


def pair_folders(input_dir: str | os.PathLike, target_dir: str | os.PathLike, recursive: bool = True) -> list[tuple[Path, Path]]:
    """``[(degraded, clean), ...]`` matched by name between two folders (see :func:`match_target`)."""
    inputs = list_images(input_dir, recursive=recursive)
    targets = {p.stem: p for p in list_images(target_dir, recursive=recursive)}
    pairs = []
    for p in inputs:
        t = match_target(p, targets)
        if t is not None:
            pairs.append((p, t))
    if not pairs:
        raise ValueError(
            f"no matching image pairs between {input_dir} ({len(inputs)} images) and {target_dir} ({len(targets)} images)"
        )
    return pairs


def find_pair_layout(folder: str | os.PathLike) -> tuple[Path, Path] | None:
    """The (degraded, clean) sub-folders of ``folder`` if it has a recognised pair layout."""
    folder = Path(folder)
    for a, b in PAIR_FOLDERS:
        da, db = _find_subdir(folder, a), _find_subdir(folder, b)
        if da is not None and db is not None:
            return da, db
    return None


class PairedFolderDataset(Dataset):
    """Aligned degraded/clean pairs from ``root/input`` + ``root/target`` (or another pair layout).

    Without ``patch`` the dataset is finite (whole images, in name order); with ``patch`` it is
    index-addressed: epoch ``i // n`` shuffles the pairs with ``seed``, then a random crop and flip.
    """

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        *,
        pairs: Sequence[tuple[Path, Path]] | None = None,
        task: str = "custom",
        patch: int | None = None,
        seed: int = 0,
        augment: bool = True,
    ):
        _check_patch(patch)
        if pairs is None:
            if root is None:
                raise ValueError("give root or pairs")
            root = Path(root)
            if not root.is_dir():
                raise FileNotFoundError(f"no such folder: {root}")
            layout = find_pair_layout(root)
            if layout is None:
                raise ValueError(f"{root} has no input/ and target/ folders (nor another known degraded/clean pair)")
            pairs = pair_folders(*layout)
        self.pairs = [(Path(a), Path(b)) for a, b in pairs]
        self.tasks = [task]
        self.patch = patch
        self.seed = int(seed)
        self.augment = bool(augment)

    def __len__(self) -> int:
        return len(self.pairs)

    def _load(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.pairs[k]
        degraded, clean = load_image(a), load_image(b)
        if degraded.shape != clean.shape:
            raise ValueError(f"{a.name} is {tuple(degraded.shape[1:])} but its target {b.name} is {tuple(clean.shape[1:])}")
        return degraded, clean

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        n = len(self.pairs)
        if self.patch is None:
            if not 0 <= index < n:
                raise IndexError(f"index {index} out of range")
            degraded, clean = self._load(index)
            return {"input": degraded, "target": clean, "task": 0, "name": self.pairs[index][0].stem}
        if index < 0:
            raise IndexError(f"index {index} out of range")
        epoch_gen = torch.Generator().manual_seed(derive_seed("paired-epoch", self.seed, index // n))
        k = int(torch.randperm(n, generator=epoch_gen)[index % n])
        g = torch.Generator().manual_seed(derive_seed("paired-item", self.seed, index))
        degraded, clean = random_crop(self._load(k), self.patch, g)
        if self.augment:
            code = int(torch.randint(8, (), generator=g))
            degraded, clean = _dihedral(degraded, code), _dihedral(clean, code)
        return {"input": degraded.contiguous(), "target": clean.contiguous(), "task": 0, "name": self.pairs[k][0].stem}


class TaskMixture(Dataset):
    """Several single-task datasets as one multi-task dataset.

    Index-addressed sources (``patch`` set): item ``i`` comes from source ``i % S`` at index ``i // S``
    (balanced batches). Finite sources: concatenated in order.
    """

    def __init__(self, sources: Sequence[tuple[str, Dataset]], infinite: bool):
        if not sources:
            raise ValueError("sources must not be empty")
        self.tasks: list[str] = []
        self.sources = []
        for task, ds in sources:
            if task not in self.tasks:
                self.tasks.append(task)
            self.sources.append((self.tasks.index(task), ds))
        self.infinite = infinite
        self._offsets = []
        total = 0
        for _, ds in self.sources:
            self._offsets.append(total)
            total += len(ds)
        self._total = total

    def __len__(self) -> int:
        return self._total

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if self.infinite:
            t, ds = self.sources[index % len(self.sources)]
            item = ds[index // len(self.sources)]
        else:
            if not 0 <= index < self._total:
                raise IndexError(f"index {index} out of range")
            s = max(i for i, off in enumerate(self._offsets) if off <= index)
            t, ds = self.sources[s]
            item = ds[index - self._offsets[s]]
        return {**item, "task": t}


def _task_sources(task_dir: Path, task: str, *, patch, seed, augment, test_noise_sigmas) -> list[tuple[str, Dataset]]:
    """The datasets of one PromptIR task folder (pairs, clean-only noise folders, or per-set sub-folders)."""
    layout = find_pair_layout(task_dir)
    if layout is not None:
        return [(task, PairedFolderDataset(pairs=pair_folders(*layout), task=task, patch=patch, seed=seed, augment=augment))]
    clean = list_images(task_dir)
    if clean and task == "noise":
        if patch:
            return [("noise", DegradationDataset(clean, ("noise",), patch=patch, seed=seed, augment=augment))]
        return [
            (f"noise{s}", DegradationDataset(clean, (f"noise{s}",), patch=None, seed=seed)) for s in test_noise_sigmas
        ]
    sources = []
    for sub in sorted(p for p in task_dir.iterdir() if p.is_dir()):
        sub_sources = _task_sources(sub, task, patch=patch, seed=seed, augment=augment, test_noise_sigmas=test_noise_sigmas)
        if patch is None:  # test sets keep their own names: rain/Rain100L
            sub_sources = [(f"{name}/{sub.name}", ds) for name, ds in sub_sources]
        sources += sub_sources
    return sources


def promptir_dataset(
    root: str | os.PathLike,
    *,
    patch: int | None = None,
    seed: int = 0,
    augment: bool = True,
    tasks: Sequence[str] | None = None,
    test_noise_sigmas: Sequence[int] = (15, 25, 50),
) -> TaskMixture:
    """A PromptIR / AirNet data tree as a :class:`TaskMixture`.

    ``root`` may be the tree's top (containing ``Train``/``test``) or one split folder. Task folders
    (``Denoise``, ``Derain``, ``Dehaze``, ``Deblur``, ``Enhance``, case-insensitive) hold either a pair
    layout, clean images (denoising: noise is added on the fly; σ 15/25/50 as separate test tasks),
    or one sub-folder per benchmark set. ``tasks`` keeps only the named tasks (``noise``, ``rain``, …).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no such folder: {root}")
    split_name = "train" if patch else "test"
    split_dir = _find_subdir(root, split_name) or root
    found = []
    for child in sorted(split_dir.iterdir()):
        task = TASK_FOLDERS.get(_norm(child.name))
        if child.is_dir() and task is not None and (tasks is None or task in tasks):
            found += _task_sources(child, task, patch=patch, seed=seed, augment=augment, test_noise_sigmas=test_noise_sigmas)
    if not found:
        raise ValueError(
            f"{root} has no PromptIR/AirNet task folders (Denoise, Derain, Dehaze, Deblur, Enhance) with images"
        )
    return TaskMixture(found, infinite=bool(patch))


def folder_dataset(
    root: str | os.PathLike, *, patch: int | None = None, seed: int = 0, augment: bool = True, tasks: Sequence[str] | None = None,
) -> Dataset:
    """Open a data folder whatever its layout: a pair layout (``input/``+``target/`` …), a PromptIR /
    AirNet tree (every task folder in it), or a folder of clean images (degraded on the fly by
    ``tasks``, default all five)."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"no such folder: {root}")
    if not root.is_dir():
        raise ValueError(f"--data must be a folder, got a file: {root}")
    if find_pair_layout(root) is not None:
        task = TASK_FOLDERS.get(_norm(root.name), root.name)
        return PairedFolderDataset(root, task=task, patch=patch, seed=seed, augment=augment)
    try:
        return promptir_dataset(root, patch=patch, seed=seed, augment=augment)
    except ValueError:
        pass
    clean = list_images(root)
    if not clean:
        raise ValueError(
            f"{root} holds no images, no input/+target/ pair folders and no PromptIR/AirNet task folders"
        )
    return DegradationDataset(clean, tuple(tasks or TASKS), patch=patch, seed=seed, augment=augment)


def _validate_leaf(ds: Dataset, min_side: int) -> list[tuple[Path, str]]:
    bad: list[tuple[Path, str]] = []
    if isinstance(ds, PairedFolderDataset):
        kept = []
        for a, b in ds.pairs:
            reason = check_image_file(a, min_side=min_side) or check_image_file(b, min_side=min_side)
            if reason is None:
                from .io import read_image

                sa, sb = read_image(a)[0].shape, read_image(b)[0].shape
                if sa != sb:
                    reason = f"{a.name} is {tuple(sa[1:])} but its target {b.name} is {tuple(sb[1:])}"
            if reason is None:
                kept.append((a, b))
            else:
                bad.append((a, reason))
        ds.pairs = kept
    elif isinstance(ds, DegradationDataset):
        src = ds.source
        keep = []
        for k, item in enumerate(src.items):
            reason = None if isinstance(item, torch.Tensor) else check_image_file(item, min_side=min_side)
            if reason is None:
                keep.append(k)
            else:
                bad.append((Path(item), reason))
        if len(keep) != len(src.items):
            old = len(src.items)
            src.items = [src.items[k] for k in keep]
            src.names = [src.names[k] for k in keep]
            src._cache.clear()
            if ds.patch and ds.epoch_size == old * len(ds.tasks) * 100:
                ds.epoch_size = len(src.items) * len(ds.tasks) * 100
    return bad


def _dataset_size(ds: Dataset) -> int:
    if isinstance(ds, PairedFolderDataset):
        return len(ds.pairs)
    if isinstance(ds, DegradationDataset):
        return len(ds.source.items)
    return len(ds)


def validate_dataset(dataset: Dataset, *, min_side: int = 1) -> list[tuple[Path, str]]:
    """Decode every image file of a folder dataset once, before training or evaluation starts.

    Unreadable images, images smaller than ``min_side`` pixels and mismatched pairs are removed from
    ``dataset`` (in place) and returned as ``(path, reason)``; a ValueError if nothing usable is left.
    """
    bad: list[tuple[Path, str]] = []
    if isinstance(dataset, TaskMixture):
        sources = []
        for t, ds in dataset.sources:
            bad += _validate_leaf(ds, min_side)
            if _dataset_size(ds):
                sources.append((t, ds))
        dataset.sources = sources
        dataset._offsets, total = [], 0
        for _, ds in sources:
            dataset._offsets.append(total)
            total += len(ds)
        dataset._total = total
        empty = not sources
    else:
        bad += _validate_leaf(dataset, min_side)
        empty = _dataset_size(dataset) == 0
    if empty:
        first = f" (e.g. {bad[0][1]})" if bad else ""
        raise ValueError(f"no usable images left after skipping {len(bad)} bad file(s){first}")
    return bad


def embedded_train_dataset(tasks: Sequence[str] = TASKS, *, patch: int = 64, seed: int = 0, max_side: int = 512) -> DegradationDataset:
    """Random training crops of the embedded training photographs, degraded by ``tasks``."""
    names, images = zip(*embedded_images("train", max_side))
    return DegradationDataset(list(images), tasks, patch=patch, seed=seed, names=list(names))


class TensorPairs(Dataset):
    """A fixed list of ``(input, target, task, name)`` items."""

    def __init__(self, items: Sequence[dict], tasks: Sequence[str]):
        self.items = list(items)
        self.tasks = list(tasks)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def embedded_eval_dataset(
    tasks: Sequence[str] = TASKS, *, crop: int = 128, crops_per_image: int = 4, seed: int = 1234, max_side: int = 512
) -> TensorPairs:
    """Held-out evaluation crops: ``crops_per_image`` evenly spread ``crop``² boxes of each held-out
    photograph, the same boxes for every task, each degraded with a seed fixed by (seed, task, box)."""
    items = []
    images = embedded_images("eval", max_side)
    for t, task in enumerate(tasks):
        parse_task(task)
        for name, image in images:
            for y, x in eval_crop_boxes(image.shape[1], image.shape[2], crop, crops_per_image):
                clean = image[:, y : y + crop, x : x + crop].contiguous()
                g = torch.Generator().manual_seed(derive_seed("embedded-eval", seed, task, name, y, x))
                items.append({"input": degrade(clean, task, g), "target": clean, "task": t, "name": f"{name}_{y}_{x}"})
    return TensorPairs(items, tasks)


__all__ = [
    "DegradationDataset", "PairedFolderDataset", "TaskMixture", "TensorPairs", "embedded_eval_dataset",
    "embedded_train_dataset", "find_pair_layout", "folder_dataset", "match_target", "pair_folders", "promptir_dataset",
    "random_crop",
]
