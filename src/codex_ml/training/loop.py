"""The native training loop: accumulation, clipping, mixed precision, evaluation and checkpoints.

The loop knows nothing about files or config: it calls ``loss_sum`` on batches, ``evaluate`` for
validation, ``save`` for checkpoints and ``emit`` for every event. Everything that must survive a
restart is in ``state_dict()``, so a resumed run continues bit for bit.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch

from codex_ml.eval.loss import IGNORE_INDEX


@dataclass
class LoopSettings:
    max_steps: int
    grad_accum: int = 1
    grad_clip: float = 1.0
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    checkpoint_every: int = 100
    best_metric: str = "val_loss"
    best_mode: str = "min"
    early_stopping_patience: int = 0
    early_stopping_min_delta: float = 0.0
    flops_per_token: float = 0.0
    peak_flops: float = 0.0  # of all devices together; 0 when unknown (no MFU reported)


@dataclass
class LoopState:
    step: int = 0  # optimizer steps taken
    tokens: int = 0  # target tokens trained on
    best: float | None = None
    evals_without_improvement: int = 0
    last_metrics: dict = field(default_factory=dict)  # of the latest evaluation
    last_eval_step: int = -1
    interval_loss: float = 0.0  # summed over the steps since the last log line
    interval_steps: int = 0
    interval_tokens: int = 0
    stopped_early: bool = False


class StopRequest:
    """Set from a signal handler; the loop saves a checkpoint and returns after the current step."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __call__(self, signum, frame=None) -> None:
        self.signal = signum


class Trainer:
    def __init__(
        self,
        model: torch.nn.Module,
        loss_sum: Callable[[dict], torch.Tensor],
        optimizer: torch.optim.Optimizer,
        scheduler,
        batches: Iterator[dict],
        settings: LoopSettings,
        device: torch.device,
        evaluate: Callable[[], dict],
        save: Callable[[LoopState], None],
        emit: Callable[[dict], None],
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        scaler: torch.amp.GradScaler | None = None,
        all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
        no_sync: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        stop: StopRequest | None = None,
        world_size: int = 1,
    ) -> None:
        # loss_sum(batch): the cross-entropy summed over the batch's target tokens (labels != -100)
        self.model, self.loss_sum, self.optimizer, self.scheduler = model, loss_sum, optimizer, scheduler
        self.batches, self.s, self.device = batches, settings, device
        self.evaluate, self.save, self.emit = evaluate, save, emit
        self.autocast, self.scaler, self.all_reduce, self.no_sync = autocast, scaler, all_reduce, no_sync
        self.stop = stop or StopRequest()
        self.world_size = world_size
        self.state = LoopState()

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        return {
            "loop": asdict(self.state),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.state = LoopState(**state["loop"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    # ------------------------------------------------------------------ one step

    def _train_step(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """One optimizer step over ``grad_accum`` micro-batches; (loss, grad norm, target tokens, lr used).

        The loss is normalised by the target tokens of the whole step (all micro-batches, all
        ranks), so it equals the loss of one large batch however the step is split.
        """
        micro = [{k: v.to(self.device, non_blocking=True) for k, v in next(self.batches).items()}
                 for _ in range(self.s.grad_accum)]
        n_tokens = sum((b["labels"] != IGNORE_INDEX).sum() for b in micro)
        if self.all_reduce is not None:
            n_tokens = self.all_reduce(n_tokens.clone())
        n_tokens = n_tokens.clamp(min=1)
        total = torch.zeros((), device=self.device)
        for i, batch in enumerate(micro):
            last = i == len(micro) - 1
            with contextlib.nullcontext() if last else self.no_sync():
                with self.autocast():
                    loss = self.loss_sum(batch) / n_tokens
                # DDP averages gradients over ranks; scale back up to the global token mean.
                scaled = loss * self.world_size if self.world_size > 1 else loss
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            total += loss.detach()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.s.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.s.grad_clip)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        if self.all_reduce is not None:
            total = self.all_reduce(total)
        return total, grad_norm, n_tokens, lr

    # ------------------------------------------------------------------ the loop

    def run(self) -> LoopState:
        st, s = self.state, self.s
        self.model.train()
        interval_start = time.perf_counter()
        interval_loss = torch.tensor(st.interval_loss, device=self.device, dtype=torch.float64)
        interval_tokens = torch.tensor(st.interval_tokens, device=self.device, dtype=torch.int64)
        while st.step < s.max_steps:
            loss, grad_norm, n_tokens, lr = self._train_step()
            st.step += 1
            interval_loss += loss.double()
            interval_tokens += n_tokens
            st.interval_steps += 1

            if st.step % s.log_every == 0 or st.step == s.max_steps:
                # The only host synchronisation of the hot loop, once per log interval.
                elapsed = time.perf_counter() - interval_start
                mean_loss = interval_loss.item() / st.interval_steps
                tokens = int(interval_tokens.item())
                st.tokens += tokens
                event = {
                    "event": "train", "step": st.step, "train_loss": mean_loss,
                    "lr": lr, "grad_norm": float(grad_norm),
                    "tokens": st.tokens, "tokens_per_s": tokens / max(elapsed, 1e-9),
                }
                if s.peak_flops and s.flops_per_token:
                    event["mfu"] = event["tokens_per_s"] * s.flops_per_token / s.peak_flops
                if not math.isfinite(mean_loss):
                    event["nonfinite_loss"] = True
                self.emit(event)
                interval_loss.zero_()
                interval_tokens.zero_()
                st.interval_steps = 0
                interval_start = time.perf_counter()

            final = st.step == s.max_steps
            if (s.eval_every and st.step % s.eval_every == 0) or final:
                self._evaluate()
            stopping = self.stop.signal is not None or st.stopped_early
            if st.step % s.checkpoint_every == 0 or final or stopping:
                st.interval_loss, st.interval_tokens = interval_loss.item(), int(interval_tokens.item())
                self.save(st)
            if stopping:
                break
        return st

    def _evaluate(self) -> None:
        metrics = self.evaluate()
        self.model.train()
        record_evaluation(self.state, self.s, metrics, self.emit)


def record_evaluation(st: LoopState, s: LoopSettings, metrics: dict, emit: Callable[[dict], None]) -> None:
    """Emit an evaluation, track the best value of ``s.best_metric``, and decide on early stopping."""
    st.last_metrics, st.last_eval_step = metrics, st.step
    emit({"event": "eval", "step": st.step, **metrics})
    value = metrics.get(s.best_metric)
    if value is None or not math.isfinite(value):
        return
    better = st.best is None or (
        value < st.best - s.early_stopping_min_delta if s.best_mode == "min"
        else value > st.best + s.early_stopping_min_delta
    )
    if better:
        st.best, st.evals_without_improvement = value, 0
    else:
        st.evals_without_improvement += 1
        if s.early_stopping_patience and st.evals_without_improvement >= s.early_stopping_patience:
            st.stopped_early = True
            emit({"event": "early_stop", "step": st.step, "best": st.best,
                  "evals_without_improvement": st.evals_without_improvement})
