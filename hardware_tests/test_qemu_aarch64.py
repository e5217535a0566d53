"""linux-aarch64 smoke run of the device agent under qemu-user emulation.

What it shows: the real agent, on the aarch64 Python with the aarch64 wheels a Raspberry Pi-class device
installs, enrolls with the real update server, receives the signed digits bundle through the real protocol
(director assignment, TUF image repository, per-file downloads), verifies it against its trust roots, picks
the onnxruntime variant for its profile, passes the golden-vector self-test in its worker, activates it and
answers predictions on its local API that match x86 onnxruntime running the same variant here.

The emulated root is a Debian bookworm arm64 made by ``hardware_tests/qemu/setup_rootfs.sh``
(debootstrap + Debian's qemu-user-static), emulating a Cortex-A72 (the Pi 4's core) by default. The chroot
shares the host's network: the agent reaches the server on 127.0.0.1 and the test reaches the agent's API.

Not part of the default ``pytest`` run (``testpaths = ["tests"]``); run it explicitly::

    sudo hardware_tests/qemu/setup_rootfs.sh           # once, 4-7 min on 2 cores
    sudo python -m pytest hardware_tests/test_qemu_aarch64.py -v -s

Skipped, with the reason, when the root has not been built or this is not root (chroot and mount need it).
With ``EDGEPACK_QEMU_ROOTFS`` set, a missing root is an error instead of a skip: setting it says "I expect
this to run".
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import struct
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from hardware_tests.harness import (
    DIGITS_BUNDLE,
    DIGITS_KEYS,
    AgentProcess,
    LocalServer,
    agent_pid,
    bundle_manifest,
    resign_bundle,
    rss_mb,
)

QEMU_DIR = Path(__file__).resolve().parent / "qemu"
DEFAULT_ROOTFS = Path("/var/cache/edgepack/aarch64-rootfs")
VENV_PYTHON = Path("opt/edgepack/venv/bin/python")
#: fp32 kernels on NEON and AVX differ in the last bits; a wrong model or kernel is orders of magnitude off.
PROBABILITY_ATOL = 1e-5
#: Emulation runs Python 10-30x slower than the host; every step gets that much room.
INSTALL_TIMEOUT_S = 1200.0
SAMPLES = 300
#: The digits example's Pi 4 profile ships tflite-int8 with tflite-fp32 as its fp32 fallback. The emulated root
#: has no LiteRT (its subject is the aarch64 onnxruntime wheel), so the smoke bundle is the example's files
#: re-signed with onnx-fp32 as the fallback instead: the agent must skip tflite-int8 and pick onnx-fp32. fp32
#: also makes "same answer as x86" a tight check (int8 kernels may differ by a quantization step across ISAs).
RPI4_PROFILE = ["tflite-int8", "onnx-fp32"]
SMOKE_VARIANT = "onnx-fp32"

# e_machine values from the ELF specification.
_ELF_MACHINES = {62: "x86_64", 183: "aarch64", 40: "arm"}


def elf_machine(path: Path) -> str:
    """The architecture an ELF shared object was built for (e_machine at offset 18)."""
    header = path.read_bytes()[:20]
    if header[:4] != b"\x7fELF":
        raise ValueError(f"{path} is not an ELF file (starts with {header[:4]!r})")
    (machine,) = struct.unpack_from("<H", header, 18)
    return _ELF_MACHINES.get(machine, f"e_machine={machine}")


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
    missing = [m for m in ("fastapi", "uvicorn", "sqlalchemy", "sklearn") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"the host side needs the update server and scikit-learn's digits ({', '.join(missing)} "
                    "missing): pip install 'edgepack[server,build]'")
    if not DIGITS_BUNDLE.is_file():
        pytest.skip(f"no digits bundle at {DIGITS_BUNDLE}: build it with "
                    "`python -m edgepack.cli build -c examples/digits/edgepack.toml`")
    return rootfs


def _mapped_onnxruntime(pid: int) -> Path:
    """The onnxruntime extension module mapped by a (qemu-run) process: the guest's file, seen from the host."""
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        path = line.split(maxsplit=5)[-1] if len(line.split()) >= 6 else ""
        if "onnxruntime_pybind11_state" in path:
            return Path(path)
    raise AssertionError(f"process {pid} has no onnxruntime extension mapped")


def _smoke_bundle(workdir: Path) -> Path:
    keys = workdir / "keys"
    shutil.copytree(DIGITS_KEYS, keys)  # signing writes the key set's cumulative targets metadata
    m = bundle_manifest(DIGITS_BUNDLE)
    profiles = dict(m["profiles"], rpi4=RPI4_PROFILE)
    return resign_bundle(DIGITS_BUNDLE, keys, workdir / "digits-cnn-aarch64.edgepack", version="1.0.1-aarch64",
                         release_counter=int(m["release_counter"]) + 1, profiles=profiles)


