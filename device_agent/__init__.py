"""edgepack device agent: check in, download, verify, self-test, activate, roll back, serve, report.

The agent core is :class:`device_agent.machine.Agent`, a class with an injectable clock, HTTP transport,
telemetry publisher and worker factory, so many agents can run in one process (fleet simulation).
Light by design: it never imports numpy or a runtime itself; inference runs in a supervised worker
process (:mod:`device_agent.worker`).
"""

from __future__ import annotations

__version__ = "0.1.0"
AGENT_VERSION = __version__
