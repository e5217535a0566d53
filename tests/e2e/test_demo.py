"""The README's main command, shortened: `edgepack demo` on embedded defaults must end with the good version
at 100 % and both bad versions halted in their first phase and rolled back."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
@pytest.mark.parametrize("broker", ["mosquitto", "amqtt"])
def test_shortened_demo_ends_as_documented(tmp_path: Path, broker: str) -> None:
    """With mosquitto (MQTT 5 over TLS, dynamic security), and with amqtt, the pure-Python fallback broker
    (MQTT 3.1.1, plain on loopback, no accounts: the demo warns)."""
    res = subprocess.run([sys.executable, "-m", "edgepack.cli", "demo", "--devices", "6", "--soak", "3",
                          "--broker", broker, "--workdir", str(tmp_path / "demo")],
                         capture_output=True, text=True, timeout=900,
                         env={"COLUMNS": "200", "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
                              "HOME": str(tmp_path)})
    out = res.stdout
    assert res.returncode == 0, out[-3000:] + res.stderr[-3000:]
    rows = {m.group(1): m.group(2) for m in re.finditer(r"│ (1\.\d\.0)\s+│ r-\w+\s+│ (\w+)", out)}
    assert rows == {"1.0.0": "completed", "1.1.0": "completed", "1.2.0": "rolled_back", "1.3.0": "rolled_back"}
    assert "accuracy_drop" in out and "crash_rate" in out  # the gates that halted the bad versions
    assert "fleet now serves {'1.1.0': 6}" in out
    assert f"broker: {broker}" in out
    assert re.search(r"update server: https://127\.0\.0\.1:\d+", out)  # HTTPS with the demo's local CA
    if broker == "mosquitto":  # TLS, and every device on its own broker account
        assert re.search(r"broker: mosquitto at mqtts://127\.0\.0\.1:\d+ \(MQTT 5, accounts: dynsec\)", out)
    else:  # said loudly: amqtt has no accounts in the demo
        assert "WITHOUT accounts" in out and "accounts: none" in out
    assert re.search(r"dashboard: https://127\.0\.0\.1:\d+/ui/", out)
    assert "dashboard pages show the halted rollouts and their gates: ok" in out
