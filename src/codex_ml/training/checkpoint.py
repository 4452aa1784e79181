"""Checkpoints, the one module that owns them: layout, completion, verification, weights, resume.

A checkpoint is a folder ``checkpoints/step_XXXXXXXX/`` holding any number of files, a
``manifest.json`` with each file's size and SHA-256, and a ``COMPLETE`` marker written last. It is
assembled under a temporary name, flushed to disk, and renamed into place in one atomic step, so a
process killed at any moment leaves either the whole checkpoint or none. Loading checks every file
against the manifest and names the first one that differs.

One process (or DDP) writes the model as safetensors and the optimizer as one file, from rank 0.
Under ``training.strategy=fsdp`` every rank writes its own shards of the model and optimizer into
``sharded/`` through ``torch.distributed.checkpoint`` (optionally in the background), and rank 0
completes the folder only once every rank's shards are on disk. Either kind resumes on any number
of ranks, and :func:`model_state` reads either into a full state dict for export and inference.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
from torch.distributed.tensor import DTensor, distribute_tensor

from codex_ml.conf.schema import ConfigError
from codex_ml.errors import CodexError
from codex_ml.models.gpt import CONFIG_NAME, GPT, WEIGHTS_NAME, GPTConfig
from codex_ml.runs import CHECKPOINTS_DIR, CONFIG_FILE, TOKENIZER_DIR, RunError
from codex_ml.tokenizer.core import CodeTokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedModel

COMPLETE = "COMPLETE"
MANIFEST = "manifest.json"
_NAME = re.compile(r"^step_(\d{8,})$")


class CheckpointError(CodexError):
    """A checkpoint that fails verification or cannot be read."""


@dataclass
class Checkpoint:
    step: int
    path: Path

    @property
    def manifest(self) -> dict:
        return json.loads((self.path / MANIFEST).read_text())

    @property
    def metrics(self) -> dict:
        return self.manifest.get("metrics", {})


def checkpoint_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def torch_bytes(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def load_torch_file(path: Path) -> Any:
    """Only tensors and plain containers: a checkpoint file never runs code when loaded."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError... for damaged files
        raise CheckpointError(f"{path}: cannot be read ({e.__class__.__name__}: {e})") from None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(
    root: Path, step: int, files: dict[str, bytes], metrics: dict | None = None, extra: dict | None = None
) -> Path:
    """Write ``files`` (name -> content) as the checkpoint of ``step``; returns its folder.

    A complete checkpoint of the same step is kept as it is (a run resumed at that step).
    """
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_dir_name(step)
    if (final / COMPLETE).exists():
        return final
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return _complete(tmp, final, step, files, metrics, extra)


