"""Weight formats: how a model's linear weights are stored and multiplied.

    format     stored per linear weight W [out, in]                         decode matmul
    float32    W.T in float32                                                 x @ W.T (BLAS)
    bfloat16   W.T in bfloat16 (upcast for big batches on CPUs without bf16)  x @ W.T
    int8       int8 q [out, in], one scale per output row                     torch._weight_int8pack_mm
    int4       4-bit q [out, in], a scale and a zero per 32 inputs of a row   torch._weight_int4pack_mm(_for_cpu)

The quantized formats are weight-only: activations stay in the model's dtype and are rounded to bfloat16
for the quantized kernel (the kernels' only fast input type: float32 and float16 inputs run 20-70x slower,
measured with this module's `benchmark_kernels`). A batch of at least `dense_min_rows` rows (a prefill
chunk) dequantizes the weight into the model's dtype and runs a dense matmul, which is 2-3x faster there
than the quantized kernels; decode steps stay on the kernels, which read 4x (int8) or 8x (int4) fewer
weight bytes than float32.

Dequantized values:  int8: W = q * scale[row]        int4: W = (q - 8) * scale[row, g] + zero[row, g]
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cache

import torch

WEIGHT_FORMATS = ("float32", "bfloat16", "float16", "int8", "int4")
QUANTIZED_FORMATS = ("int8", "int4")
INT4_GROUP = 32
KERNEL_DTYPE = torch.bfloat16
_ROW_CHUNK = 4096  # rows quantized at once: bounds the float32 scratch of a big tensor (the vocabulary)


@dataclass(frozen=True)
class QuantWeight:
    """A weight-only quantized matrix W [out, in] (see the module docstring for the formulas).

    bits 8: values int8 [out, in], scale float32 [out], zero None.
    bits 4: values uint8 in 0..15 [out, in], scale and zero float32 [out, in / group_size].
    """

    bits: int
    values: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None = None
    group_size: int = 0

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.values.shape[0]), int(self.values.shape[1]))

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Dequantized float32 rows [len(index), in] (an embedding lookup)."""
        return _dequantize(self.bits, self.values[index], self.scale[index],
                           None if self.zero is None else self.zero[index], self.group_size, torch.float32)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return _dequantize(self.bits, self.values, self.scale, self.zero, self.group_size, dtype)


