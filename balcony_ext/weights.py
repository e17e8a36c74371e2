"""The model's weights as the decode engine reads them.

A decoder layer is handed to the engine as the tensors of `LayerWeights`, in the order of
`LAYER_FIELDS`: that order is the argument order of the native step
(csrc/include/layer_layout.h lists the same fields; a test checks the two agree). Matrices are the
model's own tensors; norms and biases are small float32 copies; absent ones are empty tensors.
An exit adds its norm after its layer's fields.

Weight formats (`quantize(model, "int8")`, `bx.load(..., weights="int8")`): "float" hands the engine the
model's own matrices (float32 or bfloat16); "int8" hands it every decoder matrix and the LM head as Q8
blocks (ops.quantize_q8: int8 in blocks of 32 with a float16 scale, 8.5 bits per weight); "q4" every
decoder matrix as Q4 blocks (ops.quantize_q4: 4-bit values in blocks of 32 with a float16 scale, 4.5
bits per weight, llama.cpp's Q4_0) and the LM head as Q8 blocks (as llama.cpp keeps its output matrix
at a higher precision than its 4-bit layers); "q4_1" likewise with Q4_1 blocks (ops.quantize_q4_1: a
float16 scale and minimum per block of 32, 5 bits per weight, llama.cpp's Q4_1: it holds the default
model, whose weights come from a Q4_1 GGUF file with a Q8_0 embedding, exactly); read by the
native step and linear_rows as they are and dequantised for the multi-token GEMMs.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch

from .ops.linear_rows import (Q8_BLOCK, dequantize_q4, dequantize_q4_1, dequantize_q8, quantize_q4, quantize_q4_1,
                               quantize_q8)

WEIGHT_FORMATS = ("float", "int8", "q4", "q4_1")
HEAD_FORMAT = {"float": "float", "int8": "int8", "q4": "int8", "q4_1": "int8"}  # the LM head's format under each
# the exits' layers under each: int8 under the 4-bit formats (measured on the shipped exits, 32 held-out
# instructions: chat top-1 with their layers in Q4_1 0.545 / 0.614 / 0.714, in int8 0.552 / 0.633 / 0.732,
# float 0.550 / 0.638 / 0.737; they were trained in float on a base that Q4_1 holds exactly)
EXIT_FORMAT = {"float": "float", "int8": "int8", "q4": "int8", "q4_1": "int8"}
QUANTIZE = {"int8": quantize_q8, "q4": quantize_q4, "q4_1": quantize_q4_1}


class LayerWeights(NamedTuple):
    input_norm: torch.Tensor
    q_proj: torch.Tensor
    q_bias: torch.Tensor
    k_proj: torch.Tensor
    k_bias: torch.Tensor
    v_proj: torch.Tensor
    v_bias: torch.Tensor
    q_norm: torch.Tensor
    k_norm: torch.Tensor
    o_proj: torch.Tensor
    post_norm: torch.Tensor
    gate_proj: torch.Tensor
    up_proj: torch.Tensor
    down_proj: torch.Tensor
    attn_out_norm: torch.Tensor
    mlp_out_norm: torch.Tensor


LAYER_FIELDS = LayerWeights._fields
PER_LAYER = len(LAYER_FIELDS)  # tensors per decoder layer in the native step's weight lists
PER_EXIT = PER_LAYER + 1  # an exit's layer, then its norm


def _vec(t, offset: float = 0.0):
    """A float32 copy of a norm or bias (a norm's weight plus `offset`: Gemma's norms scale by 1 + w)."""
    return (t.detach().float() + offset).contiguous() if t is not None else torch.empty(0)


ACTIVATION_NAMES = {"SiLU": "silu", "SiLUActivation": "silu", "GELUTanh": "gelu_tanh",
                    "PytorchGELUTanh": "gelu_tanh"}  # the MLP's act_fn class -> ops.decode_step activation


def mlp_activation(layer) -> str:
    """The gate activation of a decoder layer's MLP ("silu" or "gelu_tanh"; raises for another)."""
    act = getattr(layer.mlp, "act_fn", None) or getattr(layer.mlp, "activation_fn", None)
    name = type(act).__name__ if act is not None else "SiLU"
    if name not in ACTIVATION_NAMES:
        raise NotImplementedError(f"generate(): the MLP activation {name} is neither SiLU nor GELU (tanh)")
    return ACTIVATION_NAMES[name]


