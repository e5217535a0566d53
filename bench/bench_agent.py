"""Device-agent benchmarks, each against a baseline measured in the same run on the same machine.

* local API overhead: ``POST /v1/predict`` (raw input -> the bundle's preprocessing -> the model in the
  worker -> JSON) through the Python client over loopback, against a bare ``InferenceSession.run`` of the
  same model on the already preprocessed features (p50, p99);
* activation: from the start of verification to the new bundle serving, against the sum of hashing the
  bundle's files, creating the session and running the golden vectors (in this process, warm imports);
* the supervisor's (``edgepack-agent run``) idle RSS and CPU;
* the worker's RSS against a bare process holding the same model in onnxruntime.

Everything is real: the agent runs as ``edgepack-agent run`` in a subprocess and updates itself from a
protocol-conformant server (tests/agent/fakeserver.py: real TUF metadata, real director signatures) with
real signed bundles: the digits classifier of the tests (4 KB) and an MLP of ~34 MB of weights, closer to
what a kiosk runs.

    python bench/bench_agent.py [--write-docs] [--calls 2000] [--updates 5]
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bundles.assemble import BundleInfo, assemble_bundle  # noqa: E402
from bundles.golden import Golden, check_outputs, tolerances  # noqa: E402
from bundles.keys import KeyStore  # noqa: E402
from bundles.manifest import Manifest  # noqa: E402
from bundles.preprocessing import Pipeline  # noqa: E402
from device_agent.client import AgentClient  # noqa: E402
from tests.agent.conftest import AgentProcess, agent_config_dict, toml_dumps  # noqa: E402
from tests.agent.fakeserver import FakeUpdateServer  # noqa: E402
from tests.support.factories import digits_data, digits_pipeline_spec, make_digits_bundle  # noqa: E402
from tests.support.services import free_port  # noqa: E402

DEVICE, HARDWARE = "kiosk-0001", "x86-kiosk"


def rss_mb(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", text).group(1)) / 1024  # type: ignore[union-attr]


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def mlp_model(hidden: int = 2048, seed: int = 0) -> bytes:
    """64 -> hidden -> hidden -> 10 MLP (label + probabilities), ~34 MB of fp32 weights."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    dims = [64, hidden, hidden, 10]
    inits, nodes, prev = [], [], "input"
    for i, (a, b) in enumerate(itertools.pairwise(dims)):
        inits += [numpy_helper.from_array((rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32), f"W{i}"),
                  numpy_helper.from_array(np.zeros(b, np.float32), f"B{i}")]
        nodes.append(helper.make_node("Gemm", [prev, f"W{i}", f"B{i}"], [f"h{i}"]))
        prev = f"h{i}"
        if i < len(dims) - 2:
            nodes.append(helper.make_node("Relu", [prev], [f"r{i}"]))
            prev = f"r{i}"
    nodes += [helper.make_node("Softmax", [prev], ["probabilities"], axis=-1),
              helper.make_node("ArgMax", [prev], ["label"], axis=-1, keepdims=0)]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 64])],
                              [helper.make_tensor_value_info("label", TensorProto.INT64, [None]),
                               helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def mlp_bundle(keys: KeyStore, out: Path, version: str, rc: int, model: bytes) -> BundleInfo:
    import onnxruntime as ort

    spec = digits_pipeline_spec()
    images, _ = digits_data()
    raw = images[1500:1508]
    features = Pipeline.from_dict(spec).transform(raw)
    label, probs = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, features)
    golden = Golden(raw=raw, features=features, outputs={"onnx-fp32": {"label": label, "probabilities": probs}})
    manifest = {
        "format_version": 1, "name": "mlp", "version": version, "release_counter": rc, "hardware_ids": [HARDWARE],
        "compatibility": {"platforms": ["linux-x86_64"], "runtimes": {"onnxruntime": ">=1.16"}},
        "io": {"inputs": [{"name": "input", "dtype": "float32", "shape": [None, 64]}],
               "outputs": [{"name": "label", "dtype": "int64", "shape": [None]},
                           {"name": "probabilities", "dtype": "float32", "shape": [None, 10]}],
               "labels": [str(i) for i in range(10)], "task": "classification"},
        "preprocessing": "preprocessing.json",
        "golden": {"file": "golden.npz", "variants": {"onnx-fp32": {"atol": 1e-4, "rtol": 1e-3}}},
        "variants": [{"id": "onnx-fp32", "file": "models/mlp.onnx", "format": "onnx", "runtime": "onnxruntime",
                      "precision": "fp32"}],
        "profiles": {HARDWARE: ["onnx-fp32"]}}
    files = {"models/mlp.onnx": model, "preprocessing.json": json.dumps(spec).encode(), "golden.npz": golden.to_bytes()}
    return assemble_bundle(out, keystore=keys, manifest=manifest, files=files)


