"""Self-distillation of the exits: the frozen full model is the teacher, every exit a student.

    stats = bx.train(model, data="shakespeare", tokens=500_000, checkpoint_dir="run1")

Per micro-batch: one frozen forward without grad gives the hidden state at every exit depth and
the teacher's final hidden state; each balcony layer then runs with autograd, and the loss is the
forward KL(p_full || p_exit) (temperature 1, teacher detached) averaged over the exits. The exits
back-propagate one after another, so only one exit's logits are alive at a time.
AdamW, linear warm-up then cosine decay to zero, gradient clipping per exit, gradient accumulation,
optional bf16 autocast. With checkpoint_dir, the whole training state (exits, optimiser,
schedule, data position, RNG states) is written atomically every `checkpoint_every` steps and a
later call with resume=True continues exactly where the last checkpoint left off.
"""

from __future__ import annotations

import functools
import math
import numbers
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import ops
from .checks import check_flag, check_path
from .data import check_heldout, prepare
from .exits_io import save_exits
from .files import atomic_write

STATE_FILE = "train_state.pt"
# data="self" samples at most this many tokens (then trains on them for several epochs); sampling
# is slow on a CPU, so sample once with data.prepare("self", ...) and pass the Corpus to reuse it.
SELF_SAMPLE_MAX = 200_000
EXITS_FILE = "exits.safetensors"
SHARED_LOGITS_MAX = 1 << 28  # teacher logits shared by the exits in a bf16 step: at most 512 MB


def reference_distill_loss(student_hidden, weight, teacher, teacher_is_logits=False, softcap=None):
    """Plain PyTorch: mean over tokens of KL(softmax(teacher logits) || softmax(student @ W^T)),
    in float32 with the full logits. teacher: hidden states [.., H] (projected by `weight`) or,
    with teacher_is_logits, logits [.., V] (already capped). softcap: logits -> cap * tanh(logits / cap)
    after the head, for families that cap their logits (Gemma 2 and 3)."""
    def head(h):
        z = F.linear(h, weight).float()
        return z if softcap is None else torch.tanh(z / softcap) * softcap

    s = student_hidden.reshape(-1, student_hidden.shape[-1])
    log_q = F.log_softmax(head(s), dim=-1)
    with torch.no_grad():
        t = teacher.reshape(-1, teacher.shape[-1])
        log_p = F.log_softmax(t.float() if teacher_is_logits else head(t), dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="sum") / s.shape[0]


def distill_loss(student_hidden, weight, teacher, teacher_is_logits=False):
    """Forward KL(p_teacher || p_student) through the shared LM head `weight` [V, H], averaged over
    tokens; gradient only to the student. teacher: the teacher's final (normed) hidden states, or
    its logits with teacher_is_logits=True (cheaper when several exits share one teacher).
    Uses the fused native op: the student logits never exist in full."""
    # the op takes one dtype: under autocast the hidden states may be bf16, the head fp32
    s = student_hidden.reshape(-1, student_hidden.shape[-1]).to(weight.dtype)
    t = teacher.reshape(-1, teacher.shape[-1]).detach().to(weight.dtype)
    return ops.fused_linear_kl(s, weight, t, teacher_is_logits=teacher_is_logits, reduction="mean")


def _capped(model, logits):
    """Logits soft-capped where the family caps them (Gemma 2 and 3), as adapter.logits does."""
    cap = model.adapter.logit_softcap
    return logits if cap is None else torch.tanh(logits.float() / cap) * cap


def distill_loss_for(model, loss_impl: str = "fused"):
    """The distillation loss for the model's head: the fused op, or plain PyTorch where asked or where
    the family soft-caps its logits (the fused op computes plain logits)."""
    cap = model.adapter.logit_softcap
    if cap is not None:
        return functools.partial(reference_distill_loss, softcap=cap)
    return distill_loss if loss_impl == "fused" else reference_distill_loss


def _distributed() -> tuple:
    """(world size, rank) of the torch.distributed process group, (1, 0) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def _average_across_processes(params, per_exit: dict, world: int) -> dict:
    """Data parallelism: every process holds the gradient of the mean loss over its own rows;
    the mean over processes is the gradient of the mean over the global batch (equal row counts)."""
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads] + [torch.tensor(list(per_exit.values()), dtype=grads[0].dtype,
                                                                    device=grads[0].device)])
    torch.distributed.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
    return {k: float(v) for k, v in zip(per_exit, flat[offset:].tolist())}


def lr_factor(step: int, total: int, warmup_steps: int) -> float:
    """Linear warm-up over warmup_steps, then cosine decay to zero at `total`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def micro_batch(blocks: torch.Tensor, index: int, batch_size: int, seed: int) -> torch.Tensor:
    """The index-th micro-batch of the training stream: blocks shuffled per epoch by (seed, epoch),
    so the data position is just a counter."""
    per_epoch = blocks.shape[0] // batch_size
    epoch, pos = divmod(index, per_epoch)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(blocks.shape[0], generator=gen)
    return blocks[perm[pos * batch_size:(pos + 1) * batch_size]]


