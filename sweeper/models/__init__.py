from sweeper.contract import MODULES, VARIANTS, InceptionCfg, VariantCfg, count_macs
from sweeper.models.googlenet import GoogLeNet, UnknownVariant, build_model, count_params

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
