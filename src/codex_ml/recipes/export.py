"""Recipe: `codex-ml export` and `codex-ml merge`, a run's checkpoint as a Hugging Face model directory.

Native weights become ``LlamaForCausalLM`` (the same architecture, names mapped one to one); a
Hugging Face module is saved as what it is; a LoRA adapter is merged into its base first. The
directory holds config.json, model.safetensors, generation_config.json and the run's tokenizer, and
``AutoModelForCausalLM.from_pretrained(out)`` loads it offline. A reward run (its checkpoints hold
``reward_head.safetensors``) is written as a one-label sequence classifier instead, which
``AutoModelForSequenceClassification.from_pretrained(out)`` loads.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch

from codex_ml.conf.schema import ExportConfig
from codex_ml.errors import CodexError
from codex_ml.models.gpt import GPT
from codex_ml.models.reward import HEAD_WEIGHTS, SCORE_KEY, sequence_classifier
from codex_ml.recipes.checkpoints import checkpoint_source, find_checkpoint, load_checkpoint_model
from codex_ml.runs import TOKENIZER_DIR
from codex_ml.tokenizer.core import CodeTokenizer
from codex_ml.training.device import DTYPES

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def to_hf_module(model: torch.nn.Module, tokenizer: CodeTokenizer) -> PreTrainedModel:
    """A Hugging Face causal LM for ``model``: native weights as LlamaForCausalLM, others as they are."""
    ids = {"eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id, "bos_token_id": None}
    if isinstance(model, GPT):
        from codex_ml.models.convert import native_to_hf

        return native_to_hf(model, **ids)
    for key, value in ids.items():
        setattr(model.config, key, value)
    return cast("PreTrainedModel", model)  # any model but the native one is a Hugging Face module


def write_hf_dir(model: PreTrainedModel, tokenizer_dir: Path, out: Path, dtype: str) -> None:
    """Write the model, its generation config and the tokenizer into ``out`` (replaced atomically)."""
    from transformers import GenerationConfig

    out = out.expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model = model.to(DTYPES[dtype])  # type: ignore[arg-type]  # transformers types .to() through a decorator that loses self
        model.config.architectures = [type(model).__name__]
        model.save_pretrained(str(tmp), safe_serialization=True)
        c = model.config
        generation = GenerationConfig(eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id, bos_token_id=c.bos_token_id)
        generation.save_pretrained(str(tmp))
        for f in tokenizer_dir.iterdir():
            # a fine-tuned run's tokenizer folder came from a model folder (its config.json too): the model's own files win
            if f.is_file() and not (tmp / f.name).exists():
                shutil.copy2(f, tmp / f.name)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export_command(cfg: ExportConfig) -> None:
    assert cfg.run_dir is not None and cfg.out is not None  # validate_export requires both
    run_dir = Path(cfg.run_dir).expanduser()
    path = find_checkpoint(run_dir, cfg.checkpoint)
    source = checkpoint_source(path)
    model = load_checkpoint_model(run_dir, path, torch.device("cpu"))
    tokenizer = CodeTokenizer.load(run_dir / TOKENIZER_DIR)
    hf = to_hf_module(model, tokenizer)
    if (path / HEAD_WEIGHTS).exists():  # a reward run: the decoder and its scalar head, as a sequence classifier
        from safetensors.torch import load_file

        hf = sequence_classifier(hf, load_file(str(path / HEAD_WEIGHTS))[SCORE_KEY], tokenizer.pad_id)
    write_hf_dir(hf, run_dir / TOKENIZER_DIR, Path(cfg.out), cfg.dtype)
    merged = " (LoRA adapter merged into its base)" if source.get("lora") else ""
    print(f"exported {path} as {type(hf).__name__}{merged} to {Path(cfg.out).expanduser().resolve()}")


def merge_command(cfg: ExportConfig) -> None:
    assert cfg.run_dir is not None  # validate_export requires it
    run_dir = Path(cfg.run_dir).expanduser()
    path = find_checkpoint(run_dir, cfg.checkpoint)
    if not checkpoint_source(path).get("lora"):
        raise CodexError(f"{path} holds full weights, not a LoRA adapter: use codex-ml export run_dir={run_dir} out=DIR")
    export_command(cfg)
