"""``edgepack build``: convert, quantize, evaluate, choose per device profile, sign.

Public surface (heavy libraries are imported only inside the functions that need them)::

    from converter import load_spec, build
    report = build(load_spec(Path("edgepack.toml")))
"""

from __future__ import annotations

from typing import Any

from converter.errors import ConverterError
from converter.spec import BuildSpec, load_spec


def build(spec: BuildSpec, **kwargs: Any) -> dict[str, Any]:
    """Run a build (see :func:`converter.builder.build`)."""
    from converter.builder import build as _build

    return _build(spec, **kwargs)


__all__ = ["BuildSpec", "ConverterError", "build", "load_spec"]
