"""System metrics: sampled in the background as `system` events; a machine without a GPU is said once, not an error."""

import json
import threading

from codex_ml.tracking.system import GpuProbe, SystemMonitor

CPU_KEYS = {"system/cpu_percent", "system/process_cpu_percent", "system/process_rss_mb", "system/memory_used_percent"}


def test_monitor_emits_system_events_in_the_background():
    events, said, three = [], [], threading.Event()

    def emit(event):
        events.append(event)
        if len(events) == 3:
            three.set()

    monitor = SystemMonitor(0.01, emit, current_step=lambda: 7, say=said.append)
    # counted, not timed: wait (generously) for the third event, whatever the machine's load
    assert three.wait(timeout=60), f"{len(events)} system events in 60 s at one per 0.01 s"
    monitor.stop()
    assert not monitor.thread.is_alive()  # stopped and joined: the sampler can emit nothing more
    for e in events:
        assert e["event"] == "system" and e["step"] == 7
        assert set(e) >= CPU_KEYS
        assert e["system/process_rss_mb"] > 10 and 0 <= e["system/memory_used_percent"] <= 100
    gpu = GpuProbe()
    if gpu.available:
        assert "system/gpu0_utilization" in events[0] and "system/gpu0_memory_used_mb" in events[0]
        assert said == []
    else:
        assert said == [f"system metrics: CPU and memory only ({gpu.reason})"]


def test_training_run_logs_system_metrics_and_says_no_gpu_once(tracked_run):
    rows = [json.loads(line) for line in (tracked_run.path / "metrics.ndjson").read_text().splitlines()]
    system = [r for r in rows if r["event"] == "system"]
    assert system and all(set(r) >= CPU_KEYS for r in system)
    assert [r["step"] for r in system] == sorted(r["step"] for r in system)
    for output in tracked_run.outputs:  # each of the run's two processes
        lines = output.splitlines()
        about_gpu = [line for line in lines if "system metrics" in line or "NVML" in line or "GPU" in line]
        if GpuProbe().available:
            assert about_gpu == []
        else:
            assert len(about_gpu) == 1 and about_gpu[0].startswith("system metrics: CPU and memory only"), about_gpu
        assert not any(line.lower().startswith(("error", "warning")) for line in lines), lines
