"""Run a verified bundle's golden vectors: preprocessing parity, then each variant's outputs.

Used by the agent's self-test before activation, by ``edgepack verify --selftest`` and by the tests.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

import numpy as np

from bundles.errors import FormatError
from bundles.golden import Golden, check_features, check_outputs, tolerances
from bundles.runtime import Runner, load_runner

if TYPE_CHECKING:  # keeps TUF and cryptography out of processes that only run golden vectors (the worker)
    from bundles.verify import VerifiedBundle


class BundleResources(Mapping[str, bytes]):
    """Read-only, lazy view of a verified bundle's files, handed to the preprocessing pipeline."""

    def __init__(self, bundle: VerifiedBundle) -> None:
        self._bundle = bundle

    def __getitem__(self, key: str) -> bytes:
        if key not in self._bundle.files:
            raise KeyError(key)
        return self._bundle.path(key).read_bytes()

    def __iter__(self) -> Iterator[str]:
        return iter(self._bundle.files)

    def __len__(self) -> int:
        return len(self._bundle.files)


def load_pipeline(bundle: VerifiedBundle):  # type: ignore[no-untyped-def]  # Pipeline type lives in preprocessing
    """The bundle's preprocessing pipeline, with its resources (tokenizer.json, ...) from the bundle."""
    from bundles.preprocessing import Pipeline

    try:
        spec = json.loads(bundle.path(bundle.manifest.preprocessing).read_bytes())
    except json.JSONDecodeError as exc:
        raise FormatError(f"preprocessing spec is not JSON: {exc}", path=bundle.manifest.preprocessing) from exc
    return Pipeline.from_dict(spec, BundleResources(bundle))


def load_golden(bundle: VerifiedBundle) -> Golden:
    return Golden.from_bytes(bundle.path(str(bundle.manifest.golden["file"])).read_bytes())


def run_golden(bundle: VerifiedBundle, variant_id: str, runner: Runner | None = None) -> dict[str, np.ndarray]:
    """Check preprocessing and ``variant_id`` against the golden vectors; return the model outputs.

    Raises GoldenMismatchError (a VerificationError) with what differed, or a runtime/preprocessing error.
    """
    golden = load_golden(bundle)
    pipeline = load_pipeline(bundle)
    features = pipeline.transform(golden.raw_inputs())
    check_features(golden, features, float(bundle.manifest.golden.get("features_atol", 1e-5)))
    variant = bundle.manifest.variant(variant_id)
    if runner is None:
        runner = load_runner(bundle.path(variant.file), variant.runtime)
    feeds = {name: golden.features.get(name, features.get(name)) for name in runner.input_names}
    outputs = runner.run(feeds)
    atol, rtol = tolerances(bundle.manifest.golden, variant_id)
    check_outputs(golden, variant_id, outputs, atol, rtol)
    return outputs
