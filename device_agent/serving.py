"""Serving: predictions and feedback on the local API, windows of serving figures, worker crash reports.

:class:`Serving` never changes the persisted record; it reads which bundle serves from the worker supervisor
and the record through a callable, and it is called from the local API's threads, the window thread and
the supervisor's monitor thread. The update machine (:mod:`device_agent.steps`) decides what a crash
means; :meth:`Serving.on_crash` only counts, reports and hands the note to the acting thread.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from device_agent.clock import Clock
from device_agent.config import AgentConfig
from device_agent.errors import WorkerError
from device_agent.inbox import Inbox
from device_agent.reporting import Reporter
from device_agent.states import State
from device_agent.store import BundleRef, StateRecord
from device_agent.supervisor import WorkerSupervisor
from device_agent.telemetry import WindowStats

log = logging.getLogger("edgepack-agent")


def error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()


class Serving:
    """The serving side of one device."""

    def __init__(self, config: AgentConfig, *, clock: Clock, supervisor: WorkerSupervisor, reporter: Reporter,
                 inbox: Inbox, stop_flag: threading.Event, record: Callable[[], StateRecord]) -> None:
        self.config = config
        self.clock = clock
        self.supervisor = supervisor
        self.reporter = reporter
        self.inbox = inbox
        self.stop_flag = stop_flag
        self.record = record
        self.window = WindowStats(clock.now())
        self._predictions: OrderedDict[str, tuple[list[str] | None, str]] = OrderedDict()
        self._pred_lock = threading.Lock()
        self._window_thread: threading.Thread | None = None

    # ---- boot ----------------------------------------------------------------------------------------------
    def serve_at_boot(self, rec: StateRecord) -> None:
        """Serve the bundle ``rec`` says must serve; if it cannot load, the other verified one."""
        first = rec.serving()
        for ref in (first, rec.previous if first is rec.active else rec.active):
            if ref is None:
                continue
            try:
                self.supervisor.serve(ref)
                return
            except WorkerError as exc:
                log.error("cannot serve %s %s at boot: %s", ref.name, ref.version, exc)
                self.reporter.event("install_failed", target=ref.ident(), detail={**exc.as_detail(),
                                                                                    "phase": "boot"})
        if first is not None:
            log.error("no verified bundle can be served")

    def start_windows(self) -> None:
        self._window_thread = threading.Thread(target=self._windows, name="windows", daemon=True)
        self._window_thread.start()

    # ---- crashes and windows -----------------------------------------------------------------------------
    def on_crash(self, ref: BundleRef | None, err: WorkerError) -> None:
        """Called from the worker's monitor thread: count, report, hand the decision to the acting thread."""
        self.window.crash()
        phase = "trial" if self.record().state is State.TRIAL else "serving"
        self.reporter.event("crash", target=ref.ident() if ref else None, detail={**err.as_detail(), "phase": phase})
        self.inbox.put("crash", dict(err.detail))

    def _windows(self) -> None:
        while not self.clock.wait(self.stop_flag, self.config.telemetry.window_s):
            self.emit_window()

    def emit_window(self) -> dict[str, Any] | None:
        window = self.window.take(self.clock.now())
        if self.record().serving() is None and not window["requests"]:
            return None
        try:
            stats = self.supervisor.call({"op": "stats"}, 10.0).get("input_stats")
        except WorkerError:
            stats = None
        if stats:
            window["input_stats"] = stats
        return self.reporter.window(window)

    # ---- local API -----------------------------------------------------------------------------------------
    def predict(self, body: bytes) -> tuple[int, bytes]:
        """Run one prediction request (JSON body); returns HTTP status and JSON body."""
        pid = uuid.uuid4().hex
        t0 = time.perf_counter()
        try:
            ans = self.supervisor.call({"op": "predict", "body": body, "prediction_id": pid},
                                       self.config.api.prediction_timeout_s)
        except WorkerError as exc:
            self.window.request((time.perf_counter() - t0) * 1e3, False, None)
            return 503, error_body("model_unavailable", exc.message + "; the last good model is being restarted"
                                   if exc.code != "no_model" else exc.message)
        latency = (time.perf_counter() - t0) * 1e3
        status = int(ans.get("status", 500))
        if status != 200:
            self.window.request(latency, False, None)
            return status, error_body(str(ans.get("error")), str(ans.get("message")))
        classes = ans.get("classes")
        self.window.request(latency, True, classes)
        serving = self.supervisor.serving
        version = serving.ref.version if serving is not None and serving.ref is not None else ""
        with self._pred_lock:
            self._predictions[pid] = (classes, version)
            while len(self._predictions) > self.config.api.feedback_memory:
                self._predictions.popitem(last=False)
        return 200, bytes(ans["body"])

    def feedback(self, body: bytes) -> tuple[int, bytes]:
        """The true label(s) for a prediction id: the source of the accuracy telemetry.

        Each prediction takes one accepted feedback; a refused one (wrong number of labels) leaves the id
        available for the corrected call."""
        try:
            doc = json.loads(body)
            pid, label = doc["prediction_id"], doc["label"]
        except (ValueError, KeyError, TypeError):
            return 400, error_body("bad_request", 'feedback must be {"prediction_id": "...", "label": ...} '
                                                  "(a list of labels for a batch)")
        labels = [str(x) for x in label] if isinstance(label, list) else [str(label)]
        with self._pred_lock:
            known = self._predictions.get(str(pid))
            if known is not None and known[0] is not None and len(labels) == len(known[0]):
                del self._predictions[str(pid)]  # accepted: the id is used up
        if known is None:
            return 404, error_body("unknown_prediction",
                                   f"no recent prediction {pid!r} (only the last {self.config.api.feedback_memory} "
                                   "are kept; each takes one feedback)")
        classes, version = known
        if classes is None or len(labels) != len(classes):
            return 400, error_body("bad_request", f"expected {len(classes) if classes else 'no'} label(s) for this "
                                                  f"prediction, got {len(labels)}; the prediction id stays valid "
                                                  "for the corrected feedback")
        correct = [a == b for a, b in zip(labels, classes, strict=True)]
        for c in correct:
            self.window.feedback_given(c)
        return 200, json.dumps({"prediction_id": pid, "correct": correct, "model_version": version}).encode()
