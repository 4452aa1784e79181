"""Hugging Face models that are not Llama (GPT-2, Qwen2, Phi-3, Gemma 2) served in their own layers over the
scheduler's slot cache: greedy completions equal transformers' own ``generate``, alone or batched."""

from __future__ import annotations

import asyncio

import pytest
import torch

from codex_ml.conf.schema import ServeCommandConfig, ServeConfig
from codex_ml.errors import CodexError
from codex_ml.serve.generation import Choices, ChoiceSpec
from codex_ml.serve.hf_decoder import HFSlotDecoder, UnsupportedModel, check_matches_model
from codex_ml.serve.server import build
from codex_ml.tokenizer.core import CodeTokenizer
from helpers import run_cli, save_tiny_hf_models, stdlib_sample, tiny_train_args

PROMPTS = ["def parse_header_line(line):", "import os\n", "class Cache:\n    def get(self, key", "x = [", "# sum\n"]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf-archs")
    corpus = root / "corpus"
    corpus.mkdir()
    for p in stdlib_sample(20):
        (corpus / p.name).write_bytes(p.read_bytes())
    save_tiny_hf_models(root, ["gpt2", "qwen2", "phi3"], corpus, max_positions=128)
    return root


def reference_completions(folder) -> list[str]:
    """transformers' own greedy decoding, one prompt at a time, with the model loaded afresh (the prompt's ids
    and the decoding are the served tokenizer's, so that only the model's forward pass is compared)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True).eval()
    tok = CodeTokenizer.load(folder)
    out = []
    for prompt in PROMPTS:
        ids = torch.tensor([tok.encode(prompt)])
        with torch.inference_mode():
            new = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_id)[0, ids.shape[1] :]
        new = new.tolist()
        out.append(tok.decode(new[: new.index(tok.eos_id)] if tok.eos_id in new else new))  # generate pads after the end
    return out


def served_completions(app, prompts: list[str]) -> list[str]:
    """Greedy completions of ``prompts``, all submitted at once so that they decode in one batch."""
    served = app.state.services.served

    async def one(i: int, prompt: str) -> str:
        eos = frozenset({served.tokenizer.eos_id})
        spec = ChoiceSpec(served.tokenizer.encode(prompt), NEW_TOKENS, 0.0, 1.0, 0, [], eos, None)
        choices = Choices(served, [spec], f"r{i}")
        choices.submit()
        text = ""
        async for _, event in choices.events():
            text = event.text
        return text

    async def go() -> list[str]:
        return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))

    return asyncio.run(go())


@pytest.mark.parametrize("arch", ["gpt2", "qwen2", "phi3"])
def test_greedy_completions_equal_transformers_generate(hf_models, tmp_path, arch):
    folder = hf_models / arch
    expected = reference_completions(folder)
    cfg = ServeCommandConfig(device="cpu", serve=ServeConfig(model_path=str(folder), keys_db=str(tmp_path / "k.db")))
    _, app, model_id = build(cfg, quiet=True)
    try:
        assert model_id == arch
        assert isinstance(app.state.services.served.scheduler.model, HFSlotDecoder)  # not converted: its own layers
        assert served_completions(app, PROMPTS) == expected  # five at once, one decoding batch
        assert [served_completions(app, [p])[0] for p in PROMPTS] == expected  # and each alone
    finally:
        app.state.services.served.scheduler.stop(10)


def test_compile_is_refused_for_a_model_in_its_own_layers(hf_models, tmp_path):
    cfg = ServeCommandConfig(
        device="cpu", serve=ServeConfig(model_path=str(hf_models / "gpt2"), keys_db=str(tmp_path / "k.db"), compile=True)
    )
    with pytest.raises(CodexError, match="serve.compile=false"):
        build(cfg, quiet=True)


def test_a_model_whose_forward_differs_is_refused(hf_models):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_models / "qwen2"), local_files_only=True)
    decoder = HFSlotDecoder(model)
    probe = list(range(1, 9))
    check_matches_model(decoder, lambda ids: decoder(ids, *_one_row(ids, decoder)), probe)  # itself: accepted
    with pytest.raises(UnsupportedModel, match="differ"):
        check_matches_model(decoder, lambda ids: torch.zeros(ids.shape[1], decoder.config.vocab_size), probe)


def _one_row(ids: torch.Tensor, decoder: HFSlotDecoder) -> tuple:
    from codex_ml.models.gpt import SlotKVCache

    n = ids.shape[1]
    positions = torch.arange(n)[None]
    cache = SlotKVCache(decoder.config, 1, n, "cpu", torch.float32)
    cache.bind(slice(0, 1), positions, n)
    return positions, (positions[0, None, :] <= positions[0, :, None])[None, None], cache


def test_a_model_hf_gpt2_run_serves_what_codex_ml_generate_writes(hf_models, tmp_path):
    """A GPT-2 fine-tuned through ``model=hf``: the server's greedy completion equals ``codex-ml generate``'s."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for p in stdlib_sample(8):
        (corpus / p.name).write_bytes(p.read_bytes())
    run = tmp_path / "runs" / "gpt2"
    args = [a for a in tiny_train_args(corpus, run, steps=2) if not a.startswith("model")]
    run_cli("train", "model=hf", f"model.path={hf_models / 'gpt2'}", *args, env={"OMP_NUM_THREADS": "1"})
    prompt = "def parse_header_line(line):"
    gen = run_cli("generate", f"run_dir={run}", f"prompt={prompt}", f"max_new_tokens={NEW_TOKENS}", "temperature=0")
    cfg = ServeCommandConfig(run_dir=str(run), device="cpu", serve=ServeConfig(keys_db=str(tmp_path / "k.db")))
    _, app, _ = build(cfg, quiet=True)
    try:
        completion = served_completions(app, [prompt])[0]
    finally:
        app.state.services.served.scheduler.stop(10)
    assert completion and completion in gen.stdout


def test_gemma2_soft_capped_attention_matches_its_own_forward(monkeypatch):
    """Gemma 2 soft-caps attention scores (at 0.5, with scores made large, so capping changes them a lot): the slot
    attention does the same; an attention that ignored the cap would be refused by the start-up check."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from codex_ml.serve.hf_decoder import wrap_hf_model

    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, attn_logit_softcapping=0.5,
    )  # fmt: skip
    model = Gemma2ForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight *= 30
            layer.self_attn.k_proj.weight *= 30
    prompt = torch.tensor([[5, 6, 7, 8, 9, 10]])
    expected = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)[0, 6:].tolist()
    decoder = wrap_hf_model(model, list(range(1, 17)))
    ids, got = prompt, []
    for _ in range(8):  # no cache reuse here: the whole sequence each step, through the slot attention
        logits = decoder(ids, *_one_row(ids, decoder))[0, -1]
        got.append(int(logits.argmax()))
        ids = torch.cat([ids, torch.tensor([[got[-1]]])], 1)
    assert got == expected

    import torch.nn.functional as F

    from codex_ml.serve import hf_decoder

    uncapped = lambda q, k, v, mask, scale, cap: F.scaled_dot_product_attention(q, k, v, mask, scale=scale, enable_gqa=True)  # noqa: E731
    monkeypatch.setattr(hf_decoder, "_softcapped_attention", uncapped)
    with pytest.raises(UnsupportedModel, match="differ"):
        wrap_hf_model(model, list(range(1, 17)))