def _rng_state():
    state = dict(torch=torch.get_rng_state(), python=random.getstate())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_train_args(model, lr, batch_size, seq_len, grad_accum, warmup, clip, weight_decay, checkpoint_every,
                     seed, bf16, callback) -> None:
    """Raises ValueError naming the first training argument out of its range (before any data is prepared)."""
    real = lambda x: isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)  # noqa: E731
    count = lambda x: isinstance(x, numbers.Integral) and not isinstance(x, bool) and x >= 1  # noqa: E731
    for name, v in (("batch_size", batch_size), ("seq_len", seq_len), ("grad_accum", grad_accum),
                    ("checkpoint_every", checkpoint_every)):
        if not count(v):
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and seq_len > positions:
        raise ValueError(f"seq_len={seq_len} is past the model's {positions} positions (max_position_embeddings)")
    if not (real(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if not (real(warmup) and 0 <= warmup <= 1):
        raise ValueError(f"warmup (the fraction of the steps that warm up) must be in [0, 1], got {warmup!r}")
    if clip is not None and not (real(clip) and clip >= 0):
        raise ValueError(f"clip must be a finite number >= 0 (0 or None: no clipping), got {clip!r}")
    if not (real(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
    if bf16 not in (None, True, False):
        raise ValueError(f"bf16 must be True, False or None (on with CUDA), got {bf16!r}")
    if callback is not None and not callable(callback):
        raise ValueError(f"callback must be a function (step, info) or None, got {callback!r}")


def _vocab_rows(model, vocab):
    """The head rows of train(vocab=...): the first `vocab` ids of the model's shortlist, or None."""
    if vocab is None:
        return None
    listed = getattr(model, "shortlist", None)
    if listed is None:
        raise ValueError(f"vocab={vocab!r}: the model has no vocabulary shortlist (bx.set_shortlist / "
                         "bx.load(shortlist=...)) to take its first tokens from")
    if isinstance(vocab, bool) or not isinstance(vocab, int) or not 1 <= vocab <= listed.numel():
        raise ValueError(f"vocab must be None (the whole vocabulary) or an int in 1..{listed.numel()} (the "
                         f"shortlist's length), got {vocab!r}")
    return listed[:vocab].to(model.device)


def train(model, data="self", tokens: int = 1_000_000, lr: float = 5e-4, batch_size: int = 4, seq_len: int = 512,
          grad_accum: int = 1, warmup: float = 0.01, clip: float = 1.0, bf16: bool | None = None,
          weight_decay: float = 0.0, checkpoint_dir=None, checkpoint_every: int = 100, resume: bool = True,
          seed: int = 0, heldout: float = 0.05, progress: bool = True, callback=None,
          affine_baseline: bool = False, loss_impl: str = "fused", vocab: int | None = None) -> dict:
    """Trains the model's exits by self-distillation on `tokens` training tokens.

    data: a Corpus, "self" (text sampled from the model), "shakespeare", or text files/directories.
    bf16: autocast to bfloat16 (default: on with CUDA, off on CPU). callback(step, info) runs after
    every optimiser step (an exception it raises stops training, as an interruption would).
    loss_impl: "fused" (the native fused_linear_kl: the student logits never exist in full) or
    "reference" (plain PyTorch on the full logits; the same loss, for comparison and debugging).
    vocab: the KL over the first `vocab` tokens of the model's shortlist only (shortlist.py; teacher and
    exits renormalised there): the head's work per step in proportion, for the head a budget buys
    anyway (None: the whole vocabulary).
    affine_baseline: also train the learned affine exit (the tuned lens, affine.AffineExit) at
    every exit depth on the very same batches with the same loss and schedule, sharing the frozen
    forward; it is checkpointed with the exits and returned as "affine" for evaluate(affine=...).
    Data parallel: under torchrun (a torch.distributed process group, e.g. NCCL on GPUs or gloo on
    CPUs) every process trains on its share of the global batch_size and gradients are averaged, so
    the result matches one process with the same global batch; only rank 0 writes checkpoints.
    Returns {"history": [...], "steps", "tokens", "seconds", "tokens_per_s", "exits", "corpus" (a
    description), "data" (the Corpus, to pass on to evaluate()), "affine" ({depth: AffineExit} or None)}.
    """
    from tqdm.auto import tqdm

    if not model.exits:
        raise ValueError("the model has no exits to train; call attach(model, exits=[...]) first")
    if loss_impl not in ("fused", "reference"):
        raise ValueError(f"loss_impl must be 'fused' or 'reference', got {loss_impl!r}")
    if isinstance(tokens, bool) or not isinstance(tokens, numbers.Real) or not (0 < tokens < math.inf):
        raise ValueError(f"tokens (the number of training tokens) must be positive, got {tokens!r}")
    check_train_args(model, lr=lr, batch_size=batch_size, seq_len=seq_len, grad_accum=grad_accum, warmup=warmup,
                     clip=clip, weight_decay=weight_decay, checkpoint_every=checkpoint_every, seed=seed, bf16=bf16,
                     callback=callback)
    for name, flag in (("resume", resume), ("progress", progress), ("affine_baseline", affine_baseline)):
        check_flag(name, flag)
    check_path("checkpoint_dir", checkpoint_dir, none="no checkpoints")
    check_heldout(data, heldout)
    rows = _vocab_rows(model, vocab)
    loss_fn = distill_loss_for(model, loss_impl)
    exits = model.exits
    device = model.device
    if bf16 is None:
        bf16 = device.type == "cuda"
    corpus = prepare(data, model.tokenizer, heldout=heldout, seed=seed, model=model,
                     tokens=min(tokens, SELF_SAMPLE_MAX) if isinstance(data, str) and data == "self" else None)
    blocks = corpus.train_blocks(seq_len)
    masks = corpus.train_mask_blocks(seq_len)
    if masks.all():
        masks = None  # plain text: the loss at every position, no selection
    if blocks.shape[0] < batch_size:
        raise ValueError(f"the training text has {blocks.shape[0]} blocks of {seq_len} tokens, fewer than "
                         f"batch_size={batch_size}; use more text or a shorter seq_len")
    world, rank = _distributed()
    if batch_size % world:
        raise ValueError(f"batch_size={batch_size} is the global batch and must be divisible by the "
                         f"{world} data-parallel processes")
    local_rows = slice(rank * (batch_size // world), (rank + 1) * (batch_size // world))
    progress = progress and rank == 0
    tokens_per_step = batch_size * seq_len * grad_accum
    total_steps = max(1, math.ceil(tokens / tokens_per_step))
    warmup_steps = max(1, math.ceil(warmup * total_steps))
    # what a resumed run must share with the run that wrote the checkpoint (a setting added later is
    # None in older checkpoints: None keeps them resumable)
    settings = dict(exits=exits, tokens=tokens, lr=lr, batch_size=batch_size, seq_len=seq_len, grad_accum=grad_accum,
                    warmup=warmup, clip=clip, weight_decay=weight_decay, seed=seed, total_steps=total_steps,
                    vocab=vocab)

    params = model.balcony_parameters()
    lenses = None
    if affine_baseline:
        from .affine import new_affine_exits

        lenses = new_affine_exits(model, exits)
        settings["affine_baseline"] = True
        params = params + [p for lens in lenses.values() for p in lens.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total_steps, warmup_steps))
    step, history = 0, []
    torch.manual_seed(seed)

    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt_dir is not None and resume and (ckpt_dir / STATE_FILE).exists():
        state = torch.load(ckpt_dir / STATE_FILE, map_location="cpu", weights_only=False)
        diff = {k: (state["settings"].get(k), v) for k, v in settings.items() if state["settings"].get(k) != v}
        if diff:
            raise ValueError(f"cannot resume from {ckpt_dir}: the settings differ (checkpoint, now): {diff}; "
                             "pass resume=False or another checkpoint_dir to start over")
        model.balconies.load_state_dict(state["exits"])
        if lenses is not None:
            for k, lens in lenses.items():
                lens.load_state_dict(state["affine"][str(k)])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, history = state["step"], state["history"]
        model.tokens_trained = state["tokens_trained"]
        _set_rng_state(state["rng"])
        if progress:
            print(f"balcony_ext: resuming from {ckpt_dir} at step {step}/{total_steps}")

    def save_checkpoint():
        state = dict(settings=settings, exits=model.balconies.state_dict(), optimizer=opt.state_dict(),
                     scheduler=sched.state_dict(), step=step, data_position=step * grad_accum,
                     history=history, tokens_trained=model.tokens_trained, rng=_rng_state())
        if lenses is not None:
            state["affine"] = {str(k): lens.state_dict() for k, lens in lenses.items()}
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(ckpt_dir / STATE_FILE, lambda tmp: torch.save(state, tmp))
        save_exits(model, ckpt_dir / EXITS_FILE)

    weight = model.adapter.lm_head.weight
    # Under bf16 autocast the loss runs in bf16 too (fp32 accumulation inside the op): the student
    # and the teacher's final hidden state go through a bf16 copy of the frozen head, which
    # measured 1.5x faster per exit than fp32 with shared fp32 teacher logits; the teacher's bf16
    # logits are shared by the exits as well (one head GEMM for the teacher a step, not one an exit).
    head = weight.to(torch.bfloat16) if bf16 else weight
    if rows is not None:
        head = head[rows]
    was_training = model.training
    model.train()
    bar = tqdm(total=total_steps, initial=step, desc="training exits", unit="step", disable=not progress)
    t0, tokens_this_run = time.time(), 0
    try:
        while step < total_steps:
            per_exit = {k: 0.0 for k in exits}
            t_step = time.time()
            for micro in range(grad_accum):
                # every process draws the same global micro-batch and trains on its own rows of it
                index = step * grad_accum + micro
                ids = micro_batch(blocks, index, batch_size, seed)[local_rows].to(device)
                # the positions that carry the loss (e.g. a chat answer): students and teacher are
                # reduced to those rows before the LM head
                keep = micro_batch(masks, index, batch_size, seed)[local_rows].to(device) if masks is not None else None
                if keep is not None and not keep.any():
                    keep = None  # a block without a single learned position: learn on all of it
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    hidden, teacher = model.frozen_forward(ids, exits)
                    if keep is not None:
                        teacher = teacher[keep]
                    # The teacher's logits are computed once and shared by the exits (and lenses); in
                    # bf16 through the bf16 head, as the fused op would compute them per exit. Past
                    # SHARED_LOGITS_MAX elements each exit's loss computes them chunk by chunk instead.
                    with torch.no_grad():
                        if not bf16:
                            target, is_logits = model.adapter.logits(teacher, rows).float(), True
                        elif teacher.shape[0] * head.shape[0] <= SHARED_LOGITS_MAX:
                            target, is_logits = _capped(model, F.linear(teacher.to(torch.bfloat16), head)), True
                        else:
                            target, is_logits = teacher.to(torch.bfloat16), False
                    for k in exits:
                        student = model.exit_hidden(k, hidden[k])
                        loss = loss_fn(student if keep is None else student[keep], head, target,
                                       teacher_is_logits=is_logits)
                        (loss / (len(exits) * grad_accum)).backward()
                        per_exit[k] += loss.item() / grad_accum
                        if lenses is not None:
                            lens = lenses[k](hidden[k] if keep is None else hidden[k][keep])
                            loss = loss_fn(lens, head, target, teacher_is_logits=is_logits)
                            (loss / (len(exits) * grad_accum)).backward()
                            per_exit[f"affine@{k}"] = per_exit.get(f"affine@{k}", 0.0) + loss.item() / grad_accum
            if world > 1:
                per_exit = _average_across_processes(params, per_exit, world)
            # Every exit (and every affine lens) is clipped on its own: an exit's updates do not
            # depend on which other exits train beside it. grad_norm reports the largest.
            grad_norm = None
            if clip:
                groups = [model.exit_module(k).parameters() for k in exits]
                groups += [lens.parameters() for lens in lenses.values()] if lenses is not None else []
                grad_norm = max(torch.nn.utils.clip_grad_norm_(list(g), clip) for g in groups)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            tokens_this_run += tokens_per_step
            model.tokens_trained += tokens_per_step
            mean_loss = sum(per_exit[k] for k in exits) / len(exits)
            model.last_loss = mean_loss
            tps = tokens_this_run / max(1e-9, time.time() - t0)
            info = dict(step=step, loss=mean_loss, loss_per_exit=dict(per_exit), lr=sched.get_last_lr()[0],
                        grad_norm=float(grad_norm) if grad_norm is not None else None,
                        tokens=model.tokens_trained, tokens_per_s=tps, step_s=time.time() - t_step)
            history.append(info)
            bar.set_postfix({**{f"kl@{k}": f"{per_exit[k]:.3f}" for k in exits}, "tok/s": f"{tps:.0f}"})
            bar.update(1)
            if ckpt_dir is not None and (step % checkpoint_every == 0 or step == total_steps):
                if rank == 0:
                    save_checkpoint()
                if world > 1:
                    torch.distributed.barrier()
            if callback is not None:
                callback(step, info)
    finally:
        bar.close()
        model.train(was_training)
        if lenses is not None:
            for lens in lenses.values():
                lens.eval()
    seconds = time.time() - t0
    return dict(history=history, steps=step, tokens=model.tokens_trained, seconds=seconds,
                tokens_per_s=tokens_this_run / max(1e-9, seconds), exits=exits, corpus=corpus.describe(),
                data=corpus, affine=lenses)
