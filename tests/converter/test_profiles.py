"""Which variants a profile ships: a pure decision, tested with tables of candidates."""

from __future__ import annotations

import pytest

from converter.errors import SpecError
from converter.profiles import BUILTIN_PROFILES, Candidate, decide, profile_from_dict


def cands(*specs: tuple[str, bool], latency: dict[str, float] | None = None) -> list[Candidate]:
    out = []
    for vid, passed in specs:
        fmt, prec = vid.split("-", 1)
        out.append(Candidate(vid, "onnxruntime" if fmt == "onnx" else "litert",
                             "int8" if prec.startswith("int8") else prec, passed, 1000,
                             (latency or {}).get(vid)))
    return out


ALL = [("onnx-fp32", True), ("onnx-fp16", True), ("onnx-int8", True), ("tflite-fp32", True),
       ("tflite-fp16", True), ("tflite-int8", True)]


@pytest.mark.parametrize(
    ("profile", "candidates", "ship"),
    [
        ("rpi4", ALL, ("tflite-int8", "tflite-fp32")),
        ("rpi5", ALL, ("tflite-int8", "tflite-fp32")),
        ("x86-kiosk", ALL, ("onnx-int8", "onnx-fp32")),
        # a refused int8 falls back to fp32 alone
        ("rpi4", [("tflite-int8", False), ("tflite-fp32", True)], ("tflite-fp32",)),
        # no litert variants: the Pi takes the ONNX ones
        ("rpi4", [("onnx-int8", True), ("onnx-fp32", True)], ("onnx-int8", "onnx-fp32")),
        # fp16 alone is never shipped to a CPU profile
        ("x86-kiosk", [("onnx-fp16", True)], ()),
        # the kiosk has only onnxruntime
        ("x86-kiosk", [("tflite-int8", True)], ()),
    ],
)
def test_builtin_profiles(profile: str, candidates: list, ship: tuple) -> None:
    decision = decide(BUILTIN_PROFILES[profile], cands(*candidates))
    assert decision.ship == ship
    for vid, _ in candidates:
        assert vid in ship or vid in decision.excluded


def test_fp16_excluded_with_reason_on_cpu_profiles() -> None:
    d = decide(BUILTIN_PROFILES["rpi5"], cands(*ALL))
    assert "no fp16 compute" in d.excluded["onnx-fp16"]


def test_the_fp16_note_quotes_what_this_build_measured_not_a_fixed_claim() -> None:
    """A note must not say "fp16 is slower" in a report that measured it faster (issue 14)."""
    from converter.profiles import Candidate

    fast = Candidate("onnx-fp16", "onnxruntime", "fp16", True, 10, 1.0,
                     measured="1.67x the speed of onnx-fp32 (per-round range 1.50-1.80x)")
    d = decide(BUILTIN_PROFILES["x86-kiosk"], [*cands(("onnx-fp32", True)), fast])
    note = d.excluded["onnx-fp16"]
    assert "1.67x the speed of onnx-fp32" in note and "slower" not in note


def test_user_profile_with_fp16_compute_prefers_fp16() -> None:
    gpu = profile_from_dict("jetson", {"base": "rpi5", "runtimes": ["onnxruntime"], "fp16_compute": True,
                                       "preference": ["onnx-fp16", "onnx-int8", "onnx-fp32"]})
    assert decide(gpu, cands(*ALL)).ship == ("onnx-fp16", "onnx-fp32")


def test_user_profile_size_limit_and_host_latency() -> None:
    tiny = profile_from_dict("mcu-ish", {"max_model_bytes": 10, "runtimes": ["onnxruntime"]})
    assert decide(tiny, cands(*ALL)).ship == ()
    timed = profile_from_dict("twin", {"use_host_latency": True, "runtimes": ["onnxruntime"]})
    lat = {"onnx-fp32": 1.0, "onnx-int8": 2.0}
    assert decide(timed, cands(("onnx-fp32", True), ("onnx-int8", True), latency=lat)).ship[0] == "onnx-fp32"
    lat = {"onnx-fp32": 1.0, "onnx-int8": 1.05}  # within 10 %: preference decides
    assert decide(timed, cands(("onnx-fp32", True), ("onnx-int8", True), latency=lat)).ship[0] == "onnx-int8"


def test_user_profile_refuses_unknown_keys() -> None:
    with pytest.raises(SpecError, match="unknown keys"):
        profile_from_dict("x", {"gpu": True})
