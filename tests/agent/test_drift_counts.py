"""The agent's worker counts its inputs into the bundle's drift profile, and only counts leave it.

A real worker process loads a real signed digits bundle and serves real predictions; its ``stats`` answer
(what the agent puts in each telemetry window) is compared with the reference by the server's drift code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from bundles.keys import KeyStore
from bundles.trust import TrustStore
from bundles.verify import verify_archive
from device_agent.supervisor import WorkerProcess
from tests.support.factories import digits_data, make_digits_bundle, reference_profile
from update_server.drift import compare


def _worker_stats(proc: WorkerProcess, rows: np.ndarray) -> dict[str, Any]:
    for i in range(0, len(rows), 50):  # 50 inputs a request, as a kiosk batching frames would
        answer = proc.call({"op": "predict", "body": json.dumps({"inputs": rows[i:i + 50].tolist()}).encode(),
                            "prediction_id": f"p{i}"}, 30)
        assert answer.get("status") == 200, answer
    stats = proc.call({"op": "stats"}, 30)["input_stats"]
    assert stats is not None
    return dict(stats)


def test_worker_counts_inputs_against_the_reference_and_sends_no_input(keys: KeyStore, tmp_path: Path) -> None:
    info = make_digits_bundle(keys, tmp_path / "digits.edgepack")
    verified = verify_archive(info.path, TrustStore.from_root_file(keys.root_path), tmp_path / "bundle")
    images, _ = digits_data()
    steady = images[1200:1700]                        # raw 8x8 images, values 0..16: what a kiosk camera gives
    faint = np.round(images[1200:1700] * 0.6)         # the same digits, fainter ink (a smudged lens)
    proc = WorkerProcess()
    try:
        proc.wait_ready(60)
        loaded = proc.call({"op": "load", "dir": str(verified.directory), "variant": "onnx-fp32",
                            "files": {rel: (t.length, t.hashes["sha256"]) for rel, t in verified.files.items()},
                            "ident": {"name": "digits", "version": "1.0.0"}}, 60)
        assert loaded.get("ok"), loaded
        results = {}
        for name, rows in (("steady", steady), ("faint", faint)):
            stats = _worker_stats(proc, rows)
            hist = stats["hist"]
            assert hist["samples"] == len(rows)
            assert len(hist["counts"]) == 64 and all(sum(row) == len(rows) for row in hist["counts"])
            text = json.dumps(stats)
            assert set(stats) == {"count", "mean", "std", "min", "max", "hist"}  # aggregates only
            assert len(text) < 8000, len(text)                                 # a few kB a window
            results[name] = compare(reference_profile(), hist["counts"], hist["samples"], 500)
    finally:
        proc.stop()
    from bundles.drift import DriftProfile

    assert hist["profile"] == DriftProfile.from_dict(reference_profile()).digest
    assert results["steady"].value is not None and results["steady"].value < 0.25, results["steady"]
    assert results["faint"].value is not None and results["faint"].value > 0.25, results["faint"]
