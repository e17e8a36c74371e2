"""Small-batch linear map for decode steps (torch.ops.balcony.linear_rows), and its block weight formats.

Weights are float32, bfloat16, Q8, Q4 or Q4_1 blocks (K a multiple of 32, one float16 scale per block of
32 columns; see csrc/include/balcony/dtypes.h):
- `quantize_q8(w)`: uint8 [N, K + K/16], each row its K int8 values then the scales
  (w ~ int8 * scale, scale = max |w| of the block / 127): 8.5 bits per weight;
- `quantize_q4(w)`: int8 storage [N, K/2 + K/16], each row its 4-bit values, two per byte (in a block,
  byte i: column i in the low nibble, column 16 + i in the high one), then the scales
  (w ~ (v - 8) * scale, v in 0..15, scale = the block's signed value of largest magnitude / -8):
  4.5 bits per weight;
- `quantize_q4_1(w)`: int16 storage [N, (K/2 + K/8) / 2], each row its 4-bit values as Q4's, then the
  scales, then the minimums (w ~ v * scale + min, v in 0..15, min = the block's least value, scale =
  (largest - least) / 15): 5 bits per weight, llama.cpp's Q4_1. It holds any matrix whose every block
  of 32 lies on such a grid exactly (e.g. weights dequantised from a Q4_1 GGUF file).
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


def _block_columns(packed: torch.Tensor, dtype: torch.dtype, block_bytes: int, name: str) -> int:
    """K of a block-format weight whose rows hold block_bytes bytes per block of 32 columns."""
    if packed.dtype != dtype or packed.dim() != 2 or packed.shape[1] % block_bytes:
        raise ValueError(f"not a {name} weight: {packed.dtype} {tuple(packed.shape)}")
    return packed.shape[1] // block_bytes * Q8_BLOCK


def q8_columns(packed: torch.Tensor) -> int:
    """K of a Q8 weight (uint8 [N, K + K/16])."""
    return _block_columns(packed, torch.uint8, Q8_BLOCK + 2, "Q8")


def dequantize_q8(packed: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Q8 blocks -> the float [N, K] matrix they stand for (int8 * scale, computed in float32)."""
    K = q8_columns(packed)
    N = packed.shape[0]
    q = packed[:, :K].contiguous().view(torch.int8).float().reshape(N, K // Q8_BLOCK, Q8_BLOCK)
    scale = packed[:, K:].contiguous().view(torch.float16).float().unsqueeze(-1)
    return (q * scale).reshape(N, K).to(dtype)


def quantize_q4(weight: torch.Tensor) -> torch.Tensor:
    """float [N, K] -> Q4 blocks, int8 storage [N, K/2 + K/16] (round to nearest; as llama.cpp's Q4_0: the
    block's value of largest magnitude maps to -8 exactly, the scale rounded to float16 first)."""
    if weight.dim() != 2 or weight.shape[1] % Q8_BLOCK:
        raise ValueError(f"quantize_q4: need a 2-D weight with a multiple of {Q8_BLOCK} columns, got "
                         f"{tuple(weight.shape)}")
    N, K = weight.shape
    blocks = weight.detach().float().reshape(N, K // Q8_BLOCK, Q8_BLOCK)
    idx = blocks.abs().argmax(-1, keepdim=True)
    scale = (blocks.gather(-1, idx).squeeze(-1) / -8.0 + 0.0).half()  # (+ 0.0: an all-zero block stores +0)
    s = scale.float().unsqueeze(-1)
    v = (torch.where(s != 0, blocks / torch.where(s != 0, s, 1.0), 0.0).round() + 8).clamp(0, 15).to(torch.uint8)
    packed = v[..., :16] | (v[..., 16:] << 4)  # [N, K/32, 16]
    out = torch.empty(N, K // 2 + K // Q8_BLOCK * 2, dtype=torch.uint8, device=weight.device)
    out[:, :K // 2] = packed.reshape(N, K // 2)
    out[:, K // 2:] = scale.contiguous().view(torch.uint8).reshape(N, K // Q8_BLOCK * 2)
    return out.view(torch.int8)


def q4_columns(packed: torch.Tensor) -> int:
    """K of a Q4 weight (int8 [N, K/2 + K/16])."""
    return _block_columns(packed, torch.int8, Q8_BLOCK // 2 + 2, "Q4")


def dequantize_q4(packed: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Q4 blocks -> the float [N, K] matrix they stand for ((v - 8) * scale, computed in float32)."""
    K = q4_columns(packed)
    N = packed.shape[0]
    raw = packed.view(torch.uint8)
    b = raw[:, :K // 2].reshape(N, K // Q8_BLOCK, 16).to(torch.int16)
    v = torch.cat([b & 15, b >> 4], dim=-1).float() - 8.0
    scale = raw[:, K // 2:].contiguous().view(torch.float16).float().unsqueeze(-1)
    return (v * scale).reshape(N, K).to(dtype)


def quantize_q4_1(weight: torch.Tensor) -> torch.Tensor:
    """float [N, K] -> Q4_1 blocks, int16 storage [N, (K/2 + K/8) / 2] (as llama.cpp's Q4_1: per block of 32,
    min = the least value and scale = (largest - least) / 15, both rounded to float16 first, v = the
    nearest step in 0..15). A block already on such a grid (both ends used) is stored exactly."""
    if weight.dim() != 2 or weight.shape[1] % Q8_BLOCK:
        raise ValueError(f"quantize_q4_1: need a 2-D weight with a multiple of {Q8_BLOCK} columns, got "
                         f"{tuple(weight.shape)}")
    N, K = weight.shape
    blocks = weight.detach().float().reshape(N, K // Q8_BLOCK, Q8_BLOCK)
    lo, hi = blocks.amin(-1), blocks.amax(-1)
    scale, low = ((hi - lo) / 15.0).half(), lo.half()
    s, m = scale.float().unsqueeze(-1), low.float().unsqueeze(-1)
    v = torch.where(s > 0, (blocks - m) / torch.where(s > 0, s, 1.0), 0.0).round().clamp(0, 15).to(torch.uint8)
    packed = v[..., :16] | (v[..., 16:] << 4)  # [N, K/32, 16]
    out = torch.empty(N, K // 2 + K // Q8_BLOCK * 4, dtype=torch.uint8, device=weight.device)
    out[:, :K // 2] = packed.reshape(N, K // 2)
    out[:, K // 2:K // 2 + K // 16] = scale.contiguous().view(torch.uint8).reshape(N, K // 16)
    out[:, K // 2 + K // 16:] = low.contiguous().view(torch.uint8).reshape(N, K // 16)
    return out.view(torch.int16)


def q4_1_columns(packed: torch.Tensor) -> int:
    """K of a Q4_1 weight (int16 [N, (K/2 + K/8) / 2])."""
    return _block_columns(packed, torch.int16, (Q8_BLOCK // 2 + 4) // 2, "Q4_1")


def dequantize_q4_1(packed: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Q4_1 blocks -> the float [N, K] matrix they stand for (v * scale + min, computed in float32)."""
    K = q4_1_columns(packed)
    N = packed.shape[0]
    raw = packed.contiguous().view(torch.uint8)
    b = raw[:, :K // 2].reshape(N, K // Q8_BLOCK, 16).to(torch.int16)
    v = torch.cat([b & 15, b >> 4], dim=-1).float()
    scale = raw[:, K // 2:K // 2 + K // 16].contiguous().view(torch.float16).float().unsqueeze(-1)
    low = raw[:, K // 2 + K // 16:].contiguous().view(torch.float16).float().unsqueeze(-1)
    return (v * scale + low).reshape(N, K).to(dtype)


def weight_columns(weight: torch.Tensor) -> int:
    """K of a linear_rows weight in any format."""
    if weight.dtype == torch.uint8:
        return q8_columns(weight)
    if weight.dtype == torch.int8:
        return q4_columns(weight)
    if weight.dtype == torch.int16:
        return q4_1_columns(weight)
    return weight.shape[1]


def is_blocks(weight: torch.Tensor) -> bool:
    """Whether a linear_rows weight is in a block format (Q8: uint8, Q4: int8, Q4_1: int16)."""
    return weight.dtype in (torch.uint8, torch.int8, torch.int16)


def weight_matrix(weight: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """The float matrix a linear_rows weight stands for (float32, bfloat16, Q8, Q4 or Q4_1 blocks)."""
    if weight.dtype == torch.uint8:
        return dequantize_q8(weight, dtype)
    if weight.dtype == torch.int8:
        return dequantize_q4(weight, dtype)
    if weight.dtype == torch.int16:
        return dequantize_q4_1(weight, dtype)
    return weight.to(dtype)


def round_rows_i16(x: torch.Tensor) -> torch.Tensor:
    """x [M,K] float32 as the Q8 path reads it: each row rounded to int16 steps of max|row| / 32767
    (to nearest, ties to even), returned as the float32 values those integers stand for."""
    x = x.float()
    amax = x.abs().amax(dim=1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(32767.0) / amax, torch.zeros_like(amax))
    return torch.round(x * inv) * (amax / 32767.0)


def reference_linear_rows(x, weight, bias=None):
    """The specification: x [M,K] float32 @ weight[N,K]^T (widened to float32; bfloat16 weights take x
    rounded to bfloat16, as a bfloat16 matmul does; Q8, Q4 and Q4_1 blocks dequantised and x rounded to
    int16 per row, `round_rows_i16`) + bias, float32 [M,N]."""
    if is_blocks(weight):
        out = (round_rows_i16(x).double() @ weight_matrix(weight).double().T).float()
        return out + bias.float() if bias is not None else out
    if weight.dtype == torch.bfloat16:  # every product of two bfloat16 values is exact in float32
        out = (x.bfloat16().double() @ weight.double().T).float()
        return out + bias.float() if bias is not None else out
    out = x.float() @ weight_matrix(weight).T
    return out + bias.float() if bias is not None else out


def linear_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, out: torch.Tensor | None = None,
                accumulate: bool = False) -> torch.Tensor:
    """x [M,K] float32 times weight [N,K] (float32, bfloat16, Q8, Q4 or Q4_1 blocks, read once) transposed,
    plus bias [N] float32: float32 [M,N]. With bfloat16 weights x is first rounded to bfloat16 (each
    product is then exact; AVX512-BF16 CPUs multiply with vdpbf16ps). With block weights each row of x is first rounded to int16 (one
    scale per row; see round_rows_i16) and every block's dot product is exact integer arithmetic. With
    `out`, writes (accumulate=False) or adds (True) into it.
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
        K = weight_columns(weight)
        torch._check(x.shape[1] == K, lambda: "linear_rows: x and weight disagree on K")
        return None
