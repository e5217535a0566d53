"""Pydantic models for the HTTP edge (requests and the few typed responses)."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

DEVICE_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


class _In(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ActiveBundle(_In):
    name: str
    version: str
    release_counter: int | None = None
    variant: str | None = None


class EnrollRequest(_In):
    enrollment_token: str = Field(min_length=8, max_length=256)
    device_id: str = Field(pattern=DEVICE_ID)
    hardware_id: str = Field(min_length=1, max_length=64)
    platform: str | None = Field(None, max_length=64)
    agent_version: str | None = Field(None, max_length=32)
    runtimes: dict[str, str] = Field(default_factory=dict)
    tags: dict[str, str] = Field(default_factory=dict)


class CheckinRequest(_In):
    agent_version: str | None = Field(None, max_length=32)
    platform: str | None = Field(None, max_length=64)
    runtimes: dict[str, str] | None = None
    state: str | None = Field(None, max_length=32)
    active: ActiveBundle | None = None
    last_error: str | None = Field(None, max_length=4000)
    outbox_oldest_seq: int | None = Field(None, ge=0, le=2**63 - 1)
    """The oldest telemetry seq still in the device's outbox: seqs below it will never be sent again."""
    outbox_seq: int | None = Field(None, ge=0, le=2**63 - 1)
    """The last telemetry seq the device assigned."""

    @field_validator("last_error", mode="before")
    @classmethod
    def _error_as_text(cls, value: Any) -> Any:
        """The agent reports its last error as an object (``{"error", "message", "phase", ...}``); it is
        stored as JSON text. Refusing it with 422 locked a device that had failed once out of check-ins."""
        if isinstance(value, dict):
            return json.dumps(value, separators=(",", ":"), default=str)[:4000]
        return value


class TelemetryAck(BaseModel):
    committed_seq: int
    """Every telemetry message of this device up to this seq is stored (or known lost)."""


class CheckinResponse(BaseModel):
    assignment: str | None
    poll_interval_s: int
    server_time: str
    telemetry: TelemetryAck | None = None


class TokenCreate(_In):
    name: str = Field(min_length=1, max_length=128)
    role: Literal["admin", "operator", "viewer"] = "viewer"


class EnrollmentTokenCreate(_In):
    uses: int = Field(1, ge=1, le=1_000_000)
    ttl_s: int | None = Field(None, ge=60)
    group: str | None = Field(None, max_length=128)
    tags: dict[str, str] = Field(default_factory=dict)


class DevicePatch(_In):
    group: str | None = Field(None, max_length=128)
    tags: dict[str, str] | None = None


class BundleRef(_In):
    name: str
    version: str


class Selector(_In):
    model_config = ConfigDict(extra="forbid")
    group: str | None = None
    tags: dict[str, str] | None = None
    hardware_ids: list[str] | None = None
    device_ids: list[str] | None = None


class PhaseIn(_In):
    percent: float = Field(gt=0, le=100)
    min_soak_s: float | None = Field(None, ge=0)
    min_devices: int | None = Field(None, ge=0)


class RolloutCreate(_In):
    bundle: BundleRef
    selector: Selector = Field(default_factory=Selector)
    phases: list[PhaseIn | float] | None = None
    min_soak_s: float | None = Field(None, ge=0)
    min_devices: int | None = Field(None, ge=0)
    gates: dict[str, Any] | None = None
    on_breach: Literal["rollback", "halt"] = "rollback"
    canary_devices: int = Field(1, ge=1, description="The first phase holds at least this many devices.")
    start: bool = False
    reason: str = ""

    def to_request(self) -> dict[str, Any]:
        data = self.model_dump(exclude_none=True)
        data["selector"] = self.selector.model_dump(exclude_none=True)
        if self.phases is not None:
            data["phases"] = [p.model_dump(exclude_none=True) if isinstance(p, PhaseIn) else p for p in self.phases]
        return data


class ActionRequest(_In):
    reason: str = Field("", max_length=2000)
