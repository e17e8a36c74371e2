"""BalconyModel: a frozen Hugging Face causal LM plus trainable exits ("balcony layers").

Exit k (1 <= k < num_layers) = base layers 1..k, then one extra decoder layer of the base's own
class and config, then its own RMSNorm, then the base's frozen LM head.

    model = BalconyModel(hf_model, tokenizer)
    attach(model, exits=[8, 15, 22])
    logits = model(input_ids, exits=[8, model.num_layers])   # {8: [B,T,V], 30: [B,T,V]}
"""

from __future__ import annotations

import torch
from torch import nn

from .adapters import adapter_for
from .checks import check_flag

INITS = ("last", "next", "random")
NORM_INITS = ("final", "next")


class BalconyExit(nn.Module):
    """One exit: a decoder layer of the base's class plus its own RMSNorm."""

    def __init__(self, layer: nn.Module, norm: nn.Module, init: str, norm_init: str):
        super().__init__()
        self.layer = layer
        self.norm = norm
        self.init = init
        self.norm_init = norm_init


class BalconyModel(nn.Module):
    def __init__(self, hf_model: nn.Module, tokenizer=None, name: str | None = None):
        super().__init__()
        self.adapter = adapter_for(hf_model)
        self.base = hf_model
        self.tokenizer = tokenizer
        self.name = name or getattr(hf_model.config, "_name_or_path", "") or type(hf_model).__name__
        self.balconies = nn.ModuleDict()
        # Training bookkeeping carried into saved exits.
        self.tokens_trained = 0
        self.last_loss = None
        self.shortlist = None  # token ids, most frequent first, whose leading parts are cheaper heads (shortlist.py)
        self.shortlist_sizes = []  # the head sizes (leading parts) the budgets may buy
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.base.eval()

    # ---- properties -------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.adapter.num_layers

    @property
    def exits(self) -> list:
        return sorted(int(k) for k in self.balconies.keys())

    @property
    def config(self):
        return self.base.config

    @property
    def device(self) -> torch.device:
        return self.adapter.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.adapter.lm_head.weight.dtype

    def exit_module(self, k: int) -> BalconyExit:
        key = str(int(k))
        if key not in self.balconies:
            raise KeyError(f"no exit at depth {k}; attached exits: {self.exits}")
        return self.balconies[key]

    def check_exit(self, k, what: str = "exit") -> None:
        """Raises (naming `what`) unless k is an attached exit or num_layers (the full model)."""
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"{what} must be an int, got {k!r}")
        if k != self.num_layers and str(k) not in self.balconies:
            raise ValueError(f"{what} {k} is not attached to the model (exits: {self.exits}; "
                             f"{self.num_layers} is the full model)")

    def balcony_parameters(self):
        return [p for p in self.balconies.parameters()]

    def train(self, mode: bool = True):
        super().train(mode)
        self.base.eval()  # the base stays in inference mode whatever the exits do
        return self

    # ---- exits --------------------------------------------------------------------------------
    def validate_exits(self, exits, allow_full: bool = False) -> list:
        """Checks a list of exit depths: ints in 1..num_layers-1 (and num_layers if allow_full),
        no repeats. Returns them sorted."""
        if isinstance(exits, int) or not hasattr(exits, "__iter__"):
            raise ValueError(f"exits must be a list of layer counts, got {exits!r}")
        exits = list(exits)
        if not exits:
            raise ValueError("exits is empty; give at least one depth")
        top = self.num_layers if allow_full else self.num_layers - 1
        for k in exits:
            if isinstance(k, bool) or not isinstance(k, int):
                raise ValueError(f"exit depth {k!r} is not an int (exits={exits})")
            if not 1 <= k <= top:
                raise ValueError(
                    f"exit depth {k} is out of range: this model has {self.num_layers} layers, "
                    f"exits must be in 1..{top}"
                )
        if len(set(exits)) != len(exits):
            raise ValueError(f"exit depths repeat: {exits}")
        return sorted(exits)

    def build_exit(self, k: int, init: str = "last", norm_init: str = "final") -> BalconyExit:
        """A new exit module for depth k (not attached), on the base's device and dtype."""
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if norm_init not in NORM_INITS:
            raise ValueError(f"norm_init must be one of {NORM_INITS}, got {norm_init!r}")
        a = self.adapter
        # Each exit has its own KV-cache slot past the base's layers, stable whatever other
        # exits exist: base layers use 0..L-1, exit k uses L + k - 1.
        cache_index = a.num_layers + k - 1
        # "last": the base's last decoder layer; "next": base layer k+1 (0-based index k), the layer
        # the exit replaces; "random": the model's own initialiser
        copy_from = {"last": a.num_layers - 1, "next": k, "random": None}[init]
        layer = a.new_layer(cache_index, copy_from=copy_from)
        # "next": the input norm of base layer k+1 (0-based index k), as the paper's code does.
        norm = a.new_norm("final" if norm_init == "final" else k)
        ex = BalconyExit(layer, norm, init, norm_init).to(device=self.device, dtype=self.dtype)
        for p in ex.parameters():
            p.requires_grad_(True)
        ex.train(self.training)
        return ex

    def check_token_ids(self, input_ids) -> None:
        """Raises TypeError for ids that are not integers and ValueError naming the first token id
        (tensor or list) outside the vocabulary."""
        ids = torch.as_tensor(input_ids)
        if ids.dtype == torch.bool or ids.dtype.is_floating_point or ids.dtype.is_complex:
            raise TypeError(f"token ids must be integers (e.g. torch.long), got dtype {ids.dtype}")
        V = self.adapter.vocab_size
        outside = (ids < 0) | (ids >= V)
        if outside.any():
            raise ValueError(f"token id {int(ids[outside][0])} is outside the vocabulary: ids must be in "
                             f"0..{V - 1} (vocabulary size {V})")

    # ---- forward pieces -------------------------------------------------------------------------
    def _embed_context(self, input_ids, attention_mask=None, position_ids=None):
        self.check_token_ids(input_ids)
        hidden = self.adapter.embed_tokens(input_ids)
        ctx = self.adapter.context(hidden, attention_mask=attention_mask, position_ids=position_ids)
        return hidden, ctx

    def exit_hidden(self, k: int, hidden_k: torch.Tensor, attention_mask=None, position_ids=None, ctx=None,
                    module: BalconyExit | None = None):
        """Balcony layer k + exit norm k applied to the hidden state after k base layers, with
        autograd through the exit's parameters. Returns the exit-normed hidden state [B,T,H].
        module: run this (unattached) exit module instead of the attached one, e.g. a baseline."""
        ex = module if module is not None else self.exit_module(k)
        if ctx is None:
            ctx = self.adapter.context(hidden_k, attention_mask=attention_mask, position_ids=position_ids)
        a = self.adapter
        h = a.run_layer(ex.layer, hidden_k, ctx, a.layer_type(a.num_layers - 1))
        return ex.norm(h)

    @torch.no_grad()
    def frozen_forward(self, input_ids, depths, attention_mask=None, position_ids=None, full=True):
        """One pass of the frozen base, no grad. Returns ({k: hidden after k layers} for k in
        depths, final hidden after the final norm (None if full=False, in which case layers past
        max(depths) are not run))."""
        depths = sorted(set(int(d) for d in depths))
        for d in depths:
            if not 0 <= d <= self.num_layers:
                raise ValueError(f"depth {d} out of range 0..{self.num_layers}")
        hidden, ctx = self._embed_context(input_ids, attention_mask, position_ids)
        stop = self.num_layers if full else (max(depths) if depths else 0)
        out = {}
        if 0 in depths:
            out[0] = hidden
        for i in range(stop):
            hidden = self.adapter.run_base_layer(i, hidden, ctx)
            if i + 1 in depths:
                out[i + 1] = hidden
        final = self.adapter.final_norm(hidden) if full else None
        return out, final

    def truncated_logits(self, hidden_k: torch.Tensor) -> torch.Tensor:
        """The truncation baseline: the hidden state at depth k straight into the final norm and head."""
        return self.adapter.logits(self.adapter.final_norm(hidden_k))

    def forward(self, input_ids, exits=None, attention_mask=None, position_ids=None) -> dict:
        """Logits at the requested exits: {k: [B,T,V]}. k == num_layers is the full model.
        Default: every attached exit plus the full model. Layers past max(exits) never run."""
        if exits is None:
            exits = self.exits + [self.num_layers]
        if isinstance(exits, int):
            exits = [exits]
        exits = self.validate_exits(exits, allow_full=True)
        for k in exits:
            if k != self.num_layers:
                self.exit_module(k)  # raises for an exit that is not attached
        a = self.adapter
        hidden, ctx = self._embed_context(input_ids, attention_mask, position_ids)
        wanted = set(exits)
        out = {}
        for i in range(max(exits)):
            hidden = a.run_base_layer(i, hidden, ctx)
            k = i + 1
            if k in wanted:
                if k == self.num_layers:
                    out[k] = a.logits(a.final_norm(hidden))
                else:
                    out[k] = a.logits(self.exit_hidden(k, hidden, ctx=ctx))
        return out

    def extra_repr(self) -> str:
        return f"name={self.name!r}, num_layers={self.num_layers}, exits={self.exits}"


