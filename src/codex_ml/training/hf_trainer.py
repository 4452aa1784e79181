"""The Hugging Face Trainer as a second engine (``training.engine=hf``), for workflows built on it.

It runs the same model, batches (our loader, in our order), optimizer and schedule objects,
precision, accumulation, checkpoint cadence and seed as the native loop, and reports through the
same callbacks, so a run folder looks the same whichever engine wrote it. Checkpoints are ours
(written by ``save``); the Trainer only steps. Its DataLoader hands on our batches one by one, as
they are drawn (no re-batching, no sharding, no look-ahead): the loader's position in a checkpoint
is then exactly the batches trained on, and a resumed run neither skips nor repeats one.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, cast

import torch

from codex_ml.models.loss import SummedLossModule, target_tokens
from codex_ml.training.loop import LoopSettings, LoopState, StopRequest, record_evaluation

if TYPE_CHECKING:
    from transformers import TrainerControl, TrainerState, TrainingArguments


class _Batches(torch.utils.data.IterableDataset):
    """Our loader's batches, whole, drawn only when the Trainer asks for the next one."""

    def __init__(self, batches: Iterator[dict]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[dict]:
        yield from self.batches


def run_hf_trainer(
    module: torch.nn.Module,
    loss_sum: Callable[[dict], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    batches: Iterator[dict],
    settings: LoopSettings,
    state: LoopState,
    batch_size: int,
    precision: str,
    seed: int,
    device: torch.device,
    evaluate: Callable[..., dict],
    save: Callable[[LoopState], None],
    emit: Callable[[dict], None],
    stop: StopRequest,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> LoopState:
    """Train from ``state.step`` to ``settings.max_steps`` with ``transformers.Trainer``.

    ``loss_sum`` is the batch's summed token loss on the bare ``module`` (the Trainer wraps it for
    data parallelism itself); ``all_reduce`` sums across ranks, as in the native loop.
    """
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    start = state.step
    remaining = settings.max_steps - start

    world_size = torch.distributed.get_world_size() if all_reduce is not None else 1
    step_targets: list[torch.Tensor] = []  # the target tokens (all ranks) of each step not yet counted

    class CodexTrainer(Trainer):
        loss_is_scaled_for_ga = True  # compute_loss below divides by the step's target tokens itself

        def get_train_dataloader(self) -> torch.utils.data.DataLoader:
            # our loader already shards by rank and batches: hand its batches on as they are
            assert self.train_dataset is not None, "run_hf_trainer always passes train_dataset"
            return torch.utils.data.DataLoader(self.train_dataset, batch_size=None, num_workers=0)

        def get_batch_samples(
            self, epoch_iterator: Iterator, num_batches: int, device: torch.device
        ) -> tuple[list, torch.Tensor]:
            # the Trainer draws a step's micro-batches at once: count their target tokens on every
            # rank (the Trainer's own count drops each row's first label, which our labels, already
            # shifted, do not have to spare)
            samples = []
            for _ in range(num_batches):
                try:
                    samples.append(next(epoch_iterator))
                except StopIteration:
                    break
            # our batches never run out, so samples is never empty: a sum of tensors, never the start value 0
            n = cast(torch.Tensor, sum(target_tokens(b["labels"]) for b in samples)).to(device)
            if all_reduce is not None:
                n = all_reduce(n)
            step_targets.append(n)
            return samples, n.clamp(min=1)

        def compute_loss(
            self,
            model: torch.nn.Module,
            inputs: dict[str, Any],
            return_outputs: bool = False,
            num_items_in_batch: torch.Tensor | int | None = None,
        ) -> torch.Tensor | tuple[torch.Tensor, Any]:
            # DDP averages gradients over ranks; scale back up to the global token mean, as the native loop
            assert num_items_in_batch is not None, "get_batch_samples above always counts the step's targets"
            loss = model(inputs) / num_items_in_batch * world_size
            return (loss, {"loss": loss}) if return_outputs else loss

    class Bridge(TrainerCallback):
        """Our events, evaluation, checkpoints and stop requests, at the Trainer's step boundaries."""

        def __init__(self) -> None:
            self.interval_start = time.perf_counter()
            self.interval_tokens = 0

        # "hf_state", not the base class's "state", which would hide the LoopState this closure updates;
        # the Trainer passes (args, state, control) positionally
        def on_step_end(  # type: ignore[override]
            self,
            args: TrainingArguments,
            hf_state: TrainerState,
            control: TrainerControl,
            **kw: Any,
        ) -> None:
            n = int(step_targets.pop(0))
            state.tokens += n
            self.interval_tokens += n

        def on_log(  # type: ignore[override]
            self,
            args: TrainingArguments,
            hf_state: TrainerState,
            control: TrainerControl,
            logs: dict[str, float] | None = None,
            **kw: Any,
        ) -> TrainerControl | None:
            # the Trainer logs every step (logging_steps=1), right after on_step_end: the step's train
            # event goes out first, then evaluation and the checkpoint, whose metrics offset includes it
            if not logs or "loss" not in logs:
                return None
            state.step = start + hf_state.global_step
            elapsed = time.perf_counter() - self.interval_start
            emit(
                {
                    "event": "train",
                    "step": state.step,
                    "train_loss": float(logs["loss"]),
                    "lr": float(logs.get("learning_rate", optimizer.param_groups[0]["lr"])),
                    "grad_norm": float(logs.get("grad_norm", math.nan)),
                    "tokens": state.tokens,
                    "tokens_per_s": self.interval_tokens / max(elapsed, 1e-9),
                    "engine": "hf",
                }
            )
            self.interval_start, self.interval_tokens = time.perf_counter(), 0
            final = state.step == settings.max_steps
            if (settings.eval_every and state.step % settings.eval_every == 0) or final:
                record_evaluation(state, settings, evaluate(whole_split=final), emit)
                module.train()
            stopping = stop.decide() or state.stopped_early  # the same decision on every rank
            if state.step % settings.checkpoint_every == 0 or final or stopping:
                save(state)
            if stopping:
                control.should_training_stop = True
            return control

    with tempfile.TemporaryDirectory(prefix="codex-ml-hf-trainer-") as out:
        args = TrainingArguments(
            output_dir=out,
            max_steps=remaining,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=settings.grad_accum,
            max_grad_norm=settings.grad_clip or 0.0,
            logging_steps=1,
            save_strategy="no",
            eval_strategy="no",
            report_to=[],  # an event per step, as ours
            seed=seed,
            data_seed=seed,
            bf16=precision == "bf16",
            fp16=precision == "fp16",
            use_cpu=device.type == "cpu",
            dataloader_num_workers=0,
            disable_tqdm=True,
            ignore_data_skip=True,
            remove_unused_columns=False,
        )
        trainer = CodexTrainer(
            model=SummedLossModule(module, loss_sum),
            args=args,
            train_dataset=_Batches(batches),
            optimizers=(optimizer, scheduler),
            callbacks=[Bridge()],
        )
        for cb in (PrinterCallback, ProgressCallback):  # our console reporter prints the progress
            trainer.remove_callback(cb)
        trainer.train()
    return state
