"""Tiny random Hugging Face models for fast tests (no downloads, seconds on a CPU)."""

import torch


def tiny_config(model_type="llama", layers=4, hidden=64, heads=4, kv_heads=2, vocab=256, **extra):
    import transformers

    cls = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "gemma2": transformers.Gemma2Config,
        "gemma3_text": transformers.Gemma3TextConfig,
        "phi3": transformers.Phi3Config,
        "olmo2": transformers.Olmo2Config,
        "gpt_neox": transformers.GPTNeoXConfig,
        "olmo": transformers.OlmoConfig,
        "granite": transformers.GraniteConfig,
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
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    # what makes each family itself at a tiny size: Gemma's sliding layers with a window shorter than
    # the test sequences and its soft caps, GPT-NeoX's partial rotary and parallel residual
    fields.update({
        "gemma2": dict(head_dim=16, sliding_window=8, final_logit_softcapping=5.0, attn_logit_softcapping=20.0),
        "gemma3_text": dict(head_dim=16, sliding_window=8, final_logit_softcapping=5.0, attn_logit_softcapping=20.0,
                            layer_types=["sliding_attention", "full_attention"] * (layers // 2)
                            + ["sliding_attention"] * (layers % 2)),
        "gpt_neox": dict(rotary_pct=0.5, use_parallel_residual=True, tie_word_embeddings=False),
        "granite": dict(embedding_multiplier=2.0, logits_scaling=4.0),
    }.get(model_type, {}))
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


class ChatByteTokenizer:
    """A byte tokenizer with a chat template, for tiny models (vocab 256): bytes map to ids 0..254
    (byte 255 folds onto 254), 255 is the end-of-turn token."""

    eos_token_id = 255
    bos_token_id = None
    all_special_ids = [255]
    chat_template = "<user>{content}\n<bot>"

    def encode(self, text, add_special_tokens=False):
        return [min(b, 254) for b in text.encode()]

    def __call__(self, text):
        return {"input_ids": self.encode(text)}

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True):
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages) + ("<bot>" if add_generation_prompt else "")
        return self.encode(text) if tokenize else text

    def decode(self, ids, skip_special_tokens=False):
        return bytes(i for i in ids if not (skip_special_tokens and i == 255) and i < 255).decode("utf-8", "replace")


def tiny_chat_balcony(seed=0, **kw):
    """A tiny llama with the byte chat tokenizer; generation stops at its end-of-turn token."""
    from balcony_ext.model import BalconyModel

    hf = tiny_hf("llama", seed=seed, **kw)
    hf.generation_config.eos_token_id = ChatByteTokenizer.eos_token_id
    return BalconyModel(hf, tokenizer=ChatByteTokenizer(), name=f"tiny-chat-{seed}")
