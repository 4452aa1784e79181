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
from types import FrameType
from typing import cast

import torch
from torch.distributed.tensor import DTensor

from codex_ml.models.loss import target_tokens


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
    pending: list = field(default_factory=list)  # per-step records read back but not yet logged
    stopped_early: bool = False


class StopRequest:
    """Set from a signal handler; the loop saves a checkpoint and returns after the current step.

    A signal reaches one process, but every rank must stop at the same step (or the others wait
    in a collective forever): ``agree`` turns the ranks' requests into one decision, the same on
    every rank, and ``agreed`` is what the loop and the recipe act on.
    """

    def __init__(self, agree: Callable[[int | None], int | None] = lambda signum: signum) -> None:
        self.signal: int | None = None  # what this process received
        self.agreed: int | None = None  # what all ranks decided: a signal number, or None to go on
        self._agree = agree  # a collective under torchrun (every rank must call it at the same step)

    def __call__(self, signum: int, frame: FrameType | None = None) -> None:
        self.signal = signum

    def decide(self) -> bool:
        """Whether to stop now; a collective when there are several ranks. Once stopping, stays so."""
        if self.agreed is None:
            self.agreed = self._agree(self.signal)
        return self.agreed is not None


def token_measure(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Language modelling: the loss is normalised by the target tokens, and those are the tokens trained on."""
    n = target_tokens(batch["labels"])
    return n, n


class Trainer:
    """The native loop over any objective.

    ``loss_sum(batch)`` is the objective summed over the batch's units; ``measure(batch)`` gives
    (units, tokens): the loss of a step is divided by its units over all micro-batches and ranks
    (target tokens for language modelling, pairs for DPO, sequences or tokens for GRPO) and the
    tokens feed the throughput. ``step_metrics()``, called after each optimizer step, returns the
    objective's own figures as ``name -> tensor([sum, count])`` over this rank's part of the step;
    the loop adds them over ranks and logs ``sum / count`` in the step's ``train`` event.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss_sum: Callable[[dict], torch.Tensor],
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LambdaLR,
        batches: Iterator[dict],
        settings: LoopSettings,
        device: torch.device,
        evaluate: Callable[..., dict],  # evaluate(whole_split=bool): the validation metrics
        save: Callable[[LoopState], None],
        emit: Callable[[dict], None],
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        scaler: torch.amp.GradScaler | None = None,
        all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
        no_sync: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        stop: StopRequest | None = None,
        world_size: int = 1,
        measure: Callable[[dict], tuple[torch.Tensor, torch.Tensor]] = token_measure,
        step_metrics: Callable[[], dict[str, torch.Tensor]] | None = None,
    ) -> None:
        # loss_sum(batch): the cross-entropy summed over the batch's target tokens (models.loss);
        # under DDP, the DDP-wrapped models.loss.SummedLossModule, so that gradients are synchronised
        self.model, self.loss_sum, self.optimizer, self.scheduler = model, loss_sum, optimizer, scheduler
        self.batches, self.s, self.device = batches, settings, device
        self.evaluate, self.save, self.emit = evaluate, save, emit
        self.autocast, self.scaler, self.all_reduce, self.no_sync = autocast, scaler, all_reduce, no_sync
        self.stop = stop or StopRequest()
        self.world_size = world_size
        self.measure, self.step_metrics = measure, step_metrics
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

    def _train_step(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, dict[str, torch.Tensor]]:
        """One optimizer step over ``grad_accum`` micro-batches; (loss, grad norm, tokens, lr used, metrics).

        The loss is normalised by the units of the whole step (all micro-batches, all ranks), so it
        equals the loss of one large batch however the step is split.
        """
        micro = [
            {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in next(self.batches).items()}
            for _ in range(self.s.grad_accum)
        ]
        # grad_accum >= 1: a sum of tensors, never sum()'s start value 0; units and tokens in one collective
        counts = cast(torch.Tensor, sum(torch.stack(self.measure(b)).to(self.device, torch.float64) for b in micro))
        if self.all_reduce is not None:
            counts = self.all_reduce(counts.clone())
        n_units, n_tokens = counts[0].clamp(min=1), counts[1]
        total = torch.zeros((), device=self.device)
        for i, batch in enumerate(micro):
            last = i == len(micro) - 1
            with contextlib.nullcontext() if last else self.no_sync():
                with self.autocast():
                    loss = self.loss_sum(batch) / n_units.to(torch.float32)
                # DDP averages gradients over ranks; scale back up to the global mean.
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
        if isinstance(grad_norm, DTensor):  # FSDP2: the norm over every rank's shards, the same on each
            grad_norm = grad_norm.full_tensor()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        metrics = self.step_metrics() if self.step_metrics is not None else {}
        if self.all_reduce is not None:
            total = self.all_reduce(total)
            if metrics:  # one collective for all of them, in a fixed order
                names = sorted(metrics)
                summed = self.all_reduce(torch.stack([metrics[k].to(self.device, torch.float64) for k in names]))
                metrics = dict(zip(names, summed.unbind(0)))
        return total, grad_norm, n_tokens, lr, metrics

    # ------------------------------------------------------------------ the loop

    def run(self) -> LoopState:
        """Train to ``max_steps``. Every step gets its own ``train`` event, but the values stay on the
        device and are read back in one synchronisation per ``log_every`` steps (and at checkpoints)."""
        st, s = self.state, self.s
        self.model.train()
        interval_start = time.perf_counter()
        on_device: list[tuple] = []  # (step, loss, grad norm, lr, tokens, metrics) not yet read back

        def read_back() -> None:
            if on_device:
                values = torch.stack(
                    [torch.stack([loss.double(), norm.double(), n.double()]) for _, loss, norm, _, n, _ in on_device]
                ).tolist()
                extras = [
                    {k: v.tolist() for k, v in metrics.items()} if metrics else {} for *_, metrics in on_device
                ]  # read back with the rest: no synchronisation of its own per step
                for (step, _, _, lr, _, _), (loss, norm, n), extra in zip(on_device, values, extras):
                    record = {"step": step, "train_loss": loss, "grad_norm": norm, "lr": lr, "tokens": int(n)}
                    record.update({k: total / count if count else float("nan") for k, (total, count) in extra.items()})
                    st.pending.append(record)
                on_device.clear()

        while st.step < s.max_steps:
            loss, grad_norm, n_tokens, lr, metrics = self._train_step()
            st.step += 1
            on_device.append((st.step, loss, grad_norm, lr, n_tokens, metrics))

            if st.step % s.log_every == 0 or st.step == s.max_steps:
                read_back()  # the hot loop's only host synchronisation
                elapsed = time.perf_counter() - interval_start
                tokens_per_s = sum(p["tokens"] for p in st.pending) / max(elapsed, 1e-9)
                for record in st.pending:
                    st.tokens += record["tokens"]
                    event = {"event": "train", **record, "tokens": st.tokens, "tokens_per_s": tokens_per_s}
                    if s.peak_flops and s.flops_per_token:
                        event["mfu"] = tokens_per_s * s.flops_per_token / s.peak_flops
                    if not math.isfinite(record["train_loss"]):
                        event["nonfinite_loss"] = True
                    self.emit(event)
                st.pending = []
                interval_start = time.perf_counter()

            final = st.step == s.max_steps
            if (s.eval_every and st.step % s.eval_every == 0) or final:
                self._evaluate(whole_split=final)  # the run's last figure covers the whole split
            # every rank reaches the same decision at the same step; with several ranks only at
            # steps that synchronise anyway (log and checkpoint steps), to keep the hot loop sync-free
            at_sync = self.world_size == 1 or final or st.step % s.log_every == 0 or st.step % s.checkpoint_every == 0
            stopping = (at_sync and self.stop.decide()) or st.stopped_early
            if st.step % s.checkpoint_every == 0 or final or stopping:
                read_back()  # unlogged steps go into the checkpoint, so a resumed run logs them too
                self.save(st)
            if stopping:
                break
        return st

    def _evaluate(self, whole_split: bool) -> None:
        metrics = self.evaluate(whole_split=whole_split)
        self.model.train()
        record_evaluation(self.state, self.s, metrics, self.emit)
        if self.state.stopped_early and not whole_split:
            # the run ends here instead of at max_steps: its last figure covers the whole split as well
            self.state.last_metrics = self.evaluate(whole_split=True)
            self.model.train()
            self.emit({"event": "eval", "step": self.state.step, **self.state.last_metrics})


def record_evaluation(st: LoopState, s: LoopSettings, metrics: dict, emit: Callable[[dict], None]) -> None:
    """Emit an evaluation, track the best value of ``s.best_metric``, and decide on early stopping."""
    st.last_metrics, st.last_eval_step = metrics, st.step
    emit({"event": "eval", "step": st.step, **metrics})
    value = metrics.get(s.best_metric)
    if value is None or not math.isfinite(value):
        return
    better = st.best is None or (
        value < st.best - s.early_stopping_min_delta if s.best_mode == "min" else value > st.best + s.early_stopping_min_delta
    )
    if better:
        st.best, st.evals_without_improvement = value, 0
    else:
        st.evals_without_improvement += 1
        if s.early_stopping_patience and st.evals_without_improvement >= s.early_stopping_patience:
            st.stopped_early = True
            emit(
                {
                    "event": "early_stop",
                    "step": st.step,
                    "best": st.best,
                    "evals_without_improvement": st.evals_without_improvement,
                }
            )
