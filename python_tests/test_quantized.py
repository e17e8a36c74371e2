"""int8, q4 and q4_1 weights (weights.quantize / bx.load(weights=...)): the engine reads Q8 / Q4 / Q4_1 blocks and
computes what the model, whose weights quantize() rounded in place, computes."""

import pytest
import torch

import balcony_ext as bx
from balcony_ext import ops
from balcony_ext.engine import Engine
from balcony_ext.model import attach
from step_checks import assert_native_matches_composed
from tiny_models import tiny_balcony

L = 6
EXITS = [2, 4]


def _model(seed=0):
    m = tiny_balcony("llama", seed=seed, layers=L, initializer_range=0.2)
    attach(m, EXITS, init="random", seed=1)
    return m


def _prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 250, (5 + 3 * i,), generator=g).tolist() for i in range(n)]


def test_quantize_rounds_the_model_and_the_engine_reads_q8_blocks():
    m = _model()
    w0 = m.adapter.layers[0].mlp.down_proj.weight.clone()
    bx.quantize(m, "int8")
    w1 = m.adapter.layers[0].mlp.down_proj.weight
    assert not torch.equal(w0, w1) and torch.equal(w1, ops.dequantize_q8(ops.quantize_q8(w0)))
    e = Engine(m, 2, 32)
    assert e.w.format == "int8" and e.w.layer(0).down_proj.dtype == torch.uint8 and e.w.head.dtype == torch.uint8
    assert e.w.layer(L).q_proj.dtype == torch.uint8  # the exits too
    # the rounding is stable: the engine's blocks are those of the original weights
    assert torch.equal(e.w.layer(0).down_proj, ops.quantize_q8(w0))
    with pytest.raises(ValueError, match="weights must be one of"):
        bx.quantize(m, "int4")
    with pytest.raises(ValueError, match="already rounded"):
        bx.quantize(m, "float")
    with pytest.raises(ValueError, match="already rounded to int8"):
        bx.quantize(m, "q4")


@pytest.mark.parametrize("fmt", ["q4", "q4_1"])
def test_4bit_rounds_the_base_layers_to_4bit_and_the_exits_and_head_to_q8(fmt):
    quant, dequant, storage = {"q4": (ops.quantize_q4, ops.dequantize_q4, torch.int8),
                               "q4_1": (ops.quantize_q4_1, ops.dequantize_q4_1, torch.int16)}[fmt]
    m = _model()
    w0, h0 = m.adapter.layers[0].mlp.down_proj.weight.clone(), m.adapter.lm_head.weight.clone()
    x0 = m.exit_module(2).layer.mlp.down_proj.weight.clone()
    bx.quantize(m, fmt)
    assert torch.equal(m.adapter.layers[0].mlp.down_proj.weight, dequant(quant(w0)))
    assert torch.equal(m.adapter.lm_head.weight, ops.dequantize_q8(ops.quantize_q8(h0)))
    assert torch.equal(m.exit_module(2).layer.mlp.down_proj.weight, ops.dequantize_q8(ops.quantize_q8(x0)))
    e = Engine(m, 2, 32)
    assert e.w.format == fmt and e.w.layer(0).down_proj.dtype == storage
    assert e.w.layer(L).q_proj.dtype == torch.uint8  # the exits' layers in int8 blocks (weights.EXIT_FORMAT)
    assert e.w.head.dtype == torch.uint8
    if fmt == "q4_1":
        return
    assert torch.equal(e.w.layer(0).down_proj, ops.quantize_q4(w0))  # the engine's blocks: the original's


@pytest.mark.parametrize("fmt", ["int8", "q4", "q4_1"])
def test_block_native_step_matches_the_composed_step(cpu_capability, fmt):
    m = bx.quantize(_model(), fmt)
    assert_native_matches_composed(m, _prompts(4), [2, 4, L, 2], steps=4, tol=2e-4, same_tokens=True)


