"""The early-exit KV cache: what every sequence has computed, and which rows are in use.

Static storage, allocated once: float32 keys and values [B, Hkv, S, D] for every layer slot (the L
base layers, then one slot per exit), the hidden state after each exit depth for every token
(`kept`, what a later move to a deeper exit catches up from), the tokens of each row and, per slot
and row, how many leading positions hold valid entries (`kv_len`). A token decoded at exit k writes
slots 0..k-1 and exit k's slot; the others fall behind until a catch-up fills them.

Rows are handed out and taken back with alloc()/free() (continuous batching); `row(b)` is a view of
one row, sharing its storage, for work on that sequence alone (a prefill).
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, w, batch: int, max_len: int, device):
        self.L, self.exits = w.L, list(w.exits)
        self.B, self.S = batch, max_len
        slots = self.L + len(self.exits)
        f32 = dict(dtype=torch.float32, device=device)
        self.k = [torch.zeros(batch, w.Hkv, max_len, w.D, **f32) for _ in range(slots)]
        self.v = [torch.zeros(batch, w.Hkv, max_len, w.D, **f32) for _ in range(slots)]
        self.kept = [torch.zeros(batch, max_len, w.H, **f32) for _ in self.exits]
        self.kv_len = torch.zeros(slots, batch, dtype=torch.long)  # valid entries per slot and row
        self.tokens = torch.zeros(batch, max_len, dtype=torch.long)
        self.length = torch.zeros(batch, dtype=torch.long)  # tokens in each sequence
        self.in_use = [False] * batch
        self._masks = {}

    def rows(self, begin: int, end: int) -> "KVCache":
        """A cache viewing rows begin..end-1 of this one's storage (writes go to this cache)."""
        view = KVCache.__new__(KVCache)
        view.L, view.exits, view.B, view.S = self.L, self.exits, end - begin, self.S
        view.k = [t[begin:end] for t in self.k]
        view.v = [t[begin:end] for t in self.v]
        view.kept = [t[begin:end] for t in self.kept]
        view.kv_len, view.tokens, view.length = self.kv_len[:, begin:end], self.tokens[begin:end], self.length[begin:end]
        view.in_use, view._masks = self.in_use[begin:end], {}
        return view

    def row(self, b: int) -> "KVCache":
        """A one-row cache viewing row b's storage."""
        return self.rows(b, b + 1)

    # -- rows
    def alloc(self) -> int:
        """A free row, now in use (its counts are zero)."""
        for b, used in enumerate(self.in_use):
            if not used:
                self.in_use[b] = True
                return b
        raise RuntimeError(f"the cache has no free row (all {self.B} in use)")

    def free(self, b: int):
        """Row b's entries are dropped (nothing is cleared: counts go to zero) and the row is free."""
        self.kv_len[:, b] = 0
        self.length[b] = 0
        self.in_use[b] = False

    def move(self, src: int, dst: int):
        """Moves the sequence in row src (its valid entries) to the free row dst; src becomes free."""
        if self.in_use[dst] or not self.in_use[src]:
            raise RuntimeError(f"cannot move row {src} to row {dst}: the source must be in use and the target free")
        n = int(self.length[src])
        for t in self.k + self.v:
            t[dst, :, :n] = t[src, :, :n]
        for t in self.kept:
            t[dst, :n] = t[src, :n]
        self.tokens[dst, :n] = self.tokens[src, :n]
        self.kv_len[:, dst] = self.kv_len[:, src]
        self.length[dst] = n
        self.in_use[dst] = True
        self.free(src)

    @property
    def rows_in_use(self) -> int:
        return sum(self.in_use)

    def set_tokens(self, b: int, ids):
        n = len(ids)
        if n == 0:
            raise ValueError(f"prompt {b} is empty")
        if n > self.S:
            raise ValueError(f"prompt {b} has {n} tokens, past the cache of {self.S}")
        self.tokens[b, :n] = torch.as_tensor(ids, dtype=torch.long)
        self.length[b] = n
        self.kv_len[:, b] = 0
        self.in_use[b] = True

    def append(self, b: int, token: int):
        n = int(self.length[b])
        if n >= self.S:
            raise ValueError(f"sequence {b} is full: {self.S} tokens, the size of the cache")
        self.tokens[b, n] = token
        self.length[b] = n + 1

    # -- slots
    def exit_slot(self, k: int) -> int | None:
        return None if k == self.L else self.L + self.exits.index(k)

    def slots_for(self, k: int) -> list:
        """Slots a token decoded at exit k reads and writes (k == 0: an idle row, none)."""
        if k == 0:
            return []
        return list(range(k)) + ([self.exit_slot(k)] if k != self.L else [])

    def slot_mask(self, exits: list) -> torch.Tensor:
        """bool [slots, B]: the slots each row reads at its exit (cached per exit tuple)."""
        key = tuple(exits)
        m = self._masks.get(key)
        if m is None:
            m = torch.zeros(self.kv_len.shape, dtype=torch.bool)
            for b, k in enumerate(exits):
                m[self.slots_for(k), b] = True
            self._masks[key] = m
        return m

    def complete(self, exits: list, upto: torch.Tensor) -> bool:
        """Whether every slot each row reads at its exit holds its first upto[b] positions."""
        return not bool(((self.kv_len < upto) & self.slot_mask(exits)).any())
