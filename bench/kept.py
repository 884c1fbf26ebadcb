"""What a model shape's attention keeps for backward, per implementation, on a CPU: no GPU needed.

    python -m bench.kept --shape gemma-2-2b --layers 2 --rows 8x512,16x256

builds a random model of a `bench/shapes.py` shape cut to `--layers` decoder layers (their kinds as the shape
alternates them: Gemma 2's sliding and global), bf16, and counts the bytes autograd keeps for backward in one
forward and backward of a micro-batch of random conversations (`--rows`: COUNTxLENGTH, comma-separated), each storage
once, through autograd's saved-tensor hooks: an exact count, the same on a CPU as on a GPU. Each micro-batch goes
through (a) packed rows with the attention the job chooses for the shape (job/attention.py attention_for), (b) the
same conversations padded (Transformers' plain path) and, for a model that caps its attention logits, (c) packed
rows through Transformers' eager attention as one flat row, what the job did before eager_varlen. The difference
between two of them, divided by the layers, is what one layer of the full model keeps more.
"""

from __future__ import annotations

import argparse
import time


def kept_for_backward(model, batch: dict) -> int:
    """Bytes of the tensors autograd keeps for backward in one forward of `batch` (each storage once), counted by
    its saved-tensor hooks; the backward runs too, so the count covers what a training step holds."""
    import torch

    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch).loss.backward()
    return sum(kept.values())


def variants(config) -> list[tuple[str, str, bool]]:
    """(name, attention implementation, packed) for the shape's `config`: the job's packed path, padded, and for a
    capped model the whole-row eager attention."""
    from job import attention

    chosen, _ = attention.attention_for(config, attention.NAME)
    padded = attention.unpacked(chosen)
    out = [(f"packed, {chosen}", chosen, True), (f"padded, {padded}", padded, False)]
    if chosen == attention.EAGER_NAME:
        out.append(("packed, eager (one flat row)", "eager", True))
    return out


def main(argv: list[str] | None = None) -> int:
    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from bench.shapes import SHAPES, model_config
    from job import attention

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="gemma-2-2b")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers kept (the full model's: --layers 0)")
    parser.add_argument("--rows", default="8x512", help="micro-batches, COUNTxLENGTH comma-separated")
    parser.add_argument(
        "--vocab",
        type=int,
        default=32000,
        help="vocabulary (the shape's own: 0); it changes the "
        "output layer's share, which every variant has alike, not the attention's",
    )
    args = parser.parse_args(argv)

    attention.register()
    config = model_config(args.shape)
    if args.layers:
        config.num_hidden_layers = args.layers
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[: args.layers]
    if args.vocab:
        config.vocab_size = args.vocab
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    for p in model.parameters():
        p.requires_grad_(False)
    model.get_input_embeddings().weight.requires_grad_(True)  # gradients flow through every layer to the embeddings
    layers = config.num_hidden_layers
    print(f"{args.shape}, {layers} layers, vocabulary {config.vocab_size}, bf16, CPU")
    for spec in args.rows.split(","):
        count, length = (int(x) for x in spec.lower().split("x"))
        rows = [torch.randint(1, config.vocab_size, (length,)).tolist() for _ in range(count)]
        examples = [{"input_ids": r, "labels": r} for r in rows]
        figures = {}
        for name, implementation, packed in variants(config):
            model.set_attn_implementation(implementation)
            batch = DataCollatorForLanguageModeling(0, padding_free=packed)(examples)
            t0 = time.perf_counter()
            figures[name] = kept_for_backward(model, batch)
            print(f"  {spec}: {name}: {figures[name] / 2**30:.3f} GiB kept ({time.perf_counter() - t0:.0f} s)")
        first = next(iter(figures.values()))
        for name, value in list(figures.items())[1:]:
            print(f"  {spec}: {name} keeps {(value - first) / layers / 2**30:+.3f} GiB per layer against the first")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
