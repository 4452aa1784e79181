"""System metrics sampled in the background: CPU, memory, and NVIDIA GPUs through NVML."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable


class GpuProbe:
    """Utilisation, memory and power of every NVIDIA GPU; ``available`` is False without NVML or GPUs."""

    def __init__(self) -> None:
        import pynvml

        self.handles, self.reason = [], ""
        try:
            pynvml.nvmlInit()
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            self.nvml = pynvml
            if not self.handles:
                self.reason = "NVML sees no GPU"
        except Exception as e:  # pynvml.NVMLError when there is no driver: that just means no GPU
            self.reason = f"no NVIDIA driver ({e.__class__.__name__})"

    @property
    def available(self) -> bool:
        return bool(self.handles)

    def sample(self) -> dict[str, float]:
        out = {}
        for i, h in enumerate(self.handles):
            util = self.nvml.nvmlDeviceGetUtilizationRates(h)
            mem = self.nvml.nvmlDeviceGetMemoryInfo(h)
            out[f"system/gpu{i}_utilization"] = float(util.gpu)
            out[f"system/gpu{i}_memory_used_mb"] = mem.used / 2**20
            try:
                out[f"system/gpu{i}_power_w"] = self.nvml.nvmlDeviceGetPowerUsage(h) / 1000.0
            except self.nvml.NVMLError:
                pass
        return out


class SystemMonitor:
    """Every ``every_s`` seconds, one ``system`` event with keys under ``system/``."""

    def __init__(
        self, every_s: float, emit: Callable[[dict], None], current_step: Callable[[], int], say: Callable[[str], None]
    ) -> None:
        import psutil

        self.every_s, self.emit, self.current_step = every_s, emit, current_step
        self.process = psutil.Process(os.getpid())
        self.psutil = psutil
        self.gpus = GpuProbe()
        if not self.gpus.available:
            say(f"system metrics: CPU and memory only ({self.gpus.reason})")
        self.process.cpu_percent(None)  # the first reading of cpu_percent is meaningless
        psutil.cpu_percent(None)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="codex-ml-system", daemon=True)
        self.thread.start()

    def sample(self) -> dict[str, float]:
        mem = self.psutil.virtual_memory()
        out = {
            "system/cpu_percent": self.psutil.cpu_percent(None),
            "system/process_cpu_percent": self.process.cpu_percent(None),
            "system/process_rss_mb": self.process.memory_info().rss / 2**20,
            "system/memory_used_percent": mem.percent,
        }
        if self.gpus.available:
            out.update(self.gpus.sample())
        return out

    def _run(self) -> None:
        while not self.stopped.wait(self.every_s):
            self.emit({"event": "system", "step": self.current_step(), **self.sample()})

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)
