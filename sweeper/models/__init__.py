from sweeper.models.googlenet import (
    MODULES,
    VARIANTS,
    GoogLeNet,
    InceptionCfg,
    UnknownVariant,
    VariantCfg,
    build_model,
    count_macs,
    count_params,
)

__all__ = [
    "MODULES",
    "VARIANTS",
    "GoogLeNet",
    "InceptionCfg",
    "UnknownVariant",
    "VariantCfg",
    "build_model",
    "count_macs",
    "count_params",
]