def _complete(tmp: Path, final: Path, step: int, files: dict[str, bytes], metrics: dict | None, extra: dict | None) -> Path:
    """Add ``files`` to the folder ``tmp`` (which may hold shards already), list every file in the
    manifest, write the COMPLETE marker last, and rename ``tmp`` to ``final``."""
    for name, data in files.items():
        _write(tmp / name, data)
    entries = {}
    for f in sorted(q for q in tmp.rglob("*") if q.is_file()):
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        entries[f.relative_to(tmp).as_posix()] = {"bytes": f.stat().st_size, "sha256": h.hexdigest()}
    manifest = {"step": step, "files": entries, "metrics": metrics or {}, **(extra or {})}
    _write(tmp / MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    _write(tmp / COMPLETE, b"")
    for d in sorted({f.parent for f in tmp.rglob("*")} | {tmp}, key=lambda q: -len(q.parts)):
        _fsync_dir(d)
    if final.exists():  # an incomplete folder of that name, from some other tool: set it aside
        _discard(final)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    return final


def _discard(path: Path) -> None:
    """Rename first, then delete: a half-deleted folder never looks like a checkpoint."""
    trash = path.parent / f".trash-{path.name}-{os.getpid()}"
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def remove_partial(root: Path) -> list[Path]:
    """Delete what an interrupted save or prune left behind (the caller holds the run's lock)."""
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((".tmp-", ".trash-")):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def complete_checkpoints(root: Path) -> list[Checkpoint]:
    """Checkpoints with their completion marker, oldest first."""
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = _NAME.match(p.name)
            if m and p.is_dir() and (p / COMPLETE).exists():
                found.append(Checkpoint(int(m.group(1)), p))
    return sorted(found, key=lambda c: c.step)


def latest_complete_checkpoint(root: Path) -> Checkpoint | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def verify_checkpoint(path: Path) -> dict:
    """The manifest, once every file it lists has the recorded size and SHA-256."""
    manifest_path = path / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({e})") from None
    for name, entry in sorted(files.items()):
        f = path / name
        if not f.exists():
            raise CheckpointError(f"{f}: missing from the checkpoint")
        size = f.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(f"{f}: {size} bytes, the manifest says {entry['bytes']} (truncated or overwritten)")
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        if h.hexdigest() != entry["sha256"]:
            raise CheckpointError(f"{f}: SHA-256 differs from the manifest (the file is corrupted)")
    return manifest


def prune_checkpoints(root: Path, keep_last: int, keep_best: int, metric: str, mode: str) -> list[Path]:
    """Delete all but the newest ``keep_last`` and the best ``keep_best`` by ``metric``."""
    found = complete_checkpoints(root)
    keep = {c.path for c in found[-keep_last:]}
    if keep_best:
        scored = [(c.metrics[metric], c) for c in found if isinstance(c.metrics.get(metric), (int, float))]
        scored.sort(key=lambda sc: (sc[0] if mode == "min" else -sc[0], -sc[1].step))
        keep |= {c.path for _, c in scored[:keep_best]}
    removed = []
    for c in found:
        if c.path not in keep:
            _discard(c.path)
            removed.append(c.path)
    return removed


def best_checkpoint(root: Path, metric: str, mode: str) -> Checkpoint | None:
    scored = [c for c in complete_checkpoints(root) if isinstance(c.metrics.get(metric), (int, float))]
    if not scored:
        return None
    return (min if mode == "min" else max)(scored, key=lambda c: c.metrics[metric])


# ------------------------------------------------------------------ weights (safetensors) and their configs

HF_CONFIG = "config.json"
BASE_WEIGHTS = "base_model.safetensors"  # a LoRA run's frozen base, kept when no model.path has it
SOURCE_FILE = "model_source.json"  # what a checkpoint's weights are: native, converted Llama, or an HF module
SHARDED_DIR = "sharded"  # DCP folder of an fsdp run: {"model": ..., "optimizer": ...}, every rank's shards
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "trainer_state.pt"


def native_weight_files(model: GPT) -> dict[str, bytes]:
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return {
        WEIGHTS_NAME: save_safetensors(state, metadata={"format": "pt"}),
        CONFIG_NAME: (json.dumps(model.config.to_dict(), indent=2) + "\n").encode(),
    }


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_safetensors(path.read_bytes())
    except Exception as e:  # safetensors raises its own error type for malformed headers
        raise CheckpointError(f"{path}: cannot be read ({e})") from None


def model_state(directory: Path, template: torch.nn.Module, weights_name: str = WEIGHTS_NAME) -> dict[str, torch.Tensor]:
    """The full state dict of the model in checkpoint ``directory``: the one place that reads weights.

    A safetensors file is read as it is; the shards of an fsdp run (whatever its number of ranks)
    are read through DCP into the shapes of ``template`` (the model built from the checkpoint's
    config, on the CPU), without a process group.
    """
    path = directory / weights_name
    sharded = directory / SHARDED_DIR
    if not path.exists() and weights_name == WEIGHTS_NAME and (sharded / ".metadata").exists():
        state = dict(template.state_dict())
        try:
            dcp.load({"model": state}, checkpoint_id=str(sharded), no_dist=True)
        except Exception as e:  # DCP raises CheckpointException, RuntimeError... for damaged or foreign shards
            raise CheckpointError(f"{sharded}: the shards do not load into the model ({e.__class__.__name__}: {e})") from None
        return state
    return read_safetensors(path)


def load_native_weights(model: GPT, directory: Path, weights_name: str = WEIGHTS_NAME) -> None:
    """Load ``directory/weights_name``; every parameter must be there (bar a tied output head), nothing else."""
    missing, unexpected = model.load_state_dict(model_state(directory, model, weights_name), strict=False)
    missing = [k for k in missing if not (model.config.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(
            f"{directory / weights_name}: does not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )


def hf_weight_files(model: PreTrainedModel) -> dict[str, bytes]:
    state = _drop_shared({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()})
    return {
        WEIGHTS_NAME: save_safetensors(state, metadata={"format": "pt"}),
        HF_CONFIG: (model.config.to_json_string() + "\n").encode(),
    }


def _drop_shared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied embeddings): keep the first of each."""
    seen, out = set(), {}
    for k, v in state.items():
        key = (v.data_ptr(), v.shape, v.stride()) if v.numel() else (k,)
        if key in seen:
            continue
        seen.add(key)
        out[k] = v
    return out


def load_hf_weights(model: torch.nn.Module, directory: Path) -> None:
    missing, unexpected = model.load_state_dict(model_state(directory, model), strict=False)
    tied = getattr(model.config, "tie_word_embeddings", False)
    missing = [k for k in missing if not (tied and "lm_head" in k)]
    if missing or unexpected:
        raise CheckpointError(
            f"{directory / WEIGHTS_NAME}: does not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )


def find_native_weights(path: Path) -> Path:
    """A native model's weights in a run folder (its newest checkpoint), or a folder holding them and their config."""
    if (path / CONFIG_NAME).exists() and ((path / WEIGHTS_NAME).exists() or (path / SHARDED_DIR).is_dir()):
        return path
    found = latest_complete_checkpoint(path / CHECKPOINTS_DIR)
    if found is None or not (found.path / CONFIG_NAME).exists():
        raise ConfigError(
            "model.path",
            f"{path} holds no native model ({WEIGHTS_NAME} with {CONFIG_NAME}), "
            "nor a run folder with a complete checkpoint of one",
        )
    return found.path


# ------------------------------------------------------------------ the loop's whole state, for every strategy


def _local_bytes(state: object) -> int:
    """Bytes of this rank's tensors in a (nested) state dict: what an asynchronous save copies to the host."""
    if isinstance(state, dict):
        return sum(_local_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_local_bytes(v) for v in state)
    if isinstance(state, DTensor):
        local = state.to_local()
        return local.numel() * local.element_size()
    if torch.is_tensor(state):
        return state.numel() * state.element_size()
    return 0


class TrainingCheckpoints:
    """Writes the loop's checkpoints into a run's ``checkpoints/`` folder and prunes them.

    ``sharded``: every rank writes its shards of the model and optimizer through DCP; rank 0 adds
    the run-level files and completes the folder after every rank's shards are written (DCP's
    coordinator writes ``.metadata`` only after gathering every rank's result). ``asynchronous``:
    the state is copied to the host and written by a background thread while training continues;
    the next save (or :meth:`finish`) waits for it. Otherwise rank 0 writes the whole checkpoint.
    """

    def __init__(
        self,
        root: Path,
        rank: int,
        world_size: int,
        sharded: bool,
        asynchronous: bool,
        prune: Callable[[Path], object],
    ) -> None:
        self.root, self.rank, self.world_size = root, rank, world_size
        self.sharded, self.asynchronous, self.prune = sharded, asynchronous, prune
        self._pending: Future | None = None
        self._finalizing: threading.Thread | None = None
        self._error: BaseException | None = None
        # a background save runs its own collectives: on a group of its own, never interleaved with training's
        self._group = dist.new_group(backend="gloo") if asynchronous and dist.is_initialized() else None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def save(
        self,
        step: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        files: Callable[[], dict[str, bytes]],
        metrics: dict,
        extra: dict,
    ) -> dict:
        """Checkpoint ``step``; ``files()`` (rank 0's run-level files, or all of them when not sharded)
        is called on rank 0 only. Returns what the checkpoint event reports (path, blocking time,
        host memory staged for a background write)."""
        start = time.perf_counter()
        final = self.root / checkpoint_dir_name(step)
        if not self.sharded:
            if self.is_main:
                save_checkpoint(self.root, step, files(), metrics=metrics, extra=extra)
                self.prune(self.root)
            return {"path": final, "blocking_s": time.perf_counter() - start}
        self.finish()  # one write in flight at a time: the previous one is complete (or has failed loudly)
        if (final / COMPLETE).exists():  # a run resumed at this very step: the checkpoint is there already
            return {"path": final, "blocking_s": 0.0}
        tmp = self.root / f".tmp-{final.name}"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / SHARDED_DIR).mkdir(parents=True)
        _barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state: dict[str, Any] = {"model": model_sd, "optimizer": optim_sd}
        run_files = files() if self.is_main else {}  # taken now: the loop moves on before the write ends
        out: dict = {"path": final}
        if self.asynchronous:
            staged = _local_bytes(state)
            self._pending = cast(
                Future,
                dcp.async_save(
                    state,
                    checkpoint_id=str(tmp / SHARDED_DIR),
                    process_group=self._group,
                    async_checkpointer_type=AsyncCheckpointerType.THREAD,
                ),
            )
            if self.is_main:
                pending = self._pending
                self._finalizing = threading.Thread(
                    target=self._finalize_when_written,
                    args=(pending, tmp, final, step, run_files, metrics, extra),
                    name=f"checkpoint-{step}",
                    daemon=True,
                )
                self._finalizing.start()
            out["host_staging_bytes"] = staged
            out["async"] = True
        else:
            dcp.save(state, checkpoint_id=str(tmp / SHARDED_DIR))
            if self.is_main:
                _complete(tmp, final, step, run_files, metrics, extra)
                self.prune(self.root)
            _barrier()  # every rank sees the checkpoint complete before training goes on
        out["blocking_s"] = time.perf_counter() - start
        return out

    def _finalize_when_written(
        self, pending: Future, tmp: Path, final: Path, step: int, files: dict, metrics: dict, extra: dict
    ) -> None:
        try:
            pending.result()  # rank 0's future ends after every rank's shards and the metadata are written
            _complete(tmp, final, step, files, metrics, extra)
            self.prune(self.root)
        except BaseException as e:  # re-raised in the training thread by finish(): never lost
            self._error = e

    def finish(self) -> None:
        """Wait for a background write to end; its checkpoint is then complete on every rank's view."""
        if self._pending is None:
            return
        try:
            self._pending.result()
        finally:
            self._pending = None
            if self._finalizing is not None:
                self._finalizing.join()
                self._finalizing = None
        if self._error is not None:
            error, self._error = self._error, None
            raise CheckpointError(f"the background checkpoint write failed: {error.__class__.__name__}: {error}") from error
        _barrier()


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def is_sharded(path: Path) -> bool:
    return (path / SHARDED_DIR / ".metadata").exists()


def load_training_state(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    load_weights: Callable[[Path], None],
) -> dict:
    """Load checkpoint ``path``'s model and optimizer into this run, whatever number of ranks and
    strategy wrote it and whatever this run's are; returns its trainer state (loop, loader, RNG).

    Sharded checkpoints are resharded by DCP onto this run's ranks (or read whole by one process).
    A safetensors checkpoint loads through ``load_weights`` into an unsharded model, or, into a
    sharded one, as a full state dict that each rank cuts its shard from.
    """
    sharded_model = any(isinstance(p, DTensor) for p in model.parameters())
    if is_sharded(path):
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state: dict[str, Any] = {"model": model_sd, "optimizer": optim_sd}
        try:
            dcp.load(state, checkpoint_id=str(path / SHARDED_DIR))
        except Exception as e:  # DCP wraps each rank's failure: say which checkpoint, and why
            raise CheckpointError(f"{path / SHARDED_DIR}: cannot be loaded ({e.__class__.__name__}: {e})") from None
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    elif sharded_model:
        _load_whole_into_shards(path, model, optimizer)
    else:
        load_weights(path)
        optimizer.load_state_dict(load_torch_file(path / OPTIMIZER_FILE))
    return load_torch_file(path / STATE_FILE)


def _load_whole_into_shards(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """A whole-model checkpoint into a sharded model: every rank reads it and keeps its own pieces
    (the weights, and the optimizer moments shaped like them), with no communication."""
    full = _full_state(path, model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name not in full:
                raise CheckpointError(f"{path / WEIGHTS_NAME}: has no {name}, which the model has")
            copy_into(p, full[name])
    state = load_torch_file(path / OPTIMIZER_FILE)
    params = [p for g in optimizer.param_groups for p in g["params"]]  # the order the positions refer to
    for index, moments in state["state"].items():
        p = params[index]
        for key, value in moments.items():
            if isinstance(p, DTensor) and torch.is_tensor(value) and value.shape == p.shape:
                moments[key] = distribute_tensor(value, p.device_mesh, p.placements, src_data_rank=None)
    optimizer.load_state_dict(state)


def copy_into(param: torch.Tensor, whole: torch.Tensor) -> None:
    """Set ``param`` (sharded or not) from the whole tensor ``whole``, which every rank holds alike."""
    if whole.shape != param.shape:
        raise CheckpointError(f"a checkpoint tensor of shape {tuple(whole.shape)} does not fit {tuple(param.shape)}")
    if isinstance(param, DTensor):
        # every rank holds the same whole tensor: each takes its own piece, no communication
        local = distribute_tensor(whole.to(param.dtype), param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(local.to_local())
    else:
        param.copy_(whole.to(param.dtype))


def _full_state(path: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A safetensors checkpoint's weights under every name ``model`` has (a tied head under both)."""
    if not (path / WEIGHTS_NAME).exists():
        raise CheckpointError(
            f"{path}: holds no {WEIGHTS_NAME} (a LoRA adapter?): only full-model checkpoints of one "
            "process or DDP resume under training.strategy=fsdp; resume it with the strategy that wrote it"
        )
    state = read_safetensors(path / WEIGHTS_NAME)
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    for names in aliases.values():
        present = [n for n in names if n in state]
        for n in names:
            if n not in state and present:
                state[n] = state[present[0]]
    return state


# ------------------------------------------------------------------ a run's checkpoint, for inference


def find_checkpoint(run_dir: Path, which: str | None = None) -> Path:
    """``which``: None or "latest", "best" (by the run's training.best_metric), a step number, or a folder."""
    if not run_dir.is_dir():
        raise RunError(f"run folder {run_dir} does not exist")
    root = run_dir / CHECKPOINTS_DIR
    if not (run_dir / CONFIG_FILE).exists() and not root.is_dir():
        raise RunError(f"{run_dir} is not a run folder (no {CONFIG_FILE}, no {CHECKPOINTS_DIR}/)")
    which = None if which is None else str(which)
    if which in (None, "latest"):
        found = latest_complete_checkpoint(root)
        if found is None:
            raise RunError(f"{run_dir} has no complete checkpoint yet")
        return found.path
    if which == "best":
        metric, mode = _best_rule(run_dir)
        found = best_checkpoint(root, metric, mode)
        if found is None:
            raise RunError(f"{run_dir}: no checkpoint has a {metric} to choose the best by")
        return found.path
    if which.isdigit():
        path = root / checkpoint_dir_name(int(which))
    else:
        path = Path(which)
        path = path if path.is_absolute() or path.exists() else root / which
    if not (path / "COMPLETE").exists():
        raise RunError(f"checkpoint {path} does not exist or is incomplete")
    return path


def _best_rule(run_dir: Path) -> tuple[str, str]:
    import yaml

    try:
        training = yaml.safe_load((run_dir / CONFIG_FILE).read_text()).get("training", {})
    except (OSError, AttributeError):
        training = {}
    return training.get("best_metric", "val_loss"), training.get("best_mode", "min")


def checkpoint_source(path: Path) -> dict:
    """What the checkpoint's weights are (native, hf, hf-native; lora or not)."""
    if (path / SOURCE_FILE).exists():
        return json.loads((path / SOURCE_FILE).read_text())
    if (path / CONFIG_NAME).exists():
        return {"kind": "native", "path": None, "lora": False}
    raise CheckpointError(f"{path}: neither {SOURCE_FILE} nor {CONFIG_NAME}; not a codex-ml checkpoint")


def load_native_checkpoint(path: Path, device: torch.device, weights_name: str = WEIGHTS_NAME) -> GPT:
    """The native decoder in ``path``: its config, and weights that fit it exactly (bar a tied output head)."""
    try:
        config = GPTConfig.from_dict(json.loads((path / CONFIG_NAME).read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path / CONFIG_NAME}: not a native model config ({e})") from None
    model = GPT(config)
    load_native_weights(model, path, weights_name)
    return model.to(device).eval()


def _base_for_adapter(source: dict, run_dir: Path, path: Path) -> torch.nn.Module:
    """The frozen base a LoRA checkpoint adapts: a Hugging Face module, or the native decoder."""
    if source["kind"] in ("hf", "hf-native"):
        from codex_ml.models.hf import load_hf_causal_lm

        return load_hf_causal_lm(source["path"], torch.float32, torch.device("cpu"))
    if source.get("path"):
        return load_native_checkpoint(find_native_weights(Path(source["path"])), torch.device("cpu"))
    if is_sharded(path):
        raise CheckpointError(
            f"{path}: a LoRA checkpoint written under training.strategy=fsdp keeps its adapter in DCP shards; "
            "read it by resuming the run (export and inference of fsdp LoRA checkpoints are not supported yet)"
        )
    if (path / BASE_WEIGHTS).exists():
        # a base missing a weight would merge into a model with randomly initialised layers: refuse it
        return load_native_checkpoint(path, torch.device("cpu"), weights_name=BASE_WEIGHTS)
    raise CheckpointError(f"{path}: a LoRA adapter whose base model cannot be found")


def load_checkpoint_model(run_dir: Path, path: Path, device: torch.device) -> torch.nn.Module:
    """The checkpoint's model, adapters merged: a native ``GPT`` or a Hugging Face causal LM."""
    verify_checkpoint(path)
    source = checkpoint_source(path)
    if source.get("lora"):
        from peft import PeftModel

        base = _base_for_adapter(source, run_dir, path)
        model = PeftModel.from_pretrained(base, str(path)).merge_and_unload()  # nosec B615  # a verified local checkpoint folder: PEFT reads its adapter from disk
        return model.to(device).eval()
    if source["kind"] == "hf":
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(str(path), local_files_only=True)  # nosec B615  # a verified local checkpoint folder, local_files_only: never the Hub
        model = AutoModelForCausalLM.from_config(config)
        load_hf_weights(model, path)
        return model.to(device).eval()
    return load_native_checkpoint(path, device)


def load_run_model(run_dir: Path, which: str | None, device: torch.device) -> tuple[torch.nn.Module, CodeTokenizer, Path]:
    """(model, tokenizer, checkpoint folder) of a run."""
    path = find_checkpoint(run_dir, which)
    model = load_checkpoint_model(run_dir, path, device)
    tokenizer = CodeTokenizer.load(run_dir / TOKENIZER_DIR)
    return model, tokenizer, path
