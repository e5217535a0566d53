"""The two examples build, verify, pass their golden vectors through real runtimes; builds are reproducible.

Slow (TensorFlow training / torch export), run in CI.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.converter.conftest import REPO, run_build, variant

pytestmark = pytest.mark.slow


def _verify_and_selftest(report: dict[str, Any], keys: Path, dest: Path) -> dict[str, str]:
    from bundles.selftest import run_golden
    from bundles.trust import TrustStore
    from bundles.verify import verify_archive

    trust = TrustStore.from_root_file(keys / "trust" / "root.json")
    bundle = verify_archive(Path(report["bundle"]["path"]), trust, dest)
    assert bundle.content_digest == report["bundle"]["content_digest"]
    runtimes = {}
    for v in bundle.manifest.variants:
        run_golden(bundle, v.id)  # preprocessing parity + outputs within tolerance, real runtime
        runtimes[v.id] = v.runtime
    return runtimes


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from rich.console import Console

    root = tmp_path_factory.mktemp("digits")
    shutil.copytree(REPO / "examples" / "digits", root / "ex",
                    ignore=shutil.ignore_patterns("out", "keys", "__pycache__"))
    console = Console(file=open(root / "log.txt", "w"), width=150)  # noqa: SIM115
    report = run_build(root / "ex" / "edgepack.toml", console)
    return {"root": root, "report": report, "console": console}


# Both digits tests share the module's build: under `--dist loadgroup` the group keeps them on one worker, so
# the example is built once, not once per worker.
@pytest.mark.xdist_group("digits-example")
def test_digits_builds_verifies_and_golden_runs_on_onnxruntime_and_litert(digits: dict[str, Any]) -> None:
    report, root = digits["report"], digits["root"]
    assert report["status"] == "ok", report["errors"]
    runtimes = _verify_and_selftest(report, root / "ex" / "keys", root / "verified")
    assert set(runtimes.values()) == {"onnxruntime", "litert"}
    for vid in ("onnx-int8", "tflite-int8"):
        v = variant(report, vid)
        assert v["status"] == "shipped"
        assert v["drop"] <= 0.005          # issue goal: at most 0.5 accuracy points lost
        assert v["quantization"].get("float_ops", []) == []
    # fp16 is built and measured but no CPU profile ships it
    assert variant(report, "onnx-fp16")["status"] == "passed"
    assert report["profiles"]["rpi4"]["ship"][0] == "tflite-int8"
    assert report["profiles"]["x86-kiosk"]["ship"][0] == "onnx-int8"
    out = root / "ex" / "out"
    assert (out / "build-report.json").is_file() and (out / "build-report.md").is_file()


@pytest.mark.xdist_group("digits-example")
def test_digits_build_is_deterministic(digits: dict[str, Any], tmp_path: Path) -> None:
    """Same inputs, same package versions -> same content digest, with a different key set."""
    first = digits["report"]
    again = run_build(digits["root"] / "ex" / "edgepack.toml", digits["console"],
                      {"output.dir": str(tmp_path / "out2"), "signing.keys": str(tmp_path / "keys2")})
    assert again["status"] == "ok", again["errors"]
    assert again["bundle"]["content_digest"] == first["bundle"]["content_digest"]
    assert again["manifest"] == first["manifest"]


def test_minilm_builds_within_goals(tmp_path: Path) -> None:
    from rich.console import Console

    shutil.copytree(REPO / "examples" / "minilm", tmp_path / "ex",
                    ignore=shutil.ignore_patterns("out", "keys", "__pycache__"))
    console = Console(file=open(tmp_path / "log.txt", "w"), width=150)  # noqa: SIM115
    # fp16 is left out (nothing here asserts on it; the digits build covers fp16) and latency is sampled
    # less: the assertions are about accuracy, size and the golden vectors.
    report = run_build(tmp_path / "ex" / "edgepack.toml", console,
                       {"variants.build": ["onnx-fp32", "onnx-int8-dynamic"], "output.latency_runs": 10})
    assert report["status"] == "ok", report["errors"]
    int8 = variant(report, "onnx-int8-dynamic")
    assert int8["status"] == "shipped"
    assert int8["value"] >= 0.99             # mean cosine to the fp32 embeddings
    assert int8["smaller_x"] >= 3.0
    runtimes = _verify_and_selftest(report, tmp_path / "ex" / "keys", tmp_path / "verified")
    assert runtimes == {"onnx-int8-dynamic": "onnxruntime", "onnx-fp32": "onnxruntime"}
