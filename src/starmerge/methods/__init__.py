"""Merge methods: importing this package registers every method in ``METHODS``."""

from starmerge.methods.base import METHODS, Merged, Method, Param, register_method

# Importing the modules registers the methods (order = order in `starmerge methods`).
from starmerge.methods import (  # noqa: E402,F401  isort: skip
    simple_average,
    task_arithmetic,
    ties,
    tall_masks,
    metagpt,
    star,
    mats,
    fisher_regmean,
    localize_stitch,
    tsv_m,
    iso,
    cart,
    wudi,
    linear,
    dare,
    breadcrumbs,
    della,
    sce,
    slerp,
    multislerp,
    karcher,
    model_stock,
    nearswap,
    arcee_fusion,
    ram,
)

__all__ = ["METHODS", "Merged", "Method", "Param", "register_method"]
