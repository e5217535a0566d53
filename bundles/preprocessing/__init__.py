"""Preprocessing shared by training and device: same code, same features.

Public surface::

    from bundles.preprocessing import Pipeline, OPSET_VERSION, registered_ops

The ops live in ``image_ops``, ``array_ops``, ``tabular_ops`` and ``text_ops``; importing
this package registers them all. Only NumPy is needed, plus ``tokenizers`` for the
tokenize op (imported on first use) and Pillow for JPEG (optional).
"""

from __future__ import annotations

from bundles.preprocessing.array_ops import Cast, Clip, ExpandDims, Reshape, Scale
from bundles.preprocessing.base import OPSET_VERSION, Op, registered_ops
from bundles.preprocessing.image_ops import CenterCrop, Decode, Layout, Normalize, Resize
from bundles.preprocessing.pipeline import Pipeline
from bundles.preprocessing.table import Table
from bundles.preprocessing.tabular_ops import Impute, OneHot, SelectColumns, StandardScale
from bundles.preprocessing.text_ops import Tokenize

__all__ = [
    "OPSET_VERSION",
    "Cast",
    "CenterCrop",
    "Clip",
    "Decode",
    "ExpandDims",
    "Impute",
    "Layout",
    "Normalize",
    "OneHot",
    "Op",
    "Pipeline",
    "Reshape",
    "Resize",
    "Scale",
    "SelectColumns",
    "StandardScale",
    "Table",
    "Tokenize",
    "registered_ops",
]
