"""Answer predictions with onnxruntime inside the emulated aarch64 root (stand-in for the agent).

Runs on the guest side of the linux-aarch64 smoke run (hardware_tests/test_qemu_aarch64.py), started
through run_in_aarch64.sh, until the device agent can load a signed bundle itself; then the test runs
`python -m device_agent ...` instead and this file goes. It imports only numpy and onnxruntime, the
two packages whose aarch64 wheels are under test, and reports enough about where it ran (machine,
the ELF machine of the loaded onnxruntime extension, versions) for the host to check that the answer
came from aarch64 code and not from an x86 fallback.

    python guest_predict.py MODEL.onnx INPUTS.npy OUT_DIR   # writes OUT_DIR/outputs.npz, OUT_DIR/info.json
"""

from __future__ import annotations

import argparse
import json
import platform
import struct
import sys
import time
from pathlib import Path

# e_machine values from the ELF specification, for the report.
_ELF_MACHINES = {62: "x86_64", 183: "aarch64", 40: "arm"}


def elf_machine(path: Path) -> str:
    """Name the architecture an ELF shared object was built for (e_machine at offset 18)."""
    header = path.read_bytes()[:20]
    if header[:4] != b"\x7fELF":
        raise ValueError(f"{path} is not an ELF file (starts with {header[:4]!r})")
    (machine,) = struct.unpack_from("<H", header, 18)
    return _ELF_MACHINES.get(machine, f"e_machine={machine}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("inputs", type=Path, help=".npy float32 array, one row per sample")
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)

    started = time.perf_counter()
    import numpy as np
    import onnxruntime as ort
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_native

    imported = time.perf_counter()
    session = ort.InferenceSession(str(args.model), providers=["CPUExecutionProvider"])
    loaded = time.perf_counter()
    inputs = np.load(args.inputs)
    (input_meta,) = session.get_inputs()
    names = [output.name for output in session.get_outputs()]
    results = session.run(names, {input_meta.name: inputs.astype(np.float32)})
    answered = time.perf_counter()

    args.out_dir.mkdir(parents=True, exist_ok=True)
    np.savez(args.out_dir / "outputs.npz", **dict(zip(names, results, strict=True)))
    info = {
        "machine": platform.machine(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": ort.__version__,
        "providers": session.get_providers(),
        "onnxruntime_native": str(ort_native.__file__),
        "onnxruntime_native_elf": elf_machine(Path(str(ort_native.__file__))),
        "outputs": names,
        "seconds": {
            "import": round(imported - started, 3),
            "load": round(loaded - imported, 3),
            "predict": round(answered - loaded, 3),
        },
    }
    (args.out_dir / "info.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