def attach(model: BalconyModel, exits, init: str = "last", norm_init: str = "final", seed: int | None = None,
           replace: bool = False) -> BalconyModel:
    """Adds trainable exits at the given depths (layer counts, 1..num_layers-1).

    init: "last" copies the base's last decoder layer; "next" copies base layer k+1 (the first layer the
    exit skips); "random" uses the model's own initialiser
    (seeded by `seed` when given). norm_init: "final" copies the final norm (the LM head was
    trained behind it); "next" copies the input norm of layer k+1 (the paper's code).
    An exit that already exists raises unless replace=True. Returns the model.
    """
    if not isinstance(model, BalconyModel):
        raise TypeError(f"attach() needs a BalconyModel, got {type(model).__name__}")
    exits = model.validate_exits(exits)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed must be an int or None, got {seed!r}")
    check_flag("replace", replace)
    existing = [k for k in exits if str(k) in model.balconies]
    if existing and not replace:
        raise ValueError(f"exits {existing} are already attached; pass replace=True to re-initialise them")
    built = {}
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for k in exits:
                built[k] = model.build_exit(k, init, norm_init)
    else:
        for k in exits:
            built[k] = model.build_exit(k, init, norm_init)
    for k in exits:
        model.balconies[str(k)] = built[k]
    # keep the ModuleDict in depth order
    ordered = sorted(model.balconies.items(), key=lambda kv: int(kv[0]))
    model.balconies = nn.ModuleDict(ordered)
    return model


def detach(model: BalconyModel, exits) -> BalconyModel:
    """Removes the exits at the given depths (e.g. to evaluate or train one exit alone); the others and
    the base stay as they are. An exit that is not attached raises; an empty list removes nothing.
    Returns the model."""
    if not isinstance(model, BalconyModel):
        raise TypeError(f"detach() needs a BalconyModel, got {type(model).__name__}")
    if isinstance(exits, (list, tuple)) and not exits:
        return model
    exits = model.validate_exits(exits)
    missing = [k for k in exits if str(k) not in model.balconies]
    if missing:
        raise ValueError(f"exits {missing} are not attached (the model's exits: {model.exits})")
    for k in exits:
        del model.balconies[str(k)]
    return model
