"""Model families beyond the Llama family, each on a tiny random configuration (no download): the
adapter composes the model's own modules into the same logits as Hugging Face's forward, exits attach
(a copy of the last layer at depth L-1 is the full model), train, save and load; generation at full
depth gives Hugging Face's tokens and exit switches catch up exactly; unknown model types are
accepted only when a probe proves the composition."""

import warnings

import pytest
import torch

from balcony_ext.adapters import FAMILIES, UnsupportedModelError, adapter_for
from balcony_ext.exits_io import load_exits, save_exits
from balcony_ext.generate import generate
from balcony_ext.model import BalconyModel, attach
from balcony_ext.train import train
from test_train import _corpus
from tiny_models import tiny_balcony, tiny_hf

NEW = ["gemma2", "gemma3_text", "phi3", "olmo2", "gpt_neox"]
NATIVE_NEW = {"phi3", "olmo2", "gemma2", "gemma3_text"}  # (GPT-NeoX: its own modules)


def _ids(T=24, B=2, seed=0):
    return torch.randint(3, 256, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("model_type", NEW)
def test_full_depth_equals_hf_logits(model_type):
    model = tiny_balcony(model_type)
    ids = _ids()  # 24 tokens: past the Gemma sliding window of 8
    want = model.base(input_ids=ids).logits
    got = model(ids, exits=[model.num_layers])[model.num_layers]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", NEW)
def test_copy_of_the_last_layer_at_depth_l_minus_1_is_the_full_model(model_type):
    model = tiny_balcony(model_type)
    L = model.num_layers
    attach(model, [L - 1], init="next", norm_init="final")  # layer L (index L-1) and the final norm
    ids = _ids()
    out = model(ids, exits=[L - 1, L])
    torch.testing.assert_close(out[L - 1], out[L], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", NEW)
def test_training_reduces_kl_and_exits_save_and_load(model_type, tmp_path):
    model = tiny_balcony(model_type)
    attach(model, [1, 2], init="random", seed=0)
    base = {k: v.clone() for k, v in model.base.state_dict().items()}
    out = train(model, data=_corpus(), tokens=30 * 4 * 32, lr=3e-3, batch_size=4, seq_len=32, progress=False)
    h = out["history"]
    first, last = sum(x["loss"] for x in h[:5]) / 5, sum(x["loss"] for x in h[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    assert all(torch.equal(v, base[k]) for k, v in model.base.state_dict().items())
    path = save_exits(model, tmp_path / "exits.safetensors")
    other = tiny_balcony(model_type)
    load_exits(other, path)
    ids = _ids(T=12)
    a, b = model(ids, exits=[1, 2]), other(ids, exits=[1, 2])
    for k in (1, 2):
        torch.testing.assert_close(a[k], b[k])
    with pytest.raises(ValueError, match="differs|another|architecture"):
        load_exits(tiny_balcony("llama"), path)


def test_gemma_soft_cap_is_in_the_exit_logits_and_the_training_loss():
    from balcony_ext.train import distill_loss_for, reference_distill_loss

    model = tiny_balcony("gemma2")
    attach(model, [2], init="random", seed=0)
    logits = model(_ids(), exits=[2])[2]
    assert float(logits.detach().abs().max()) <= 5.0 + 1e-4  # final_logit_softcapping=5
    loss = distill_loss_for(model)
    h, t = torch.randn(6, 64), torch.randn(6, 64)
    w = model.adapter.lm_head.weight
    assert loss(h, w, t) != reference_distill_loss(h, w, t)
    capped = lambda x: torch.tanh(x @ w.T / 5) * 5  # noqa: E731
    want = torch.nn.functional.kl_div(capped(h).log_softmax(-1), capped(t).log_softmax(-1), log_target=True,
                                      reduction="sum") / 6
    torch.testing.assert_close(loss(h, w, t), want)


def test_olmo2_has_no_input_norm_to_copy():
    model = tiny_balcony("olmo2")
    with pytest.raises(ValueError, match="norm_init='final'"):
        attach(model, [1], norm_init="next")
    assert model.exits == []


def _assert_q4_1_generation_is_the_rounded_models(m):
    """Q4_1 blocks of every matrix (fused ones included): generation at exit 4 equals the rounded model's
    own forward."""
    from balcony_ext.weights import quantize

    quantize(m, "q4_1")
    ids = [5, 6, 7, 8, 9]
    out = generate(m, ids, exit_layer=4, max_new_tokens=6, stop_tokens=[], calibration=None)
    with torch.no_grad():
        logits = m(torch.tensor([ids + out.tokens]), exits=[4])[4][0]
    assert out.tokens == logits[len(ids) - 1:-1].argmax(-1).tolist()


def _assert_steps_match_fresh_forward(m, ids, schedule, new_tokens, native=None):
    """Streams a generation of ids under the exit schedule; every step's logits must equal those of a fresh
    forward of the model's own modules at that step's exit. Returns the generator (its engine, its exits)."""
    g = generate(m, ids, exit_layer=schedule, max_new_tokens=new_tokens, stop_tokens=[], stream=True, native=native)
    for _ in g:
        k = g.exit_layers[0][-1]
        with torch.no_grad():
            fresh = m(torch.tensor([ids + g.generated[0][:-1]]), exits=[k])[k][0, -1]
        torch.testing.assert_close(g.engine.logits[0], fresh, atol=3e-4, rtol=3e-4)
    return g


def _gen_model(model_type, layers=6, exits=(2, 4)):
    # a larger initialiser range gives peaked distributions, so greedy choices are well separated
    m = tiny_balcony(model_type, layers=layers, initializer_range=0.2)
    attach(m, list(exits), init="random", seed=1)
    return m


@pytest.mark.parametrize("model_type", NEW)
def test_generate_at_full_depth_equals_hugging_face_generate(model_type):
    m = _gen_model(model_type)
    assert m.adapter.native == (model_type in NATIVE_NEW)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [20, 21, 22]]  # 10 + 14 tokens: past the window of 8
    outs = generate(m, prompts, exit_layer=m.num_layers, max_new_tokens=14, stop_tokens=[])
    for ids, out in zip(prompts, outs):
        ref = m.base.generate(torch.tensor([ids]), max_new_tokens=14, min_new_tokens=14, do_sample=False,
                              pad_token_id=0)[0, len(ids):].tolist()
        assert out.tokens == ref


@pytest.mark.parametrize("model_type", NEW)
def test_exit_switches_catch_up_to_what_a_fresh_forward_gives(model_type):
    m = _gen_model(model_type)
    L = m.num_layers
    ids = [7, 30, 31, 40, 41, 42, 50]
    schedule = {0: 2, 3: 4, 5: L, 7: 2, 9: 4}  # shallow, deeper, full, back to an exit, deeper again
    g = generate(m, [ids, ids[:4]], exit_layer=schedule, max_new_tokens=12, stop_tokens=[], stream=True)
    seen = []
    for _ in g:
        k = g.exit_layers[0][-1]
        for b, p in enumerate([ids, ids[:4]]):
            seq = p + g.generated[b][:-1]
            with torch.no_grad():
                fresh = m(torch.tensor([seq]), exits=[k])[k][0, -1]
            torch.testing.assert_close(g.engine.logits[b], fresh, atol=3e-4, rtol=3e-4)
        seen.append(k)
    assert seen == [2, 2, 2, 4, 4, L, L, 2, 2, 4, 4, 4]
    assert g.engine.catch_up_tokens > 0


def test_families_outside_the_native_step_refuse_it_and_int8_by_name():
    from balcony_ext.weights import quantize

    m = _gen_model("gpt_neox")
    with pytest.raises(NotImplementedError, match="gpt_neox"):
        generate(m, [5, 6, 7], max_new_tokens=2, native=True)
    with pytest.raises(NotImplementedError, match="gpt_neox"):
        quantize(m, "int8")


def test_phi3_runs_the_native_step_on_row_slices_of_its_fused_projections(cpu_capability):
    from balcony_ext.weights import engine_weights
    from step_checks import assert_native_matches_composed

    m = _gen_model("phi3")
    assert m.adapter.native
    w = engine_weights(m)
    attn, mlp = m.adapter.layers[0].self_attn, m.adapter.layers[0].mlp
    q_rows = w.Hq * w.D
    assert w.layer(0).q_proj.data_ptr() == attn.qkv_proj.weight.data_ptr()  # views, no copies
    assert torch.equal(w.layer(0).k_proj, attn.qkv_proj.weight[q_rows:q_rows + w.Hkv * w.D])
    assert torch.equal(w.layer(0).up_proj, mlp.gate_up_proj.weight[w.I:])
    assert_native_matches_composed(m, [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14]], [2, m.num_layers], steps=4, tol=2e-4)
    # Q4_1 blocks of the fused matrices: generation equals the rounded model's own forward
    _assert_q4_1_generation_is_the_rounded_models(m)
    # partial rotary embeddings (Phi-4-mini turns 3/4 of each head's dimensions): the native step too;
    # greedy generation equals Hugging Face's, every step's logits a fresh forward's across exit switches
    for factor in (0.5, 0.75):
        partial = tiny_balcony("phi3", layers=6, partial_rotary_factor=factor, initializer_range=0.2)
        attach(partial, [2, 4], init="random", seed=1)
        assert partial.adapter.native
        assert engine_weights(partial).rope(8)[0].shape[-1] == int(w.D * factor) // 2
        ids = [5, 6, 7, 8, 9]
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # (no notice of a module-by-module decode)
            out = generate(partial, ids, max_new_tokens=8, stop_tokens=[], calibration=None)
        # (Hugging Face stops at its end-of-sequence token, which min_new_tokens would suppress)
        ref = partial.base.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                                    pad_token_id=0)[0, len(ids):].tolist()
        assert len(ref) >= 5 and out.tokens[:len(ref)] == ref
        _assert_steps_match_fresh_forward(partial, ids, {0: 2, 2: 6, 3: 4, 5: 2, 6: 6}, 8, native=True)
        assert_native_matches_composed(partial, [[5, 6, 7, 8], [9, 10, 11]], [2, 6], steps=4, tol=2e-4)


def test_olmo2_runs_the_native_step_with_norms_after_its_sublayers(cpu_capability):
    from balcony_ext.weights import engine_weights
    from step_checks import assert_native_matches_composed

    m = _gen_model("olmo2")
    w = engine_weights(m)
    lw, layer = w.layer(0), m.adapter.layers[0]
    assert lw.input_norm.numel() == 0 and lw.post_norm.numel() == 0  # no norms before the sublayers
    assert torch.equal(lw.attn_out_norm, layer.post_attention_layernorm.weight)
    assert torch.equal(lw.mlp_out_norm, layer.post_feedforward_layernorm.weight)
    assert lw.q_norm.numel() == w.Hq * w.D and lw.k_norm.numel() == w.Hkv * w.D  # over all heads of a row
    assert_native_matches_composed(m, [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14]], [2, m.num_layers], steps=4, tol=2e-4)
    _assert_q4_1_generation_is_the_rounded_models(m)


