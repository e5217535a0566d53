"""manifest.json: what a bundle is, what it runs on, and how each variant was made.

Parsing is strict about what edgepack relies on and lenient about the rest: unknown fields are kept in
``extra`` and written back unchanged, so an older agent can read (and re-serialize) a newer bundle's
manifest as long as its ``format_version`` is one it understands (python-tuf ADR 0008).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from bundles._util import parse_semver, pretty_json
from bundles.errors import ManifestError, UnsupportedError

FORMAT_VERSION = 1
"""Bundle format version written by this edgepack. Readers accept any version <= their own."""

FORMATS = ("onnx", "tflite")
RUNTIMES = ("onnxruntime", "litert")
PRECISIONS = ("fp32", "fp16", "int8")
TASKS = ("classification", "embedding", "regression", "other")


def _req(d: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in d:
        raise ManifestError(f"{where}: missing field {key!r}")
    value = d[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise ManifestError(f"{where}: field {key!r} has the wrong type", expected=names,
                            found=type(value).__name__)
    return value


def _safe_rel(path: str, where: str) -> str:
    if not path or path.startswith("/") or "\\" in path or any(p in ("", ".", "..") for p in path.split("/")):
        raise ManifestError(f"{where}: not a safe relative path inside the bundle", found=path)
    return path


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int | str | None, ...]

    @classmethod
    def from_dict(cls, d: Any, where: str) -> TensorSpec:
        if not isinstance(d, Mapping):
            raise ManifestError(f"{where}: expected an object", found=type(d).__name__)
        shape = _req(d, "shape", list, where)
        for dim in shape:
            if not (dim is None or isinstance(dim, str) or (isinstance(dim, int) and not isinstance(dim, bool))):
                raise ManifestError(f"{where}: shape entries must be int, name or null", found=dim)
        return cls(_req(d, "name", str, where), _req(d, "dtype", str, where), tuple(shape))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class Variant:
    """One model file of the bundle, for one runtime and precision."""

    id: str
    file: str
    format: str
    runtime: str
    precision: str
    extra: dict[str, Any] = field(default_factory=dict)
    """Unmodelled fields (quantization settings, metric, size_bytes, ...), kept verbatim."""

    @classmethod
    def from_dict(cls, d: Any, where: str) -> Variant:
        if not isinstance(d, Mapping):
            raise ManifestError(f"{where}: expected an object", found=type(d).__name__)
        v = cls(
            id=_req(d, "id", str, where),
            file=_safe_rel(_req(d, "file", str, where), where),
            format=_req(d, "format", str, where),
            runtime=_req(d, "runtime", str, where),
            precision=_req(d, "precision", str, where),
            extra={k: val for k, val in d.items() if k not in ("id", "file", "format", "runtime", "precision")},
        )
        for name, value, allowed in (("format", v.format, FORMATS), ("runtime", v.runtime, RUNTIMES),
                                     ("precision", v.precision, PRECISIONS)):
            if value not in allowed:
                raise ManifestError(f"{where}: unknown {name}", expected="|".join(allowed), found=value)
        return v

    def to_dict(self) -> dict[str, Any]:
        return {**self.extra, "id": self.id, "file": self.file, "format": self.format,
                "runtime": self.runtime, "precision": self.precision}


@dataclass(frozen=True)
class Manifest:
    """A parsed manifest. Build with :meth:`from_dict` / :meth:`from_bytes`; never mutate."""

    format_version: int
    name: str
    version: str
    release_counter: int
    hardware_ids: tuple[str, ...]
    platforms: tuple[str, ...]
    runtimes: dict[str, str]
    min_agent_version: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    labels: tuple[str, ...] | None
    task: str
    preprocessing: str
    golden: dict[str, Any]
    variants: tuple[Variant, ...]
    profiles: dict[str, tuple[str, ...]]
    reference_stats: str | None
    provenance: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ManifestError(f"manifest.json is not valid JSON: {exc}") from exc
        return cls.from_dict(doc)

    @classmethod
    def from_dict(cls, d: Any) -> Manifest:
        w = "manifest"
        if not isinstance(d, Mapping):
            raise ManifestError("manifest must be a JSON object", found=type(d).__name__)
        fv = _req(d, "format_version", int, w)
        if fv > FORMAT_VERSION or fv < 1:
            raise UnsupportedError(
                "bundle format version not supported by this edgepack; upgrade edgepack / the agent",
                expected=f"1..{FORMAT_VERSION}", found=fv,
            )
        name = _req(d, "name", str, w)
        if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
            raise ManifestError("manifest: name must be letters, digits, '-', '_' or '.'", found=name)
        version = _req(d, "version", str, w)
        try:
            parse_semver(version)
        except ValueError as exc:
            raise ManifestError(f"manifest: {exc}") from exc
        rc = _req(d, "release_counter", int, w)
        if rc < 0:
            raise ManifestError("manifest: release_counter must be >= 0", found=rc)
        compat = _req(d, "compatibility", dict, w)
        io = _req(d, "io", dict, w)
        golden = _req(d, "golden", dict, w)
        _safe_rel(_req(golden, "file", str, "manifest.golden"), "manifest.golden")
        variants_raw = _req(d, "variants", list, w)
        if not variants_raw:
            raise ManifestError("manifest: at least one variant is required")
        variants = tuple(Variant.from_dict(v, f"manifest.variants[{i}]") for i, v in enumerate(variants_raw))
        ids = [v.id for v in variants]
        if len(set(ids)) != len(ids):
            raise ManifestError("manifest: duplicate variant ids", found=ids)
        profiles_raw = d.get("profiles", {})
        if not isinstance(profiles_raw, Mapping):
            raise ManifestError("manifest: profiles must be an object")
        profiles: dict[str, tuple[str, ...]] = {}
        for prof, order in profiles_raw.items():
            if not isinstance(order, list) or not all(isinstance(x, str) and x in ids for x in order):
                raise ManifestError(f"manifest.profiles[{prof!r}] must list known variant ids",
                                    expected=ids, found=order)
            profiles[str(prof)] = tuple(order)
        labels = io.get("labels")
        if labels is not None and (not isinstance(labels, list) or not all(isinstance(x, str) for x in labels)):
            raise ManifestError("manifest.io.labels must be a list of strings or null")
        runtimes = compat.get("runtimes", {})
        if not isinstance(runtimes, Mapping) or not all(isinstance(v, str) for v in runtimes.values()):
            raise ManifestError("manifest.compatibility.runtimes must map runtime -> version spec")
        hw = d.get("hardware_ids", [])
        platforms = compat.get("platforms", [])
        for label, seq in (("hardware_ids", hw), ("compatibility.platforms", platforms)):
            if not isinstance(seq, list) or not all(isinstance(x, str) for x in seq):
                raise ManifestError(f"manifest.{label} must be a list of strings")
        min_agent = compat.get("min_agent_version", "0.0.0")
        try:
            parse_semver(min_agent)
        except ValueError as exc:
            raise ManifestError(f"manifest.compatibility.min_agent_version: {exc}") from exc
        task = io.get("task", "other")
        if task not in TASKS:
            raise ManifestError("manifest.io.task unknown", expected="|".join(TASKS), found=task)
        ref = d.get("reference_stats")
        known = {"format_version", "name", "version", "release_counter", "hardware_ids", "compatibility", "io",
                 "preprocessing", "golden", "variants", "profiles", "reference_stats", "provenance"}
        return cls(
            format_version=fv, name=name, version=version, release_counter=rc,
            hardware_ids=tuple(hw), platforms=tuple(platforms), runtimes=dict(runtimes),
            min_agent_version=min_agent,
            inputs=tuple(TensorSpec.from_dict(t, "manifest.io.inputs") for t in _req(io, "inputs", list, w)),
            outputs=tuple(TensorSpec.from_dict(t, "manifest.io.outputs") for t in _req(io, "outputs", list, w)),
            labels=tuple(labels) if labels is not None else None, task=task,
            preprocessing=_safe_rel(_req(d, "preprocessing", str, w), w),
            golden=dict(golden), variants=variants, profiles=profiles,
            reference_stats=_safe_rel(ref, w) if isinstance(ref, str) else None,
            provenance=dict(d.get("provenance", {})) if isinstance(d.get("provenance", {}), Mapping) else {},
            extra={k: v for k, v in d.items() if k not in known},
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.extra)
        out.update({
            "format_version": self.format_version, "name": self.name, "version": self.version,
            "release_counter": self.release_counter, "hardware_ids": list(self.hardware_ids),
            "compatibility": {"platforms": list(self.platforms), "runtimes": dict(self.runtimes),
                              "min_agent_version": self.min_agent_version},
            "io": {"inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs],
                   "labels": list(self.labels) if self.labels is not None else None, "task": self.task},
            "preprocessing": self.preprocessing, "golden": dict(self.golden),
            "variants": [v.to_dict() for v in self.variants],
            "profiles": {k: list(v) for k, v in self.profiles.items()},
            "provenance": dict(self.provenance),
        })
        if self.reference_stats is not None:
            out["reference_stats"] = self.reference_stats
        return out

    def to_bytes(self) -> bytes:
        return pretty_json(self.to_dict())

    def variant(self, variant_id: str) -> Variant:
        for v in self.variants:
            if v.id == variant_id:
                return v
        raise ManifestError("no such variant in the manifest", expected=[v.id for v in self.variants],
                            found=variant_id)

    def referenced_files(self) -> set[str]:
        """Every bundle file the manifest points at (must all be present and signed)."""
        files = {self.preprocessing, str(self.golden["file"]), *(v.file for v in self.variants)}
        if self.reference_stats:
            files.add(self.reference_stats)
        return files