def _x86_answer(bundle: Path, trust: Path, variant_id: str, images: np.ndarray, workdir: Path) -> np.ndarray:
    """The same bundle verified here, its preprocessing and variant run by the x86 onnxruntime."""
    from bundles.runtime import load_runner
    from bundles.selftest import load_pipeline
    from bundles.trust import TrustStore
    from bundles.verify import verify_archive

    vb = verify_archive(bundle, TrustStore.open(workdir / "x86-trust", initial_root=trust / "root.json"),
                        workdir / "x86-bundle", hardware_id="rpi4")
    features = load_pipeline(vb).transform(images)
    variant = vb.manifest.variant(variant_id)
    runner = load_runner(vb.path(variant.file), variant.runtime)
    (probs,) = runner.run({name: features[name] for name in runner.input_names}).values()
    return np.asarray(probs)


def test_agent_serves_digits_bundle_on_aarch64(tmp_path: Path,
                                               record_property: Callable[[str, object], None]) -> None:
    rootfs = _rootfs()
    import onnxruntime as ort
    from sklearn.datasets import load_digits

    started = time.perf_counter()
    bundle = _smoke_bundle(tmp_path)
    trust = tmp_path / "keys" / "trust"
    server = LocalServer(tmp_path / "keys", tmp_path / "server")
    data = tmp_path / "data"
    data.mkdir()
    agent = AgentProcess(
        data, "qemu-aarch64-1", "rpi4", server.url, trust, guest_home="/data",
        launcher=[str(QEMU_DIR / "run_in_aarch64.sh"), str(rootfs), "--data", str(data), "--", "python"],
        sections={"worker": {"start_timeout_s": 900.0}, "trial": {"period_s": 3.0, "health_interval_s": 2.0},
                  "api": {"prediction_timeout_s": 300.0}, "server": {"request_timeout_s": 120.0}})
    try:
        assert server.push(bundle)
        agent.enroll(server.enrollment_token(), timeout=INSTALL_TIMEOUT_S)
        enrolled = time.perf_counter()
        agent.start()
        m = bundle_manifest(bundle)
        rollout = server.roll_out(m["name"], m["version"], agent.device_id)
        status = agent.wait_serving(m["version"], INSTALL_TIMEOUT_S)
        serving_at = time.perf_counter()
        server.wait_rollout(rollout)

        digits = load_digits()
        images = digits.images[-SAMPLES:].astype(np.float32)
        t0 = time.perf_counter()
        with agent.client(timeout=300) as client:
            answer = client.predict(images.tolist())
        predict_s = time.perf_counter() - t0
        guest_probs = np.asarray(next(iter(answer["outputs"].values())), dtype=np.float32)
        guest_labels = [int(x) for x in answer["predictions"]]

        view = server.device(agent.device_id)
        worker_pid = int(status["worker"]["pid"])
        native = _mapped_onnxruntime(worker_pid)
        (activated,) = agent.events("activated")
        (verified,) = agent.events("verified")
        memory = {"agent": rss_mb(agent_pid(agent)), "worker": rss_mb(worker_pid)}
    finally:
        agent.stop(timeout=120)
        server.stop()

    host_probs = _x86_answer(bundle, trust, status["serving"]["variant"], images, tmp_path)
    host_labels = host_probs.argmax(axis=1).tolist()
    max_diff = float(np.max(np.abs(guest_probs - host_probs)))
    report = {
        "variant": status["serving"]["variant"], "why": verified["why"], "platform": view["platform"],
        "runtimes": view["runtimes"], "onnxruntime_native_elf": elf_machine(native),
        "samples": SAMPLES, "label_agreement": float(np.mean(np.asarray(guest_labels) == host_labels)),
        "accuracy": float(np.mean(np.asarray(guest_labels) == digits.target[-SAMPLES:])),
        "max_abs_probability_diff": max_diff, "agent_timings": activated["timings"],
        "enroll_s": round(enrolled - started, 1), "rollout_to_serving_s": round(serving_at - enrolled, 1),
        "predict_300_s": round(predict_s, 2), "memory": memory, "total_s": round(time.perf_counter() - started, 1),
        "qemu_cpu": os.environ.get("EDGEPACK_QEMU_CPU", "cortex-a72"),
    }
    print(f"\nqemu aarch64 smoke: {json.dumps(report)}")
    for key, value in report.items():
        record_property(key, value)

    assert view["platform"] == "linux-aarch64", view
    assert report["onnxruntime_native_elf"] == "aarch64", native
    assert view["runtimes"] == {"onnxruntime": ort.__version__}, (
        f"guest runtimes {view['runtimes']} != host onnxruntime {ort.__version__}: update "
        "hardware_tests/qemu/requirements-aarch64.txt and rerun setup_rootfs.sh")
    assert status["serving"]["variant"] == SMOKE_VARIANT, verified
    assert "skipped tflite-int8 (runtime litert not installed)" in verified["why"], verified
    assert answer["model"]["version"] == m["version"] and report["accuracy"] > 0.9, report
    assert guest_labels == host_labels
    np.testing.assert_allclose(guest_probs, host_probs, rtol=0, atol=PROBABILITY_ATOL)
