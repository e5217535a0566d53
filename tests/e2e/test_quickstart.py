"""docs/quickstart.md, run as written: every ``bash`` block from "Your own model" on, in document order, in a
fresh directory (a new key set, the template, a scikit-learn model built and signed, a real update server, a
real agent that installs the bundle and answers a prediction). The document cannot drift from the code.

The only changes to the text: ports 8080 and 8711 become free ports (the page says how: ``EDGEPACK_PORT``,
``EDGEPACK_SERVER``, ``[api] listen``), and after a command the page sends to the background the script
waits for its port to open, as a reader would before typing the next line.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.services import free_port

DOC = Path(__file__).resolve().parents[2] / "docs" / "quickstart.md"
PRELUDE = """set -euo pipefail
wait_port() {
  for _ in $(seq 1 1200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done
  echo "quickstart test: nothing listens on port $1" >&2; return 1
}
"""


def blocks(text: str, start: str) -> list[str]:
    """The ```bash blocks after the heading ``start``, in order."""
    return re.findall(r"^```bash\n(.*?)^```", text[text.index(start):], flags=re.M | re.S)


def script(doc: str, server_port: int, agent_port: int) -> str:
    lines, heredoc = [PRELUDE], None
    for block in blocks(doc, "## Your own model"):
        for line in block.replace("8080", str(server_port)).replace("8711", str(agent_port)).splitlines():
            lines.append(line)
            if heredoc is not None:
                heredoc = None if line.strip() == heredoc else heredoc
                continue
            start = re.search(r"<<'?(\w+)'?", line)
            if start:
                heredoc = start.group(1)
                continue
            if line.split("#", 1)[0].rstrip().endswith("&"):
                port = server_port if "edgepack-server serve" in line else agent_port
                lines += ['echo $! >> "$QUICKSTART_PIDS"', f"wait_port {port}"]
    return "\n".join(lines) + "\n"


def test_the_script_keeps_heredocs_and_waits_for_background_services() -> None:
    text = script(DOC.read_text(), 18080, 18711)
    assert "edgepack-server serve &" in text and "wait_port 18080" in text and "wait_port 18711" in text
    assert 'url = "http://127.0.0.1:18080"' in text and "8711" not in text.replace("18711", "")
    assert text.count("wait_port 18080") == 1  # the heredocs' lines were not taken for commands


@pytest.mark.slow
def test_quickstart_runs_as_written(tmp_path: Path) -> None:
    server_port, agent_port = free_port(), free_port()
    pids = tmp_path / "pids"
    pids.touch()
    work = tmp_path / "work"
    work.mkdir()
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
           "HOME": str(tmp_path), "LANG": "C.UTF-8", "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
           "EDGEPACK_PORT": str(server_port), "EDGEPACK_SERVER": f"http://127.0.0.1:{server_port}",
           "QUICKSTART_PIDS": str(pids)}
    path = tmp_path / "quickstart.sh"
    path.write_text(script(DOC.read_text(), server_port, agent_port))
    log = tmp_path / "quickstart.log"  # a file, not a pipe: the server and agent keep their output open
    try:
        with log.open("w") as fh:
            code = subprocess.run(["bash", str(path)], cwd=work, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                  timeout=400).returncode
    finally:
        for pid in (int(p) for p in pids.read_text().split()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    out = log.read_text()
    assert code == 0, out[-6000:]
    # the device answered with the model built from the page
    answer, _ = json.JSONDecoder().raw_decode(out[out.index('{"prediction_id"'):])
    assert answer["model"]["name"] == "my-model" and answer["model"]["version"] == "1.0.0"
    assert answer["model"]["variant"] in ("onnx-int8", "onnx-fp32")
    assert len(answer["predictions"]) == 1
    assert re.search(r"kiosk-0001 .* 1\.0\.0 \(rollout\)", out), out[-2000:]  # devices list: assigned by the rollout
    report = (work / "my-model" / "out" / "build-report.md").read_text()
    assert "Preprocessing fitted on [fit] (1200 samples" in report
    assert "reads the model output `probabilities`" in report
    assert "verified my-model 1.0.0" in out
