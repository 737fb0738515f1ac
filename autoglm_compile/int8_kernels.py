"""Real int8 kernels for QDQ models on llvm targets with an int8 dot product.

TVM's ONNX importer turns a QDQ model's DequantizeLinear into relax dequantize, so Conv/MatMul/Gemm read float32.
`rewrite` turns each

    conv2d(dequantize(xq, sx, zx), dequantize(wq, sw, 0))      xq: uint8 activations, wq: an int8 constant
    matmul(dequantize(xq, sx, zx), dequantize(wq, sw, 0))      (Gemm: the weight may be permute_dims'd)

into an int8 x int8 -> int32 conv2d/matmul, with exact zero-point handling, then back to the float the graph expects:

    acc = conv2d(pad(xq, value=zx), wq, padding=0, out_dtype=int32) - zx * sum(wq[o])     (a constant per channel)
    y   = float32(acc) * (sx * sw[o])

(topi pads with 0, so a non-zero activation zero point is padded explicitly). The QuantizeLinear after the op stays:
the requantize is y's quantize. Weights must be int8 with a zero point of 0 (quantize_static's symmetric weights),
per tensor or per output channel; activations uint8 (or int8) per tensor. The int8 conv2d is NHWC (input channels
innermost: MetaSchedule does not tensorize an NCHW conv2d), between two transposes; `sink_transposes` then moves
those transposes down through the layout-agnostic ops (bias add, relu, quantize/dequantize, residual add, pooling) and
cancels inverse pairs, so the graph is NHWC from conv to conv and the elementwise chains fuse into the conv epilogues
(ResNet-50: 106 transposes -> 2, at the input and the output). A matmul of two dequantized activations (attention)
becomes int8 too, its zero points corrected with row and column sums at run time. Grouped and depthwise convs stay
float. Scalar scales and zero points become one-element vectors (`singleton_qparams`), so that like layers share
their kernels and tuning tasks.

VNNI (x86): activations stay uint8 (vpdpbusd multiplies uint8 by int8). MetaSchedule picks its VNNI rule from the
target's features (space_generator.cc: avx512vnni or avxvnni -> MultiLevelTilingWithIntrin with "dot_16x4_vnni"),
but that intrinsic reads its weight operand as one contiguous 16x4 block, which an OHWI or [K, N] weight is not (its
RewriteLayout postproc runs after tensorize, too late). So the kernel is a TE compute over a weight packed at build
time, [O/16, KH, KW, I/4, 16, 4] ([N/16, K/4, 16, 4] for a matmul), the layout of topi's old conv2d_NCHWc_int8; a
conv's input channels that are not a multiple of 4 (a stem's 3) and output channels that are not a multiple of 16 (the
PP-OCRv4 detector's 24) are padded with zero weights, the extra outputs sliced off. Matmuls whose dims do not allow it
are plain int8 matmuls without vpdpbusd.
Tuning (--tune) then emits vpdpbusd; untuned builds on AVX512-VNNI CPUs get cpu_kernels' hand schedule for these
packed blocks (a register tile, one vpdpbusd per 16x4 block), on AVX-VNNI-only ones TVM's default loops. aarch64 (dotprod): activations are shifted to
int8 (xq - 128, zx - 128: exact) for sdot, with plain int8 ops; sdot emission there is not verified.
CUDA (sm_72 and newer): activations are shifted to int8 as on aarch64, and the int8 convs (NHWC) and matmuls run on
the tensor cores' int8 fragments (gpu_schedules.wmma_schedule: wmma 16x16x16, s8 x s8 -> s32), their K split where
they launch fewer than two waves of thread blocks (gpu_schedules.split_k). No tuning is needed for that.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from .relax_util import mutate_functions

# LLVM feature -> the int8 dot-product instruction that code for it can use, by architecture.
DOT_FEATURES = {"x86_64": [("avx512vnni", "vpdpbusd (AVX512-VNNI)"), ("avxvnni", "vpdpbusd (AVX-VNNI)")],
                "aarch64": [("dotprod", "sdot (dotprod)")]}


CUDA_INT8 = "int8 tensor cores (wmma s8 x s8 -> s32)"
# Attention's matmuls of two activations stay float on CUDA: in int8 their zero points need the row sums of A and the
# column sums of B, 4 reduction kernels more per attention (on the H200, BERT-base int8: see docs/int8.md).
CUDA_ACTIVATION_MATMULS = False
CUDA_INT8_MIN_SM = 72  # wmma's 8-bit fragments need sm_72 (Jetson Xavier) or newer


def int8_dot_product(target) -> str | None:
    """The int8 dot-product instruction a TVM llvm target can use (from its mcpu and mattr), or on a cuda target
    the int8 tensor cores (sm_72 and newer); None where there is none."""
    from tvm.target import codegen

    if target.kind.name == "cuda":
        from tvm.s_tir.dlight.gpu.matmul import check_sm_version

        arch = str(target.attrs.get("arch", ""))
        return CUDA_INT8 if arch and check_sm_version(arch) >= CUDA_INT8_MIN_SM else None
    if target.kind.name != "llvm":
        return None
    triple = str(target.attrs.get("mtriple", "")) or codegen.llvm_get_system_triple()
    arch = triple.split("-")[0]
    features = set(codegen.llvm_get_cpu_features(target))
    return next((instr for feat, instr in DOT_FEATURES.get(arch, []) if feat in features), None)



def bound_value(mutator, expr):
    """The value a variable is bound to, through chains of variables (a PyExprMutator's lookup_binding), else expr."""
    from tvm import relax

    while isinstance(expr, relax.Var):
        value = mutator.lookup_binding(expr)
        if value is None:
            return expr
        expr = value
    return expr

@dataclass
class Int8Summary:
    """What `rewrite` did: ops rewritten to int8 x int8 -> int32, and those left in float with the reason."""

    instruction: str | None
    convs: int = 0
    matmuls: int = 0
    packed: int = 0  # of those, with the weight packed in blocks that the dot-product instruction reads
    pools: int = 0  # max_pool2d on dequantized activations, moved before the dequantize (on the quantized values)
    activation_matmuls: int = 0  # of the matmuls, those of two activations (attention)
    kept_float: dict[str, int] = field(default_factory=dict)  # "Conv: reason" -> count

    @property
    def rewritten(self) -> int:
        return self.convs + self.matmuls

    def keep(self, op: str, reason: str) -> None:
        key = f"{op}: {reason}"
        self.kept_float[key] = self.kept_float.get(key, 0) + 1


LANES, REDUCE = 16, 4  # VNNI's vpdpbusd (dot_16x4_vnni): 16 int32 outputs, each a sum of 4 uint8 x int8 products


def _pack_dense(w: np.ndarray) -> np.ndarray:
    """[K, N] -> [N/16, K/4, 16, 4]: each 16x4 block contiguous, as dot_16x4_vnni reads its B operand."""
    k, n = w.shape
    return np.ascontiguousarray(w.reshape(k // REDUCE, REDUCE, n // LANES, LANES).transpose(2, 0, 3, 1)).astype(np.int8)


def _pack_conv(w: np.ndarray) -> np.ndarray:
    """OIHW -> [O/16, H, W, I/4, 16, 4]."""
    o, i, kh, kw = w.shape
    return np.ascontiguousarray(w.reshape(o // LANES, LANES, i // REDUCE, REDUCE, kh, kw).transpose(0, 4, 5, 2, 1, 3)).astype(np.int8)


def _dense_packed(a, wp):
    """int32 [..., N] = a [..., K] (uint8) x the packed weight."""
    from tvm import te

    k = te.reduce_axis((0, a.shape[-1]), "k")
    n = wp.shape[0] * LANES
    return te.compute((*a.shape[:-1], n), lambda *i: te.sum(
        a[(*i[:-1], k)].astype("int32") * wp[i[-1] // LANES, k // REDUCE, i[-1] % LANES, k % REDUCE].astype("int32"), axis=k),
        name="dense_int8")


def _batch_matmul_packed(a, bp):
    """int32 [..., M, N] = a [..., M, K] (uint8) x bp [..., N/16, K/4, 16, 4] (int8, packed at run time), batch dims
    alike."""
    from tvm import te

    k = te.reduce_axis((0, a.shape[-1]), "k")
    batch = len(bp.shape) - 4
    return te.compute((*a.shape[:-1], bp.shape[-4] * LANES), lambda *i: te.sum(
        a[(*i[:-1], k)].astype("int32") * bp[(*i[:batch], i[-1] // LANES, k // REDUCE, i[-1] % LANES, k % REDUCE)].astype("int32"), axis=k),
        name="batch_matmul_int8")


def _conv2d_packed(x, wp, strides, dilation):
    """int32 NHWC = conv2d of x (NHWC uint8, padded already) with the packed weight."""
    from tvm import te

    n, h, w, _ = x.shape
    o_blocks, kh, kw, i_blocks = wp.shape[:4]
    (sh, sw), (dh, dw) = strides, dilation
    oh, ow = (h - (kh - 1) * dh - 1) // sh + 1, (w - (kw - 1) * dw - 1) // sw + 1
    rh, rw, ric = te.reduce_axis((0, kh), "rh"), te.reduce_axis((0, kw), "rw"), te.reduce_axis((0, i_blocks * REDUCE), "ric")
    return te.compute((n, oh, ow, o_blocks * LANES), lambda b, y, z, c: te.sum(
        x[b, y * sh + rh * dh, z * sw + rw * dw, ric].astype("int32")
        * wp[c // LANES, rh, rw, ric // REDUCE, c % LANES, ric % REDUCE].astype("int32"), axis=[rh, rw, ric]), name="conv2d_nhwc_int8")


def _const(expr) -> np.ndarray | None:
    from tvm.ir.expr import Constant

    return expr.value.numpy() if isinstance(expr, Constant) else None


def rewrite(mod, target):
    """(mod with int8 Conv/MatMul where the target has an int8 dot product, Int8Summary). Without one the module is
    returned as it is, and the summary counts every Conv/MatMul as float. With it, TVM's FastMathTransform also
    turns erf, exp, tanh and softmax into topi's vectorizable approximations on CPUs (LLVM calls libm's erff/expf
    per element, which made BERT-base's GELU 64 % of the int8 run); their outputs are requantized to 8 bits anyway."""
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    instruction = int8_dot_product(target)
    summary = Int8Summary(instruction)
    signed = instruction is not None and (instruction.startswith("sdot") or instruction == CUDA_INT8)  # s8 x s8
    packed = instruction is not None and instruction.startswith("vpdpbusd")
    op = tvm.ir.Op.get
    CONV, MATMUL, DQ, PERMUTE = op("relax.nn.conv2d"), op("relax.matmul"), op("relax.dequantize"), op("relax.permute_dims")
    MAX_POOL = op("relax.nn.max_pool2d")
    OTHER_CONVS = (op("relax.nn.conv1d"), op("relax.nn.conv3d"))

    @mutator
    class Rewriter(PyExprMutator):
        def _activation(self, expr, permuted: bool = False):
            """(xq, sx, zx) of a per-tensor dequantize of uint8/int8 activations, or a reason it is not one. permuted:
            also through a permute_dims after the dequantize (then applied to xq: per tensor, it commutes)."""
            call = bound_value(self, expr)
            axes = None
            if permuted and isinstance(call, relax.Call) and call.op.same_as(PERMUTE):
                axes = call.attrs.axes
                call = bound_value(self, call.args[0])
            if not (isinstance(call, relax.Call) and call.op.same_as(DQ)):
                return "its input is not dequantized (kept in float)"
            xq, scale, zp = call.args
            s, z = _const(scale), _const(zp)
            if s is None or z is None or s.size != 1 or z.size != 1:
                return "its input's scale or zero point is not one constant"
            dtype = xq.ty.dtype
            if dtype not in ("uint8", "int8"):
                return f"its input is {dtype}"
            if axes is not None:
                xq = self.builder_.emit(relax.op.permute_dims(xq, axes))
            return xq, float(s.reshape(())), int(z.reshape(()))

        def _weight(self, expr, out_axis: int):
            """(wq int64 array, scale per output channel) of a dequantized int8 constant, or a reason."""
            call = bound_value(self, expr)
            perm = None
            if isinstance(call, relax.Call) and call.op.same_as(PERMUTE):
                perm = call.attrs.axes
                call = bound_value(self, call.args[0])
            if not (isinstance(call, relax.Call) and call.op.same_as(DQ)):
                return "its weight is not a dequantized constant (an activation)"
            w, s, z = (_const(a) for a in call.args)
            if w is None or s is None or z is None:
                return "its weight is not a dequantized constant (an activation)"
            if w.dtype != np.int8:
                return f"its weight is {w.dtype}, not int8"
            if np.any(z != 0):
                return "its weight zero point is not 0"
            axis = int(call.attrs.axis) % w.ndim
            if perm is not None:
                axes = [int(a) for a in perm] if len(perm) else list(range(w.ndim))[::-1]
                w = np.transpose(w, axes)
                axis = axes.index(axis)
            n = w.shape[out_axis]
            if s.size == 1:
                s = np.full(n, float(s.reshape(())), np.float64)
            elif s.size == n and axis == out_axis:
                s = s.reshape(n).astype(np.float64)
            else:
                return "its weight scale is not per tensor or per output channel"
            return w, s

        def _input(self, xq, zx):
            """The activations in the dtype the dot product takes (uint8 on x86, int8 on aarch64 and CUDA)."""
            want = "int8" if signed else "uint8"
            if xq.ty.dtype == want:
                return xq, zx
            shift = -128 if want == "int8" else 128
            wide = relax.op.add(relax.op.astype(xq, "int16"), relax.const(shift, "int16"))
            return relax.op.astype(wide, want), zx + shift

        def visit_call_(self, call):
            call = self.builder_.normalize(super().visit_call_(call))
            if call.op.same_as(CONV):
                return self._conv(call)
            if call.op.same_as(MATMUL):
                return self._matmul(call)
            if any(call.op.same_as(o) for o in OTHER_CONVS):
                summary.keep("Conv", "not 2-D (only conv2d is rewritten)")
            if call.op.same_as(MAX_POOL):
                return self._max_pool(call)
            return call

        def _max_pool(self, call):
            """max_pool2d(dequantize(q)) as dequantize(max_pool2d(q)): a positive per-tensor scale keeps the order,
            so the max of the quantized values is exact (the pad: q's lowest value, below every real one), and
            ResNet-50's stem writes and pools uint8 instead of float32."""
            found = self._activation(call.args[0])
            if isinstance(found, str):
                return call
            xq, sx, zx = found
            if sx <= 0:
                return call
            a = call.attrs
            pooled = relax.op.nn.max_pool2d(xq, a.pool_size, a.strides, a.padding, a.dilation, a.ceil_mode, a.count_include_pad, a.layout, a.out_layout)
            dq = bound_value(self, call.args[0])
            summary.pools += 1
            return relax.op.dequantize(pooled, dq.args[1], dq.args[2], int(dq.attrs.axis), "float32")

        def _conv(self, call):
            a = call.attrs
            if str(call.ty.dtype) != "float32":
                return call
            if instruction is None:
                summary.keep("Conv", "the target has no int8 dot product")
                return call
            if a.data_layout != "NCHW" or a.kernel_layout != "OIHW":
                summary.keep("Conv", f"layout {a.data_layout}/{a.kernel_layout}")
                return call
            if int(a.groups) != 1:
                summary.keep("Conv", "grouped or depthwise (no int8 dot-product schedule for it)")
                return call
            act, wt = self._activation(call.args[0]), self._weight(call.args[1], 0)
            for found in (act, wt):
                if isinstance(found, str):
                    summary.keep("Conv", found)
                    return call
            (xq, sx, zx), (w, sw) = act, wt
            xq, zx = self._input(xq, zx)
            pad = [int(p) for p in a.padding]
            if zx != 0 and any(pad):  # topi pads with 0: pad with the zero point instead
                top, left, bottom, right = pad
                xq = relax.op.nn.pad(xq, [0, 0, 0, 0, top, bottom, left, right], "constant", float(zx))
                pad = [0, 0, 0, 0]
            # NHWC: the input channels innermost, as the dot-product intrinsics read them (MetaSchedule does not
            # tensorize an NCHW conv2d); the float graph around stays NCHW.
            x_nhwc = relax.op.permute_dims(xq, [0, 2, 3, 1])
            if packed:
                extra = -w.shape[1] % REDUCE  # input channels padded to a multiple of 4 with zero weights (the stem's 3)
                lanes = -w.shape[0] % LANES  # output channels padded to a multiple of 16 with zero weights, sliced off after
                if any(pad) or extra:
                    top, left, bottom, right = pad
                    x_nhwc = relax.op.nn.pad(x_nhwc, [0, 0, top, bottom, left, right, 0, extra], "constant", 0.0)
                wp = _pack_conv(np.pad(w, [(0, lanes), (0, extra), (0, 0), (0, 0)]))
                acc = self.builder_.call_te(_conv2d_packed, self.builder_.emit(x_nhwc), relax.const(wp), [int(v) for v in a.strides],
                                            [int(v) for v in a.dilation], primfunc_name_hint="conv2d_nhwc_int8_packed")
                if lanes:
                    acc = relax.op.strided_slice(acc, axes=[3], begin=[0], end=[w.shape[0]])
                summary.packed += 1
            else:
                acc = relax.op.nn.conv2d(x_nhwc, relax.const(np.ascontiguousarray(w.transpose(0, 2, 3, 1))), strides=a.strides, padding=pad,
                                         dilation=a.dilation, data_layout="NHWC", kernel_layout="OHWI", out_dtype="int32")
            summary.convs += 1
            return relax.op.permute_dims(self._dequantized(acc, w, zx, sx * sw, (1, 1, 1, -1), (1, 2, 3)), [0, 3, 1, 2])

        def _matmul(self, call):
            if str(call.ty.dtype) != "float32":
                return call
            if instruction is None:
                summary.keep("MatMul", "the target has no int8 dot product")
                return call
            act = self._activation(call.args[0])
            wt = self._weight(call.args[1], 1)
            if not isinstance(act, str) and isinstance(wt, str) and not isinstance(other := self._activation(call.args[1], permuted=True), str):
                if instruction == CUDA_INT8 and not CUDA_ACTIVATION_MATMULS:
                    summary.keep("MatMul", "of two activations (attention): on CUDA its zero-point row and column sums would be 4 kernels more")
                    return call
                both = self._matmul_activations(*act, *other)
                return call if both is None else both
            for found in (act, wt):
                if isinstance(found, str):
                    summary.keep("MatMul", found)
                    return call
            (xq, sx, zx), (w, sw) = act, wt
            if w.ndim != 2:
                summary.keep("MatMul", f"its weight has {w.ndim} dims")
                return call
            xq, zx = self._input(xq, zx)
            if packed and w.shape[1] % LANES == 0 and w.shape[0] % REDUCE == 0:
                acc = self.builder_.call_te(_dense_packed, xq, relax.const(_pack_dense(w)), primfunc_name_hint="dense_int8_packed")
                summary.packed += 1
            else:
                acc = relax.op.matmul(xq, relax.const(np.ascontiguousarray(w).astype(np.int8)), out_dtype="int32")
            summary.matmuls += 1
            return self._dequantized(acc, w, zx, sx * sw, (-1,), (0,))

        def _matmul_activations(self, aq, sa, za, bq, sb, zb):
            """int8 x int8 -> int32 matmul of two dequantized activations (attention), B shifted to int8 and, with
            VNNI, packed in 16x4 blocks at run time; zero points from the row sums of A and the column sums of B:
            acc = sum(a b) - zb sum_k(a) - za sum_k(b) + K za zb."""
            if aq.ty.ndim < 2 or bq.ty.ndim != aq.ty.ndim or any(not isinstance(d, tvm.tirx.IntImm) for d in (*aq.ty.shape, *bq.ty.shape)):
                summary.keep("MatMul", "two activations of unlike or dynamic shapes")
                return None
            (*batch, _, k), (*batch_b, _, n) = ([int(d) for d in t.ty.shape] for t in (aq, bq))
            if batch != batch_b:
                summary.keep("MatMul", "two activations with broadcast batch dims")
                return None
            aq, za = self._input(aq, za)
            if bq.ty.dtype == "uint8":
                bq, zb = relax.op.astype(relax.op.subtract(relax.op.astype(bq, "int16"), relax.const(128, "int16")), "int8"), zb - 128
            if packed and n % LANES == 0 and k % REDUCE == 0:
                nb = len(batch)
                blocks = relax.op.reshape(bq, [*batch, k // REDUCE, REDUCE, n // LANES, LANES])
                bp = relax.op.permute_dims(blocks, [*range(nb), nb + 2, nb, nb + 3, nb + 1])
                acc = self.builder_.call_te(_batch_matmul_packed, aq, self.builder_.emit(bp), primfunc_name_hint="batch_matmul_int8_packed")
                summary.packed += 1
            else:
                acc = relax.op.matmul(aq, bq, out_dtype="int32")
            summary.matmuls += 1
            summary.activation_matmuls += 1

            def vector(value, dtype):  # not a scalar, which TVM inlines: like layers share their kernels (singleton_qparams)
                return relax.const(np.array([value], dtype))

            corr = vector(k * za * zb, "int32")
            if zb:
                corr = relax.op.subtract(corr, relax.op.multiply(vector(zb, "int32"), relax.op.sum(relax.op.astype(aq, "int32"), axis=[-1], keepdims=True)))
            if za:
                corr = relax.op.subtract(corr, relax.op.multiply(vector(za, "int32"), relax.op.sum(relax.op.astype(bq, "int32"), axis=[-2], keepdims=True)))
            return relax.op.multiply(relax.op.astype(relax.op.add(acc, corr), "float32"), vector(sa * sb, "float32"))

        def _dequantized(self, acc, w, zx, scale, shape, reduce_axes):
            """float32(acc - zx * sum(w per output channel)) * scale per output channel."""
            if zx != 0:
                corr = (zx * w.astype(np.int64).sum(axis=reduce_axes)).astype(np.int32).reshape(shape)
                acc = relax.op.subtract(acc, relax.const(corr))
            return relax.op.multiply(relax.op.astype(acc, "float32"), relax.const(scale.astype(np.float32).reshape(shape)))

    rewritten = mutate_functions(Rewriter(mod), mod)
    if not summary.rewritten:
        return mod, summary
    folded = relax.transform.FoldConstant()(relax.transform.DeadCodeElimination()(rewritten))  # constant biases
    out = singleton_qparams(sink_transposes(folded))
    if target.kind.name != "llvm":  # for libm's scalar calls only; on CUDA the attention kernel's pattern takes nn.softmax, not topi's
        return out, summary
    return relax.transform.FastMathTransform()(out), summary


def fold_dequantized_constants(mod):
    """Every dequantize of a constant (an int8 weight whose op the rewrite left in float: its activation is kept in
    float, or the target has no int8 dot product) folded into a float32 constant, so that the op reads a constant
    weight and gets the float kernels (cpu_kernels' packed dense and conv, DLight's GEMM rule). Without it, where the
    rewrite did not run its FoldConstant (nothing rewritten: no int8 dot product, or a QDQ model built in float), a
    matmul on a dequantized weight ran TVM's default loop nest: 278 ms against ONNX Runtime's 2.3 ms on a 128x384 by
    384x1536 matmul, and 78 % of MiniLM's int8 run with 109 nodes in float. TVM's FoldConstant folds the same calls,
    but it compiles and runs a kernel for each: 25.7 s on the PP-OCRv4 recognizer's QDQ model, 0.1 s in numpy here."""
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    from .quantize import dequantize

    @mutator
    class Folder(PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if getattr(call.op, "name", None) != "relax.dequantize":
                return call
            q, s, z = (_const(a) for a in call.args)
            if q is None or s is None or z is None or str(call.attrs.out_dtype) != "float32":
                return call
            return relax.const(dequantize(q, s, z, int(call.attrs.axis)))

    return mutate_functions(Folder(mod), mod)


def singleton_qparams(mod):
    """Each quantize/dequantize's scalar scale and zero point as a one-element vector. TVM's legalization inlines a
    scalar constant into the kernel, so each tensor's scale made its kernels distinct tuning tasks (BERT-base: the 12
    layers' kernels all different, 217 tasks); read from a buffer, the kernels of like layers are one task."""
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    QDQ = (tvm.ir.Op.get("relax.quantize"), tvm.ir.Op.get("relax.dequantize"))

    @mutator
    class Vectorizer(PyExprMutator):
        def visit_call_(self, call):
            call = self.builder_.normalize(super().visit_call_(call))
            if not any(call.op.same_as(o) for o in QDQ):
                return call
            params = [relax.const(v.reshape(1)) if (v := _const(p)) is not None and v.ndim == 0 else p for p in call.args[1:]]
            return relax.Call(call.op, [call.args[0], *params], call.attrs)

    return mutate_functions(Vectorizer(mod), mod)


TO_NCHW, TO_NHWC = [0, 3, 1, 2], [0, 2, 3, 1]


def sink_transposes(mod):
    """Move each NCHW<->NHWC permute_dims below the layout-agnostic ops that read it (elementwise ops with
    constants, per-tensor or per-channel quantize/dequantize, pad, pooling, a keepdims mean) and cancel inverse pairs,
    so that the int8 convs' NHWC reaches from one conv to the next and transposes stay at the graph's edges."""
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    op = tvm.ir.Op.get
    PERMUTE, QUANT, DEQUANT, PAD, MEAN = (op(f"relax.{n}") for n in ("permute_dims", "quantize", "dequantize", "nn.pad", "mean"))
    UNARY = [op(f"relax.{n}") for n in ("nn.relu", "astype", "clip", "sigmoid", "tanh", "round", "negative", "abs")]
    BINARY = [op(f"relax.{n}") for n in ("add", "subtract", "multiply", "divide", "maximum", "minimum")]
    POOLS = {op("relax.nn.max_pool2d"): relax.op.nn.max_pool2d, op("relax.nn.avg_pool2d"): relax.op.nn.avg_pool2d}
    ADAPTIVE = op("relax.nn.adaptive_avg_pool2d")

    def is_op(call, ops):
        return isinstance(call, relax.Call) and any(call.op.same_as(o) for o in ops)

    @mutator
    class Sinker(PyExprMutator):
        def _perm(self, expr):
            """(the NCHW<->NHWC permute_dims' input, its axes) if expr is one, else None."""
            call = bound_value(self, expr)
            if is_op(call, [PERMUTE]) and call.attrs.axes is not None and [int(a) for a in call.attrs.axes] in (TO_NCHW, TO_NHWC):
                return call.args[0], [int(a) for a in call.attrs.axes]
            return None

        def visit_call_(self, call):
            call = self.builder_.normalize(super().visit_call_(call))
            if is_op(call, [PERMUTE]) and (inner := self._perm(call.args[0])) and (outer := self._perm(call)):
                x, p = inner
                axes = [p[q] for q in outer[1]]
                return x if axes == list(range(4)) else relax.op.permute_dims(x, axes)
            sunk = self._sink(call)
            if sunk is None:
                return call
            inner, p = sunk
            return relax.op.permute_dims(self.builder_.emit(inner), p)

        def _sink(self, call):
            """(the op on the un-permuted input, the permutation to apply after it), or None."""
            if is_op(call, UNARY + [QUANT, DEQUANT, PAD, MEAN, ADAPTIVE, *POOLS]) and (found := self._perm(call.args[0])):
                x, p = found
                a = call.attrs
                if is_op(call, UNARY):
                    return relax.Call(call.op, [x, *call.args[1:]], call.attrs), p
                if is_op(call, [QUANT, DEQUANT]):
                    fn = relax.op.quantize if call.op.same_as(QUANT) else relax.op.dequantize
                    return fn(x, call.args[1], call.args[2], p[int(a.axis) % 4], str(a.out_dtype)), p
                if is_op(call, [PAD]):
                    width = [int(v) for v in a.pad_width]
                    return relax.op.nn.pad(x, [v for i in range(4) for v in width[2 * p.index(i):2 * p.index(i) + 2]], str(a.pad_mode), float(a.pad_value)), p
                if is_op(call, [MEAN]):
                    if not a.keepdims or a.axis is None:
                        return None
                    return relax.op.mean(x, [p[int(i) % 4] for i in a.axis], True), p
                layouts = {"NCHW": (TO_NCHW, "NHWC"), "NHWC": (TO_NHWC, "NCHW")}  # the op's layout: (p, its layout after)
                if str(a.layout) != str(a.out_layout) or layouts.get(str(a.layout), (None,))[0] != p:
                    return None
                layout = layouts[str(a.layout)][1]
                if call.op.same_as(ADAPTIVE):
                    return relax.op.nn.adaptive_avg_pool2d(x, a.output_size, layout, layout), p
                return POOLS[call.op](x, a.pool_size, a.strides, a.padding, a.dilation, bool(a.ceil_mode), bool(a.count_include_pad), layout, layout), p
            if is_op(call, BINARY):
                perms = [self._perm(arg) for arg in call.args]
                axes = {tuple(found[1]) for found in perms if found}
                if len(axes) != 1:
                    return None
                p = list(axes.pop())
                args = []
                for arg, found in zip(call.args, perms):
                    if found:
                        args.append(found[0])
                        continue
                    value = _const(bound_value(self, arg))
                    if value is None or value.ndim > 4:
                        return None
                    if not value.ndim:
                        args.append(arg)
                        continue
                    value = np.transpose(value.reshape((1,) * (4 - value.ndim) + value.shape), np.argsort(p))  # rank 4, un-permuted
                    args.append(relax.const(np.ascontiguousarray(value)))
                return relax.Call(call.op, args, call.attrs), p
            return None

    rewritten = mutate_functions(Sinker(mod), mod)
    return relax.transform.DeadCodeElimination()(rewritten)


_INT8_PRODUCT = re.compile(r'T\.Cast\("int32", \w+\[[^\]]*\]\) \* T\.Cast\("int32", \w+\[')


def dot_kernels(lowered, cuda: bool = False) -> tuple[int, int]:
    """(kernels that call the int8 dot-product instruction, int8 kernels) in a lowered module. CUDA: the kernels on
    int8 tensor cores (wmma on int8 fragments), and those that multiply int8 operands into int32 sums without them."""
    if cuda:
        from tvm import tirx

        scripts = [f.script() for _, f in lowered.functions_items() if isinstance(f, tirx.PrimFunc)]
        used = sum("tvm_mma_sync" in t and '"int8"' in t for t in scripts)
        return used, used + sum("tvm_mma_sync" not in t and bool(_INT8_PRODUCT.search(t)) for t in scripts)
    names = [(str(g.name_hint), f) for g, f in lowered.functions_items() if "int8_packed" in str(g.name_hint)]
    # a kernel and its weight-packing function (SplitLayoutRewritePreproc's "_weight_prepack") share the name: count
    # the compute ones
    kernels = [(n, f) for n, f in names if not any(w in n for w in ("layout_rewrite", "preproc", "weight_prepack"))]
    return sum("vpdpbusd" in f.script() for _, f in kernels), len(kernels)


def describe(summary: Int8Summary, dot: tuple[int, int] | None = None) -> str:
    """The report's `int8 kernels` text."""
    floats = "; ".join(f"{k} x{n}" for k, n in sorted(summary.kept_float.items()))
    if summary.instruction is None:
        return ("no: the target has no int8 dot product (x86 avx512vnni/avxvnni, aarch64 dotprod, CUDA sm_72+), so Conv/MatMul/Gemm "
                "stay float32 on the dequantized tensors (QDQ simulated in float)" + (f"; {floats}" if floats else ""))
    both = f", {summary.activation_matmuls} of them of two activations" if summary.activation_matmuls else ""
    activations = "uint8 activations" if summary.instruction.startswith("vpdpbusd") else "int8 activations (uint8 ones shifted by -128)"
    text = (f"{summary.convs} Conv and {summary.matmuls} MatMul/Gemm{both} as int8 x int8 -> int32 ({activations}, int8 weights, "
            f"requantized by the QuantizeLinear after them)")
    if dot is not None:
        used, total = dot
        text += f"; {used} of {total} int8 kernels use {summary.instruction}" if total else f"; no kernel uses {summary.instruction}"
        if used < total:
            text += (" (the others do not fit its tiles)" if summary.instruction == CUDA_INT8
                     else " (the others have no tuned schedule with it: build with --tune)")
    if summary.pools:
        text += f"; {summary.pools} MaxPool on the quantized values"
    return text + (f"; kept in float: {floats}" if floats else "")


def apply(job) -> None:
    """The rewrite for a QDQ model on a TVM CPU target: job.relax_mod, job.int8 and the report's int8 kernels text."""
    from .tvm_build import make_target

    job.relax_mod, job.int8 = rewrite(job.relax_mod, make_target(job.target))
    if job.report.quantization is not None:
        job.report.quantization.int8_kernels = describe(job.int8)