def baseline_activation(slot: Path, runs: int = 5) -> dict[str, float]:
    """Hash every file + create the session + run the golden vectors, in this (warm) process."""
    import onnxruntime as ort

    manifest = Manifest.from_bytes((slot / "manifest.json").read_bytes())
    variant = manifest.variants[0]
    totals: dict[str, list[float]] = {"hash_s": [], "session_s": [], "golden_s": []}
    for _ in range(runs):
        t0 = time.perf_counter()
        for p in sorted(slot.rglob("*")):
            if p.is_file():
                hashlib.sha256(p.read_bytes()).hexdigest()
        t1 = time.perf_counter()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        sess = ort.InferenceSession(str(slot / variant.file), opts, providers=["CPUExecutionProvider"])
        t2 = time.perf_counter()
        golden = Golden.from_bytes((slot / "golden.npz").read_bytes())
        pipeline = Pipeline.from_dict(json.loads((slot / manifest.preprocessing).read_bytes()))
        features = pipeline.transform(golden.raw_inputs())
        outputs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, features), strict=False))
        check_outputs(golden, variant.id, outputs, *tolerances(manifest.golden, variant.id))
        t3 = time.perf_counter()
        totals["hash_s"].append(t1 - t0)
        totals["session_s"].append(t2 - t1)
        totals["golden_s"].append(t3 - t2)
    out = {k: statistics.median(v) for k, v in totals.items()}
    out["sum_s"] = out["hash_s"] + out["session_s"] + out["golden_s"]
    return out


FRESH_BASELINE = """
import hashlib, json, sys, time
from pathlib import Path
import numpy as np
import onnxruntime as ort
from bundles.golden import Golden, check_outputs, tolerances
from bundles.manifest import Manifest
from bundles.preprocessing import Pipeline
from device_agent.worker import _preload
_preload("onnxruntime")                      # what the agent's standby worker has done before a load
slot = Path(sys.argv[1])
t0 = time.perf_counter()
for p in sorted(slot.rglob("*")):
    if p.is_file():
        hashlib.sha256(p.read_bytes()).hexdigest()
t1 = time.perf_counter()
manifest = Manifest.from_bytes((slot / "manifest.json").read_bytes())
variant = manifest.variants[0]
o = ort.SessionOptions(); o.intra_op_num_threads = 1
sess = ort.InferenceSession(str(slot / variant.file), o, providers=["CPUExecutionProvider"])
t2 = time.perf_counter()
golden = Golden.from_bytes((slot / "golden.npz").read_bytes())
features = Pipeline.from_dict(json.loads((slot / manifest.preprocessing).read_bytes())).transform(golden.raw_inputs())
outputs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, features)))
check_outputs(golden, variant.id, outputs, *tolerances(manifest.golden, variant.id))
t3 = time.perf_counter()
print(json.dumps({"hash_s": t1 - t0, "session_s": t2 - t1, "golden_s": t3 - t2, "sum_s": t3 - t0}))
"""


def baseline_fresh(slot: Path, runs: int = 3) -> dict[str, float]:
    """The same sum in a fresh process that imported the runtime first: the worker's situation."""
    outs = [json.loads(subprocess.run([sys.executable, "-c", FRESH_BASELINE, str(slot)], capture_output=True,
                                      text=True, check=True, cwd=ROOT).stdout) for _ in range(runs)]
    return {k: statistics.median(o[k] for o in outs) for k in outs[0]}


def bare_worker_rss(model: Path) -> float:
    code = ("import numpy as np, onnxruntime as ort, re, pathlib\n"
            "o = ort.SessionOptions(); o.intra_op_num_threads = 1\n"
            f"s = ort.InferenceSession({str(model)!r}, o, providers=['CPUExecutionProvider'])\n"
            "s.run(None, {'input': np.zeros((1, 64), np.float32)})\n"
            "t = pathlib.Path('/proc/self/status').read_text()\n"
            "print(int(re.search(r'VmRSS:\\s+(\\d+)', t).group(1)) / 1024)\n")
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def activated_events(state: Path) -> list[dict[str, Any]]:
    out = []
    for p in sorted((state / "outbox").glob("*-event-*.json")):
        doc = json.loads(p.read_bytes())
        if doc["event"] == "activated":
            out.append(doc)
    return out


