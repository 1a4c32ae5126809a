"""Data: real datasets (:mod:`.datasets`), synthetic npz shards (:mod:`.synthetic`) and the device-side
loader that augments and mixes them (:mod:`.loader`). Every public name is re-exported here, so
``from cdp_fast.data import X`` works for all of them.
"""
from .datasets import (
    DATASETS,
    DEFAULTS,
    DatasetDefaults,
    ImageData,
    as_float01,
    balanced_subset,
    canonical_name,
    dataset_defaults,
    defaults_for,
    load_dataset,
    read_cifar_batch,
    read_idx,
    to_float,
    to_uint8,
    write_idx,
)
from .loader import DeviceLoader, augment_batch, random_crop, random_flip
from .synthetic import (
    CONSOLIDATED_DIR,
    SyntheticStore,
    consolidate_synthetic,
    default_cache_dir,
    load_synthetic,
    save_synthetic,
    shard_files,
)

__all__ = [
    "DATASETS", "DEFAULTS", "DatasetDefaults", "defaults_for", "ImageData", "load_dataset", "dataset_defaults",
    "canonical_name", "balanced_subset",
    "read_idx", "write_idx", "read_cifar_batch", "load_synthetic", "save_synthetic",
    "to_float", "as_float01", "to_uint8", "random_crop", "random_flip", "augment_batch", "DeviceLoader",
    "SyntheticStore", "consolidate_synthetic", "default_cache_dir", "shard_files", "CONSOLIDATED_DIR",
]
