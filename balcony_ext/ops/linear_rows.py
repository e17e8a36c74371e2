"""Small-batch linear map for decode steps (torch.ops.balcony.linear_rows), and its int8 weight format.

Weights are float32, bfloat16, or Q8 blocks: `quantize_q8(w)` turns a float [N, K] matrix (K a
multiple of 32) into uint8 [N, K + K/16], each row its K int8 values followed by one float16 scale per
block of 32 columns (w ~ int8 * scale, scale = max |w| of the block / 127): 8.5 bits per weight.
"""

import torch

from .. import _native

Q8_BLOCK = 32


def quantize_q8(weight: torch.Tensor) -> torch.Tensor:
    """float [N, K] -> Q8 blocks, uint8 [N, K + K/16] (round to nearest; the scale rounded to float16
    first, so the stored int8 values are those of the stored scale)."""
    if weight.dim() != 2 or weight.shape[1] % Q8_BLOCK:
        raise ValueError(f"quantize_q8: need a 2-D weight with a multiple of {Q8_BLOCK} columns, got "
                         f"{tuple(weight.shape)}")
    N, K = weight.shape
    blocks = weight.detach().float().reshape(N, K // Q8_BLOCK, Q8_BLOCK)
    scale = (blocks.abs().amax(-1) / 127.0).half()
    s = scale.float().unsqueeze(-1)
    q = torch.where(s > 0, blocks / torch.where(s > 0, s, 1.0), 0.0).round().clamp(-127, 127).to(torch.int8)
    out = torch.empty(N, K + K // Q8_BLOCK * 2, dtype=torch.uint8, device=weight.device)
    out[:, :K] = q.reshape(N, K).view(torch.uint8)
    out[:, K:] = scale.contiguous().view(torch.uint8).reshape(N, K // Q8_BLOCK * 2)
    return out


def q8_columns(packed: torch.Tensor) -> int:
    """K of a Q8 weight (uint8 [N, K + K/16])."""
    per_block = Q8_BLOCK + 2
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] % per_block:
        raise ValueError(f"not a Q8 weight: {packed.dtype} {tuple(packed.shape)}")
    return packed.shape[1] // per_block * Q8_BLOCK


def dequantize_q8(packed: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Q8 blocks -> the float [N, K] matrix they stand for (int8 * scale, computed in float32)."""
    K = q8_columns(packed)
    N = packed.shape[0]
    q = packed[:, :K].contiguous().view(torch.int8).float().reshape(N, K // Q8_BLOCK, Q8_BLOCK)
    scale = packed[:, K:].contiguous().view(torch.float16).float().unsqueeze(-1)
    return (q * scale).reshape(N, K).to(dtype)


def weight_matrix(weight: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """The float matrix a linear_rows weight stands for (float32, bfloat16 or Q8 blocks)."""
    return dequantize_q8(weight, dtype) if weight.dtype == torch.uint8 else weight.to(dtype)


def round_rows_i16(x: torch.Tensor) -> torch.Tensor:
    """x [M,K] float32 as the Q8 path reads it: each row rounded to int16 steps of max|row| / 32767
    (to nearest, ties to even), returned as the float32 values those integers stand for."""
    x = x.float()
    amax = x.abs().amax(dim=1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(32767.0) / amax, torch.zeros_like(amax))
    return torch.round(x * inv) * (amax / 32767.0)


def reference_linear_rows(x, weight, bias=None):
    """The specification: x [M,K] float32 @ weight[N,K]^T (widened to float32; Q8 blocks dequantised
    and x rounded to int16 per row, `round_rows_i16`) + bias, float32 [M,N]."""
    if weight.dtype == torch.uint8:
        out = (round_rows_i16(x).double() @ weight_matrix(weight).double().T).float()
        return out + bias.float() if bias is not None else out
    out = x.float() @ weight_matrix(weight).T
    return out + bias.float() if bias is not None else out


def linear_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, out: torch.Tensor | None = None,
                accumulate: bool = False) -> torch.Tensor:
    """x [M,K] float32 times weight [N,K] (float32, bfloat16 or Q8 blocks, read once) transposed, plus
    bias [N] float32: float32 [M,N]. With Q8 blocks each row of x is first rounded to int16 (one scale
    per row; see round_rows_i16) and every block's dot product is exact integer arithmetic. With `out`, writes (accumulate=False) or adds (True) into it.
    Meant for the few rows of a decode step, where the weight read is the whole cost."""
    if out is None:
        out = x.new_empty((x.shape[0], weight.shape[0]), dtype=torch.float32)
        accumulate = False
    torch.ops.balcony.linear_rows(x, weight, bias, out, accumulate)
    return out


if _native.available():

    @torch.library.register_fake("balcony::linear_rows")
    def _(x, weight, bias, out, accumulate):
        torch._check(x.dim() == 2 and weight.dim() == 2, lambda: "linear_rows: x and weight must be 2-D")
        K = q8_columns(weight) if weight.dtype == torch.uint8 else weight.shape[1]
        torch._check(x.shape[1] == K, lambda: "linear_rows: x and weight disagree on K")
        return None
