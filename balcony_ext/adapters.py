"""Architecture adapters: the one place that knows where a Hugging Face causal LM keeps its parts.

An adapter wraps a loaded `*ForCausalLM` and hands out its own modules (embeddings, decoder layers,
final norm, LM head, rotary embedding) and the attention masks its decoder layers expect. Nothing
here copies Hugging Face modeling code: every computation calls the model's own modules, so a
new transformers release that keeps the module names keeps working.

What differs between families is data (`Family`): where the parts are, the name of a layer's
attention module and input norm, whether rotary tables differ per attention type, a soft cap on the
final logits and the offset of its norms' weights. For training and evaluation, norm forms, fused
projections, q/k norms, partial rotary, embedding scaling and attention soft-capping live inside the
family's own modules and need nothing here (the native step reads them: weights.py). A model type not in FAMILIES is taken apart by the names its
`*ForCausalLM` uses and accepted only if its own forward and the adapter's composition of its
modules give the same logits on a probe (never silently wrong).

The decode engine (engine.py, the native step) runs the Llama family, Phi-3 (whose fused q/k/v and
gate/up projections it reads as row slices), OLMo 2 (norms after its sublayers, q/k norms over all
heads) and Gemma 2 / 3 ((1 + w) norms folded on load, sandwich norms, scaled embedding, GELU, sliding
windows, soft-caps, a rotary table per layer type), with full or partial rotary embeddings
(`Family.native`); the other families attach, train, evaluate, save and load exits and generate
through their own modules.
"""

from __future__ import annotations

import copy
import functools
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

FULL = "full_attention"
SLIDING = "sliding_attention"


@dataclass(frozen=True)
class Family:
    """Where one family keeps its parts (attribute names) and what its modules need from the caller."""

    causal_lm: str  # the *ForCausalLM class name
    inner: str = "model"  # the attribute holding the decoder stack
    layers: str = "layers"
    norm: str = "norm"  # the final norm, on the inner model
    embed: str = "embed_tokens"
    rotary: str = "rotary_emb"
    attention: str = "self_attn"  # a decoder layer's attention module (holds layer_idx)
    input_norm: str | None = "input_layernorm"  # None: the family normalises after its sublayers
    rotary_per_layer_type: bool = False  # rotary_emb(x, position_ids, layer_type) (Gemma 3)
    logit_softcap: str | None = None  # config field: logits = cap * tanh(logits / cap)
    norm_offset: float = 0.0  # its RMS norms scale by (offset + w) (Gemma: 1)
    native: bool = False  # the native decode step runs it


FAMILIES = {
    "llama": Family("LlamaForCausalLM", native=True),  # SmolLM and SmolLM2 are Llama
    "mistral": Family("MistralForCausalLM", native=True),
    "qwen2": Family("Qwen2ForCausalLM", native=True),
    "qwen3": Family("Qwen3ForCausalLM", native=True),
    "gemma2": Family("Gemma2ForCausalLM", logit_softcap="final_logit_softcapping", norm_offset=1.0, native=True),
    "gemma3_text": Family("Gemma3ForCausalLM", rotary_per_layer_type=True, logit_softcap="final_logit_softcapping",
                          norm_offset=1.0, native=True),
    "phi3": Family("Phi3ForCausalLM", native=True),  # (partial rotary in Phi-4-mini)
    "olmo2": Family("Olmo2ForCausalLM", input_norm=None, native=True),  # (norms after its sublayers)
    "gpt_neox": Family("GPTNeoXForCausalLM", inner="gpt_neox", norm="final_layer_norm", embed="embed_in",
                       attention="attention"),
}
SUPPORTED = {t: f.causal_lm for t, f in FAMILIES.items()}  # model_type -> class name
NATIVE = sorted(t for t, f in FAMILIES.items() if f.native)
LLAMA_FIELDS = {"llama", "mistral", "qwen2", "qwen3"}  # whose config hash leaves the other families' fields out


class UnsupportedModelError(ValueError):
    pass


@dataclass
class Context:
    """What every decoder layer of one forward pass shares: positions, rotary cos/sin, masks."""

    position_ids: torch.Tensor
    position_embeddings: object  # (cos, sin), or {layer type: (cos, sin)}
    masks: dict  # layer type ("full_attention" / "sliding_attention") -> mask (or None: causal)
    past_key_values: object = None
    use_cache: bool = False


def _first_attr(obj, names):
    return next((n for n in names if isinstance(getattr(obj, n, None), nn.Module)), None)