def _dequantize(bits: int, values: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group: int,
                dtype: torch.dtype) -> torch.Tensor:
    if bits == 8:
        return (values.to(dtype) * scale.to(dtype)[:, None])
    assert zero is not None
    rows, cols = values.shape
    q = values.view(rows, cols // group, group).to(dtype) - 8
    return (q * scale.to(dtype)[..., None] + zero.to(dtype)[..., None]).view(rows, cols)


def quantize_int8(w: torch.Tensor) -> QuantWeight:
    """Symmetric per-row int8: scale = max |W[row]| / 127, q = round(W / scale)."""
    w = w.detach()
    values = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    for start in range(0, w.shape[0], _ROW_CHUNK):
        part = w[start:start + _ROW_CHUNK].float()
        s = part.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        values[start:start + _ROW_CHUNK] = torch.round(part / s[:, None]).clamp(-127, 127).to(torch.int8)
        scale[start:start + _ROW_CHUNK] = s
    return QuantWeight(8, values, scale)


def quantize_int4(w: torch.Tensor, group_size: int = INT4_GROUP) -> QuantWeight:
    """Asymmetric int4 per group of `group_size` inputs: the group's min..max spread over q = 0..15."""
    w = w.detach()
    rows, cols = w.shape
    if cols % group_size:
        raise ValueError(f"int4 needs the input size ({cols}) to be a multiple of the group size ({group_size})")
    values = torch.empty(w.shape, dtype=torch.uint8, device=w.device)
    scale = torch.empty(rows, cols // group_size, dtype=torch.float32, device=w.device)
    zero = torch.empty_like(scale)
    for start in range(0, rows, _ROW_CHUNK):
        part = w[start:start + _ROW_CHUNK].float().view(-1, cols // group_size, group_size)
        lo, hi = part.amin(-1), part.amax(-1)
        s = ((hi - lo) / 15.0).clamp(min=1e-12)
        q = torch.round((part - lo[..., None]) / s[..., None]).clamp(0, 15)
        values[start:start + _ROW_CHUNK] = q.to(torch.uint8).view(-1, cols)
        scale[start:start + _ROW_CHUNK] = s
        zero[start:start + _ROW_CHUNK] = lo + 8 * s
    return QuantWeight(4, values, scale, zero, group_size)


def quantize(w: torch.Tensor, weight_format: str) -> QuantWeight:
    if weight_format == "int8":
        return quantize_int8(w)
    if weight_format == "int4":
        return quantize_int4(w)
    raise ValueError(f"not a quantized format: {weight_format!r}")


def concat_rows(parts: list[QuantWeight]) -> QuantWeight:
    """Stack quantized matrices of one format along the output dimension (fused q/k/v, gate/up)."""
    first = parts[0]
    if any(p.bits != first.bits or p.group_size != first.group_size for p in parts):
        raise ValueError("cannot fuse weights of different formats")
    zero = torch.cat([p.zero for p in parts]) if first.zero is not None else None  # type: ignore[misc]
    return QuantWeight(first.bits, torch.cat([p.values for p in parts]), torch.cat([p.scale for p in parts]),
                       zero, first.group_size)


def permute_rows(weight: QuantWeight, index: torch.Tensor) -> QuantWeight:
    return QuantWeight(weight.bits, weight.values[index], weight.scale[index],
                       None if weight.zero is None else weight.zero[index], weight.group_size)


class DenseLinear:
    """y = x @ W.T (+ bias), W stored transposed [in, out] (faster than F.linear on CPU for small batches).

    NOTE: with `upcast_min_rows` set (half precision on CPUs without half-precision matrix instructions),
    batches of at least that many rows compute in float32 and round the result back.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, upcast_min_rows: int | None) -> None:
        self.w_t = weight.t().contiguous()  # [in, out]
        self.bias = bias
        self.upcast_min_rows = upcast_min_rows
        self.nbytes = self.w_t.numel() * self.w_t.element_size()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.upcast_min_rows is not None and x.shape[0] >= self.upcast_min_rows:
            y = x.float() @ self.w_t.float()
            if self.bias is not None:
                y += self.bias.float()
            return y.to(x.dtype)
        return x @ self.w_t if self.bias is None else torch.addmm(self.bias, x, self.w_t)


class QuantLinear:
    """y = x @ W.T (+ bias) with W weight-only quantized (int8 or int4, see the module docstring).

    Rows < dense_min_rows: the quantized kernel on bfloat16 activations. More rows: W dequantized into the
    activations' dtype for this call (a transient copy) and a dense matmul.
    """

    def __init__(self, weight: QuantWeight, bias: torch.Tensor | None, device: torch.device,
                 dense_min_rows: int) -> None:
        self.bits = weight.bits
        self.out_features, self.in_features = weight.shape
        self.group_size = weight.group_size
        self.bias = bias
        self.dense_min_rows = dense_min_rows
        self.device = device
        if weight.bits == 8:
            self.values = weight.values.to(device)  # [out, in] int8
            self.scale = weight.scale.to(device=device, dtype=KERNEL_DTYPE)  # [out]
            self.scale32 = self.scale.float()
            self.nbytes = self.values.numel() + self.scale.numel() * 2
            return
        assert weight.zero is not None
        # [in / group, out, 2]: the kernels' layout of scales and zeros
        self.scale_zero = torch.stack([weight.scale.t(), weight.zero.t()], dim=-1).to(
            device=device, dtype=KERNEL_DTYPE).contiguous()
        self.packed = _pack_int4(weight.values.to(device))
        # where the packed layout cannot be read back, the values stay beside it for the dense path
        self.values4 = None if _unpackable(self.packed, self.out_features) else weight.values.to(device)
        self.nbytes = self.packed.numel() * self.packed.element_size() + self.scale_zero.numel() * 2 + (
            0 if self.values4 is None else self.values4.numel())

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """W [out, in] in `dtype`, with the kernel's bfloat16 scales (what the kernel multiplies by)."""
        if self.bits == 8:
            return self.values.to(dtype) * self.scale.to(dtype)[:, None]
        values = self.values4 if self.values4 is not None else _unpack_blocks(
            self.packed, self.out_features, self.in_features, _cpu_int4_layout() or 0)
        groups = self.in_features // self.group_size
        scale = self.scale_zero[..., 0].t().to(dtype)  # [out, groups]
        zero = self.scale_zero[..., 1].t().to(dtype)
        q = values.view(self.out_features, groups, self.group_size).to(dtype) - 8
        return (q * scale[..., None] + zero[..., None]).view(self.out_features, self.in_features)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] >= self.dense_min_rows:
            w = self.dequantize(x.dtype)
            return x @ w.t() if self.bias is None else torch.addmm(self.bias.to(x.dtype), x, w.t())
        xk = x.to(KERNEL_DTYPE)
        if self.bits == 8:
            y = torch._weight_int8pack_mm(xk, self.values, self.scale)
        elif self.device.type == "cpu":
            y = torch._weight_int4pack_mm_for_cpu(xk, self.packed, self.group_size, self.scale_zero)
        else:
            y = torch._weight_int4pack_mm(xk, self.packed, self.group_size, self.scale_zero)
        y = y.to(x.dtype)
        return y if self.bias is None else y + self.bias


# -- int4 packing ------------------------------------------------------------------------------------
# NOTE: the CPU kernel's packed layout is an implementation detail of PyTorch. The layout found on this
# machine (checked once per process by `_cpu_int4_layout`) lets a prefill batch unpack the weight without a
# second copy; where it is not recognised (or on CUDA), QuantLinear keeps the unpacked values beside it.

@cache
def _cpu_int4_layout() -> int | None:
    """Block width BN of the CPU pack: bytes [out / BN, in, BN / 2], byte j = (row j) | (row j + BN/2) << 4."""
    probe = torch.randint(0, 16, (128, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    packed = torch._convert_weight_to_int4pack_for_cpu(probe, 1)
    for bn in (64, 32, 16):
        try:
            unpacked = _unpack_blocks(packed, 128, 64, bn)
        except RuntimeError:
            continue
        if torch.equal(unpacked.int(), probe):
            return bn
    return None


def _unpack_blocks(packed: torch.Tensor, rows: int, cols: int, bn: int) -> torch.Tensor:
    blocks = packed.reshape(rows // bn, cols, bn // 2)
    both = torch.cat([blocks & 15, blocks >> 4], dim=2)  # [rows / bn, cols, bn]
    return both.permute(0, 2, 1).reshape(rows, cols)


def _pack_int4(values: torch.Tensor) -> torch.Tensor:
    if values.device.type == "cpu":
        return torch._convert_weight_to_int4pack_for_cpu(values.to(torch.int32), 1)
    # CUDA: the tensor-core kernel takes [out, in / 2] uint8 (two values per byte, high nibble first)
    pairs = values.view(values.shape[0], -1, 2).to(torch.uint8)
    return torch._convert_weight_to_int4pack((pairs[..., 0] << 4) | pairs[..., 1], 8)


def _unpackable(packed: torch.Tensor, rows: int) -> bool:
    """True where `_unpack_blocks` reads this packed weight back (the CPU layout was recognised)."""
    layout = _cpu_int4_layout() if packed.device.type == "cpu" else None
    return layout is not None and rows % layout == 0


# -- measuring the kernels ----------------------------------------------------------------------------

@dataclass(frozen=True)
class KernelTimes:
    """Milliseconds of one [rows, in] x [in, out] product per way of computing it."""

    rows: int
    dense_ms: float  # the model dtype's dense matmul
    int8_ms: float
    int4_ms: float


def benchmark_kernels(in_features: int, out_features: int, rows: int, dtype: torch.dtype,
                      device: torch.device, repeats: int = 20) -> KernelTimes:
    """Time dense, int8 and int4 products of one shape (what `auto` is chosen by)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(out_features, in_features, generator=gen).to(device)
    x = torch.randn(rows, in_features, generator=gen).to(device=device, dtype=dtype)
    dense = DenseLinear(w.to(dtype), None, None)
    big = 1 << 30
    q8 = QuantLinear(quantize_int8(w), None, device, big)
    q4 = QuantLinear(quantize_int4(w), None, device, big)

    ms = [_time(lambda f=f: f(x), repeats) / repeats * 1e3 for f in (dense, q8, q4)]
    return KernelTimes(rows, *ms)


def choose_dense_min_rows(in_features: int, out_features: int, dtype: torch.dtype, device: torch.device) -> int:
    """The smallest batch (of 16, 32, 64, 128) at which dequantize + dense beats the int8 kernel, measured."""
    w = torch.randn(out_features, in_features).to(device)
    q = QuantLinear(quantize_int8(w), None, device, 1 << 30)
    for rows in (16, 32, 64, 128):
        x = torch.randn(rows, in_features).to(device=device, dtype=dtype)

        def kernel(x: torch.Tensor = x) -> None:
            q(x)

        def dense(x: torch.Tensor = x) -> None:
            x @ q.dequantize(dtype).t()

        if _time(dense) < _time(kernel):
            return rows
    return 256


def _time(fn: object, repeats: int = 5) -> float:
    """Seconds for `repeats` calls of fn after a warm-up call (CUDA work waited for)."""
    assert callable(fn)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    with torch.inference_mode():
        fn()
        sync()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        sync()
        return time.perf_counter() - start


# -- choosing a format --------------------------------------------------------------------------------

# Formats `auto` may pick, by the quality `bench perplexity` measured on the default model (README,
# "Weight formats"): each is within its bound (int8 within 1% of float32, int4 within 1% of llama.cpp's).
AUTO_CANDIDATES = ("int4", "int8")


@cache
def quantized_kernels_work(device_type: str) -> bool:
    """True where torch's weight-only int8 and int4 kernels run on this device (bfloat16 activations)."""
    device = torch.device(device_type)
    try:
        w = torch.randn(64, 64, device=device)
        x = torch.randn(2, 64, device=device)
        QuantLinear(quantize_int8(w), None, device, 1 << 30)(x)
        QuantLinear(quantize_int4(w), None, device, 1 << 30)(x)
    except (RuntimeError, NotImplementedError, AttributeError):
        return False
    return True


def supported_formats(device: torch.device) -> tuple[str, ...]:
    floats = ("float32", "bfloat16", "float16")
    return floats + QUANTIZED_FORMATS if quantized_kernels_work(device.type) else floats


def check_format(weight_format: str, device: torch.device) -> None:
    """Raise UnsupportedFormatError naming the supported formats when `weight_format` cannot run here."""
    from promptstash.errors import UnsupportedFormatError

    supported = supported_formats(device)
    if weight_format not in supported:
        raise UnsupportedFormatError(
            f"weight format {weight_format!r} is not supported on {device} with torch {torch.__version__}; "
            f"supported here: {', '.join(supported)}")


def auto_format(dtype: torch.dtype, device: torch.device, in_features: int, out_features: int) -> str:
    """The fastest decode format for a [1, in] x [in, out] product among the float dtype and AUTO_CANDIDATES.

    Measured at start on this machine (about a second): decode streams every weight once per token, so
    the format that multiplies one row fastest decodes fastest.
    """
    dense = str(dtype).removeprefix("torch.")
    if device.type != "cpu" or not quantized_kernels_work(device.type):
        return dense
    times = benchmark_kernels(in_features, out_features, 1, dtype, device)
    quantized = {"int8": times.int8_ms, "int4": times.int4_ms}
    best = min((f for f in quantized if f in AUTO_CANDIDATES), key=lambda f: quantized[f])
    # NOTE: the dense format must win clearly: a start on a busy machine times noisily, and the dense product
    # also streams 2-8x the bytes of the whole model (the embedding and head too), which one layer understates
    return dense if times.dense_ms < 0.5 * quantized[best] else best
