"""Degradations, datasets and image I/O for all-in-one restoration (SPEC §6)."""

from .datasets import (
    DegradationDataset,
    PairedFolderDataset,
    TaskMixture,
    TensorPairs,
    embedded_eval_dataset,
    embedded_train_dataset,
    find_pair_layout,
    folder_dataset,
    pair_folders,
    promptir_dataset,
    random_crop,
)
from .degradations import (
    COMPOSITE_TASKS,
    NOISE_SIGMAS,
    SINGLE_DEGRADATIONS,
    TASKS,
    apply_degradation,
    defocus_blur,
    degrade,
    depth_proxy,
    derive_seed,
    gaussian_noise,
    haze,
    low_light,
    make_generator,
    motion_blur,
    parse_task,
    rain_streaks,
    sample_parameters,
)
from .embedded import EVAL_IMAGES, TRAIN_IMAGES, embedded_images
from .io import IMAGE_EXTENSIONS, is_image_file, list_images, load_image, save_image

__all__ = [
    "COMPOSITE_TASKS", "DegradationDataset", "EVAL_IMAGES", "IMAGE_EXTENSIONS", "NOISE_SIGMAS", "PairedFolderDataset",
    "SINGLE_DEGRADATIONS", "TASKS", "TRAIN_IMAGES", "TaskMixture", "TensorPairs", "apply_degradation", "defocus_blur",
    "degrade", "depth_proxy", "derive_seed", "embedded_eval_dataset", "embedded_images", "embedded_train_dataset",
    "find_pair_layout", "folder_dataset", "gaussian_noise", "haze", "is_image_file", "list_images", "load_image",
    "low_light", "make_generator", "motion_blur", "pair_folders", "parse_task", "promptir_dataset", "rain_streaks",
    "random_crop", "sample_parameters", "save_image",
]
