"""``edgepack demo --keep``: what a user needs to reach the running devices by hand.

For each simulated device: ``devices/<id>/agent.toml`` (the device's configuration, with the local API's
actual address, loadable by ``edgepack-agent status --config``) and ``devices/<id>/addresses.json``; one
``devices/addresses.txt`` table for the whole fleet; a sample input; and one copy-pasteable command that
sends a prediction and its feedback.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any


def toml_dumps(doc: dict[str, Any]) -> str:
    """Enough TOML for an agent configuration: scalars and lists at the top, then tables (nested ones too)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(str(v))

    def table(prefix: str, d: dict[str, Any]) -> list[str]:
        lines = [f"{k} = {value(v)}" for k, v in d.items() if not isinstance(v, dict) and v is not None]
        for k, v in d.items():
            if isinstance(v, dict):
                name = f"{prefix}.{k}" if prefix else k
                lines += ["", f"[{name}]", *table(name, v)]
        return lines

    return "\n".join(table("", doc)).lstrip("\n") + "\n"


def write_device_files(work: Path, fleet: list[Any], server_url: str, broker_url: str) -> Path:
    """Write agent.toml and addresses.json per device and devices/addresses.txt; returns the latter."""
    rows = []
    for device in fleet:
        doc = json.loads(json.dumps(device.extra.get("config", {}), default=str))
        doc.setdefault("api", {})["listen"] = device.api_address
        doc.setdefault("mqtt", {}).setdefault("url", broker_url)
        folder = Path(doc["state_dir"])
        (folder / "agent.toml").write_text(
            "# Written by `edgepack demo --keep`: this simulated device's configuration. While the demo runs:\n"
            f"#   edgepack-agent status --config {folder / 'agent.toml'}\n" + toml_dumps(doc))
        addresses = {"device_id": device.device_id, "local_api": f"http://{device.api_address}",
                     "update_server": server_url, "broker": broker_url, "state_dir": str(folder),
                     "agent_toml": str(folder / "agent.toml")}
        (folder / "addresses.json").write_text(json.dumps(addresses, indent=2) + "\n")
        rows.append(addresses)
    table = work / "devices" / "addresses.txt"
    width = max(len(r["device_id"]) for r in rows)
    table.write_text("".join(f"{r['device_id']:<{width}}  {r['local_api']:<24}  {r['agent_toml']}\n" for r in rows))
    return table


def sample_input(work: Path) -> tuple[Path, str]:
    """One digits image as the local API takes it, and its true label."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    path = work / "sample-digit.json"
    path.write_text(json.dumps({"inputs": [digits.images[3].tolist()]}) + "\n")
    return path, str(int(digits.target[3]))


def predict_and_feedback_command(api_address: str, sample: Path, label: str) -> str:
    """One shell line: predict on the sample, then send its true label as feedback for that prediction."""
    url = f"http://{api_address}/v1"
    pick = "import json,sys; print(json.load(sys.stdin)['prediction_id'])"
    feedback = f'{{"prediction_id": "\'"$ID"\'", "label": "{label}"}}'
    return (f"ID=$(curl -s -X POST {url}/predict -d @{shlex.quote(str(sample))} | python3 -c \"{pick}\") && "
            f"curl -s -X POST {url}/feedback -d '{feedback}'")
