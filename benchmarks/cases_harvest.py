"""Activation harvest rate (tokens/s), to set next to the SAE training rate.

The model is the package's default model (``activations.load_default_model``:
SmolLM2-135M, harvested at ``DEFAULT_HOOK``, ``blocks.9.hook_resid_post``) when it is
installed. Otherwise, and in quick mode, it is built from a config with random weights
(nothing may be downloaded): a GPT-NeoX of Pythia-70m's shape (6 layers, d_model = d_in,
8 heads), or a tiny one when quick, wrapped in TransformerLens's ``TransformerBridge`` and
harvested at ``blocks.3.hook_resid_post``; compute per token does not depend on the
weights' values. Token ids are random: the rate of a forward pass does not depend on them.
One call harvests ``min(batch, 1024)`` tokens in contexts of 128 through
``activations.harvest`` (which stops after the hook's block); a rate is per token, and a
CPU forward of the default model over a whole SAE batch would take minutes per call.

What it leaves out: tokenisation and dataset reading (cheap next to the model, and they
overlap with it on a real run).
"""

from __future__ import annotations

import torch

from .measure import peak_memory, time_calls


def random_model(d_model: int, quick: bool):
    """A random-weight GPT-NeoX (Pythia-70m's shape, or tiny when ``quick``) as a bridge."""
    import transformers

    from switch_sae.activations.default_model import wrap_hf_model

    shape = (dict(num_hidden_layers=4, num_attention_heads=4, intermediate_size=4 * d_model, vocab_size=1000)
             if quick else dict(num_hidden_layers=6, num_attention_heads=8, intermediate_size=4 * d_model, vocab_size=50304))
    cfg = transformers.GPTNeoXConfig(hidden_size=d_model, max_position_embeddings=2048, rotary_pct=0.25,
                                     architectures=["GPTNeoXForCausalLM"], **shape)
    label = f"GPT-NeoX {cfg.num_hidden_layers} layers, d_model {d_model} (random weights)"
    return wrap_hf_model(transformers.GPTNeoXForCausalLM(cfg).eval(), None, label), label, "blocks.3.hook_resid_post"


def harvest_model(spec: dict):
    """(model, label, hook): the default model when installed and not quick, else a random one."""
    from switch_sae.activations import DEFAULT_HOOK, default_model_available, load_default_model
    from switch_sae.activations.default_model import DEFAULT_MODEL_LABEL

    if not spec["quick"] and default_model_available():
        return load_default_model(), DEFAULT_MODEL_LABEL, DEFAULT_HOOK
    return random_model(spec["d_in"], spec["quick"])


def harvest_records(spec: dict, timing: dict) -> list[dict]:
    from switch_sae.activations import harvest

    context = 16 if spec["quick"] else 128
    model, label, hook = harvest_model(spec)
    g = torch.Generator().manual_seed(spec["seed"])
    contexts = max(1, min(spec["batch"], 1024) // context)
    tokens = torch.randint(0, model.cfg.d_vocab, (contexts, context), generator=g)  # [contexts, context]
    timing = {**timing, "warmup": min(timing["warmup"], 1)}  # one call warms every layer up
    acts = harvest(model, tokens, hook)[hook]  # [contexts * context, d_model]
    if acts.shape[0] != tokens.numel() or not torch.isfinite(acts).all():
        raise RuntimeError(f"harvest returned {tuple(acts.shape)} activations for {tuple(tokens.shape)} tokens")
    stats = time_calls(lambda: harvest(model, tokens, hook), **timing)
    return [{
        "name": "harvest", "variant": f"{label}, {hook}", "n_experts": None, "batch": tokens.numel(),
        "d_in": acts.shape[1], **stats, **peak_memory(lambda: harvest(model, tokens, hook)),
        "tokens_per_s": tokens.numel() / stats["median_ms"] * 1e3,
        "validation": {"against": "shape and finiteness of the harvested activations"},
    }]
