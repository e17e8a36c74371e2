"""Architecture adapters: the one place that knows where a Hugging Face causal LM keeps its parts.

An adapter wraps a loaded `*ForCausalLM` and hands out its own modules (embeddings, decoder layers,
final norm, LM head, rotary embedding) and the attention masks its decoder layers expect. Nothing
here copies Hugging Face modeling code: every computation calls the model's own modules, so a
new transformers release that keeps the module names keeps working.

Supported: the Llama family, whose decoder layers all share the call
`layer(hidden, attention_mask=, position_ids=, past_key_values=, use_cache=, position_embeddings=)`:
Llama (SmolLM, SmolLM2 are Llama), Mistral, Qwen2, Qwen3.
"""

from __future__ import annotations

import copy
import functools
import inspect
from dataclasses import dataclass

import torch
from torch import nn

# model_type (config.model_type) -> class name of the causal LM, for error messages and checks.
SUPPORTED = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

FULL = "full_attention"
SLIDING = "sliding_attention"


class UnsupportedModelError(ValueError):
    pass


@dataclass
class Context:
    """What every decoder layer of one forward pass shares: positions, rotary cos/sin, masks."""

    position_ids: torch.Tensor
    position_embeddings: tuple
    masks: dict  # layer type ("full_attention" / "sliding_attention") -> mask (or None: causal)
    past_key_values: object = None
    use_cache: bool = False