def _mat(t, fmt: str = "float"):
    if fmt in QUANTIZE and t.shape[1] % Q8_BLOCK == 0:
        return QUANTIZE[fmt](t)
    return t.detach().contiguous()


def _projections(layer) -> dict:
    """{name: (weight, bias or None)} of a decoder layer's q/k/v, o, gate, up and down projections: the
    model's own, or row slices (views) of Phi-3's fused qkv_proj and gate_up_proj."""
    attn, mlp = layer.self_attn, layer.mlp
    out = {}
    qkv = getattr(attn, "qkv_proj", None)
    if qkv is not None:
        c = attn.config
        q_rows = int(c.num_attention_heads) * int(attn.head_dim)
        kv_rows = (qkv.weight.shape[0] - q_rows) // 2
        w = qkv.weight
        for name, rows in (("q_proj", slice(0, q_rows)), ("k_proj", slice(q_rows, q_rows + kv_rows)),
                           ("v_proj", slice(q_rows + kv_rows, None))):
            out[name] = (w[rows], qkv.bias[rows] if qkv.bias is not None else None)
    else:
        out.update({n: (getattr(attn, n).weight, getattr(attn, n).bias) for n in ("q_proj", "k_proj", "v_proj")})
    out["o_proj"] = (attn.o_proj.weight, attn.o_proj.bias)
    gate_up = getattr(mlp, "gate_up_proj", None)
    if gate_up is not None:  # (the gate's rows first, as Phi-3 splits them)
        half = gate_up.weight.shape[0] // 2
        out["gate_proj"] = (gate_up.weight[:half], gate_up.bias[:half] if gate_up.bias is not None else None)
        out["up_proj"] = (gate_up.weight[half:], gate_up.bias[half:] if gate_up.bias is not None else None)
    else:
        out.update({n: (getattr(mlp, n).weight, getattr(mlp, n).bias) for n in ("gate_proj", "up_proj")})
    out["down_proj"] = (mlp.down_proj.weight, mlp.down_proj.bias)
    return out


def _norms(layer) -> tuple:
    """A decoder layer's (input, pre-MLP, attention-output, MLP-output) norm modules, None where it has
    none: Llama's input and post-attention norms come before their sublayers; OLMo 2 normalises each
    sublayer's output instead (its post_attention_layernorm is an output norm); Gemma has all four."""
    if hasattr(layer, "pre_feedforward_layernorm"):
        return (layer.input_layernorm, layer.pre_feedforward_layernorm, layer.post_attention_layernorm,
                layer.post_feedforward_layernorm)
    if getattr(layer, "input_layernorm", None) is None and hasattr(layer, "post_feedforward_layernorm"):
        return None, None, layer.post_attention_layernorm, layer.post_feedforward_layernorm
    return layer.input_layernorm, layer.post_attention_layernorm, None, None


def layer_weights(layer, fmt: str = "float", norm_offset: float = 0.0) -> LayerWeights:
    """A Hugging Face Llama-family, Phi-3, OLMo 2 or Gemma 3 decoder layer's tensors (raises for what the
    engine does not run); norm_offset is added to every norm's weight (Gemma's are 1 + w)."""
    attn = layer.self_attn
    proj = _projections(layer)
    if any(proj[n][1] is not None for n in ("o_proj", "gate_proj", "up_proj", "down_proj")):
        raise NotImplementedError("generate(): output-projection and MLP biases are not supported by the decode step")
    mlp_activation(layer)
    qn, kn = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    norms = [_vec(n.weight if n is not None else None, norm_offset) for n in _norms(layer)]
    return LayerWeights(
        input_norm=norms[0],
        q_proj=_mat(proj["q_proj"][0], fmt), q_bias=_vec(proj["q_proj"][1]),
        k_proj=_mat(proj["k_proj"][0], fmt), k_bias=_vec(proj["k_proj"][1]),
        v_proj=_mat(proj["v_proj"][0], fmt), v_bias=_vec(proj["v_proj"][1]),
        q_norm=_vec(qn.weight if qn is not None else None, norm_offset),
        k_norm=_vec(kn.weight if kn is not None else None, norm_offset),
        o_proj=_mat(proj["o_proj"][0], fmt),
        post_norm=norms[1],
        gate_proj=_mat(proj["gate_proj"][0], fmt), up_proj=_mat(proj["up_proj"][0], fmt),
        down_proj=_mat(proj["down_proj"][0], fmt),
        attn_out_norm=norms[2], mlp_out_norm=norms[3],
    )


