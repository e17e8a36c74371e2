"""The model's weights as the decode engine reads them.

A decoder layer is handed to the engine as the tensors of `LayerWeights`, in the order of
`LAYER_FIELDS`: that order is the argument order of the native step
(csrc/include/layer_layout.h lists the same fields; a test checks the two agree). Matrices are the
model's own tensors; norms and biases are small float32 copies; absent ones are empty tensors.
An exit adds its norm after its layer's fields.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


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


LAYER_FIELDS = LayerWeights._fields
PER_LAYER = len(LAYER_FIELDS)  # tensors per decoder layer in the native step's weight lists
PER_EXIT = PER_LAYER + 1  # an exit's layer, then its norm


def _vec(t):
    return t.detach().float().contiguous() if t is not None else torch.empty(0)


def _mat(t):
    return t.detach().contiguous()


def layer_weights(layer) -> LayerWeights:
    """A Hugging Face Llama-family decoder layer's tensors (raises for what the engine does not run)."""
    attn, mlp = layer.self_attn, layer.mlp
    if getattr(attn.o_proj, "bias", None) is not None or any(
            getattr(getattr(mlp, n), "bias", None) is not None for n in ("gate_proj", "up_proj", "down_proj")):
        raise NotImplementedError("generate(): output-projection and MLP biases are not supported by the decode step")
    act = getattr(mlp, "act_fn", None)
    if act is not None and type(act).__name__ not in ("SiLU", "SiLUActivation"):
        raise NotImplementedError(f"generate(): the MLP activation {type(act).__name__} is not SiLU")
    qn, kn = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    return LayerWeights(
        input_norm=_vec(layer.input_layernorm.weight),
        q_proj=_mat(attn.q_proj.weight), q_bias=_vec(attn.q_proj.bias),
        k_proj=_mat(attn.k_proj.weight), k_bias=_vec(attn.k_proj.bias),
        v_proj=_mat(attn.v_proj.weight), v_bias=_vec(attn.v_proj.bias),
        q_norm=_vec(qn.weight if qn is not None else None), k_norm=_vec(kn.weight if kn is not None else None),
        o_proj=_mat(attn.o_proj.weight),
        post_norm=_vec(layer.post_attention_layernorm.weight),
        gate_proj=_mat(mlp.gate_proj.weight), up_proj=_mat(mlp.up_proj.weight), down_proj=_mat(mlp.down_proj.weight),
    )


class NativeWeights:
    """Every layer's weights (base layers, then the exits' layers and norms), the embedding, the head,
    the shapes the engine needs and the rotary tables."""

    def __init__(self, model):
        a = model.adapter
        c = a.config
        self.L = model.num_layers
        self.exits = list(model.exits)
        self.layers = [layer_weights(layer) for layer in a.layers]
        for k in self.exits:
            self.layers.append(layer_weights(model.exit_module(k).layer))
        self.exit_norms = [_vec(model.exit_module(k).norm.weight) for k in self.exits]
        # the flat lists the native step takes
        self.base = [t for lw in self.layers[:self.L] for t in lw]
        self.exit = [t for e, lw in enumerate(self.layers[self.L:]) for t in (*lw, self.exit_norms[e])]
        self.embed = a.embed_tokens.weight.detach()
        self.head = _mat(a.lm_head.weight)
        self.final_norm = _vec(a.final_norm.weight)
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
        self._tables = None

    def layer(self, slot: int) -> LayerWeights:
        """Cache slot `slot`'s layer: base layers 0..L-1, then one per exit."""
        return self.layers[slot]

    def exit_norm(self, k: int) -> torch.Tensor:
        """The norm after exit k's layer (the final norm for k == L)."""
        return self.final_norm if k == self.L else self.exit_norms[self.exits.index(k)]

    def rope(self, positions: int):
        """cos/sin [P, D/2] float32 from the model's own rotary embedding (its scaling included)."""
        if self._tables is None or self._tables[0].shape[0] < positions:
            ids = torch.arange(positions, device=self.embed.device).unsqueeze(0)
            probe = torch.zeros(1, positions, self.D, device=self.embed.device)
            cos, sin = self.rotary(probe, ids)
            half = self.D // 2
            self._tables = (cos[0, :, :half].float().contiguous(), sin[0, :, :half].float().contiguous())
        return self._tables


def native_weights(model) -> NativeWeights:
    """Cached per model and exit set (rebuilt when exits are attached, loaded or trained)."""
    key = (tuple(model.exits), model.tokens_trained, id(model.balconies), model.dtype,
           tuple(p.data_ptr() for p in model.balcony_parameters()[:1]))
    cached = getattr(model, "_native_weights", None)
    if cached is None or cached[0] != key:
        cached = (key, NativeWeights(model))
        model._native_weights = cached
    return cached[1]
