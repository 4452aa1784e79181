"""Our KV-cache generation vs Hugging Face ``generate`` on the same model and settings, in one run.

The model is built once with random weights and loaded into both: our native decoder, and
``LlamaForCausalLM`` with the same weights (models/convert.py). Both decode greedily from the same
prompt for the same number of new tokens (no end-of-text, so every row runs to the end), and the
script checks that both produce the same tokens. Variants: HF with its default dynamic cache and
with ``cache_implementation="static"``; ours eager (a growing cache) and compiled (a static cache
and a compiled step; CUDA graphs on GPU). Warm-up calls come first, so compilation is not timed.

CPU defaults: the `tiny` preset's shape, batch 1 and 8, 200 new tokens. GPU defaults: the `base`
preset's shape (GPT-2-124M scale, vocab 50304), batch 1 and 200, 256 new tokens, bf16. The ratio
printed last is our fast path (static cache, compiled step; what ``compile=true`` gives in
``codex-ml generate`` and ``evaluate``) over HF's default generate, at batch 1.

    python benchmarks/generate.py            # a few minutes on 2 cores
    python benchmarks/generate.py --smoke    # seconds
"""

from __future__ import annotations

import argparse
import time

import torch

from common import machine_line


def build(args, device: torch.device, dtype: torch.dtype):
    from codex_ml.models.convert import native_to_hf
    from codex_ml.models.gpt import GPT, GPTConfig

    shape = (
        dict(n_layer=12, n_head=12, n_kv_head=12, d_model=768, d_ff=2048, vocab_size=50304)
        if args.base
        else dict(n_layer=4, n_head=6, n_kv_head=6, d_model=192, d_ff=512, vocab_size=4096)
    )
    if args.smoke:
        shape = dict(n_layer=2, n_head=2, n_kv_head=2, d_model=32, d_ff=64, vocab_size=256)
    torch.manual_seed(0)
    native = GPT(GPTConfig(max_seq_len=args.prompt_len + args.new_tokens + 8, **shape)).eval()
    hf = native_to_hf(native, eos_token_id=None, pad_token_id=0, bos_token_id=None).eval()
    return native.to(device, dtype), hf.to(device, dtype)


class _Ids:
    """A tokenizer over token ids themselves, without end-of-text: every row decodes to the end."""

    eos_id, pad_id = -1, 0

    def encode(self, text):
        return [int(t) for t in text.split()]

    def decode(self, ids):
        return " ".join(map(str, ids))


def time_it(fn, device: torch.device) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=None)
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="timed calls per variant; the best counts")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.base = device.type == "cuda" and not args.smoke
    args.batch = args.batch or ([1, 200] if args.base else [1, 8])
    args.new_tokens = args.new_tokens or (256 if args.base else 200)
    if args.smoke:
        args.batch, args.new_tokens, args.repeats = [1, 2], 16, 1
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    native, hf = build(args, device, dtype)

    from codex_ml.eval.generate import SamplingSettings, generate

    tok = _Ids()
    prompt = " ".join(str(5 + i % 200) for i in range(args.prompt_len))
    ids = torch.tensor([tok.encode(prompt)], device=device)
    print(
        f"model: {'base (GPT-2-124M scale)' if args.base else 'tiny'} shape, {native.num_params():,} parameters "
        f"besides embeddings, {str(dtype).replace('torch.', '')}; prompt {args.prompt_len} tokens, "
        f"{args.new_tokens} new tokens, greedy; best of {args.repeats}"
    )
    print(machine_line())
    rows, headline = [], {}
    for batch in args.batch:

        def hf_run(cache=None, b=batch):
            extra = {"cache_implementation": cache} if cache else {}
            return hf.generate(
                ids.expand(b, -1),
                attention_mask=torch.ones_like(ids).expand(b, -1),
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
                pad_token_id=0,
                **extra,
            )

        def ours(compile, b=batch):
            return generate(
                native, tok, [prompt], SamplingSettings(max_new_tokens=args.new_tokens, temperature=0, n=b, compile=compile)
            )

        variants = {
            "HF generate (dynamic cache)": lambda: hf_run(),
            "HF generate (static cache)": lambda: hf_run("static"),
            "codex-ml (KV cache, eager)": lambda: ours(False),
            "codex-ml (static cache, compiled)": lambda: ours(True),
        }
        results = {}
        with torch.no_grad():
            for name, fn in variants.items():
                fn()  # warm-up: compilation, CUDA graph capture, allocator
                best, out = min((time_it(fn, device) for _ in range(args.repeats)), key=lambda r: r[0])
                results[name] = (batch * args.new_tokens / best, out)
        reference = results["HF generate (dynamic cache)"][1][0, args.prompt_len :].tolist()
        for name, (_, out) in results.items():
            got = out[0, args.prompt_len :].tolist() if isinstance(out, torch.Tensor) else out[0][0].token_ids
            if got != reference:
                raise SystemExit(f"{name} generated different tokens than HF generate at batch {batch}")
        anchor = results["HF generate (dynamic cache)"][0]
        for name, (tps, _) in results.items():
            rows.append((batch, name, tps, tps / anchor))
        headline[batch] = results["codex-ml (static cache, compiled)"][0] / anchor
    print("\nall variants generated the same tokens")
    print(f"\n| batch | {'variant':<34} | tokens/s | vs HF dynamic |")
    print(f"|-------|{'-' * 36}|----------|---------------|")
    for batch, name, tps, ratio in rows:
        print(f"| {batch:5d} | {name:<34} | {tps:8.0f} | {ratio:12.2f}x |")
    print(
        f"\nratio: {headline[args.batch[0]]:.2f}  (codex-ml static cache + compiled step over HF generate's "
        f"default, batch {args.batch[0]})"
    )


if __name__ == "__main__":
    main()
