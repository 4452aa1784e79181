"""What a person watching the terminal sees: a progress bar with ETA and one line per log interval."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _rate(tokens_per_s: float) -> str:
    return f"{tokens_per_s / 1e3:.1f}k" if tokens_per_s < 1e6 else f"{tokens_per_s / 1e6:.2f}M"


class ConsoleReporter:
    """Prints training and evaluation events; the bar only on a terminal, the lines always."""

    def __init__(self, start_step: int, max_steps: int, log_every: int = 1, stream: TextIO = sys.stdout) -> None:
        self.max_steps, self.log_every, self.stream = max_steps, log_every, stream
        self.losses: list[float] = []  # train losses since the last printed line
        self.start_step, self.start_time = start_step, time.time()
        self.bar = tqdm(
            total=max_steps, initial=start_step, desc="training", unit="step", disable=None, file=sys.stderr, dynamic_ncols=True
        )
        self.last_step = start_step

    def _print(self, line: str) -> None:
        if self.bar.disable:
            print(line, file=self.stream, flush=True)
        else:
            self.bar.write(line, file=self.stream)

    def __call__(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "train":
            step = event["step"]
            self.bar.update(step - self.last_step)
            self.last_step = step
            self.losses.append(event["train_loss"])
            if step % self.log_every and step != self.max_steps:
                return
            loss, self.losses = sum(self.losses) / len(self.losses), []  # the interval's mean
            done = step - self.start_step
            eta = (time.time() - self.start_time) / done * (self.max_steps - step) if done else 0.0
            line = (
                f"step {step}/{self.max_steps} | train_loss {loss:.4f} | lr {event['lr']:.2e} | "
                f"grad_norm {event['grad_norm']:.3f} | {_rate(event['tokens_per_s'])} tok/s"
            )
            if "mfu" in event:
                line += f" | mfu {event['mfu']:.1%}"
            self._print(line + f" | eta {_duration(eta)}")
            self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        elif kind == "eval":
            parts = [f"{k} {v:.4f}" for k, v in event.items() if k.startswith("val_") and isinstance(v, float)]
            self._print(f"eval at step {event['step']} | " + " | ".join(parts))
        elif kind == "checkpoint":
            self._print(f"checkpoint {event['path']}")
        elif kind == "early_stop":
            self._print(
                f"early stopping at step {event['step']}: no improvement in "
                f"{event['evals_without_improvement']} evaluations (best {event['best']:.4f})"
            )

    def close(self) -> None:
        self.bar.close()