class LlamaFamilyAdapter:
    """Adapter for Llama-style decoder-only models (`model.model.layers`, `.norm`, `.embed_tokens`,
    `.rotary_emb`, and `model.lm_head`)."""

    def __init__(self, hf_model: nn.Module):
        config = getattr(hf_model, "config", None)
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED:
            name = type(hf_model).__name__
            raise UnsupportedModelError(
                f"balcony_ext does not support the architecture {name!r} (model_type={model_type!r}); "
                f"supported model types: {', '.join(sorted(SUPPORTED))}"
            )
        inner = getattr(hf_model, "model", None)
        for part in ("layers", "norm", "embed_tokens", "rotary_emb"):
            if inner is None or not hasattr(inner, part):
                raise UnsupportedModelError(
                    f"{type(hf_model).__name__} (model_type={model_type!r}) has no `model.{part}`; "
                    "expected a Llama-family *ForCausalLM with its language-model head"
                )
        if not hasattr(hf_model, "lm_head"):
            raise UnsupportedModelError(f"{type(hf_model).__name__} has no `lm_head`; load it as a *ForCausalLM")
        self.hf = hf_model
        self.config = config
        self.model_type = model_type
        self.inner = inner

    # ---- the parts -------------------------------------------------------------------------
    @property
    def layers(self) -> nn.ModuleList:
        return self.inner.layers

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.inner.embed_tokens

    @property
    def final_norm(self) -> nn.Module:
        return self.inner.norm

    @property
    def lm_head(self) -> nn.Linear:
        return self.hf.lm_head

    @property
    def rotary_emb(self) -> nn.Module:
        return self.inner.rotary_emb

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self.lm_head.weight.shape[0])

    @property
    def rms_norm_eps(self) -> float:
        return float(self.config.rms_norm_eps)

    def layer_type(self, index: int) -> str:
        """Attention type of base layer `index` (0-based): full, or sliding window."""
        types = getattr(self.config, "layer_types", None)
        if types is not None:
            return types[index]
        return SLIDING if getattr(self.config, "sliding_window", None) else FULL

    def architecture_fields(self) -> dict:
        """The config fields that decide the shapes and the arithmetic (used to identify a base model)."""
        c = self.config
        rope = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None)
        fields = dict(
            model_type=self.model_type,
            hidden_size=c.hidden_size,
            num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads,
            num_key_value_heads=getattr(c, "num_key_value_heads", c.num_attention_heads),
            head_dim=getattr(c, "head_dim", None),
            intermediate_size=c.intermediate_size,
            vocab_size=c.vocab_size,
            hidden_act=getattr(c, "hidden_act", None),
            rms_norm_eps=c.rms_norm_eps,
            rope_theta=getattr(c, "rope_theta", None),
            rope=rope,
            tie_word_embeddings=getattr(c, "tie_word_embeddings", None),
            layer_types=getattr(c, "layer_types", None),
            sliding_window=getattr(c, "sliding_window", None),
        )
        return fields

    # ---- building new layers of the model's own classes ------------------------------------
    def new_layer(self, cache_index: int, copy_from: int | None = None) -> nn.Module:
        """A decoder layer of the base model's own class and config.

        copy_from: index of a base layer to copy (weights included); None builds a freshly
        initialised layer (the model's own initialiser), of the last layer's attention type.
        cache_index: the layer index the layer uses in a KV cache (its own slot, past the base's).
        """
        if copy_from is not None:
            layer = copy.deepcopy(self.layers[copy_from])
        else:
            template = self.num_layers - 1
            # Construct with an in-range index (some configs index per-layer types with it), then
            # give it its own cache slot below.
            layer = type(self.layers[template])(self.config, template)
            for module in layer.modules():
                self.hf._init_weights(module)
        self._set_cache_index(layer, cache_index)
        return layer

    @staticmethod
    def _set_cache_index(layer: nn.Module, cache_index: int) -> None:
        attn = getattr(layer, "self_attn", None)
        if attn is None or not hasattr(attn, "layer_idx"):
            raise UnsupportedModelError(f"{type(layer).__name__} has no self_attn.layer_idx")
        attn.layer_idx = cache_index

    def new_norm(self, copy_from: str | int = "final") -> nn.Module:
        """An RMSNorm of the model's own class: a copy of the final norm, or of base layer
        `copy_from`'s input norm (an int, 0-based)."""
        if copy_from == "final":
            return copy.deepcopy(self.final_norm)
        return copy.deepcopy(self.layers[int(copy_from)].input_layernorm)

    # ---- running the model's own modules ---------------------------------------------------
    def context(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool = False,
    ) -> Context:
        """Positions, rotary embeddings and masks for a pass over `hidden` [B, T, H], built with
        the installed transformers' own helpers, as the model's own forward builds them."""
        from transformers import masking_utils

        if position_ids is None:
            past = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0) + past
        kwargs = dict(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            position_ids=position_ids,
        )
        kwargs[_cache_keyword(masking_utils.create_causal_mask)] = past_key_values
        masks = {FULL: masking_utils.create_causal_mask(**kwargs)}
        types = {self.layer_type(i) for i in range(self.num_layers)}
        if SLIDING in types:
            masks[SLIDING] = masking_utils.create_sliding_window_causal_mask(**kwargs)
        pos = self.rotary_emb(hidden, position_ids=position_ids)
        return Context(position_ids, pos, masks, past_key_values, use_cache)

    def run_layer(self, layer: nn.Module, hidden: torch.Tensor, ctx: Context, layer_type: str = FULL):
        cache = {_cache_keyword(type(layer).forward): ctx.past_key_values}
        out = layer(
            hidden,
            attention_mask=ctx.masks.get(layer_type, ctx.masks[FULL]),
            position_ids=ctx.position_ids,
            use_cache=ctx.use_cache,
            position_embeddings=ctx.position_embeddings,
            **cache,
        )
        # transformers 5.x returns the hidden state; 4.x returned a tuple.
        return out[0] if isinstance(out, tuple) else out

    def run_base_layer(self, index: int, hidden: torch.Tensor, ctx: Context) -> torch.Tensor:
        return self.run_layer(self.layers[index], hidden, ctx, self.layer_type(index))


@functools.cache
def _cache_keyword(fn) -> str:
    """The name under which `fn` takes the KV cache: `cache` (transformers >= 5.2x), else the older
    `past_key_values` (deprecated there)."""
    return "cache" if "cache" in inspect.signature(fn).parameters else "past_key_values"


def adapter_for(hf_model: nn.Module) -> LlamaFamilyAdapter:
    """The adapter for a loaded Hugging Face causal LM; raises UnsupportedModelError naming the
    architecture when it is not supported."""
    return LlamaFamilyAdapter(hf_model)
