"""Target profiles and the pure decision of which variants ship for which profile.

A profile describes a class of device: which runtimes it has, which variants it should
prefer and whether fp16 pays there. fp16 only pays on hardware with fp16 compute a runtime
uses (GPU / NPU delegates); on CPUs the runtimes upcast or insert Cast nodes and fp16 runs
*slower* than fp32 (onnxruntime#25824: 4x slower on a Raspberry Pi 5; #16778: 2x on x86), so
the built-in CPU profiles never ship it. int8 pays on ARM with XNNPACK / dot-product kernels
(TFLite on a Pi 4: SSDLite-MobileNetV2 109.6 ms fp32 vs 57.4 ms int8), but can be slower on
old x86 without VNNI (ORT #20052). The built-in orders are static so that the manifest, and
with it the bundle digest, does not depend on timing noise on the build host. A user-defined
profile may set ``use_host_latency`` to order by the latencies measured here (for devices that
are the build host's twin), at the price of a host-dependent manifest; the device agent is the
better place to re-rank by latency, on the device itself.

Each profile ships its preferred variant plus one fp32 fallback (the agent falls back to it
when the preferred variant fails its self-test), so a bundle stays small.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from converter.errors import SpecError


@dataclass(frozen=True)
class Profile:
    """A class of target device."""

    name: str
    description: str
    hardware_ids: tuple[str, ...]
    platforms: tuple[str, ...]
    runtimes: tuple[str, ...]
    preference: tuple[str, ...]
    fp16_compute: bool = False
    use_host_latency: bool = False
    max_variants: int = 2
    max_model_bytes: int | None = None


@dataclass(frozen=True)
class Candidate:
    """What the decision needs to know about one built variant."""

    id: str
    runtime: str
    precision: str
    passed: bool
    size_bytes: int
    latency_p50_ms: float | None
    measured: str | None = None
    """What this build measured about the variant (e.g. its speed against fp32), quoted in notes."""


@dataclass(frozen=True)
class ProfileDecision:
    """The variants a profile ships, best first, and why each other variant does not."""

    profile: str
    ship: tuple[str, ...]
    excluded: dict[str, str]


_ARM_ORDER = (
    "tflite-int8",
    "onnx-int8",
    "onnx-int8-dynamic",
    "tflite-fp32",
    "onnx-fp32",
    "tflite-fp16",
    "onnx-fp16",
)
_X86_ORDER = (
    "onnx-int8",
    "onnx-int8-dynamic",
    "onnx-fp32",
    "tflite-int8",
    "tflite-fp32",
    "onnx-fp16",
    "tflite-fp16",
)

BUILTIN_PROFILES: dict[str, Profile] = {
    "rpi4": Profile(
        name="rpi4",
        description="Raspberry Pi 4 (Cortex-A72, 64-bit OS): no fp16 arithmetic, int8 via XNNPACK/NEON",
        hardware_ids=("rpi4",),
        platforms=("linux/aarch64",),
        runtimes=("litert", "onnxruntime"),
        preference=_ARM_ORDER,
    ),
    "rpi5": Profile(
        name="rpi5",
        description="Raspberry Pi 5 (Cortex-A76): int8 dot-product kernels; fp16 on CPU is slower (ORT #25824)",
        hardware_ids=("rpi5",),
        platforms=("linux/aarch64",),
        runtimes=("litert", "onnxruntime"),
        preference=_ARM_ORDER,
    ),
    "x86-kiosk": Profile(
        name="x86-kiosk",
        description="x86-64 kiosk PC, CPU only (AVX2/VNNI int8 kernels), the agent's default onnxruntime",
        hardware_ids=("x86-kiosk",),
        platforms=("linux/x86_64",),
        runtimes=("onnxruntime",),
        preference=_X86_ORDER,
    ),
}


def profile_from_dict(name: str, table: dict[str, Any]) -> Profile:
    """Build a user-defined profile from ``[profiles.NAME]``; unset keys inherit from ``base``."""
    base_name = table.get("base")
    if base_name is not None and base_name not in BUILTIN_PROFILES:
        raise SpecError(f"[profiles.{name}] base {base_name!r} is not one of {sorted(BUILTIN_PROFILES)}")
    base = BUILTIN_PROFILES.get(base_name or "x86-kiosk")
    assert base is not None
    known = {"base", "description", "hardware_ids", "platforms", "runtimes", "preference", "fp16_compute",
             "use_host_latency", "max_variants", "max_model_bytes"}
    unknown = set(table) - known
    if unknown:
        raise SpecError(f"[profiles.{name}] has unknown keys {sorted(unknown)}; known: {sorted(known)}")
    runtimes = tuple(table.get("runtimes", base.runtimes))
    bad = [r for r in runtimes if r not in ("onnxruntime", "litert")]
    if bad:
        raise SpecError(f"[profiles.{name}] runtimes {bad} unknown; use onnxruntime and/or litert")
    return Profile(
        name=name,
        description=str(table.get("description", f"user-defined profile {name}")),
        hardware_ids=tuple(table.get("hardware_ids", (name,))),
        platforms=tuple(table.get("platforms", base.platforms)),
        runtimes=runtimes,
        preference=tuple(table.get("preference", base.preference)),
        fp16_compute=bool(table.get("fp16_compute", False)),
        use_host_latency=bool(table.get("use_host_latency", False)),
        max_variants=int(table.get("max_variants", 2)),
        max_model_bytes=table.get("max_model_bytes"),
    )


def decide(profile: Profile, candidates: list[Candidate]) -> ProfileDecision:
    """Choose the variants ``profile`` ships, best first. Pure: no I/O, no clock.

    Rules, in order: a variant must have passed the accuracy gate, run on one of the
    profile's runtimes, appear in its preference list (a stage's ``pruned-``/``student-``
    variant ranks where its kind does), fit ``max_model_bytes``, and be fp16 only if the
    profile has fp16 compute. The survivors are ordered by preference, then by file size (or by
    measured latency in 10 % buckets, ties by preference, when ``use_host_latency``). The
    profile ships the first one and, if that is not fp32, the best fp32 one as a fallback.
    """
    from converter.stage_spec import split_variant

    excluded: dict[str, str] = {}
    eligible: list[Candidate] = []
    rank = {vid: i for i, vid in enumerate(profile.preference)}
    for c in candidates:
        if c.id not in rank and split_variant(c.id)[1] in rank:
            rank[c.id] = rank[split_variant(c.id)[1]]
    for c in candidates:
        if not c.passed:
            excluded[c.id] = "refused by the accuracy gate, failed to build, or passed only a stage's own budget"
        elif c.runtime not in profile.runtimes:
            excluded[c.id] = f"runtime {c.runtime} is not on {profile.name}"
        elif c.id not in rank:
            excluded[c.id] = f"not in {profile.name}'s preference list"
        elif c.precision == "fp16" and not profile.fp16_compute:
            excluded[c.id] = (f"{profile.name} declares no fp16 compute (fp16_compute = false): its runtimes "
                              "upcast fp16 on the CPU" + (f"; measured on the build host: {c.measured}"
                                                          if c.measured else ""))
        elif profile.max_model_bytes is not None and c.size_bytes > profile.max_model_bytes:
            excluded[c.id] = f"{c.size_bytes} bytes exceed {profile.name}'s max_model_bytes"
        else:
            eligible.append(c)
    if profile.use_host_latency and eligible and all(c.latency_p50_ms for c in eligible):
        fastest = min(c.latency_p50_ms or 0.0 for c in eligible)

        def key(c: Candidate) -> tuple[int, int, int, str]:
            ratio = (c.latency_p50_ms or fastest) / fastest
            return (math.floor(math.log(ratio) / math.log(1.1) + 1e-9), rank[c.id], c.size_bytes, c.id)

        ordered = sorted(eligible, key=key)
    else:
        # same kind of variant from a stage (pruned-, student-) and the input model: the smaller file first
        # (sizes are deterministic, so the manifest stays host-independent); equal size keeps the original
        ordered = sorted(eligible, key=lambda c: (rank[c.id], c.size_bytes, split_variant(c.id)[0] != "", c.id))
    ship: list[str] = []
    if ordered:
        ship.append(ordered[0].id)
        if ordered[0].precision != "fp32":
            fallback = next((c.id for c in ordered if c.precision == "fp32"), None)
            if fallback is not None:
                ship.append(fallback)
        for c in ordered[1:]:
            if len(ship) >= profile.max_variants:
                break
            if c.id not in ship:
                ship.append(c.id)
        ship = ship[: max(profile.max_variants, 1)]
    for c in ordered:
        if c.id not in ship:
            excluded[c.id] = f"{profile.name} ships at most {profile.max_variants} variants; ranked lower"
    return ProfileDecision(profile=profile.name, ship=tuple(ship), excluded=excluded)
