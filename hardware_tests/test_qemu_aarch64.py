"""linux-aarch64 smoke run under qemu-user emulation.

What it shows: the aarch64 wheels a Raspberry Pi-class device installs (onnxruntime, numpy) load a
digits model and answer the same predictions as the x86 onnxruntime on the workstation. It runs in a
Debian bookworm arm64 root made by ``hardware_tests/qemu/setup_rootfs.sh`` (debootstrap + Debian's
qemu-user-static), emulating a Cortex-A72 (the Pi 4's core) by default.

Not part of the default ``pytest`` run (``testpaths = ["tests"]``); run it explicitly::

    sudo hardware_tests/qemu/setup_rootfs.sh           # once, 4-7 min on 2 cores
    sudo python -m pytest hardware_tests/test_qemu_aarch64.py -v -s

It is skipped, with the reason, when the root has not been built or this is not root (chroot and
mount need it). With ``EDGEPACK_QEMU_ROOTFS`` set, a missing root is an error instead of a skip:
setting it says "I expect this to run".

The model is, for now, a small MLP trained here on scikit-learn's bundled digits and converted with
skl2onnx. ``run_bundle_smoke`` is the one place that changes when the device agent can verify and
serve a signed bundle; see its docstring.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

QEMU_DIR = Path(__file__).resolve().parent / "qemu"
DEFAULT_ROOTFS = Path("/var/cache/edgepack/aarch64-rootfs")
VENV_PYTHON = Path("opt/edgepack/venv/bin/python")
# Probabilities from NEON and AVX kernels differ in the last bits of float32; a real divergence
# (wrong weights, a broken kernel) is orders of magnitude larger.
PROBABILITY_ATOL = 1e-5
SMOKE_TIMEOUT_S = 900


def _rootfs() -> Path:
    """The emulated root to use, or skip with what to do to get one."""
    explicit = os.environ.get("EDGEPACK_QEMU_ROOTFS")
    rootfs = Path(explicit) if explicit else DEFAULT_ROOTFS
    if not (rootfs / VENV_PYTHON).exists():
        message = (
            f"no aarch64 root with a venv at {rootfs}; build it with "
            f"`sudo {QEMU_DIR / 'setup_rootfs.sh'} {rootfs}` (4-7 minutes on 2 cores)"
        )
        if explicit:
            pytest.fail(f"EDGEPACK_QEMU_ROOTFS is set but {message}", pytrace=False)
        pytest.skip(message)
    if os.geteuid() != 0:
        pytest.skip("the qemu smoke run chroots into the aarch64 root and mounts /proc in it: run as root")
    return rootfs


@dataclass(frozen=True)
class SmokeResult:
    """What the emulated device answered, and where it says it ran."""

    labels: np.ndarray
    probabilities: np.ndarray
    info: dict[str, object]
    seconds: float


def run_bundle_smoke(
    bundle: Path, trust_root: Path | None, inputs: np.ndarray, *, rootfs: Path, workdir: Path
) -> SmokeResult:
    """Have the emulated aarch64 device load ``bundle`` and answer predictions for ``inputs``.

    TODO(agent): this is the seam to switch to the real device agent. Today ``bundle`` is a bare
    ONNX file, ``trust_root`` is None and the guest side is ``hardware_tests/qemu/guest_predict.py``
    (onnxruntime directly). When ``python -m device_agent`` can install and serve a signed bundle,
    ``bundle`` becomes the signed digits bundle, ``trust_root`` the root.json it is verified against,
    and this body runs, through the same ``run_in_aarch64.sh ROOTFS --data WORKDIR -- ...``, the
    agent's verify + self-test + predict path, then reads its answer back into a ``SmokeResult``.
    The callers and the assertions stay as they are.
    """
    if trust_root is not None:
        raise NotImplementedError("signed bundles go through the device agent, which is not wired in yet")
    data = workdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "model.onnx").write_bytes(bundle.read_bytes())
    np.save(data / "inputs.npy", inputs.astype(np.float32))
    command = [
        str(QEMU_DIR / "run_in_aarch64.sh"),
        str(rootfs),
        "--data",
        str(data),
        "--",
        "python",
        "/edgepack/hardware_tests/qemu/guest_predict.py",
        "/data/model.onnx",
        "/data/inputs.npy",
        "/data/out",
    ]
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True, timeout=SMOKE_TIMEOUT_S)
    seconds = time.perf_counter() - started
    if completed.returncode != 0:
        raise AssertionError(
            f"the emulated run exited with {completed.returncode}\n"
            f"stdout:\n{completed.stdout}\nstderr:\n{completed.stderr}"
        )
    info = json.loads((data / "out" / "info.json").read_text())
    with np.load(data / "out" / "outputs.npz") as outputs:
        return SmokeResult(labels=outputs["label"], probabilities=outputs["probabilities"], info=info, seconds=seconds)


@dataclass(frozen=True)
class DigitsModel:
    onnx_path: Path
    test_inputs: np.ndarray
    test_targets: np.ndarray


def _train_digits_model(directory: Path) -> DigitsModel:
    """A small MLP on the 8x8 digits scikit-learn ships (no download), converted to ONNX."""
    from skl2onnx import to_onnx
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier

    digits = load_digits()
    features = (digits.data / 16.0).astype(np.float32)
    train_x, test_x, train_y, test_y = train_test_split(
        features, digits.target, test_size=300, random_state=0, stratify=digits.target
    )
    classifier = MLPClassifier(hidden_layer_sizes=(32,), max_iter=1000, random_state=0).fit(train_x, train_y)
    onnx_model = to_onnx(classifier, train_x[:1], options={id(classifier): {"zipmap": False}}, target_opset=17)
    path = directory / "digits-mlp.onnx"
    path.write_bytes(onnx_model.SerializeToString())
    return DigitsModel(onnx_path=path, test_inputs=test_x, test_targets=test_y)


def test_aarch64_onnxruntime_answers_like_x86(tmp_path: Path, record_property: Callable[[str, object], None]) -> None:
    rootfs = _rootfs()
    import onnxruntime as ort

    model = _train_digits_model(tmp_path)
    host = ort.InferenceSession(str(model.onnx_path), providers=["CPUExecutionProvider"])
    host_labels, host_probabilities = host.run(["label", "probabilities"], {"X": model.test_inputs})
    host_accuracy = float(np.mean(host_labels == model.test_targets))
    assert host_accuracy > 0.9, f"the digits model itself is broken: accuracy {host_accuracy:.3f} on x86"

    result = run_bundle_smoke(model.onnx_path, None, model.test_inputs, rootfs=rootfs, workdir=tmp_path)

    assert result.info["machine"] == "aarch64", result.info
    assert result.info["onnxruntime_native_elf"] == "aarch64", result.info
    assert result.info["onnxruntime"] == ort.__version__, (
        f"guest onnxruntime {result.info['onnxruntime']} != host {ort.__version__}: "
        "update hardware_tests/qemu/requirements-aarch64.txt and rerun setup_rootfs.sh"
    )
    max_diff = float(np.max(np.abs(result.probabilities - host_probabilities)))
    label_agreement = float(np.mean(result.labels == host_labels))
    report = {
        "samples": len(model.test_inputs),
        "label_agreement": label_agreement,
        "max_abs_probability_diff": max_diff,
        "host_accuracy": host_accuracy,
        "smoke_seconds": round(result.seconds, 1),
        "guest_seconds": result.info["seconds"],
        "qemu_cpu": os.environ.get("EDGEPACK_QEMU_CPU", "cortex-a72"),
    }
    print(f"\nqemu aarch64 smoke: {json.dumps(report)}")
    for key, value in report.items():
        record_property(key, value)
    np.testing.assert_array_equal(result.labels, host_labels)
    np.testing.assert_allclose(result.probabilities, host_probabilities, rtol=0, atol=PROBABILITY_ATOL)