def wait_serving(agent: AgentProcess, name: str, version: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = agent.status()
        if s["state"] == "idle" and s["serving"] and (s["serving"]["name"], s["serving"]["version"]) == (name, version):
            return
        time.sleep(0.05)
    raise RuntimeError(f"agent did not end up serving {name} {version}:\n{agent.log_tail()}")


def run(calls: int, updates: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bench-agent-"))
    keys = KeyStore.init(work / "keys")
    server = FakeUpdateServer(keys)
    server.poll_interval_s = 0.2
    model = mlp_model()
    bundles = {("digits", "1.0.0"): make_digits_bundle(keys, work / "d1.edgepack", version="1.0.0", release_counter=1),
               ("digits", "1.1.0"): make_digits_bundle(keys, work / "d2.edgepack", version="1.1.0", release_counter=2),
               ("mlp", "1.0.0"): mlp_bundle(keys, work / "m1.edgepack", "1.0.0", 1, model),
               ("mlp", "1.1.0"): mlp_bundle(keys, work / "m2.edgepack", "1.1.0", 2, model)}
    for info in bundles.values():
        server.publish(info)
    api = f"127.0.0.1:{free_port()}"
    doc = agent_config_dict(work / "state", server.url, keys, api={"listen": api}, trial={"period_s": 0.3},
                            server={"poll_interval_s": 0.2})
    (work / "agent.toml").write_text(toml_dumps(doc))
    os.environ.setdefault("MALLOC_ARENA_MAX", "2")  # as in device_agent/edgepack-agent.service
    agent = AgentProcess(work / "agent.toml", api, work / "agent.log")
    results: dict[str, Any] = {"models": {}}
    images, _ = digits_data()
    raw_body = json.dumps({"inputs": images[:1].tolist()}).encode()
    try:
        server.assign(DEVICE, HARDWARE, "digits", "1.0.0")
        agent.start()
        wait_serving(agent, "digits", "1.0.0")
        for name in ("digits", "mlp"):
            res: dict[str, Any] = {}
            # ---- activation: alternate versions, read the agent's own timings from its activated events
            seen = len(activated_events(work / "state"))
            for i in range(updates + 1):
                version = ("1.0.0", "1.1.0")[i % 2] if name == "mlp" else ("1.1.0", "1.0.0")[i % 2]
                server.assign(DEVICE, HARDWARE, name, version)
                wait_serving(agent, name, version)
            events = activated_events(work / "state")[seen + 1:]  # the first one switched models: skip it
            timings = [e["detail"]["timings"] for e in events if e["target"]["name"] == name]
            slot = next((work / "state" / "bundles").iterdir())
            base = baseline_activation(slot)
            fresh = baseline_fresh(slot)
            act = statistics.median(t["activation_s"] for t in timings)
            res["activation"] = {"median_s": act, "runs": len(timings), "baseline": base, "ratio": act / base["sum_s"],
                                 "fresh_baseline": fresh, "fresh_ratio": act / fresh["sum_s"],
                                 "verify_s": statistics.median(t["verify_s"] for t in timings),
                                 "selftest_s": statistics.median(t["selftest_s"] for t in timings)}
            # ---- API overhead
            import onnxruntime as ort

            manifest = Manifest.from_bytes((slot / "manifest.json").read_bytes())
            features = Pipeline.from_dict(json.loads((slot / manifest.preprocessing).read_bytes())).transform(
                images[:1])
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1
            sess = ort.InferenceSession(str(slot / manifest.variants[0].file), opts, providers=["CPUExecutionProvider"])
            bare, via_api = [], []
            # Alternating blocks (not alternating calls): each side runs in its steady state, as a device
            # serving requests does; alternating single calls would evict each other's weights from the cache.
            with AgentClient(api) as client:
                for _ in range(200):
                    client.request("POST", "/v1/predict", raw=raw_body)
                    sess.run(None, features)
                for _ in range(max(1, calls // 100)):
                    for _ in range(100):
                        t0 = time.perf_counter()
                        sess.run(None, features)
                        bare.append((time.perf_counter() - t0) * 1e3)
                    for _ in range(100):
                        t0 = time.perf_counter()
                        client.request("POST", "/v1/predict", raw=raw_body)
                        via_api.append((time.perf_counter() - t0) * 1e3)
            res["api"] = {"bare_p50_ms": pct(bare, 0.5), "bare_p99_ms": pct(bare, 0.99),
                          "api_p50_ms": pct(via_api, 0.5), "api_p99_ms": pct(via_api, 0.99),
                          "overhead_p50_ms": pct(via_api, 0.5) - pct(bare, 0.5),
                          "overhead_p99_ms": pct(via_api, 0.99) - pct(bare, 0.99)}
            # ---- worker RSS vs a bare runtime holding the same model
            worker = agent.status()["worker"]["pid"]
            res["worker_rss_mb"] = rss_mb(worker)
            res["bare_runtime_rss_mb"] = bare_worker_rss(slot / manifest.variants[0].file)
            results["models"][name] = res
        # ---- supervisor idle: poll interval back to a realistic minute, then measure
        server.poll_interval_s = 60
        time.sleep(3)
        pid = agent.proc.pid
        c0, t0 = cpu_s(pid), time.monotonic()
        time.sleep(15)
        results["supervisor"] = {"rss_mb": rss_mb(pid), "cpu_pct": 100 * (cpu_s(pid) - c0) / (time.monotonic() - t0)}
    finally:
        agent.stop()
        server.close()
    return results


def markdown(r: dict[str, Any], command: str) -> str:
    lines = ["## Device agent", "",
             f"Command: `{command}` (one run; the agent is `edgepack-agent run` in a subprocess updating itself "
             "from a protocol-conformant server with real signed bundles).", "",
             "Host: 2 shared x86-64 cores, Python 3.11, onnxruntime 1 thread. Baselines are measured in the same run.",
             "", "### Local API overhead and activation", "",
             "| model | bare run p50 / p99 ms | API p50 / p99 ms | overhead p50 / p99 ms | activation s "
             "| hash + session + golden s: warm / fresh process | ratio: warm / fresh | worker RSS MB "
             "| bare runtime RSS MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, m in r["models"].items():
        a, act = m["api"], m["activation"]
        lines.append(f"| {name} | {a['bare_p50_ms']:.3f} / {a['bare_p99_ms']:.3f} | {a['api_p50_ms']:.3f} / "
                     f"{a['api_p99_ms']:.3f} | **{a['overhead_p50_ms']:.3f}** / {a['overhead_p99_ms']:.3f} | "
                     f"{act['median_s']:.3f} | {act['baseline']['sum_s']:.3f} / {act['fresh_baseline']['sum_s']:.3f} | "
                     f"{act['ratio']:.2f}x / **{act['fresh_ratio']:.2f}x** | "
                     f"{m['worker_rss_mb']:.1f} | {m['bare_runtime_rss_mb']:.1f} |")
    s = r["supervisor"]
    mlp = r["models"]["mlp"]
    lines += ["", "### Supervisor idle", "",
              f"RSS **{s['rss_mb']:.1f} MB**, CPU **{s['cpu_pct']:.2f} %** over 15 s idle (poll interval 60 s, "
              "no broker configured).", "", "### Goals", "", "| goal | measured | met |", "|---|---|---|"]
    goals = [("API overhead p50 <= 0.5 ms (digits)", r["models"]["digits"]["api"]["overhead_p50_ms"], 0.5, "ms"),
             ("API overhead p50 <= 0.5 ms (mlp)", mlp["api"]["overhead_p50_ms"], 0.5, "ms"),
             ("activation <= 1.5x hash + session + golden, fresh process (mlp, 34 MB)",
              mlp["activation"]["fresh_ratio"], 1.5, "x"),
             ("activation <= 1.5x hash + session + golden, warm process (mlp, 34 MB)", mlp["activation"]["ratio"], 1.5,
              "x"),
             ("activation <= 1.5x hash + session + golden, fresh process (digits, 4 KB)",
              r["models"]["digits"]["activation"]["fresh_ratio"], 1.5, "x"),
             ("supervisor <= 40 MB RSS", s["rss_mb"], 40, "MB"), ("supervisor < 1 % CPU idle", s["cpu_pct"], 1, "%")]
    for label, value, limit, unit in goals:
        lines.append(f"| {label} | {value:.3f} {unit} | {value <= limit} |")
    lines += ["", (
              'Reading the figures: activation is measured by the agent itself, from the start of verification '
              'to the new worker serving: verification hashes every file; the standby worker (started, runtime '
              'imported and initialised while the bundle downloads) loads the session from the files this '
              'process has just verified and runs the golden vectors; three atomic state writes with fsync; the'
              ' old worker stops after the switch. After a restart or a rollback the worker re-hashes every '
              'file before loading it. The fresh-process baseline is the same sum in a new process that '
              "imported onnxruntime first, i.e. the worker's situation; the warm baseline reuses one process "
              '(allocator and page cache warm) and is the stricter reading. For the 4 KB model fixed costs '
              '(IPC, fsyncs) dominate a baseline of one or two milliseconds. The API overhead of the 34 MB '
              'model is above the goal: the bare loop runs the model back to back in one process, while behind '
              "the API the worker's inference alternates with the HTTP handling in two other processes on two "
              'shared cores; the worker itself adds about 0.2 ms over the bare run in-process (JSON, '
              "preprocessing, input statistics), the rest is not yet analysed. The worker's RSS over the bare "
              "runtime is numpy's preprocessing library and the IPC loop."), ""]
    return "\n".join(lines)


def write_docs(section: str) -> None:
    path = ROOT / "docs" / "benchmarks.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(r"^## Device agent\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--updates", type=int, default=5)
    p.add_argument("--write-docs", action="store_true")
    args = p.parse_args()
    results = run(args.calls, args.updates)
    print(json.dumps(results, indent=1))
    section = markdown(results, "python bench/bench_agent.py --write-docs")
    print(section)
    if args.write_docs:
        write_docs(section)


if __name__ == "__main__":
    main()