def _gemma3(window=64, **kw):
    # Gemma 3 as released: no soft-caps (the tiny default config has them, to exercise the module path)
    m = tiny_balcony("gemma3_text", layers=6, initializer_range=0.2, sliding_window=window,
                     final_logit_softcapping=None, attn_logit_softcapping=None, **kw)
    attach(m, [2, 4], init="random", seed=1)
    return m


def test_gemma3_runs_the_native_step(cpu_capability):
    from balcony_ext.weights import engine_weights
    from step_checks import assert_native_matches_composed

    m = _gemma3()
    assert m.adapter.native
    w = engine_weights(m)
    layer = m.adapter.layers[0]
    assert torch.equal(w.layer(0).input_norm, layer.input_layernorm.weight + 1)  # (1 + w) norms, folded
    assert torch.equal(w.layer(0).post_norm, layer.pre_feedforward_layernorm.weight + 1)
    assert torch.equal(w.layer(0).attn_out_norm, layer.post_attention_layernorm.weight + 1)
    assert w.embed_scale == 64 ** 0.5 and w.activation == "gelu_tanh"
    assert w.rope_types == ["full_attention", "sliding_attention"] and w.slot_rope == [1, 0, 1, 0, 1, 0, 0, 0]
    cos, _ = w.rope(8)  # (the exits as the last layer, full)
    assert not torch.allclose(cos[0], cos[1])  # the two types turn at different rates
    assert_native_matches_composed(m, [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14]], [2, m.num_layers], steps=4, tol=2e-4)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [20, 21, 22]]
    outs = generate(m, prompts, exit_layer=m.num_layers, max_new_tokens=14, stop_tokens=[])
    for ids, out in zip(prompts, outs):
        ref = m.base.generate(torch.tensor([ids]), max_new_tokens=14, min_new_tokens=14, do_sample=False,
                              pad_token_id=0)[0, len(ids):].tolist()
        assert out.tokens == ref
    _assert_q4_1_generation_is_the_rounded_models(m)


