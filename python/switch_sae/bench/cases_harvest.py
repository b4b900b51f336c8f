"""Activation harvest rate (tokens/s), to set next to the SAE training rate.

No weights may be downloaded here, so the model is built from a config with random
weights: a GPT-NeoX of Pythia-70m's shape (6 layers, d_model = d_in = 512, 8 heads,
d_mlp 2048, vocabulary 50304) wrapped in TransformerLens's ``TransformerBridge``, and
harvested with ``switch_sae.activations.harvest`` at ``blocks.3.hook_resid_post``
(``stop_at_layer`` skips the last two blocks and the unembedding). Compute per token does
not depend on the weights' values, so the rate is that of the real model of this shape.
One call harvests ``batch`` tokens (``batch // context`` contexts), the tokens of one SAE step.

What it leaves out: tokenisation and dataset reading (they overlap with the model on a
real run and are cheap next to it).
"""

from __future__ import annotations

import torch

from .measure import peak_memory, time_calls

HOOK = "blocks.3.hook_resid_post"


def harvest_model(d_model: int, quick: bool):
    """A random-weight GPT-NeoX (Pythia-70m's shape, or tiny when ``quick``) as a bridge."""
    import transformers
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    shape = (dict(num_hidden_layers=4, num_attention_heads=4, intermediate_size=4 * d_model, vocab_size=1000)
             if quick else dict(num_hidden_layers=6, num_attention_heads=8, intermediate_size=2048, vocab_size=50304))
    cfg = transformers.GPTNeoXConfig(hidden_size=d_model, max_position_embeddings=2048, rotary_pct=0.25, **shape)
    model = transformers.GPTNeoXForCausalLM(cfg).eval()
    return build_bridge_from_module(model, "GPTNeoXForCausalLM", hf_config=cfg), cfg


def harvest_records(spec: dict, timing: dict) -> list[dict]:
    from ..activations.harvest import harvest

    context = 16 if spec["quick"] else 128
    model, cfg = harvest_model(spec["d_in"], spec["quick"])
    contexts = max(1, spec["batch"] // context)
    g = torch.Generator().manual_seed(spec["seed"])
    tokens = torch.randint(0, cfg.vocab_size, (contexts, context), generator=g)  # [contexts, context]
    acts = harvest(model, tokens, HOOK)[HOOK]  # [contexts * context, d_in]
    if acts.shape != (tokens.numel(), spec["d_in"]) or not torch.isfinite(acts).all():
        raise RuntimeError(f"harvest returned {tuple(acts.shape)} activations for {tuple(tokens.shape)} tokens")
    stats = time_calls(lambda: harvest(model, tokens, HOOK), **timing)
    return [{
        "name": "harvest", "variant": f"GPTNeoX {cfg.num_hidden_layers}L d_model {cfg.hidden_size} (random weights), {HOOK}",
        "n_experts": None, "batch": tokens.numel(), **stats, **peak_memory(lambda: harvest(model, tokens, HOOK)),
        "tokens_per_s": tokens.numel() / stats["median_ms"] * 1e3,
        "validation": {"against": "shape and finiteness of the harvested activations"},
    }]
