"""One native decode step of a Balcony model (torch.ops.balcony.decode_step).

For one new token per sequence, in one call: the embedding, the base layers up to the deepest exit
in use, each row's balcony layer and exit norm (or the final norm for a row at the full depth; exit
0 is an idle row that runs nothing), the LM head into `logits` [B, V] and the next tokens into
`next_tokens` [B] (chosen as sample_tokens chooses). Every row's keys and values go into the caches
of the slots it runs, and the hidden state after each exit depth into `kept`. The weight lists are
laid out as balcony_ext.weights describes (LAYER_FIELDS per layer, an exit's norm after its layer).
Its reference is `Engine._composed_step` (balcony_ext/engine.py): the same step composed of the separate
ops, the path on devices without the native step; the tests hold the two to each other.
"""

import torch

from .. import _native


ACTIVATIONS = {"silu": 0, "gelu_tanh": 1}  # the MLP gate's activation, as the step's `activation` argument


def decode_step(tokens, positions, exit_of_row, exit_depths, embed, base_weights, exit_weights, final_norm, head,
                key_caches, value_caches, kept, cos, sin, slot_rope, slot_window, eps, scale, embed_scale, activation,
                attn_softcap, logit_softcap, workspace, logits, temperature, top_k, top_p, uniform, next_tokens):
    """Runs the step, writing the caches, kept states, logits and next_tokens in place (returns None).
    tokens, positions and exit_of_row are int64 [B]; cos / sin [P, D/2], or [R, P, D/2] with slot_rope
    naming each cache slot's table; slot_window each slot's sliding window (0: none; [] none anywhere);
    embed_scale multiplies the embedding; activation is a key of ACTIVATIONS; attn_softcap and
    logit_softcap > 0 soft-cap the attention scores and the logits (cap * tanh(x / cap); 0: off);
    workspace is float32 of decode_step_workspace(...) elements."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"decode_step: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    torch.ops.balcony.decode_step(tokens, positions, exit_of_row, list(exit_depths), embed, base_weights,
                                  exit_weights, final_norm, head, key_caches, value_caches, kept, cos, sin,
                                  list(slot_rope), list(slot_window), eps, scale, embed_scale,
                                  ACTIVATIONS[activation], attn_softcap, logit_softcap, workspace, logits,
                                  temperature, top_k, top_p, uniform, next_tokens)


def decode_step_workspace(batch, hidden, heads, kv_heads, head_dim, inter, vocab) -> int:
    """Float32 elements of the step's workspace for these sizes (and the current thread count)."""
    return torch.ops.balcony.decode_step_workspace(batch, hidden, heads, kv_heads, head_dim, inter, vocab)


if _native.available():

    @torch.library.register_fake("balcony::decode_step")
    def _(tokens, positions, exit_of_row, exit_depths, embed, base_weights, exit_weights, final_norm, head,
          key_caches, value_caches, kept, cos, sin, slot_rope, slot_window, eps, scale, embed_scale, activation, attn_softcap,
          logit_softcap, workspace, logits,
          temperature, top_k, top_p, uniform, next_tokens):
        B = tokens.shape[0]
        torch._check(positions.shape[0] == B and exit_of_row.shape[0] == B,
                     lambda: "decode_step: tokens, positions and exit_of_row must have one entry per row")
        torch._check(logits.dim() == 2 and logits.shape[0] == B and logits.shape[1] == head.shape[0],
                     lambda: "decode_step: logits must be [B, V]")
        torch._check(next_tokens.shape[0] == B, lambda: "decode_step: next_tokens must be [B]")
        return None