def test_gemma3_past_its_sliding_window():
    # the native step and the composed step (decode_attention's window) attend within each sliding
    # layer's window
    from balcony_ext.engine import Engine

    m = _gemma3(window=8)
    w = Engine(m, 1, 8).w
    assert w.slot_window == [8, 0, 8, 0, 8, 0, 0, 0] and Engine(m, 1, 40).native
    composed = Engine(m, 1, 40, native=False)
    assert composed.w.native and not composed.native  # the balcony ops over the native weights
    prompts = [list(range(5, 17)), [20, 21, 22]]  # 12 + 20 tokens: past the window of 8
    ref = [m.base.generate(torch.tensor([ids]), max_new_tokens=20, min_new_tokens=20, do_sample=False,
                           pad_token_id=0)[0, len(ids):].tolist() for ids in prompts]
    for native in (True, False):
        outs = generate(m, prompts, exit_layer=m.num_layers, max_new_tokens=20, stop_tokens=[], native=native)
        assert [o.tokens for o in outs] == ref, native
    # exit switches past the window: the caught-up caches give what a fresh forward gives
    L, ids = m.num_layers, list(range(30, 42))
    for native in (True, False):
        g = _assert_steps_match_fresh_forward(m, ids, {0: 2, 3: 4, 5: L, 7: 2}, 10, native)
        assert g.engine.native == native