@pytest.mark.parametrize("fmt", ["int8", "q4", "q4_1"])
@pytest.mark.parametrize("k", [2, 4, L])
def test_block_generation_equals_the_rounded_models_own_forward(k, fmt):
    m = bx.quantize(_model(), fmt)
    ids = _prompts(1)[0]
    out = bx.generate(m, ids, exit_layer=k, max_new_tokens=6, stop_tokens=[], calibration=None)
    seq = ids + out.tokens
    with torch.no_grad():
        logits = m(torch.tensor([seq]), exits=[k])[k][0]
    assert out.tokens == logits[len(ids) - 1:-1].argmax(-1).tolist()


def test_q4_1_holds_weights_on_its_grid_exactly():
    # a model whose decoder matrices are Q4_1 values (as the default model's, from a Q4_1 GGUF file)
    # and whose head is Q8 values: weights="q4_1" changes nothing, the engine reads those values
    m = _model()
    with torch.no_grad():
        for lin in [l for layer in m.adapter.layers for l in (layer.self_attn.q_proj, layer.mlp.down_proj)]:
            lin.weight.copy_(ops.dequantize_q4_1(ops.quantize_q4_1(lin.weight)))
        m.adapter.lm_head.weight.copy_(ops.dequantize_q8(ops.quantize_q8(m.adapter.lm_head.weight)))
    before = {n: p.clone() for n, p in m.base.named_parameters()}
    bx.quantize(m, "q4_1")
    for n, p in m.base.named_parameters():
        if n.endswith(("q_proj.weight", "down_proj.weight", "embed_tokens.weight")):
            assert torch.equal(p, before[n]), n
    e = Engine(m, 1, 16)
    assert e.w.layer(0).q_proj.dtype == torch.int16 and e.w.head.dtype == torch.uint8
    assert torch.equal(ops.dequantize_q4_1(e.w.layer(0).q_proj), before["model.layers.0.self_attn.q_proj.weight"])


def test_int8_is_close_to_float():
    m, q = _model(), bx.quantize(_model(), "int8")
    ids = torch.tensor([_prompts(1)[0]])
    with torch.no_grad():
        a, b = m(ids, exits=[L])[L], q(ids, exits=[L])[L]
    pa, pb = a.softmax(-1), b.softmax(-1)
    assert (pa - pb).abs().max() < 0.05


@pytest.mark.parametrize("fmt", ["int8", "q4", "q4_1"])
def test_multi_token_passes_read_float_matrices_of_the_blocks_values(fmt):
    # the prefill's GEMMs read the model's own (rounded) matrices, not a dequantisation per call; an exit
    # whose float weights no longer equal its blocks' values (trained after quantize) gets a copy of them
    from balcony_ext.weights import engine_weights

    m = bx.quantize(_model(), fmt)
    with torch.no_grad():
        m.exit_module(4).layer.mlp.down_proj.weight.add_(0.01)  # as if trained since: off the block grid
    w = engine_weights(m)
    for slot, own in ((0, m.adapter.layers[0]), (L + 1, m.exit_module(4).layer)):
        g, b = w.gemm_layer(slot), w.layer(slot)
        for name in ("q_proj", "down_proj"):
            assert ops.is_blocks(getattr(b, name)) and not ops.is_blocks(getattr(g, name))
            assert torch.equal(getattr(g, name), ops.weight_matrix(getattr(b, name)))
    assert w.gemm_layer(0).down_proj.data_ptr() == m.adapter.layers[0].mlp.down_proj.weight.data_ptr()  # no copy
    assert w.gemm_layer(L + 1).down_proj.data_ptr() != m.exit_module(4).layer.mlp.down_proj.weight.data_ptr()
    # a prefill long enough for the GEMM path gives what the per-row path (the blocks) gives
    ids = torch.randint(3, 250, (40,), generator=torch.Generator().manual_seed(5)).tolist()
    engines = [Engine(m, 1, 48), Engine(m, 1, 48)]
    engines[1].w = type(w).__new__(type(w))
    engines[1].w.__dict__.update(w.__dict__, gemm_layers=w.layers)  # dequantising per call
    for e in engines:
        e.add_prompts([ids])
        e.prefill_step([4], torch.zeros(1), torch.zeros(1, dtype=torch.long), torch.ones(1), torch.rand(1))
    torch.testing.assert_close(engines[0].logits, engines[1].logits, atol=1e-5, rtol=1e-5)
