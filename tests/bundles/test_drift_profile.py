"""Drift profiles (bundles/drift.py): what the converter writes for each kind of model, and that the device's
vectorized counting bins exactly as the reference does."""

from __future__ import annotations

import numpy as np
import pytest

from bundles.drift import DriftCounter, DriftProfile, bin_counts, build_profile, feature_values


def test_tabular_profile_counts_like_the_reference_and_round_trips() -> None:
    rng = np.random.default_rng(0)
    ref = np.column_stack([rng.normal(size=500), rng.integers(0, 3, 500), np.zeros(500)]).astype(np.float32)
    profile = build_profile({"x": ref}, {}, first_input="x", task="regression")
    assert [f.name for f in profile.features] == ["x[0]", "x[1]", "x[2]"]
    assert len(profile.features[0].edges) == 9  # deciles of a continuous feature
    assert profile.features[2].edges == (0.0,) and profile.features[2].expected == (1.0, 0.0)  # a constant
    again = DriftProfile.from_dict(profile.to_dict())
    assert again == profile and again.digest == profile.digest
    live = (ref[:200] + np.float32(0.5)).astype(np.float32)
    counter = DriftCounter(profile)
    for i in range(0, 200, 7):  # batches of several sizes
        counter.observe({"x": live[i:i + 7]}, {})
    hist = counter.take()
    assert hist is not None and hist["samples"] == 200 and hist["profile"] == profile.digest
    for f, counts in zip(profile.features, hist["counts"], strict=True):
        values = feature_values(f, {"x": live}, {})
        assert values is not None
        assert counts == bin_counts(f.edges, values).tolist()
    assert counter.take() is None  # taken: nothing until new inputs


def test_text_profile_uses_token_lengths_and_embedding_norms() -> None:
    rng = np.random.default_rng(1)
    lengths = rng.integers(3, 40, 300)
    mask = (np.arange(64)[None, :] < lengths[:, None]).astype(np.int64)
    ids = mask * rng.integers(100, 30000, (300, 64))
    emb = rng.normal(size=(300, 384)).astype(np.float32)
    profile = build_profile({"input_ids": ids, "attention_mask": mask}, {"sentence_embedding": emb},
                            first_input="input_ids", task="embedding")
    assert [(f.name, f.source) for f in profile.features] == [("token_length", "token_length"),
                                                              ("embedding_norm", "output_norm")]
    counter = DriftCounter(profile)
    counter.observe({"input_ids": ids[:50], "attention_mask": mask[:50]}, {"sentence_embedding": emb[:50]})
    hist = counter.take()
    assert hist is not None and hist["samples"] == 50 and [sum(c) for c in hist["counts"]] == [50, 50]


def test_wide_inputs_are_pooled() -> None:
    images = np.random.default_rng(2).random((20, 3, 32, 32)).astype(np.float32)
    profile = build_profile({"pixels": images}, {}, first_input="pixels", task="classification")
    assert [(f.name, f.index) for f in profile.features] == [("pixels[*]", None)]
    counter = DriftCounter(profile)
    counter.observe({"pixels": images[:4]}, {})
    hist = counter.take()
    assert hist is not None and hist["samples"] == 4 and sum(hist["counts"][0]) == 4 * 3 * 32 * 32


@pytest.mark.parametrize(("change", "message"), [
    ({"format": 2}, "format 2 is not supported"),
    ({"features": []}, "has no features"),
    ({"features": [{"name": "a", "source": "pixels", "tensor": "x", "index": 0, "edges": [1.0],
                    "expected": [0.5, 0.5]}]}, "unknown source"),
    ({"features": [{"name": "a", "source": "input", "tensor": "x", "index": 0, "edges": [2.0, 1.0],
                    "expected": [0.3, 0.3, 0.4]}]}, "strictly growing edges"),
])
def test_a_bad_profile_is_refused_with_what_is_wrong(change: dict[str, object], message: str) -> None:
    good = build_profile({"x": np.arange(10, dtype=np.float32)[:, None]}, {}, first_input="x",
                         task="regression").to_dict()
    with pytest.raises(ValueError, match=message):
        DriftProfile.from_dict({**good, **change})
