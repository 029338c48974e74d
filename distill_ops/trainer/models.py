"""Small Llama-architecture models built from a config (no weights downloaded): the demo's teacher
and students, and the tests' tiny models."""

from __future__ import annotations

import torch


def llama(vocab_size: int, hidden: int, layers: int, *, heads: int = 4, kv_heads: int = 0,
          intermediate: int = 0, max_positions: int = 1024, tie: bool = True, seed: int = 0):
    """A randomly initialised LlamaForCausalLM (seeded, so equal arguments give equal weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
        intermediate_size=intermediate or (8 * hidden // 3 + 7) // 8 * 8,
        max_position_embeddings=max_positions, tie_word_embeddings=tie,
        bos_token_id=0, eos_token_id=0, pad_token_id=1)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(state)
    return model


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (a tied embedding/lm_head counts once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