def test_gemma2_runs_the_native_step_with_its_soft_caps(cpu_capability):
    from balcony_ext.engine import Engine
    from balcony_ext.weights import engine_weights

    m = _gen_model("gemma2")
    w = engine_weights(m)
    assert (w.attn_softcap, w.logit_softcap) == (20.0, 5.0) and w.slot_window == [8, 0, 8, 0, 8, 0, 0, 0]
    e = Engine(m, 2, 32)
    e.add_prompts([list(range(5, 17)), [20, 21, 22]])
    e.prefill_step([m.num_layers, 2], torch.zeros(2), torch.zeros(2, dtype=torch.long), torch.ones(2), torch.rand(2))
    assert e.native and float(e.logits.abs().max()) <= 5.0  # capped logits from the prefill's head
    # every step's logits are those of a fresh forward of the model's own modules (caps and window
    # included), in the native step and in the step composed of the balcony ops
    ids = list(range(30, 42))
    for native in (True, False):
        g = _assert_steps_match_fresh_forward(m, ids, {0: 2, 4: m.num_layers}, 8, native)
        assert g.engine.native == native and g.engine.w.native


def test_unknown_model_type_accepted_when_the_probe_agrees():
    hf = tiny_hf("olmo")  # not in FAMILIES: taken apart by name, then checked
    assert "olmo" not in FAMILIES
    model = BalconyModel(hf, name="tiny-olmo")
    assert not model.adapter.native
    ids = _ids()
    torch.testing.assert_close(model(ids, exits=[model.num_layers])[model.num_layers], hf(input_ids=ids).logits,
                               rtol=1e-5, atol=1e-5)


def test_unknown_model_type_refused_when_its_forward_does_more():
    # Granite scales the embeddings and the logits inside its own forward: composing its modules
    # would be silently wrong, so the probe refuses it
    with pytest.raises(UnsupportedModelError, match="GraniteForCausalLM.*does more"):
        adapter_for(tiny_hf("granite"))


def test_encoder_decoder_and_models_without_rotary_layers_named():
    from transformers import GPT2Config, GPT2LMHeadModel, T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, vocab_size=64, d_kv=16))
    with pytest.raises(UnsupportedModelError, match="encoder-decoder"):
        adapter_for(t5)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel: no rotary embedding"):
        adapter_for(gpt2)


@pytest.mark.parametrize("model_type", NEW)
def test_continuous_batching_of_a_module_family_equals_each_request_alone(model_type):
    from balcony_ext.batcher import Batcher, Request

    m = _gen_model(model_type)
    b = Batcher(m, max_batch=3, max_len=48, prefill_chunk=5, calibration=None)  # prompts prefilled in chunks
    g = torch.Generator().manual_seed(0)
    reqs = [b.submit(Request(torch.randint(3, 250, (4 + 3 * i,), generator=g).tolist(), max_new_tokens=6 + i,
                             exit_layer=[2, 4, m.num_layers][i % 3], stop_tokens=[])) for i in range(5)]
    while b.busy:
        b.iterate()
    for r in reqs:
        alone = generate(m, r.prompt_ids, exit_layer=r.target_exit, max_new_tokens=r.max_new_tokens, stop_tokens=[],
                         calibration=None)
        assert r.tokens == alone.tokens and r.exit_layers == alone.exit_layers


@pytest.mark.parametrize("model_type", NEW)
def test_hugging_face_model_at_an_exit_depth_computes_the_exit(model_type):
    from balcony_ext.bench import hf_at_depth

    m = _gen_model(model_type)
    ids = _ids(T=20, B=1)
    for k in (2, 4):
        with torch.no_grad():
            torch.testing.assert_close(hf_at_depth(m, k)(input_ids=ids).logits, m(ids, exits=[k])[k])
