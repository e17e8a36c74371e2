"""Tiny random Hugging Face models for fast tests (no downloads, seconds on a CPU)."""

import torch


def tiny_config(model_type="llama", layers=4, hidden=64, heads=4, kv_heads=2, vocab=256, **extra):
    import transformers

    cls = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
    }[model_type]
    fields = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    return cls(**{**fields, **extra})


def tiny_hf(model_type="llama", seed=0, **kw):
    """A randomly initialised *ForCausalLM in eval mode, float32."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **kw))
    return model.eval()


def tiny_balcony(model_type="llama", seed=0, **kw):
    from balcony_ext.model import BalconyModel

    return BalconyModel(tiny_hf(model_type, seed=seed, **kw), tokenizer=None, name=f"tiny-{model_type}-{seed}")