def _gemm_layer(blocks: LayerWeights, own: LayerWeights) -> LayerWeights:
    """`blocks` with every block matrix replaced by a float matrix of its values in the model's dtype:
    the model's own tensor (in `own`) where it equals them, else a dequantised copy."""
    from .ops.linear_rows import is_blocks, weight_matrix

    out = {}
    for name, b, t in zip(LAYER_FIELDS, blocks, own):
        if not is_blocks(b):
            out[name] = b
            continue
        values = weight_matrix(b, t.dtype)
        out[name] = t if torch.equal(values, t) else values
    return LayerWeights(**out)


class NativeWeights:
    """Every layer's weights (base layers, then the exits' layers and norms), the embedding, the head,
    the shapes the engine needs and the rotary tables."""

    native = True

    def __init__(self, model):
        a = model.adapter
        c = a.config
        self.L = model.num_layers
        self.exits = list(model.exits)
        self.format = fmt = weight_format(model)
        off = a.family.norm_offset
        modules = list(a.layers) + [model.exit_module(k).layer for k in self.exits]
        self.layers = [layer_weights(layer, fmt, off) for layer in a.layers] + [
            layer_weights(model.exit_module(k).layer, EXIT_FORMAT[fmt], off) for k in self.exits]
        # the multi-token passes' GEMMs read float matrices of the blocks' values: the model's own where
        # they hold them (quantize rounds in place), else a dequantised copy (e.g. exits trained since)
        self.gemm_layers = self.layers if fmt == "float" else [
            _gemm_layer(lw, layer_weights(layer, norm_offset=off)) for lw, layer in zip(self.layers, modules)]
        self.exit_norms = [_vec(model.exit_module(k).norm.weight, off) for k in self.exits]
        # the flat lists the native step takes
        self.base = [t for lw in self.layers[:self.L] for t in lw]
        self.exit = [t for e, lw in enumerate(self.layers[self.L:]) for t in (*lw, self.exit_norms[e])]
        self.embed = a.embed_tokens.weight.detach()
        self.head = _mat(a.lm_head.weight, HEAD_FORMAT[fmt])
        self.short_ids = _short_ids(model)
        self.head_short = None if self.short_ids is None else _mat(  # the head's shortlisted rows, ranked
            a.lm_head.weight[self.short_ids], HEAD_FORMAT[fmt])
        self.final_norm = _vec(a.final_norm.weight, off)
        self.embed_scale = float(getattr(a.embed_tokens, "scalar_embed_scale", 1.0))  # (Gemma: sqrt(hidden))
        self.attn_softcap, self.logit_softcap = a.attn_softcap or 0.0, a.logit_softcap or 0.0  # (Gemma 2; 0: none)
        self.activation = mlp_activation(a.layers[0])
        self.eps = a.rms_norm_eps
        self.H = a.hidden_size
        self.Hq = int(c.num_attention_heads)
        self.Hkv = int(getattr(c, "num_key_value_heads", None) or self.Hq)
        self.D = int(getattr(c, "head_dim", None) or self.H // self.Hq)
        self.I = int(c.intermediate_size)
        self.V = a.vocab_size
        self.scale = float(getattr(a.layers[0].self_attn, "scaling", self.D ** -0.5))
        self.max_positions = int(getattr(c, "max_position_embeddings", 1 << 20))
        self.sliding = getattr(c, "sliding_window", None) if any(
            a.layer_type(i) != "full_attention" for i in range(self.L)) else None
        self.rotary = a.rotary_emb
        # one rotary table per attention type where the family's differ (Gemma 3), else one; the
        # table of each cache slot (an exit's: that of the last layer's type, as the modules run it)
        types = [a.layer_type(i) for i in range(self.L)] + [a.layer_type(self.L - 1)] * len(self.exits)
        self.rope_types = sorted(set(types)) if a.family.rotary_per_layer_type else [None]
        self.slot_rope = [self.rope_types.index(t) for t in types] if a.family.rotary_per_layer_type else []
        # each slot's sliding window (0: attends to every position), or [] where no layer slides
        self.slot_window = [int(self.sliding) if t != "full_attention" else 0 for t in types] if self.sliding else []
        self._tables = None

    def layer(self, slot: int) -> LayerWeights:
        """Cache slot `slot`'s layer: base layers 0..L-1, then one per exit."""
        return self.layers[slot]

    def gemm_layer(self, slot: int) -> LayerWeights:
        """The same layer with float matrices, for multi-token passes (the block formats' values)."""
        return self.gemm_layers[slot]

    def exit_norm(self, k: int) -> torch.Tensor:
        """The norm after exit k's layer (the final norm for k == L)."""
        return self.final_norm if k == self.L else self.exit_norms[self.exits.index(k)]

    def rope(self, positions: int):
        """cos/sin [K, P, R/2] float32 from the model's own rotary embedding (its scaling included), one
        table per entry of rope_types (slot_rope names each cache slot's); R <= D the dimensions of a head
        it rotates (R < D: partial rotary, the rest pass unchanged)."""
        if self._tables is None or self._tables[0].shape[1] < positions:
            ids = torch.arange(positions, device=self.embed.device).unsqueeze(0)
            probe = torch.zeros(1, positions, self.D, device=self.embed.device)
            tables = [self.rotary(probe, ids) if t is None else self.rotary(probe, ids, t) for t in self.rope_types]
            # (Hugging Face's tables repeat their first half: cos [1, P, R] holds R/2 distinct columns)
            self._tables = tuple(torch.stack([tb[i][0, :, : tb[i].shape[-1] // 2].float() for tb in tables])
                                 .contiguous() for i in (0, 1))
        return self._tables

    def rope_of(self, slot: int) -> int:
        """The index of cache slot `slot`'s rotary table."""
        return self.slot_rope[slot] if self.slot_rope else 0


class ModuleWeights:
    """For a family the native step does not run (adapters.Family.native False): the shapes the
    engine's cache needs and the model's own modules, which the engine runs layer by layer
    (Engine._span_modules), attention soft-caps, sandwich norms and sliding windows included."""

    native = False
    format = "float"

    def __init__(self, model):
        a = model.adapter
        c = a.config
        self.L = model.num_layers
        self.exits = list(model.exits)
        self.H = a.hidden_size
        self.Hq = int(c.num_attention_heads)
        attn = a.attention(a.layers[0])
        self.Hkv = self.Hq // int(getattr(attn, "num_key_value_groups", 1))  # (what the module computes with)
        self.D = int(getattr(attn, "head_dim", None) or getattr(attn, "head_size", None) or self.H // self.Hq)
        self.V = a.vocab_size
        self.max_positions = int(getattr(c, "max_position_embeddings", 1 << 20))
        self.sliding = None  # (sliding windows are in the masks the engine builds for each layer)
        self.window = getattr(c, "sliding_window", None)
        self.modules = list(a.layers) + [model.exit_module(k).layer for k in self.exits]
        self.types = [a.layer_type(i) for i in range(self.L)] + [a.layer_type(self.L - 1)] * len(self.exits)
        self.norms = {**{k: model.exit_module(k).norm for k in self.exits}, self.L: a.final_norm}
        self.adapter = a
        self.dtype = model.dtype
        self.short_ids = _short_ids(model)  # (the module path masks the full head's logits)
        self.sdpa = getattr(c, "_attn_implementation", None) == "sdpa"


def _short_ids(model):
    """The model's shortlisted token ids (rank order) on its device, or None."""
    ids = getattr(model, "shortlist", None)
    return ids.to(model.device) if ids is not None else None


def _cache_key(model) -> tuple:
    """What the engine's weights depend on: rebuilt when exits are attached, loaded or trained, the dtype
    or weight format changes, or another shortlist is set."""
    return (tuple(model.exits), model.tokens_trained, id(model.balconies), model.dtype, weight_format(model),
            tuple(p.data_ptr() for p in model.balcony_parameters()[:1]), id(getattr(model, "shortlist", None)))


def engine_weights(model):
    """What the engine reads: NativeWeights for the families the native step runs, else ModuleWeights.
    Cached per model (_cache_key)."""
    key = _cache_key(model)
    cached = getattr(model, "_engine_weights", None)
    if cached is None or cached[0] != key:
        if not model.adapter.native and weight_format(model) != "float":
            raise NotImplementedError(f"{weight_format(model)} weights run in the native step, which does not "
                                      f"cover {model.adapter.model_type}; load it with float weights")
        if not model.adapter.native and getattr(model, "_module_notice", None) is None:
            from .adapters import NATIVE

            model._module_notice = (f"{model.adapter.model_type} decodes through the model's own modules, layer "
                                    f"by layer (correct, slower): the native step covers {', '.join(NATIVE)}")
            warnings.warn(model._module_notice, RuntimeWarning, stacklevel=3)
        cached = (key, NativeWeights(model) if model.adapter.native else ModuleWeights(model))
        model._engine_weights = cached
    return cached[1]


def weight_format(model) -> str:
    return getattr(model, "weight_format", "float")


def _layer_linears(model, exits: bool = True, base: bool = True):
    """Every decoder matrix's nn.Linear of the base layers and/or the exits (Phi-3's fused ones once each)."""
    a = model.adapter
    layers = (list(a.layers) if base else []) + ([model.exit_module(k).layer for k in model.exits] if exits else [])
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv = [attn.qkv_proj] if hasattr(attn, "qkv_proj") else [attn.q_proj, attn.k_proj, attn.v_proj]
        gu = [mlp.gate_up_proj] if hasattr(mlp, "gate_up_proj") else [mlp.gate_proj, mlp.up_proj]
        yield from (*qkv, attn.o_proj, *gu, mlp.down_proj)


ROUND = {"int8": lambda w: dequantize_q8(quantize_q8(w), w.dtype), "q4": lambda w: dequantize_q4(quantize_q4(w), w.dtype),
         "q4_1": lambda w: dequantize_q4_1(quantize_q4_1(w), w.dtype)}


@torch.no_grad()
def quantize(model, weights: str = "int8"):
    """Puts the model's weights in `weights` format for generation: "int8" rounds every decoder matrix
    (base layers and the exits attached now) and the LM head to Q8 blocks; "q4" ("q4_1") the base's decoder
    matrices to Q4 (Q4_1) blocks, the exits' to Q8 (EXIT_FORMAT) and the head to Q8 blocks. In place in the model too (so evaluate() and training see the
    very weights the engine reads; the head is tied to the embedding in most small models, which is
    then rounded as well), and the engine reads the blocks. Matrices whose width is not a multiple of
    32 stay as they are. Returns the model."""
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {WEIGHT_FORMATS}, got {weights!r}")
    if weights != "float" and not model.adapter.native:
        raise NotImplementedError(f"{weights} weights run in the native step, which does not cover "
                                  f"{model.adapter.model_type}")
    if weight_format(model) != "float" and weights != weight_format(model):
        raise ValueError(f"the model's weights are already rounded to {weight_format(model)}; load it again for "
                         f"{weights} weights")
    if weights != "float":
        head = model.adapter.lm_head
        todo = ([(lin, weights) for lin in _layer_linears(model, exits=False)]
                + [(lin, EXIT_FORMAT[weights]) for lin in _layer_linears(model, base=False)]
                + [(head, HEAD_FORMAT[weights])])
        for lin, fmt in todo:
            w = lin.weight
            if w.dim() == 2 and w.shape[1] % Q8_BLOCK == 0:
                w.copy_(ROUND[fmt](w))
    model.weight_format = weights
    model._engine_weights = None
    return model
