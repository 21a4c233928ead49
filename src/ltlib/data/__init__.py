"""Long-tailed data: canonical subsets, image pools, samplers, transforms and the LightningDataModule."""

from ltlib.data.datamodule import AUTO_VAL_PER_CLASS, VAL_SHORTFALLS, LongTailDataModule, PoolDataset
from ltlib.data.long_tail import (
    PROFILES,
    LongTailSplit,
    indices_hash,
    long_tail_counts,
    long_tail_split,
    select_long_tail,
)
from ltlib.data.pools import (
    IMAGE_EXTENSIONS,
    ArrayPool,
    FilePool,
    ImagePool,
    cifar_pools,
    digits_pools,
    file_list_pools,
    image_folder_pools,
)
from ltlib.data.samplers import (
    ClassAwareSampler,
    ClassBalancedSampler,
    EvalShardSampler,
    MultiStreamDataset,
    ReversedSampler,
    SquareRootSampler,
    StreamSampler,
    UniformSampler,
    create_sampler,
    list_samplers,
    mix_seed,
)
from ltlib.data.transforms import TRANSFORM_KINDS, build_transforms

__all__ = [
    "AUTO_VAL_PER_CLASS",
    "IMAGE_EXTENSIONS",
    "PROFILES",
    "TRANSFORM_KINDS",
    "VAL_SHORTFALLS",
    "ArrayPool",
    "ClassAwareSampler",
    "ClassBalancedSampler",
    "EvalShardSampler",
    "FilePool",
    "ImagePool",
    "LongTailDataModule",
    "LongTailSplit",
    "MultiStreamDataset",
    "PoolDataset",
    "ReversedSampler",
    "SquareRootSampler",
    "StreamSampler",
    "UniformSampler",
    "build_transforms",
    "cifar_pools",
    "create_sampler",
    "digits_pools",
    "file_list_pools",
    "image_folder_pools",
    "indices_hash",
    "list_samplers",
    "long_tail_counts",
    "long_tail_split",
    "mix_seed",
    "select_long_tail",
]
