"""BalconyModel: the frozen base wrapped without changing it, exits attached and run as specified."""

import pytest
import torch

from balcony_ext.adapters import UnsupportedModelError, adapter_for
from balcony_ext.model import attach, detach
from tiny_models import tiny_balcony, tiny_hf


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_full_depth_equals_hf_logits(model_type):
    model = tiny_balcony(model_type)
    attach(model, [1, 2])
    ids = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        ref = model.base(ids).logits
        out = model(ids, exits=[model.num_layers])
    torch.testing.assert_close(out[model.num_layers], ref, atol=1e-5, rtol=1e-5)


def test_padding_mask_matches_hf():
    model = tiny_balcony()
    ids = torch.randint(0, 256, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    with torch.no_grad():
        ref = model.base(ids, attention_mask=mask).logits
        out = model(ids, exits=[4], attention_mask=mask)[4]
    torch.testing.assert_close(out[1, 3:], ref[1, 3:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[0], ref[0], atol=1e-5, rtol=1e-5)


def test_exit_equals_manual_composition():
    model = tiny_balcony()
    attach(model, [2], init="random", seed=1)
    ids = torch.randint(0, 256, (1, 7))
    with torch.no_grad():
        hs = model.base(ids, output_hidden_states=True).hidden_states
        ex = model.exit_module(2)
        pos = torch.arange(7).unsqueeze(0)
        cos_sin = model.base.model.rotary_emb(hs[2], position_ids=pos)
        h = ex.layer(hs[2], attention_mask=None, position_ids=pos, position_embeddings=cos_sin)
        h = h[0] if isinstance(h, tuple) else h
        ref = model.base.lm_head(ex.norm(h))
        out = model(ids, exits=[2])[2]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_layers_past_deepest_exit_never_run():
    model = tiny_balcony(layers=6)
    attach(model, [2, 3])
    calls = {i: 0 for i in range(6)}
    hooks = [
        layer.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, layer in enumerate(model.base.model.layers)
    ]
    norm_calls = []
    hooks.append(model.base.model.norm.register_forward_hook(lambda *a: norm_calls.append(1)))
    out = model(torch.randint(0, 256, (1, 5)), exits=[2, 3])
    assert set(out) == {2, 3}
    assert [calls[i] for i in range(6)] == [1, 1, 1, 0, 0, 0]
    assert not norm_calls
    _, final = model.frozen_forward(torch.randint(0, 256, (1, 5)), [2], full=False)
    assert final is None and calls[2] == 1
    for h in hooks:
        h.remove()


def test_init_last_copies_last_layer_and_norm_inits():
    model = tiny_balcony()
    attach(model, [1], init="last", norm_init="final")
    attach(model, [2], init="last", norm_init="next")
    last = model.base.model.layers[-1].state_dict()
    for k, v in model.exit_module(1).layer.state_dict().items():
        torch.testing.assert_close(v, last[k], atol=0, rtol=0)
    torch.testing.assert_close(model.exit_module(1).norm.weight, model.base.model.norm.weight)
    torch.testing.assert_close(model.exit_module(2).norm.weight, model.base.model.layers[2].input_layernorm.weight)
    assert type(model.exit_module(1).layer) is type(model.base.model.layers[0])
    assert type(model.exit_module(1).norm) is type(model.base.model.norm)
    assert model.exit_module(1).layer.self_attn.layer_idx == 4
    assert model.exit_module(2).layer.self_attn.layer_idx == 5
    # the copy is independent of the base
    assert model.exit_module(1).layer.mlp.up_proj.weight.data_ptr() != model.base.model.layers[-1].mlp.up_proj.weight.data_ptr()


def test_random_init_is_seeded_and_differs_from_last():
    a, b = tiny_balcony(), tiny_balcony()
    attach(a, [2], init="random", seed=3)
    attach(b, [2], init="random", seed=3)
    wa = a.exit_module(2).layer.self_attn.q_proj.weight
    torch.testing.assert_close(wa, b.exit_module(2).layer.self_attn.q_proj.weight, atol=0, rtol=0)
    assert not torch.equal(wa, a.base.model.layers[-1].self_attn.q_proj.weight)
    assert abs(wa.std().item() - a.config.initializer_range) < 0.01


@pytest.mark.parametrize("bad,match", [
    ([0], r"exit depth 0 is out of range: this model has 4 layers, exits must be in 1\.\.3"),
    ([4], r"exit depth 4 is out of range: .*1\.\.3"),
    ([5], r"exit depth 5 is out of range"),
    ([-1], r"exit depth -1 is out of range"),
    ([1, 7], r"exit depth 7 is out of range"),
    ([2, 2], r"exit depths repeat: \[2, 2\]"),
    ([1.5], r"exit depth 1.5 is not an int"),
    ([True], r"exit depth True is not an int"),
    (["3"], r"exit depth '3' is not an int"),
    ([], "exits is empty"),
    (2, "exits must be a list of layer counts, got 2"),
    (None, "exits must be a list of layer counts, got None"),
])
def test_exit_validation(bad, match):
    model = tiny_balcony()
    attach(model, [1])
    before = model.exit_module(1)
    with pytest.raises(ValueError, match=match):
        attach(model, bad)
    assert model.exits == [1] and model.exit_module(1) is before


@pytest.mark.parametrize("kw,match", [
    (dict(init="copy"), r"^init must be one of \('last', .*'random'\), got 'copy'"),
    (dict(norm_init="first"), r"^norm_init must be one of \('final', 'next'\), got 'first'"),
])
def test_attach_bad_init_named_and_nothing_attached(kw, match):
    model = tiny_balcony()
    attach(model, [1])
    with pytest.raises(ValueError, match=match):
        attach(model, [2, 3], **kw)
    assert model.exits == [1]


def test_attach_needs_a_balcony_model():
    with pytest.raises(TypeError, match=r"attach\(\) needs a BalconyModel, got LlamaForCausalLM"):
        attach(tiny_hf(), [1])


def test_attach_twice_needs_replace():
    model = tiny_balcony()
    attach(model, [2])
    with pytest.raises(ValueError, match=r"exits \[2\] are already attached; pass replace=True"):
        attach(model, [1, 2])
    assert model.exits == [2]
    attach(model, [3, 1])
    assert model.exits == [1, 2, 3]
    attach(model, [2], init="random", replace=True)
    assert model.exit_module(2).init == "random"


def test_detach_removes_only_the_named_exits():
    model = tiny_balcony()
    attach(model, [1, 2, 3])
    kept = {n: t.clone() for n, t in model.exit_module(2).state_dict().items()}
    ids = torch.randint(0, 256, (1, 7))
    with torch.no_grad():
        before = model(ids, exits=[2])[2]
        assert detach(model, [3, 1]) is model
        after = model(ids, exits=[2])[2]
    assert model.exits == [2]
    torch.testing.assert_close(after, before, atol=0, rtol=0)
    for n, t in model.exit_module(2).state_dict().items():
        assert torch.equal(t, kept[n])
    assert detach(model, []).exits == [2]
    with pytest.raises(ValueError, match=r"exits \[1\] are not attached \(the model's exits: \[2\]\)"):
        detach(model, [1])
    with pytest.raises(ValueError, match="out of range"):
        detach(model, [model.num_layers])
    with pytest.raises(TypeError, match=r"detach\(\) needs a BalconyModel"):
        detach(tiny_hf(), [1])
    assert model.exits == [2]


def test_forward_unattached_exit_raises():
    model = tiny_balcony()
    attach(model, [2])
    with pytest.raises(KeyError, match="no exit at depth 3"):
        model(torch.zeros(1, 3, dtype=torch.long), exits=[3])


@pytest.mark.parametrize("bad", [256, 10**6, -1])
def test_token_ids_outside_the_vocabulary_named(bad):
    model = tiny_balcony()
    attach(model, [2])
    ids = torch.tensor([[5, bad, 7]])
    match = rf"token id {bad} is outside the vocabulary: ids must be in 0\.\.255 \(vocabulary size 256\)"
    with pytest.raises(ValueError, match=match):
        model(ids, exits=[2])
    with pytest.raises(ValueError, match=match):
        model.frozen_forward(ids, [2])
    assert set(model(torch.tensor([[0, 255]]), exits=[2, 4])) == {2, 4}


@pytest.mark.parametrize("ids", [torch.tensor([[5.0, 7.0]]), torch.tensor([[True, False]]), [[5.0, 7.5]]])
def test_token_ids_that_are_not_integers_named(ids):
    model = tiny_balcony()
    attach(model, [2])
    with pytest.raises(TypeError, match="token ids must be integers .*got dtype torch.(float32|bool)"):
        model(ids, exits=[2])
    with pytest.raises(TypeError, match="token ids must be integers"):
        model.frozen_forward(ids, [2])


def test_unsupported_architecture_named():
    from transformers import GPT2Config, GPT2LMHeadModel

    m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        adapter_for(m)


def test_base_frozen_and_unchanged_by_training():
    model = tiny_balcony()
    attach(model, [1, 3])
    before = {k: v.clone() for k, v in model.base.state_dict().items()}
    assert all(not p.requires_grad for p in model.base.parameters())
    assert all(p.requires_grad for p in model.balcony_parameters())
    opt = torch.optim.AdamW(model.balcony_parameters(), lr=1e-2)
    model.train()
    assert not model.base.training
    ids = torch.randint(0, 256, (2, 8))
    for _ in range(3):
        hs, final = model.frozen_forward(ids, model.exits)
        teacher = torch.log_softmax(model.base.lm_head(final), -1)
        loss = 0
        for k in model.exits:
            student = torch.log_softmax(model.base.lm_head(model.exit_hidden(k, hs[k])), -1)
            loss = loss + torch.nn.functional.kl_div(student, teacher, log_target=True, reduction="batchmean")
        opt.zero_grad()
        loss.backward()
        opt.step()
    for k, v in model.base.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.base.parameters())


@pytest.mark.parametrize("seed", ["x", 1.5, True])
def test_attach_seed_must_be_an_int(seed):
    model = tiny_balcony()
    with pytest.raises(ValueError, match=r"seed must be an int or None, got"):
        attach(model, [2], init="random", seed=seed)
    assert model.exits == []


@pytest.mark.parametrize("replace", ["no", 1, None])
def test_attach_replace_must_be_a_bool(replace):
    model = tiny_balcony()
    attach(model, [2], init="random", seed=0)
    before = {k: v.clone() for k, v in model.balconies.state_dict().items()}
    with pytest.raises(ValueError, match=r"replace must be True or False, got"):
        attach(model, [2], init="random", seed=1, replace=replace)  # ("no" re-initialised the exit before)
    assert all(torch.equal(v, before[k]) for k, v in model.balconies.state_dict().items())
    attach(model, [2], init="random", seed=1, replace=True)