def discover(hf_model: nn.Module) -> Family:
    """A Family for a model type not in FAMILIES, from the names its modules use; raises
    UnsupportedModelError naming what is missing."""
    config = hf_model.config
    name = type(hf_model).__name__
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{name} is an encoder-decoder model; balcony_ext needs a decoder-only causal LM")
    inner = getattr(hf_model, "base_model_prefix", "model")
    stack = getattr(hf_model, inner, None)
    if not isinstance(stack, nn.Module) or stack is hf_model:
        raise UnsupportedModelError(f"{name} has no decoder stack `{inner}`; load the model as a *ForCausalLM")
    layers = next((n for n in ("layers", "h", "blocks") if isinstance(getattr(stack, n, None), nn.ModuleList)), None)
    if layers is None:
        raise UnsupportedModelError(f"{name}: no decoder layer list found (looked for `{inner}.layers`, `.h`, `.blocks`)")
    norm = _first_attr(stack, ("norm", "final_layer_norm", "ln_f", "final_norm"))
    embed = _first_attr(stack, ("embed_tokens", "embed_in", "wte", "word_embeddings"))
    rotary = _first_attr(stack, ("rotary_emb",))
    for part, found in (("final norm", norm), ("token embedding", embed), ("rotary embedding", rotary)):
        if found is None:
            raise UnsupportedModelError(f"{name}: no {part} found on `{inner}`; balcony_ext composes decoder "
                                        "layers that take rotary position embeddings from the model")
    layer = getattr(stack, layers)[0]
    attention = _first_attr(layer, ("self_attn", "attention", "attn"))
    if attention is None or not hasattr(getattr(layer, attention), "layer_idx"):
        raise UnsupportedModelError(f"{name}: its decoder layer {type(layer).__name__} has no attention module "
                                    "with a layer_idx")
    return Family(name, inner=inner, layers=layers, norm=norm, embed=embed, rotary=rotary, attention=attention,
                  input_norm=_first_attr(layer, ("input_layernorm", "ln_1")),
                  logit_softcap="final_logit_softcapping" if getattr(config, "final_logit_softcapping", None) else None)


class DecoderAdapter:
    """The parts of a decoder-only *ForCausalLM of a known family (FAMILIES) or one taken apart by
    `discover`, and the calls that run them."""

    def __init__(self, hf_model: nn.Module, family: Family | None = None):
        config = getattr(hf_model, "config", None)
        model_type = getattr(config, "model_type", None)
        name = type(hf_model).__name__
        if config is None:
            raise UnsupportedModelError(f"{name} has no config; load a Hugging Face *ForCausalLM")
        family = family or FAMILIES.get(model_type) or discover(hf_model)
        inner = getattr(hf_model, family.inner, None)
        for part in (family.layers, family.norm, family.embed, family.rotary):
            if inner is None or not isinstance(getattr(inner, part, None), nn.Module):
                raise UnsupportedModelError(f"{name} (model_type={model_type!r}) has no `{family.inner}.{part}`; "
                                            "load the model as a *ForCausalLM with its language-model head")
        head = hf_model.get_output_embeddings() if hasattr(hf_model, "get_output_embeddings") else None
        if not isinstance(head, nn.Linear):
            raise UnsupportedModelError(f"{name} has no linear language-model head; load it as a *ForCausalLM")
        self.hf, self.config, self.model_type, self.family, self.inner = hf_model, config, model_type, family, inner
        self._head = head

    # ---- the parts -------------------------------------------------------------------------
    layers = property(lambda self: getattr(self.inner, self.family.layers))
    embed_tokens = property(lambda self: getattr(self.inner, self.family.embed))
    final_norm = property(lambda self: getattr(self.inner, self.family.norm))
    rotary_emb = property(lambda self: getattr(self.inner, self.family.rotary))
    lm_head = property(lambda self: self._head)

    @property
    def native(self) -> bool:
        """Whether the native decode step runs this model (its family does)."""
        return self.family.native

    @property
    def logit_softcap(self) -> float | None:
        cap = getattr(self.config, self.family.logit_softcap, None) if self.family.logit_softcap else None
        return float(cap) if cap else None

    @property
    def attn_softcap(self) -> float | None:
        """The soft cap on attention scores (Gemma 2: scores = cap * tanh(scores / cap)), or None."""
        cap = getattr(self.config, "attn_logit_softcapping", None)
        return float(cap) if cap else None

    def logits(self, hidden: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The LM head on final (normed) hidden states, soft-capped where the family caps its logits;
        with `rows` (token ids), only those tokens' logits."""
        if rows is None:
            out = self.lm_head(hidden)
        else:
            bias = self.lm_head.bias
            out = F.linear(hidden, self.lm_head.weight[rows], None if bias is None else bias[rows])
        cap = self.logit_softcap
        return out if cap is None else torch.tanh(out / cap) * cap

    def attention(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.family.attention)

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
        c = self.config
        return float(getattr(c, "rms_norm_eps", None) or getattr(c, "layer_norm_eps", None) or 1e-6)

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
            intermediate_size=getattr(c, "intermediate_size", None),
            vocab_size=c.vocab_size,
            hidden_act=getattr(c, "hidden_act", None),
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=getattr(c, "rope_theta", None),
            rope=rope,
            tie_word_embeddings=getattr(c, "tie_word_embeddings", None),
            layer_types=getattr(c, "layer_types", None),
            sliding_window=getattr(c, "sliding_window", None),
        )
        if self.model_type not in LLAMA_FIELDS:  # (the Llama family's fields stay as shipped exits recorded them)
            fields.update(logit_softcap=self.logit_softcap,
                          partial_rotary_factor=getattr(c, "partial_rotary_factor", None),
                          use_parallel_residual=getattr(c, "use_parallel_residual", None))
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
        self.set_cache_index(layer, cache_index)
        return layer

    def set_cache_index(self, layer: nn.Module, cache_index: int) -> None:
        attn = getattr(layer, self.family.attention, None)
        if attn is None or not hasattr(attn, "layer_idx"):
            raise UnsupportedModelError(f"{type(layer).__name__} has no {self.family.attention}.layer_idx")
        attn.layer_idx = cache_index

    def new_norm(self, copy_from: str | int = "final") -> nn.Module:
        """A norm of the model's own class: a copy of the final norm, or of base layer `copy_from`'s
        input norm (an int, 0-based)."""
        if copy_from == "final":
            return copy.deepcopy(self.final_norm)
        if self.family.input_norm is None:
            raise ValueError(f"norm_init='next' copies the input norm of the layer after the exit, and "
                             f"{self.model_type} layers have none (they normalise after each sublayer); "
                             "use norm_init='final'")
        return copy.deepcopy(getattr(self.layers[int(copy_from)], self.family.input_norm))

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
        if self.family.rotary_per_layer_type:
            pos = {t: self.rotary_emb(hidden, position_ids, t) for t in types}
        else:
            pos = self.rotary_emb(hidden, position_ids=position_ids)
        return Context(position_ids, pos, masks, past_key_values, use_cache)

    def run_layer(self, layer: nn.Module, hidden: torch.Tensor, ctx: Context, layer_type: str = FULL):
        cache = {}
        if ctx.past_key_values is not None:
            cache[_cache_keyword(type(layer).forward)] = ctx.past_key_values
        pos = ctx.position_embeddings
        out = layer(
            hidden,
            attention_mask=ctx.masks.get(layer_type, ctx.masks[FULL]),
            position_ids=ctx.position_ids,
            use_cache=ctx.use_cache,
            position_embeddings=pos[layer_type] if isinstance(pos, dict) else pos,
            **cache,
        )
        # transformers 5.x returns the hidden state; 4.x returned a tuple.
        return out[0] if isinstance(out, tuple) else out

    def run_base_layer(self, index: int, hidden: torch.Tensor, ctx: Context) -> torch.Tensor:
        return self.run_layer(self.layers[index], hidden, ctx, self.layer_type(index))


