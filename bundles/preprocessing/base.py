"""The op base class, the op registry and the version gate.

Every op is a frozen dataclass: its fields are its parameters (the ones :meth:`Op.fit`
learns included), so an op is plain data that serializes to JSON and back with nothing
lost. The registry maps ``(name, version)`` to a class. A spec step naming an op or a
version this edgepack does not know is refused with :class:`UnsupportedError` that says
which edgepack introduced it (the step's ``since``), because running a different
computation than the one the model was trained with would silently give wrong answers.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

from bundles.errors import PreprocessingError, UnsupportedError
from edgepack import __version__

#: Version of the spec format as a whole (the envelope: ``opset``/``input``/``steps``/``output``).
OPSET_VERSION = 1

KINDS = ("image", "tabular", "text")

_REGISTRY: dict[str, dict[int, type[Op]]] = {}

OpT = TypeVar("OpT", bound="type[Op]")


def register(cls: OpT) -> OpT:
    """Class decorator: make an op findable by ``(name, version)``."""
    versions = _REGISTRY.setdefault(cls.name, {})
    if cls.version in versions:
        raise RuntimeError(f"op {cls.name!r} v{cls.version} registered twice")
    versions[cls.version] = cls
    return cls


def registered_ops() -> dict[str, tuple[int, ...]]:
    """Op name -> the versions this edgepack can run, e.g. ``{"resize": (1,)}``."""
    return {name: tuple(sorted(versions)) for name, versions in sorted(_REGISTRY.items())}


class Op(ABC):
    """One preprocessing step. Subclasses are ``@dataclass(frozen=True)`` and ``@register``-ed.

    Invariant: ``type(op).from_dict(op.to_dict(), op.resources()) == op``.
    """

    name: ClassVar[str]
    version: ClassVar[int]
    since: ClassVar[str]
    #: Input kinds of pipeline this op may appear in.
    kinds: ClassVar[frozenset[str]] = frozenset(KINDS)
    #: Fields that never go into ``params`` (resource payloads, caches).
    private_fields: ClassVar[frozenset[str]] = frozenset()

    @abstractmethod
    def apply(self, value: object) -> object:
        """Transform one batch. Raises PreprocessingError on an input it cannot take."""

    def fit(self, value: object) -> Op:
        """Return a copy with parameters learned from ``value``; ops that learn nothing return self."""
        return self

    @property
    def fitted(self) -> bool:
        """False while a parameter that :meth:`fit` learns is still unset."""
        return True

    def resources(self) -> dict[str, bytes]:
        """Files this op needs carried in the bundle, name -> content."""
        return {}

    def params(self) -> dict[str, Any]:
        """JSON-ready parameters (tuples become lists)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if f.name not in self.private_fields:
                out[f.name] = _jsonable(getattr(self, f.name))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.name, "version": self.version, "since": self.since, "params": self.params()}

    @classmethod
    def from_params(cls, params: Mapping[str, object], resources: Mapping[str, bytes]) -> Op:
        """Build from spec parameters; unknown or missing parameters are refused."""
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in cls.private_fields}  # type: ignore[arg-type]
        unknown = sorted(set(params) - set(fields))
        if unknown:
            raise PreprocessingError(
                f"op {cls.name!r} v{cls.version}: unknown parameter(s) {unknown}",
                expected=f"parameters among {sorted(fields)}",
            )
        missing = sorted(
            name
            for name, f in fields.items()
            if name not in params
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        )
        if missing:
            raise PreprocessingError(f"op {cls.name!r} v{cls.version}: missing parameter(s) {missing}")
        return cls._build(dict(params), resources)

    @classmethod
    def _build(cls, params: dict[str, object], resources: Mapping[str, bytes]) -> Op:
        """Construct from checked parameters; ops that carry resources override this."""
        return cls(**params)

    def check_fitted(self) -> None:
        if not self.fitted:
            raise PreprocessingError(
                f"op {self.name!r} is not fitted: call Pipeline.fit on training data before transform"
            )


def _jsonable(value: object) -> object:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def _needs(since: object) -> str:
    if isinstance(since, str) and since and len(since) <= 32:
        return f"edgepack >= {since}"
    return "a newer edgepack"


def check_opset(opset: object) -> int:
    """Accept a spec's ``opset`` this edgepack understands, refuse a newer one."""
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < 1:
        raise PreprocessingError("spec 'opset' must be a positive integer", found=repr(opset)[:80])
    if opset > OPSET_VERSION:
        raise UnsupportedError(
            f"preprocessing opset {opset} needs a newer edgepack; this is {__version__} "
            f"(opset {OPSET_VERSION}): upgrade the agent",
            expected=f"opset <= {OPSET_VERSION}",
            found=opset,
        )
    return opset


def op_from_dict(step: object, resources: Mapping[str, bytes]) -> Op:
    """Build one op from its spec step ``{"op", "version", "since", "params"}``."""
    if not isinstance(step, Mapping):
        raise PreprocessingError("a spec step must be an object", found=type(step).__name__)
    unknown = sorted(str(k) for k in step if k not in ("op", "version", "since", "params"))
    if unknown:
        raise PreprocessingError(
            f"spec step has unknown key(s) {unknown}", expected="op, version, since, params"
        )
    name, version, since = step.get("op"), step.get("version"), step.get("since")
    params = step.get("params", {})
    if not isinstance(name, str) or not name:
        raise PreprocessingError("spec step needs an 'op' name", found=repr(name)[:80])
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise PreprocessingError(
            f"op {name!r}: 'version' must be a positive integer", found=repr(version)[:80]
        )
    if not isinstance(params, Mapping) or not all(isinstance(k, str) for k in params):
        raise PreprocessingError(f"op {name!r}: 'params' must be an object", found=type(params).__name__)
    versions = _REGISTRY.get(name)
    if versions is None or version not in versions:
        raise UnsupportedError(
            f"op {name[:64]!r} v{version} needs {_needs(since)}; this is {__version__}: upgrade the agent",
            expected=f"versions {sorted(versions)} of {name[:64]!r}"
            if versions
            else "an op this agent knows",
            found=f"{name[:64]!r} v{version}",
        )
    return versions[version].from_params(params, resources)
