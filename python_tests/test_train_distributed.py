"""Data-parallel training: two CPU processes on gloo give the weights of one process with the
same global batch (torchrun does the same with more processes or GPUs)."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from balcony_ext.model import attach
from balcony_ext.train import train
from test_train import _corpus
from tiny_models import tiny_balcony

SETTINGS = dict(tokens=4 * 16 * 6, lr=3e-3, batch_size=4, seq_len=16, progress=False, seed=3)


def _trained(checkpoint_dir=None):
    model = tiny_balcony(seed=1)
    attach(model, [1, 3], init="random", seed=5)
    run = train(model, data=_corpus(), checkpoint_dir=checkpoint_dir, checkpoint_every=3, **SETTINGS)
    return model, run


def _worker(rank, world, store_path, out_path, ckpt_dir):
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        model, run = _trained(ckpt_dir)
        state = {k: v.clone() for k, v in model.balconies.state_dict().items()}
        if rank == 0:
            torch.save(dict(state=state, losses=[h["loss"] for h in run["history"]]), out_path)
        else:
            torch.save(dict(state=state), out_path + ".rank1")
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_match_one(tmp_path):
    torch.set_num_threads(1)
    single, run = _trained()
    out = str(tmp_path / "ddp.pt")
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), out, str(tmp_path / "ckpt")), nprocs=2, join=True)
    ddp = torch.load(out)
    rank1 = torch.load(out + ".rank1")
    want = single.balconies.state_dict()
    for name, value in want.items():
        # both processes hold identical weights, equal to the single-process run up to float32 sum order
        torch.testing.assert_close(ddp["state"][name], rank1["state"][name], atol=0, rtol=0)
        torch.testing.assert_close(ddp["state"][name], value, atol=2e-5, rtol=2e-4)
    torch.testing.assert_close(torch.tensor(ddp["losses"]), torch.tensor([h["loss"] for h in run["history"]]),
                               atol=1e-5, rtol=1e-5)
    assert (tmp_path / "ckpt").exists(), "rank 0 writes the checkpoints"
    fresh = tiny_balcony(seed=1)
    attach(fresh, [1, 3], init="random", seed=5)
    moved = max((ddp["state"][n] - v).abs().max().item() for n, v in fresh.balconies.state_dict().items())
    assert moved > 1e-3, "training changed the exits"
