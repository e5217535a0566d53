"""The fleet simulator: many simulated devices, running the real agent, against one real server and broker.

A scenario file (:mod:`edgepack.fleet.scenario`) describes the fleet, the bundles, the faults to inject and
the rollouts to run; :func:`edgepack.fleet.simulator.run_scenario` runs it and returns a
:class:`~edgepack.fleet.summary.Summary` saying what happened to each rollout.

What is real and what is simulated:

* real: the update server (its own process, SQLite or PostgreSQL), Mosquitto, enrollment, check-ins,
  TUF/Uptane verification, downloads, self-tests on the golden vectors, the agent's state machine
  (``device_agent.machine.Agent``), telemetry through each device's own MQTT connection, the gates;
* simulated: the worker *process* (:mod:`edgepack.fleet.supervisor` runs the real ``Worker`` logic in this
  process, one ONNX session per bundle shared by all devices), the network's faults
  (:mod:`edgepack.fleet.faults`) and the users sending predictions and feedback (:mod:`edgepack.fleet.fleet`).
"""
