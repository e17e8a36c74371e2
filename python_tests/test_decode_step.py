"""ops.decode_step: the op's wrapper, its fake kernel and opcheck, and the layer layout it shares with
Python. (Its results against the plain-PyTorch step are in test_generate.py.)"""

import re
from pathlib import Path

import torch

from balcony_ext import ops
from balcony_ext.engine import Engine
from balcony_ext.ops.decode_step import ACTIVATIONS
from balcony_ext.model import attach
from balcony_ext.weights import LAYER_FIELDS, PER_EXIT, PER_LAYER, LayerWeights
from tiny_models import tiny_balcony

HEADER = Path(__file__).resolve().parent.parent / "csrc" / "include" / "balcony" / "layer_layout.h"


def _engine(batch=3, max_len=24):
    m = tiny_balcony("llama", seed=0, layers=4, initializer_range=0.2)
    attach(m, [2], init="random", seed=1)
    e = Engine(m, batch, max_len, native=True)
    e.add_prompts([[5, 6, 7, 8][:n] for n in (4, 2, 3)][:batch])
    e.catch_up([2, 4, 0][:batch])
    return e


def _args(e, exits, op=True):
    """The arguments of torch.ops.balcony.decode_step (op) or of its wrapper ops.decode_step."""
    w, B = e.w, e.B
    pos = (e.cache.length - 1).clamp(min=0)
    last = e.cache.tokens[torch.arange(B), pos]
    act = ACTIVATIONS[w.activation] if op else w.activation
    return (last, pos, torch.tensor(exits), e.exits, w.embed, w.base, w.exit, w.final_norm, w.head, e.cache.k,
            e.cache.v, e.cache.kept, e.cos, e.sin, w.slot_rope, w.slot_window, w.eps, w.scale, w.embed_scale, act,
            w.attn_softcap, w.logit_softcap, e.workspace,
            e.logits, torch.zeros(B), torch.zeros(B, dtype=torch.long), torch.ones(B), torch.rand(B), e.next_tokens)


def test_layer_layout_is_the_native_steps():
    enum = re.search(r"enum LayerField : int64_t \{(.*?)\};", HEADER.read_text(), re.S).group(1)
    names = [n.strip() for n in re.sub(r"//[^\n]*", "", enum).split(",") if n.strip()]
    assert names[-1] == "kPerLayer"
    assert [n.lower() for n in names[:-1]] == list(LAYER_FIELDS)
    assert PER_LAYER == len(LayerWeights._fields) == 16 and PER_EXIT == 17
    e = _engine()
    assert len(e.w.base) == PER_LAYER * e.L and len(e.w.exit) == PER_EXIT * len(e.exits)
    assert e.w.layer(0).q_proj is e.w.base[LAYER_FIELDS.index("q_proj")]


def test_decode_step_wrapper_matches_the_op():
    exits = [2, 4, 0]
    a, b = _engine(), _engine()
    ops.decode_step(*_args(a, exits, op=False))
    torch.ops.balcony.decode_step(*_args(b, exits))
    torch.testing.assert_close(a.logits[:2], b.logits[:2], rtol=0, atol=0)
    assert torch.equal(a.next_tokens[:2], b.next_tokens[:2])


def test_decode_step_opcheck():
    e = _engine()
    torch.library.opcheck(torch.ops.balcony.decode_step.default, _args(e, [2, 4, 0]),
                          test_utils=("test_schema", "test_faketensor"))


def test_decode_step_fake_kernel_checks_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    e = _engine()
    args = list(_args(e, [2, 4, 0]))
    with FakeTensorMode(allow_non_fake_inputs=True):
        torch.ops.balcony.decode_step(*args)  # shapes agree: no error
        args[23] = torch.empty(2, e.w.V)  # logits with a row too few
        try:
            torch.ops.balcony.decode_step(*args)
        except Exception as exc:  # the fake kernel's check
            assert "logits must be [B, V]" in str(exc)
        else:
            raise AssertionError("the fake kernel accepted logits of the wrong shape")


def test_decode_step_names_a_malformed_layer_tensor():
    import pytest

    e = _engine()
    args = list(_args(e, [2, 4, 0]))
    base = list(args[5])
    q_norm, out_norm = LAYER_FIELDS.index("q_norm"), LAYER_FIELDS.index("mlp_out_norm")
    for slot, bad, msg in ((q_norm, torch.ones(e.w.D + 1), rf"layer 0 q norm must be a contiguous float32 \[{e.w.D}\] "
                                                            rf"or \[{e.w.Hq * e.w.D}\]"),
                           (out_norm, torch.ones(e.w.H - 1), rf"layer 0 MLP-output norm must be a contiguous float32 "
                                                             rf"\[{e.w.H}\]")):
        args[5] = base[:slot] + [bad] + base[slot + 1:]
        with pytest.raises(RuntimeError, match=msg):
            torch.ops.balcony.decode_step(*args)
