"""The Hugging Face Trainer as a second engine (``training.engine=hf``), for workflows built on it.

It runs the same model, batches (our loader, in our order), optimizer and schedule objects,
precision, accumulation, checkpoint cadence and seed as the native loop, and reports through the
same callbacks, so a run folder looks the same whichever engine wrote it. Checkpoints are ours
(written by ``save``); the Trainer only steps.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Iterator

import torch

from codex_ml.training.loop import LoopSettings, LoopState, StopRequest, record_evaluation


class _Rows(torch.utils.data.IterableDataset):
    """Our loader's batches, row by row: the Trainer's DataLoader re-forms the same batches."""

    def __init__(self, batches: Iterator[dict]) -> None:
        self.batches = batches

    def __iter__(self):
        while True:
            batch = next(self.batches)
            for i in range(batch["input_ids"].shape[0]):
                yield {k: v[i] for k, v in batch.items()}


class _LossModule(torch.nn.Module):
    """What the Trainer calls: the summed token loss of a batch; the Trainer normalises it."""

    def __init__(self, module: torch.nn.Module, loss_sum: Callable[[dict], torch.Tensor]) -> None:
        super().__init__()
        self.module = module
        self.loss_sum = loss_sum

    def forward(self, **batch):
        return {"loss": self.loss_sum(batch)}


def run_hf_trainer(
    module: torch.nn.Module,
    loss_sum: Callable[[dict], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler,
    batches: Iterator[dict],
    settings: LoopSettings,
    state: LoopState,
    batch_size: int,
    precision: str,
    seed: int,
    device: torch.device,
    evaluate: Callable[[], dict],
    save: Callable[[LoopState], None],
    emit: Callable[[dict], None],
    stop: StopRequest,
) -> LoopState:
    """Train from ``state.step`` to ``settings.max_steps`` with ``transformers.Trainer``."""
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    start = state.step
    remaining = settings.max_steps - start

    class CodexTrainer(Trainer):
        loss_is_scaled_for_ga = True  # compute_loss below divides by the step's target tokens itself

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            total = model(**inputs)["loss"]
            n = num_items_in_batch if num_items_in_batch is not None else (inputs["labels"] != -100).sum()
            loss = total / n
            return (loss, {"loss": loss}) if return_outputs else loss

    class Bridge(TrainerCallback):
        """Our events, evaluation, checkpoints and stop requests, at the Trainer's step boundaries."""

        def __init__(self) -> None:
            self.interval_start = time.perf_counter()
            self.interval_steps = 0

        def on_step_end(self, args, hf_state, control, **kw):
            state.step = start + hf_state.global_step
            state.tokens += batch_size * settings_seq_tokens[0] * settings.grad_accum
            self.interval_steps += 1
            final = state.step == settings.max_steps
            if (settings.eval_every and state.step % settings.eval_every == 0) or final:
                record_evaluation(state, settings, evaluate(), emit)
                module.train()
            stopping = stop.signal is not None or state.stopped_early
            if state.step % settings.checkpoint_every == 0 or final or stopping:
                save(state)
            if stopping:
                control.should_training_stop = True
            return control

        def on_log(self, args, hf_state, control, logs=None, **kw):
            if not logs or "loss" not in logs:
                return
            elapsed = time.perf_counter() - self.interval_start
            tokens = self.interval_steps * batch_size * settings_seq_tokens[0] * settings.grad_accum
            event = {"event": "train", "step": start + hf_state.global_step, "train_loss": float(logs["loss"]),
                     "lr": float(logs.get("learning_rate", optimizer.param_groups[0]["lr"])),
                     "grad_norm": float(logs.get("grad_norm", math.nan)), "tokens": state.tokens,
                     "tokens_per_s": tokens / max(elapsed, 1e-9), "engine": "hf"}
            emit(event)
            self.interval_start, self.interval_steps = time.perf_counter(), 0

    # tokens per row, known after the first batch is drawn; the loader's rows all have one length
    first = next(batches)
    settings_seq_tokens = [int(first["labels"].shape[1])]

    def replay() -> Iterator[dict]:
        yield first
        yield from batches

    with tempfile.TemporaryDirectory(prefix="codex-ml-hf-trainer-") as out:
        args = TrainingArguments(
            output_dir=out, max_steps=remaining, per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=settings.grad_accum, max_grad_norm=settings.grad_clip or 0.0,
            logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[],  # an event per step, as ours
            seed=seed, data_seed=seed, bf16=precision == "bf16", fp16=precision == "fp16",
            use_cpu=device.type == "cpu", dataloader_num_workers=0, disable_tqdm=True, ignore_data_skip=True,
            remove_unused_columns=False,
        )
        trainer = CodexTrainer(model=_LossModule(module, loss_sum), args=args, train_dataset=_Rows(replay()),
                               optimizers=(optimizer, scheduler), callbacks=[Bridge()])
        for cb in (PrinterCallback, ProgressCallback):  # our console reporter prints the progress
            trainer.remove_callback(cb)
        trainer.train()
    return state