@functools.cache
def _cache_keyword(fn) -> str:
    """The name under which `fn` takes the KV cache: `cache` (transformers >= 5.2x), `layer_past`
    (GPT-NeoX's layers), else the older `past_key_values` (deprecated there)."""
    params = inspect.signature(fn).parameters
    return next((n for n in ("cache", "layer_past") if n in params), "past_key_values")


@torch.no_grad()
def _probe(adapter: DecoderAdapter) -> None:
    """Raises UnsupportedModelError unless composing the model's modules as the adapter does gives the
    logits of the model's own forward (on a short random probe)."""
    hf = adapter.hf
    V = adapter.vocab_size
    dev = adapter.lm_head.weight.device
    ids = torch.randint(0, V, (1, 8), generator=torch.Generator().manual_seed(0)).to(dev)
    was = hf.training
    hf.eval()
    try:
        want = hf(input_ids=ids).logits.float()
        hidden = adapter.embed_tokens(ids)
        ctx = adapter.context(hidden)
        for i in range(adapter.num_layers):
            hidden = adapter.run_base_layer(i, hidden, ctx)
        got = adapter.logits(adapter.final_norm(hidden)).float()
    except Exception as exc:  # the layers do not take the calls of the Llama-style interface
        raise UnsupportedModelError(f"{type(hf).__name__}: its decoder layers cannot be run one by one as "
                                    f"balcony_ext runs them ({type(exc).__name__}: {exc})") from exc
    finally:
        hf.train(was)
    err = (got - want).abs().max().item() / max(want.abs().max().item(), 1e-6)
    if not err < 1e-3:
        raise UnsupportedModelError(f"{type(hf).__name__}: its own forward does more than embedding, decoder "
                                    f"layers, final norm and head (composed logits differ by {err:.2g} of their "
                                    "scale); its model type needs an entry in balcony_ext.adapters.FAMILIES")


def adapter_for(hf_model: nn.Module) -> DecoderAdapter:
    """The adapter for a loaded Hugging Face causal LM. A model type outside FAMILIES is taken apart by
    name and checked on a probe; raises UnsupportedModelError naming what is missing or different."""
    model_type = getattr(getattr(hf_model, "config", None), "model_type", None)
    adapter = DecoderAdapter(hf_model)
    if model_type not in FAMILIES:
        _probe(adapter)
    return adapter
