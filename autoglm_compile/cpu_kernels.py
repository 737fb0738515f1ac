"""Hand-scheduled float32 kernels for CPU (llvm) targets: convolutions (depthwise too), transposed convolutions
whose stride is their kernel, matmuls with constant weights and attention's matmuls of two activations.

Without tuning, TVM's CPU pipeline gives every kernel its naive loop nest; with it, MetaSchedule needs thousands of
trials and still ran BERT-base's dense layers at 47-117 GFLOP/s on this project's 2-core AVX-512 host (ONNX
Runtime's MLAS: about 175). These kernels are the register-blocked micro-kernel that BLAS libraries use, written as
a TVM schedule:

- the weight is packed once, at build time, into blocks of LANES output channels (`[N/L, K, L]` for a matmul,
  `[O/L, KH, KW, I, L]` for an NHWC convolution), so the inner loop reads it as contiguous vectors;
- each thread keeps a tile of ROWS x (BLOCKS * LANES) outputs in vector registers (8 x 32 with AVX-512: 16 of its
  32 registers) and, for each k, broadcasts one input value per row and issues BLOCKS fused multiply-adds per row;
- the tiles are spread over the cores, weight block by weight block, so that a block stays in the L2 cache while
  every row tile uses it;
- the elementwise ops that TVM fuses after the kernel (bias, residual add, ReLU, GELU...) run on the tile as it
  leaves the registers.

Output channels that 16 lanes do not divide take 8- or 4-lane blocks, or are padded with zero weights to whole blocks
and sliced after the kernel. A depthwise conv reads its NHWC input as vectors along the channels (no packing); a
transposed conv with stride = kernel is a matmul of each pixel with the weight and a depth-to-space. A 3x3 stride-1
conv is a Winograd convolution (`schedule.winograd`, `winograd_tile`): an input transform, its products as a batched
matmul on the packed (transformed) weight, and an output transform with the fused ops, both transforms unrolled so
that their matrices fold to constants. Kernels without a reduction (transposes, pads, elementwise chains) get
`schedule_elementwise` (layout transposes tiled, `_tile_transpose`); softmax and layer norm
`schedule_row_reductions` (vector partial sums), channels-last pools `schedule_pool`, else DLight's CPU rule
(`schedule_passes`).

`rewrite` puts the convolutions into NHWC (with `int8_kernels.sink_transposes`, so that a chain of convs stays NHWC)
and replaces the ops with these kernels; `schedule_pass` schedules them after fusion and marks them scheduled, so
that tuning leaves them alone. Measured in docs/benchmarks.md ("Host: hand-scheduled fp32 kernels")."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .int8_kernels import _const, bound_value, sink_transposes
from .relax_util import mutate_functions

DENSE, CONV, DEPTHWISE = "dense_f32_packed", "conv2d_nhwc_f32_packed", "depthwise_nhwc_f32"  # the kernels' main blocks (and PrimFunc name hints)
WINO_IN, WINO_OUT = "winograd_input_f32", "winograd_output_f32"  # a Winograd 3x3 conv's transforms (its products: a DENSE)
INT8_BLOCKS = ("dense_int8", "batch_matmul_int8", "conv2d_nhwc_int8")  # int8_kernels' packed computes (AVX512-VNNI)
MATMUL_BLOCKS = (DENSE, "dense_int8", "batch_matmul_int8")  # loops (*batch, i, j, k); the others (n, y, x, c, *reduce)
# float32 lanes of the widest vector unit an llvm target has, by LLVM feature; (rows, blocks) of the register tile
VECTOR_UNITS = [("avx512f", 16, (8, 2)), ("avx2", 8, (6, 2)), ("neon", 4, (8, 2))]
K_UNROLL = 4
WINOGRAD_MIN_CHANNELS = 16  # input channels (the K of its products) below which a 3x3 conv stays direct: the transforms would cost more than they save
AUTO_F4_TILES = 32  # schedule.winograd auto: F(4x4, 3x3) from this many output tiles (winograd_tile)
LANES_KEY = "autoglm_lanes"  # the main block's annotation: the width of its weight blocks (the vector width or a half or quarter of it)


@dataclass
class KernelSummary:
    """What `rewrite` did: the ops given hand-scheduled kernels, and those left to the default path, with why."""

    lanes: int | None
    convs: int = 0
    matmuls: int = 0
    attentions: int = 0  # relax.nn.attention ops written as two matmuls (counted in matmuls) and a softmax
    depthwise: int = 0  # of the convs
    conv_transposes: int = 0  # ConvTranspose with stride = kernel, as a matmul per pixel
    winograd: dict[int, int] = field(default_factory=dict)  # convs (3x3, stride 1) as Winograd F(m x m, 3 x 3), by m
    padded: int = 0  # convs and matmuls whose output channels (columns) were padded to whole vector blocks (and sliced after)
    narrow: int = 0  # kernels on half or quarter vectors: their output channels are not a multiple of the full width
    kept: dict[str, int] = field(default_factory=dict)

    def keep(self, op: str, reason: str) -> None:
        key = f"{op}: {reason}"
        self.kept[key] = self.kept.get(key, 0) + 1

    @property
    def kernels(self) -> int:
        return self.convs + self.conv_transposes + self.matmuls

    def describe(self) -> str:
        if self.lanes is None:
            return "no hand-scheduled fp32 kernels: the target has no vector unit they are written for (AVX-512, AVX2, NEON)"
        transposes = f", {self.conv_transposes} ConvTranspose" if self.conv_transposes else ""
        text = f"{self.convs} Conv{transposes} and {self.matmuls} MatMul/Gemm with hand-scheduled fp32 kernels ({self.lanes}-lane vectors, weights packed at build time)"
        if self.depthwise:
            text += f"; {self.depthwise} of the convs depthwise"
        if self.winograd:
            text += f"; {sum(self.winograd.values())} of the convs (3x3, stride 1) as Winograd " + " and ".join(
                f"F({m}x{m}, 3x3) x{n}" for m, n in sorted(self.winograd.items(), reverse=True))
        if self.padded:
            text += f"; {self.padded} with their output channels padded to whole vector blocks"
        if self.narrow:
            text += f"; {self.narrow} of them on {self.lanes // 2}- or {self.lanes // 4}-lane blocks (their output channels)"
        if self.attentions:
            text += f"; {self.attentions} Attention as two of those matmuls and a softmax each"
        if self.kept:
            text += "; default path: " + ", ".join(f"{k} x{n}" for k, n in sorted(self.kept.items()))
        return text


def vector_unit(target) -> tuple[int, tuple[int, int]] | None:
    """(float32 lanes, (rows, blocks) of the register tile) for an llvm target, or None."""
    from tvm.target import codegen

    if target.kind.name != "llvm":
        return None
    features = set(codegen.llvm_get_cpu_features(target))
    triple = str(target.attrs.get("mtriple", "")) or codegen.llvm_get_system_triple()
    if triple.startswith("aarch64"):
        features.add("neon")
    return next(((lanes, tile) for feat, lanes, tile in VECTOR_UNITS if feat in features), None)


def _dense(a, wp):
    """float32 [..., M, N] = a [..., M, K] x the packed weight [*batch, N/L, K, L]; the weight's batch dims (a
    matmul of two activations, packed at run time) are a's dims before M."""
    from tvm import te

    lanes, nb = int(wp.shape[-1]), len(wp.shape) - 3
    k = te.reduce_axis((0, a.shape[-1]), "k")
    return te.compute((*a.shape[:-1], wp.shape[-3] * lanes), lambda *i: te.sum(
        a[(*i[:-1], k)] * wp[(*i[len(i) - 2 - nb:len(i) - 2], i[-1] // lanes, k, i[-1] % lanes)], axis=k), name=DENSE, attrs={LANES_KEY: lanes})


def _conv2d(x, wp, strides, dilation):
    """float32 NHWC = conv2d of x (NHWC, padded already) with the packed weight [O/L, KH, KW, I, L]."""
    from tvm import te

    n, h, w, _ = x.shape
    o_blocks, kh, kw, ci, lanes = (int(d) for d in wp.shape)
    (sh, sw), (dh, dw) = strides, dilation
    oh, ow = (h - (kh - 1) * dh - 1) // sh + 1, (w - (kw - 1) * dw - 1) // sw + 1
    rh, rw, rc = te.reduce_axis((0, kh), "rh"), te.reduce_axis((0, kw), "rw"), te.reduce_axis((0, ci), "rc")
    return te.compute((n, oh, ow, o_blocks * lanes), lambda b, y, z, c: te.sum(
        x[b, y * sh + rh * dh, z * sw + rw * dw, rc] * wp[c // lanes, rh, rw, rc, c % lanes], axis=[rh, rw, rc]), name=CONV, attrs={LANES_KEY: lanes})


def _depthwise(x, wd, lanes, strides, dilation):
    """float32 NHWC = depthwise conv2d of x (NHWC, padded already) with the weight [KH, KW, C]."""
    from tvm import te

    n, h, w, c = x.shape
    kh, kw = int(wd.shape[0]), int(wd.shape[1])
    (sh, sw), (dh, dw) = strides, dilation
    oh, ow = (h - (kh - 1) * dh - 1) // sh + 1, (w - (kw - 1) * dw - 1) // sw + 1
    rh, rw = te.reduce_axis((0, kh), "rh"), te.reduce_axis((0, kw), "rw")
    return te.compute((n, oh, ow, c), lambda b, y, z, ch: te.sum(x[b, y * sh + rh * dh, z * sw + rw * dw, ch] * wd[rh, rw, ch], axis=[rh, rw]),
                      name=DEPTHWISE, attrs={LANES_KEY: lanes})


def winograd_matrices(m: int):
    """(A [alpha, m], B [alpha, alpha], G [alpha, 3]) of Winograd's F(m x m, 3 x 3), alpha = m + 2, from TVM's
    Cook-Toom construction: out = A^T [(G g G^T) * (B^T d B)] A for an alpha x alpha input tile d."""
    from tvm.topi.nn.winograd_util import _cook_toom_convolution, _interpolation_points

    return _cook_toom_convolution(_interpolation_points(m + 1), m, 3)


def _coef(matrix: np.ndarray, i, j):
    """matrix[i, j] at index expressions: a Select chain over its non-zero entries, which folds to a constant (and
    its product with a zero away) once the loops over i and j are unrolled."""
    from tvm import tirx

    value = tirx.const(0.0, "float32")
    for (a, b), v in np.ndenumerate(matrix):
        if v:
            value = tirx.Select(tirx.all(i == a, j == b), tirx.const(float(v), "float32"), value)
    return value


def _tiles(oh: int, ow: int, m: int) -> tuple[int, int]:
    return -(-oh // m), -(-ow // m)


def _winograd_input(x, m):
    """float32 [alpha * alpha, N * tiles, C] = B^T d B of each alpha x alpha tile d of x (NHWC, padded already, to
    whole tiles too), the tiles m apart."""
    from tvm import te

    n, h, w, c = (int(d) for d in x.shape)
    alpha = m + 2
    th, tw = (h - 2) // m, (w - 2) // m
    _, b_mat, _ = winograd_matrices(m)
    r1, r2 = te.reduce_axis((0, alpha), "r1"), te.reduce_axis((0, alpha), "r2")
    return te.compute((alpha * alpha, n * th * tw, c), lambda e, p, ch: te.sum(
        _coef(b_mat, r1, e // alpha) * _coef(b_mat, r2, e % alpha) * x[p // (th * tw), p % (th * tw) // tw * m + r1, p % tw * m + r2, ch],
        axis=[r1, r2]), name=WINO_IN)


def _winograd_output(mm, m, shape):
    """float32 NHWC `shape` = A^T M A of each tile's products M ([alpha * alpha, N * tiles, O], from _dense)."""
    from tvm import te

    n, oh, ow, o = shape
    alpha = m + 2
    th, tw = _tiles(oh, ow, m)
    a_mat, _, _ = winograd_matrices(m)
    ra, rb = te.reduce_axis((0, alpha), "ra"), te.reduce_axis((0, alpha), "rb")
    return te.compute(shape, lambda b, y, z, k: te.sum(
        _coef(a_mat, ra, y % m) * _coef(a_mat, rb, z % m) * mm[ra * alpha + rb, b * th * tw + y // m * tw + z // m, k], axis=[ra, rb]),
        name=WINO_OUT)


def winograd_weight(w: np.ndarray, m: int, lanes: int) -> np.ndarray:
    """The 3x3 weight [O, I, 3, 3] as G g G^T for every (o, i), packed for _dense: [alpha * alpha, O/L, I, L]."""
    _, _, g = winograd_matrices(m)
    o, i = w.shape[:2]
    u = np.einsum("ak,oikl,bl->abio", g, w.astype(np.float64), g).reshape(-1, i, o // lanes, lanes)
    return np.ascontiguousarray(u.transpose(0, 2, 1, 3).astype(np.float32))


def winograd_tile(setting: int | str, oh: int, ow: int) -> int:
    """The Winograd output tile m of a 3x3 stride-1 conv with an oh x ow output, for the setting schedule.winograd (0,
    2, 4 or "auto"). auto: F(4x4, 3x3) (4x fewer multiplies, 4x the weight) where it makes products of at least
    AUTO_F4_TILES tiles, else F(2x2, 3x3) (2.25x fewer, 1.8x the weight): with fewer rows, the products read more weight
    than they compute (ResNet-50's 14x14 and 7x7 convs gain little or nothing from F(4x4, 3x3) here)."""
    if setting != "auto":
        return int(setting)
    return 4 if _tiles(oh, ow, 4)[0] * _tiles(oh, ow, 4)[1] >= AUTO_F4_TILES else 2


def rewrite(mod, target, winograd: int | str = 0):
    """(mod with its float32 convs (NCHW; ungrouped or depthwise), stride = kernel ConvTransposes, matmuls on constant
    weights, matmuls of two activations and relax attention ops as the kernels of this module, KernelSummary). Targets
    without a vector unit in VECTOR_UNITS get the module back as it is."""
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    unit = vector_unit(target)
    summary = KernelSummary(unit[0] if unit else None)
    if unit is None:
        return mod, summary
    widest = unit[0]

    def lanes_for(n: int) -> int | None:
        """The widest vector, half or quarter vector (at least 4 lanes) whose width divides n output channels."""
        return next((w for w in (widest, widest // 2, widest // 4) if w >= 4 and n % w == 0), None)
    op = tvm.ir.Op.get
    CONV2D, MATMUL, PERMUTE = op("relax.nn.conv2d"), op("relax.matmul"), op("relax.permute_dims")
    ATTENTION, GELU = (op("relax.nn.attention"), op("relax.nn.attention_bias")), op("relax.nn.gelu")
    CONV_TRANSPOSE = op("relax.nn.conv2d_transpose")

    def constant_weight(mutator_, expr):
        call = bound_value(mutator_, expr)
        axes = "none"
        if isinstance(call, relax.Call) and call.op.same_as(PERMUTE):
            axes = None if call.attrs.axes is None else [int(a) for a in call.attrs.axes]
            call = bound_value(mutator_, call.args[0])
        w = _const(call)
        if w is None or w.dtype != np.float32:
            return None
        return w if axes == "none" else np.transpose(w, axes)

    @mutator
    class Rewriter(PyExprMutator):
        def visit_call_(self, call):
            call = self.builder_.normalize(super().visit_call_(call))
            if call.op.same_as(CONV2D):
                return self._conv(call)
            if call.op.same_as(MATMUL):
                return self._matmul(call)
            if call.op.same_as(CONV_TRANSPOSE) and str(call.ty.dtype) == "float32":
                return self._conv_transpose(call)
            if any(call.op.same_as(o) for o in ATTENTION) and str(call.ty.dtype) == "float32":
                return self._attention(call)
            if call.op.same_as(GELU) and str(call.ty.dtype) == "float32":
                # as its erf formula, which FastMathTransform makes vectorizable (topi's gelu calls libm's erff)
                x = call.args[0]
                half = relax.const(0.5, "float32")
                return relax.op.multiply(relax.op.multiply(x, half), relax.op.add(relax.const(1.0, "float32"),
                                                                                 relax.op.erf(relax.op.multiply(x, relax.const(2 ** -0.5, "float32")))))
            return call

        def _conv_transpose(self, call):
            """A transposed conv whose stride is its kernel (an upsampling head: DB's 2x2, stride 2), as a matmul of
            each input pixel with the weight [I, KH*KW*O] and a depth-to-space; other ones keep the default path."""
            a = call.attrs
            w = constant_weight(self, call.args[1])
            x = call.args[0]
            if w is None or a.data_layout != "NCHW" or a.kernel_layout != "IOHW" or str(a.out_layout) != "NCHW" or int(a.groups) != 1:
                summary.keep("ConvTranspose", "not NCHW with a constant IOHW weight, ungrouped")
                return call
            i, o, kh, kw = w.shape
            if [int(v) for v in a.strides] != [kh, kw] or any(int(v) for v in (*a.padding, *a.output_padding)) or any(int(v) != 1 for v in a.dilation):
                summary.keep("ConvTranspose", "its stride is not its kernel, or it pads")
                return call
            if any(not isinstance(d, tvm.tirx.IntImm) for d in x.ty.shape):
                summary.keep("ConvTranspose", "dynamic shape")
                return call
            n_, _, h, wd = (int(d) for d in x.ty.shape)
            cols = kh * kw * o
            lanes = lanes_for(cols)
            if lanes is None:
                summary.keep("ConvTranspose", f"{cols} output values per pixel, not a multiple of 4")
                return call
            w2 = w.transpose(0, 2, 3, 1).reshape(i, cols)  # columns (dy, dx, o)
            wp = np.ascontiguousarray(w2.reshape(i, cols // lanes, lanes).transpose(1, 0, 2))
            pixels = self.builder_.emit(relax.op.permute_dims(x, [0, 2, 3, 1]))
            y = self.builder_.emit(self.builder_.call_te(_dense, pixels, relax.const(wp), primfunc_name_hint=DENSE))
            y = relax.op.permute_dims(relax.op.reshape(y, [n_, h, wd, kh, kw, o]), [0, 5, 1, 3, 2, 4])
            summary.conv_transposes += 1
            summary.narrow += lanes < widest
            return relax.op.reshape(self.builder_.emit(y), [n_, o, h * kh, wd * kw])

        def _attention(self, call):
            """relax.nn.attention (O3's fuse-attention: Q, K, V [B, S, N, H], an optional bias) as its two matmuls
            and a softmax, which these kernels run; TVM's own attention kernel is a plain loop nest on CPUs."""
            a = call.attrs
            if a.causal_mask is not None or a.window_size is not None:
                summary.keep("Attention", "causal or windowed")
                return call
            q, k, v = call.args[:3]
            head = int(q.ty.shape[-1])
            scale = float(a.scale) if a.scale is not None else head ** -0.5
            emit = self.builder_.emit
            qt = emit(relax.op.permute_dims(q, [0, 2, 1, 3]))
            kt = emit(relax.op.permute_dims(k, [0, 2, 3, 1]))
            vt = emit(relax.op.permute_dims(v, [0, 2, 1, 3]))
            scores = self._matmul(self.builder_.normalize(relax.op.matmul(qt, kt)))
            scores = relax.op.multiply(emit(scores), relax.const(scale, "float32"))
            if len(call.args) > 3:
                scores = relax.op.add(emit(scores), call.args[3])
            probs = emit(relax.op.nn.softmax(emit(scores), axis=-1))
            context = self._matmul(self.builder_.normalize(relax.op.matmul(probs, vt)))
            summary.attentions += 1
            return relax.op.permute_dims(emit(context), [0, 2, 1, 3])

        def _conv(self, call):
            a = call.attrs
            if str(call.ty.dtype) != "float32" or str(call.args[0].ty.dtype) != "float32":
                return call
            if a.data_layout != "NCHW" or a.kernel_layout != "OIHW" or str(a.out_layout) != "NCHW":
                summary.keep("Conv", f"layout {a.data_layout}/{a.kernel_layout}")
                return call
            w = constant_weight(self, call.args[1])
            groups = int(a.groups)
            depthwise = w is not None and groups > 1 and w.shape[1] == 1 and groups == w.shape[0] == int(call.args[0].ty.shape[1])
            if groups != 1 and not depthwise:
                summary.keep("Conv", "grouped (not depthwise)")
                return call
            if w is None:
                summary.keep("Conv", "its weight is not a constant")
                return call
            if any(not isinstance(d, tvm.tirx.IntImm) for d in call.args[0].ty.shape):
                summary.keep("Conv", "dynamic shape")
                return call
            lanes = lanes_for(w.shape[0])
            extra = 0
            if lanes is None:  # output channels padded with zero weights to whole 8- or 4-lane blocks, sliced off after
                lanes = max(4, widest // 2 if w.shape[0] > widest // 2 else widest // 4)
                extra = -w.shape[0] % lanes
                if depthwise:
                    summary.keep("Conv", f"depthwise with {w.shape[0]} channels, not a multiple of 4")
                    return call
            top, left, bottom, right = (int(p) for p in a.padding)
            x = relax.op.permute_dims(call.args[0], [0, 2, 3, 1])
            o, i, kh, kw = w.shape
            strides, dilation = [int(v) for v in a.strides], [int(v) for v in a.dilation]
            if winograd and not depthwise and not extra and (kh, kw) == (3, 3) and strides == dilation == [1, 1] and i >= WINOGRAD_MIN_CHANNELS:
                n_, _, h, wd = (int(d) for d in call.args[0].ty.shape)
                oh, ow = h + top + bottom - 2, wd + left + right - 2
                m = winograd_tile(winograd, oh, ow)
                th, tw = _tiles(oh, ow, m)  # the pad below and right also completes the last tiles
                x = relax.op.nn.pad(x, [0, 0, top, th * m + 2 - h - top, left, tw * m + 2 - wd - left, 0, 0], "constant", 0.0)
                emit = self.builder_.emit
                v = emit(self.builder_.call_te(_winograd_input, emit(x), m, primfunc_name_hint=WINO_IN))
                products = emit(self.builder_.call_te(_dense, v, relax.const(winograd_weight(w, m, lanes)), primfunc_name_hint=DENSE))
                out = self.builder_.call_te(_winograd_output, products, m, (n_, oh, ow, o), primfunc_name_hint=WINO_OUT)
                summary.convs += 1
                summary.winograd[m] = summary.winograd.get(m, 0) + 1
                return relax.op.permute_dims(out, [0, 3, 1, 2])
            if top or left or bottom or right:
                x = relax.op.nn.pad(x, [0, 0, top, bottom, left, right, 0, 0], "constant", 0.0)
            if depthwise:  # the weight [KH, KW, C]: channels contiguous, like the NHWC input
                wd = np.ascontiguousarray(w.reshape(o, kh, kw).transpose(1, 2, 0))
                out = self.builder_.call_te(_depthwise, self.builder_.emit(x), relax.const(wd), lanes, strides, dilation, primfunc_name_hint=DEPTHWISE)
                summary.depthwise += 1
            else:
                wp = np.pad(w, [(0, extra), (0, 0), (0, 0), (0, 0)]).reshape((o + extra) // lanes, lanes, i, kh, kw).transpose(0, 3, 4, 2, 1)
                out = self.builder_.call_te(_conv2d, self.builder_.emit(x), relax.const(np.ascontiguousarray(wp)), strides, dilation, primfunc_name_hint=CONV)
                if extra:
                    out = relax.op.strided_slice(self.builder_.emit(out), axes=[3], begin=[0], end=[o])
                    summary.padded += 1
            summary.convs += 1
            summary.narrow += lanes < widest
            return relax.op.permute_dims(out, [0, 3, 1, 2])

        def _matmul(self, call):
            if str(call.ty.dtype) != "float32" or str(call.args[0].ty.dtype) != "float32":
                return call
            w = constant_weight(self, call.args[1])
            if w is None:
                return self._activations(call)
            if w.ndim != 2:
                summary.keep("MatMul", f"its weight has {w.ndim} dims")
                return call
            k, n = w.shape
            if call.args[0].ty.ndim < 1 or any(not isinstance(d, tvm.tirx.IntImm) for d in call.args[0].ty.shape):
                summary.keep("MatMul", "dynamic shape")
                return call
            lanes, extra = lanes_for(n), 0
            if lanes is None:  # columns padded with zero weights to whole blocks (a CTC head's 6625 classes), sliced off after
                lanes = widest
                extra = -n % lanes
            wp = np.ascontiguousarray(np.pad(w, [(0, 0), (0, extra)]).reshape(k, (n + extra) // lanes, lanes).transpose(1, 0, 2))
            summary.matmuls += 1
            summary.narrow += lanes < widest
            out = self.builder_.call_te(_dense, call.args[0], relax.const(wp), primfunc_name_hint=DENSE)
            if extra:
                summary.padded += 1
                out = relax.op.strided_slice(self.builder_.emit(out), axes=[call.ty.ndim - 1], begin=[0], end=[n])
            return out

        def _activations(self, call):
            """A matmul of two activations (attention), B packed at run time: [..., K, N] -> [..., N/L, K, L]."""
            a, b = call.args
            shapes = [t.ty.shape for t in (a, b)]
            if any(d is None or not isinstance(d, tvm.tirx.IntImm) for s_ in shapes for d in s_):
                summary.keep("MatMul", "two activations, dynamic shape")
                return call
            (*batch, _m, k), (*batch_b, k_b, n) = ([int(d) for d in s_] for s_ in shapes)
            if batch != batch_b or k != k_b or not batch:
                summary.keep("MatMul", "two activations with unlike or broadcast batch dims")
                return call
            lanes = lanes_for(n)
            if lanes is None:
                summary.keep("MatMul", f"two activations, {n} output columns, not a multiple of 4")
                return call
            nb = len(batch)
            bp = relax.op.permute_dims(relax.op.reshape(b, [*batch, k, n // lanes, lanes]), [*range(nb), nb + 1, nb, nb + 2])
            summary.matmuls += 1
            summary.narrow += lanes < widest
            return self.builder_.call_te(_dense, a, self.builder_.emit(bp), primfunc_name_hint=DENSE)

    rewritten = mutate_functions(Rewriter(mod), mod)
    if not summary.kernels:
        return mod, summary
    return sink_transposes(relax.transform.FoldConstant()(relax.transform.DeadCodeElimination()(rewritten))), summary


def _largest_divisor(n: int, at_most: int) -> int:
    return next(d for d in range(min(at_most, n), 0, -1) if n % d == 0)


def register_tile(extent: int, n_blocks: int, rows: int, blocks: int) -> tuple[int, int]:
    """(rows, blocks) of the register tile for `extent` rows (a conv: output columns) and `n_blocks` vector blocks of
    outputs: exact divisors (no partial tiles), as many accumulators as the preferred tile has and no more (the
    registers), and among equals the rows nearest the preferred. E.g. AVX-512, (8, 2): 7 columns take (7, 2), 14
    take (7, 2), a sequence of 77 takes (7, 2)."""
    shapes = [(r, b) for r in range(1, 2 * rows + 1) if extent % r == 0 for b in range(1, 2 * blocks + 1)
              if n_blocks % b == 0 and r * b <= rows * blocks]
    return max(shapes, key=lambda rb: (rb[0] * rb[1], -abs(rb[0] - rows)))


def schedule_func(func, lanes: int, tile: tuple[int, int], int8: bool = False):
    """The PrimFunc with its DENSE, CONV or DEPTHWISE block register-blocked (see the module's docstring) and the
    blocks fused after it computed on each tile; None if it has none of them. int8: also int8_kernels' packed
    uint8 x int8 blocks (AVX512-VNNI), whose 16 x 4 inner loops become one vpdpbusd each."""
    import tvm
    from tvm.s_tir import Schedule

    sch = Schedule(func)
    names = _block_names(func)
    if WINO_IN in names:
        return _schedule_winograd_input(sch, lanes)
    if WINO_OUT in names:
        return _schedule_winograd_output(sch, lanes)
    name = next((n for n in (DENSE, CONV, DEPTHWISE, *(INT8_BLOCKS if int8 else ())) if n in names), None)
    if name is None:
        return None
    main = sch.get_sblock(name)
    rows, blocks = tile
    is_int8 = name in INT8_BLOCKS
    lanes = 16 if is_int8 else int(sch.get(main).annotations.get(LANES_KEY, lanes))
    # the write-back of the register tile ("global" for int8: the tensor intrinsic's buffers are; LLVM keeps a small
    # constant-size allocation in registers either way)
    out = sch.cache_write(main, 0, "global" if is_int8 else "local")
    # The elementwise ops fused after the kernel: first inlined into one another (a GELU's five ops become one; a
    # mask's logical_and and where into the add that reads them), then into the write-back, one after another.
    # Producers of the kernel's own inputs (a pad) stay as they are: inlined, they would put a branch in its inner loop.
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        if sch.get(block).name_hint in (name, sch.get(out).name_hint) or any(sch.get(c).name_hint == name for c in sch.get_consumers(block)):
            continue
        try:
            sch.compute_inline(block)
        except tvm.s_tir.ScheduleError:
            pass
    shape = _inline_epilogue(sch, out)
    loops = sch.get_loops(main)
    if name in MATMUL_BLOCKS:
        *outer, i, j, k = loops
        reduce = [k]
        extent = int(sch.get(i).extent)
    elif name == DEPTHWISE:
        n, y, x, j, rh, rw = loops
        outer, i, reduce = [n, y], x, [rh, rw]
        extent = int(sch.get(x).extent)
    else:
        n, y, x, j, rh, rw, rc = loops
        outer, i, reduce = [n, y], x, [rh, rw, rc]
        extent = int(sch.get(x).extent)
    n_out = int(sch.get(j).extent)
    rows, blocks = register_tile(extent, n_out // lanes, rows, blocks)
    io, ii = sch.split(i, [None, rows])
    jo, jb, jl = sch.split(j, [None, blocks, lanes])
    if is_int8:  # k in steps of 4: the 4 uint8 x int8 products each int32 lane of vpdpbusd sums, innermost
        ko, kr = sch.split(reduce[-1], [None, 4])
        reduce = [*reduce[:-1], ko]
        sch.reorder(jo, *outer, io, *reduce, ii, jb, jl, kr)
    else:
        ko, ki = sch.split(reduce[-1], [None, _largest_divisor(int(sch.get(reduce[-1]).extent), K_UNROLL)])
        reduce = [*reduce[:-1], ko, ki]
        sch.reorder(jo, *outer, io, *reduce, ii, jb, jl)
    sch.reverse_compute_at(out, io)
    # what is left after it (an op that reads the tile twice) also on each tile, while it reads only the tile's
    # buffers and the function's inputs; the rest stays after the kernel's loop nest, in order
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    produced = {w.source.name for blk in blocks for w in sch.get(blk).writes}
    on_tile, tile_buffers = [out], {w.source.name for w in sch.get(out).writes}
    for block in blocks[[sch.get(blk).name_hint for blk in blocks].index(sch.get(out).name_hint) + 1:]:
        if any(r.source.name in produced and r.source.name not in tile_buffers for r in sch.get(block).reads) \
                or [int(d) for d in sch.get(block).writes[0].source.shape] != shape:
            break
        try:
            sch.reverse_compute_at(block, io)
        except tvm.s_tir.ScheduleError:
            break
        on_tile.append(block)
        tile_buffers |= {w.source.name for w in sch.get(block).writes}
    tile_loop = sch.fuse(jo, *outer, io)
    sch.parallel(tile_loop)
    if not is_int8:
        sch.vectorize(jl)
        sch.unroll(reduce[-1])
    sch.unroll(ii)
    sch.unroll(jb)
    init = sch.decompose_reduction(main, reduce[0])
    sch.vectorize(sch.split(sch.get_loops(init)[-1], [None, lanes])[-1])
    if is_int8:
        sch.tensorize(sch.get_loops(sch.get_sblock(f"{name}_update"))[-2], _vnni_intrinsic())
    for block in on_tile:
        last = sch.get_loops(block)[-1]
        if int(sch.get(last).extent) % lanes == 0:
            sch.vectorize(sch.split(last, [None, lanes])[-1])
    # what stays after the kernel's loop nest (a slice of padded output channels and the ops after it), spread too
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    tail = blocks[[sch.get(b).name_hint for b in blocks].index(sch.get(on_tile[-1]).name_hint) + 1:]
    if tail and all(int(v.iter_type) == 0 for b in tail for v in sch.get(b).iter_vars):
        _spread(sch, tail, lanes)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def _inline_epilogue(sch, out) -> list[int]:
    """The elementwise consumers of the write-back block `out` inlined into it, one after another; the shape it
    writes. Only a consumer that writes a tensor of that shape: TVM inlines a slice too, and writes out of bounds."""
    import tvm

    shape = [int(d) for d in sch.get(out).writes[0].source.shape]
    while len(consumers := sch.get_consumers(out)) == 1 and [int(d) for d in sch.get(consumers[0]).writes[0].source.shape] == shape:
        try:
            sch.reverse_compute_inline(consumers[0])
        except tvm.s_tir.ScheduleError:
            break
    return shape


def _vector_width(extent: int, lanes: int) -> int:
    """The widest of a full, half or quarter vector that divides extent (1: none does)."""
    return next((w for w in (lanes, lanes // 2, lanes // 4) if w > 1 and extent % w == 0), 1)


def _inline_others(sch, name: str) -> None:
    """Every root block but `name` inlined into its consumers where TVM can (what FuseOps put before the kernel)."""
    import tvm

    for block in sch.get_child_blocks(sch.get_sblock("root")):
        if sch.get(block).name_hint != name:
            try:
                sch.compute_inline(block)
            except tvm.s_tir.ScheduleError:
                pass


def _schedule_winograd_input(sch, lanes: int):
    """WINO_IN: each (tile, channel vector) of the threads' share reads its alpha x alpha input vectors once and
    writes the alpha * alpha transformed ones, the transform matrix's loops unrolled (its zeros fold away)."""
    block = sch.get_sblock(WINO_IN)
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    if len(blocks) > 1:  # the pad (FuseOps puts it here), as a loop nest of its own: inlined, it would branch
        _spread(sch, blocks[:-1], lanes)
    e, p, c, r1, r2 = sch.get_loops(block)
    vec = _vector_width(int(sch.get(c).extent), lanes)
    co, ci = sch.split(c, [None, vec])
    sch.reorder(p, co, e, r1, r2, ci)
    sch.parallel(sch.fuse(p, co))
    sch.vectorize(ci)
    init = sch.decompose_reduction(block, r1)
    sch.vectorize(sch.get_loops(init)[-1])
    for loop in (e, r1, r2):
        sch.unroll(loop)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def _schedule_winograd_output(sch, lanes: int):
    """WINO_OUT (A^T M A, then the fused epilogue): each (tile, channel vector) computes its m x m output vectors
    in registers from the alpha * alpha products, the matrix's loops unrolled, and the epilogue on them."""
    _inline_others(sch, WINO_OUT)
    block = sch.get_sblock(WINO_OUT)
    out = sch.cache_write(block, 0, "local")
    _inline_epilogue(sch, out)
    b, y, z, k, ra, rb = sch.get_loops(block)
    m = int(sch.get(ra).extent) - 2
    vec = _vector_width(int(sch.get(k).extent), lanes)
    ty, iy = sch.split(y, [None, m])
    tz, iz = sch.split(z, [None, m])
    ko, ki = sch.split(k, [None, vec])
    sch.reorder(b, ty, tz, ko, iy, iz, ra, rb, ki)
    sch.reverse_compute_at(out, ko)
    sch.parallel(sch.fuse(b, ty, tz, ko))
    sch.vectorize(ki)
    init = sch.decompose_reduction(block, iy)
    sch.vectorize(sch.get_loops(init)[-1])
    for loop in (iy, iz, ra, rb):
        sch.unroll(loop)
    tail = sch.get_loops(out)
    if int(sch.get(tail[-1]).extent) % vec == 0:
        sch.vectorize(tail[-1])
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    rest = blocks[[sch.get(x).name_hint for x in blocks].index(sch.get(out).name_hint) + 1:]
    if rest and all(int(v.iter_type) == 0 for x in rest for v in sch.get(x).iter_vars):
        _spread(sch, rest, lanes)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def _vnni_intrinsic() -> str:
    """TVM's dot_16x4_vnni, re-registered with the operand types this LLVM's vpdpbusd.512 takes
    (tune_worker.fix_vnni_intrinsic)."""
    from tvm.s_tir.tensor_intrin.x86 import VNNI_DOT_16x4_INTRIN

    from .tune_worker import import_tensor_intrinsics

    import_tensor_intrinsics()
    return VNNI_DOT_16x4_INTRIN


def _block_names(func) -> set[str]:
    from tvm.s_tir.stmt import SBlock

    from .memory_fit import walk_stmts

    names: set[str] = set()
    walk_stmts(func.body, lambda s: names.add(s.name_hint) if isinstance(s, SBlock) else None)
    return names


def schedule_pass(target, int8: bool = False):
    """A module pass that schedules the PrimFuncs holding a DENSE, CONV or DEPTHWISE block (after FuseOps/FuseTIR);
    int8 (untuned builds): int8_kernels' packed blocks too, where the target has AVX512-VNNI."""
    import tvm
    from tvm.target import codegen

    unit = vector_unit(target)
    int8 = int8 and target.kind.name == "llvm" and "avx512vnni" in set(codegen.llvm_get_cpu_features(target))

    @tvm.transform.module_pass(opt_level=0, name="HandScheduledCPUKernels")
    def _pass(mod, _ctx):
        if unit is None:
            return mod
        for gvar, func in list(mod.functions_items()):
            if isinstance(func, tvm.tirx.PrimFunc) and not func.attrs.get("tirx.is_scheduled", False):
                scheduled = schedule_func(func.with_attr("global_symbol", "main"), *unit, int8=int8)
                if scheduled is not None:
                    attrs = {k: v for k, v in func.attrs.items()} if func.attrs else {}
                    mod[gvar] = scheduled.with_attr("global_symbol", attrs.get("global_symbol", gvar.name_hint))
        return mod

    return _pass


def _row_reductions_only(func) -> bool:
    """Whether every reduction in func runs over one tensor (softmax, layer norm: its variance also reads the row's
    mean; a pooling), not two (a conv or matmul left on the default path, whose loop nest DLight's CPU rule would
    not make faster): at most one of the tensors it reads is indexed by its reduction variables."""
    from tvm.s_tir.stmt import SBlock
    from tvm.tirx.analysis import undefined_vars

    from .memory_fit import walk_stmts

    ok = [True]

    def visit(stmt):
        if isinstance(stmt, SBlock) and any(int(v.iter_type) == 2 for v in stmt.iter_vars):  # 2: IterVar.CommReduce
            reduce = {v.var.name for v in stmt.iter_vars if int(v.iter_type) == 2}
            written = {w.source.name for w in stmt.writes}
            reduced = {r.source.name for r in stmt.reads if r.source.name not in written
                       and any(v.name in reduce for rng in r.region for v in undefined_vars(rng.min, []))}
            if len(reduced) > 1:
                ok[0] = False

    walk_stmts(func.body, visit)
    return ok[0]


def _spread(sch, blocks, lanes: int) -> None:
    """Root blocks that do not reduce: inlined into one another where TVM can; each left over with its outer loops
    fused and spread over the cores, and its innermost loop vectorized when its extent allows."""
    import tvm

    names = {sch.get(b).name_hint for b in blocks}
    for block in blocks[:-1]:
        try:
            sch.compute_inline(block)
        except tvm.s_tir.ScheduleError:
            pass
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        if sch.get(block).name_hint not in names:
            continue
        loops = sch.get_loops(block)
        if not loops or _tile_transpose(sch, block, lanes):
            continue
        inner = loops[-1]
        extent = int(sch.get(inner).extent)
        if len(loops) > 1:
            sch.parallel(sch.fuse(*loops[:-1]))
        elif extent > lanes:
            outer, inner = sch.split(inner, [None, lanes * 16])
            sch.parallel(outer)
            extent = int(sch.get(inner).extent)
        if extent % lanes == 0:
            sch.vectorize(sch.split(inner, [None, lanes])[-1])


def _tile_transpose(sch, block, lanes: int) -> bool:
    """A block that reads its largest input along another axis than it writes (a layout transpose, with what was
    inlined into it: a pad, a resize): both axes tiled by `lanes`, the tiles spread over the cores, and each tile
    read along the input's contiguous axis, as vectors where `lanes` divides it; whether it was. In plain loop
    order every read of an NCHW -> NHWC transpose misses the cache (160x160x96: 3.7 ms; tiled 0.65 ms)."""
    from tvm.tirx.analysis import undefined_vars

    stmt = sch.get(block)
    loops = sch.get_loops(block)
    iters = [v.var.name for v in stmt.iter_vars]
    if len(loops) != len(iters) or len(iters) < 2 or not stmt.reads:
        return False
    source = max(stmt.reads, key=lambda r: math.prod(int(getattr(rg.extent, "value", 1)) for rg in r.region))
    used = {v.name for v in undefined_vars(source.region[-1].min, [])} & set(iters)
    if len(used) != 1:
        return False
    axis = iters.index(used.pop())
    last = len(iters) - 1
    if axis == last or any(int(sch.get(loops[i]).extent) < lanes for i in (axis, last)):
        return False
    along = int(sch.get(loops[axis]).extent)
    ao, ai = sch.split(loops[axis], [None, lanes])  # (a tail tile where lanes does not divide: predicated, not vectorized)
    lo, li = sch.split(loops[last], [None, lanes])
    outer = [lp for i, lp in enumerate(loops) if i not in (axis, last)]
    sch.reorder(*outer, ao, lo, li, ai)
    sch.parallel(sch.fuse(*outer, ao, lo))
    if along % lanes == 0:
        sch.vectorize(ai)
    return True


def schedule_elementwise(func, lanes: int):
    """A PrimFunc without reductions (transposes, pads, resizes, elementwise chains: by default single-threaded
    scalar loop nests): its blocks inlined into one another where TVM can, each left over with its outer loops fused
    and spread over the cores, and its innermost loop vectorized when its extent allows; None if it reduces."""
    import tvm
    from tvm.s_tir import Schedule

    sch = Schedule(func)
    root = sch.get_sblock("root")
    blocks = sch.get_child_blocks(root)
    if not blocks or any(int(v.iter_type) != 0 for b in blocks for v in sch.get(b).iter_vars):  # 0: data parallel
        return None
    _spread(sch, blocks, lanes)
    return sch


def schedule_row_reductions(func, lanes: int):
    """A PrimFunc of row reductions over the last axis and the elementwise ops around them (softmax, layer norm): each
    reduction summed in `lanes` vector partial sums (rfactor) and then across them, every block computed row by row
    under one parallel loop, the elementwise blocks vectorized; None if func is not of that form. DLight's CPU rule
    does the rest of this but sums each row one scalar at a time: BERT-base's 25 layer norms took 6 ms of 116."""
    import tvm
    from tvm.s_tir import Schedule
    from tvm.s_tir.dlight.analysis import normalize_prim_func

    sch = Schedule(func)
    infos = normalize_prim_func(sch)
    if infos is None or len(infos) < 2 or infos[-1].is_reduction() or not any(i.is_reduction() for i in infos):
        return None
    kinds = [i.dom_kind() for i in infos]
    rows = min(len(k) - len(k.lstrip("S")) for k in kinds)
    if not rows or any(i.is_reduction() and i.dom_kind() != "S" * rows + "R" for i in infos) or any(not i.is_reduction() and not i.is_injective() for i in infos):
        return None
    names = [sch.get(i.block_rv).name_hint for i in infos]
    partials = []
    for info in infos:
        if not info.is_reduction():
            continue
        k = sch.get_loops(info.block_rv)[-1]
        extent = int(sch.get(k).extent)
        if extent % lanes or extent <= lanes:
            continue
        try:
            _, ki = sch.split(k, [None, lanes])
            partials.append(sch.rfactor(ki, factor_axis=rows))
        except tvm.s_tir.ScheduleError:
            return None
    last = sch.get_sblock(names[-1])
    loops = sch.get_loops(last)
    row = sch.fuse(*loops[:rows]) if rows > 1 else loops[0]
    sch.parallel(row)
    for block in reversed(sch.get_child_blocks(sch.get_sblock("root"))[:-1]):
        sch.compute_at(block, row)
    partial_names = {sch.get(b).name_hint for b in partials}
    for block in sch.get_child_blocks(row):
        name = sch.get(block).name_hint
        loops = sch.get_loops(block)
        at = next(i for i, lp in enumerate(loops) if sch.get(lp).same_as(sch.get(row)))
        inner = [lp for lp in loops[at + 1:] if int(sch.get(lp).extent) > 1]
        if name in partial_names:  # loops (lane, k outer): k outer first, the lanes vectorized inside it
            if len(inner) != 2:
                return None
            lane, ko = inner
            sch.reorder(ko, lane)
            sch.vectorize(lane)
            init = sch.decompose_reduction(block, ko)
            sch.vectorize(sch.get_loops(init)[-1])
        elif all(int(v.iter_type) == 0 for v in sch.get(block).iter_vars) and inner:
            extent = int(sch.get(inner[-1]).extent)
            if extent % lanes == 0:
                sch.vectorize(sch.split(inner[-1], [None, lanes])[-1])
    return sch


def schedule_pool(func, lanes: int):
    """A PrimFunc with one reduction over windows of a channels-last tensor (an NHWC max or average pool, its pad
    before it and the elementwise ops after it): the pad inlined, the outputs' channels vectorized (a full
    register: 64 uint8 or 16 float32 with AVX-512) with the window's loops outside them, the other loops fused and
    spread over the cores, the ops after it computed on each vector; None otherwise. DLight's CPU rule fuses every spatial loop, channels too, and
    reduces one scalar at a time (ResNet-50 int8's uint8 max pool: 1.2 ms)."""
    import tvm
    from tvm.s_tir import Schedule
    from tvm.tirx.analysis import undefined_vars

    sch = Schedule(func)
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    reducing = [b for b in blocks if any(int(v.iter_type) == 2 for v in sch.get(b).iter_vars)]
    if len(reducing) != 1:
        return None
    red = reducing[0]
    stmt = sch.get(red)
    reduce_vars = {v.var.name for v in stmt.iter_vars if int(v.iter_type) == 2}
    n_spatial = sum(int(v.iter_type) == 0 for v in stmt.iter_vars)
    if [int(v.iter_type) for v in stmt.iter_vars] != [0] * n_spatial + [2] * len(reduce_vars) or len(stmt.reads) == 0:
        return None
    if any(v.name in reduce_vars for r in stmt.reads for v in undefined_vars(r.region[-1].min, [])):
        return None  # the window runs along the last axis: not channels-last
    names = [sch.get(b).name_hint for b in blocks]
    for block in blocks[:names.index(stmt.name_hint)]:  # the pad
        try:
            sch.compute_inline(block)
        except tvm.s_tir.ScheduleError:
            pass
    red = sch.get_sblock(stmt.name_hint)
    loops = sch.get_loops(red)
    if len(loops) != len(stmt.iter_vars):
        return None
    spatial, reduce = loops[:n_spatial], loops[n_spatial:]
    bits = int(stmt.writes[0].source.dtype.bits)
    vec = _vector_width(int(sch.get(spatial[-1]).extent), lanes * 32 // bits)
    co, ci = sch.split(spatial[-1], [None, vec])
    sch.reorder(*spatial[:-1], co, *reduce, ci)
    outer = sch.fuse(*spatial[:-1], co)
    sch.parallel(outer)
    sch.vectorize(ci)
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    for block in blocks[[sch.get(b).name_hint for b in blocks].index(stmt.name_hint) + 1:]:  # the ops after it
        try:
            sch.reverse_compute_at(block, outer)
        except tvm.s_tir.ScheduleError:
            return None
        last = sch.get_loops(block)[-1]
        if int(sch.get(last).extent) == vec and vec > 1:
            sch.vectorize(last)
    init = sch.decompose_reduction(red, reduce[0])
    sch.vectorize(sch.get_loops(init)[-1])
    return sch


def schedule_passes(target) -> list:
    """The schedules of an untuned llvm build: the hand-scheduled kernels, then for the kernels that reduce rows of one
    tensor (softmax, layer norm) schedule_row_reductions, for channels-last pools schedule_pool, or else DLight's CPU
    rule (parallel rows, scalar sums), and schedule_elementwise for those that do not reduce; the rest (NCHW pools,
    convs on the default path) keeps TVM's default loop nests."""
    from tvm.s_tir import dlight as dl
    from tvm.s_tir.dlight.cpu.base import CPUScheduleRule

    unit = vector_unit(target)

    class RowReductions(dl.cpu.Reduction):
        def apply(self, func, target, tunable):
            if not _row_reductions_only(func):
                return None
            mine = (schedule_row_reductions(func, unit[0]) or schedule_pool(func, unit[0])) if unit else None
            return mine or super().apply(func, target, tunable)

    class Elementwise(CPUScheduleRule):
        def apply(self, func, target, tunable):
            return schedule_elementwise(func, unit[0]) if unit else None

    return [schedule_pass(target, int8=True), dl.ApplyDefaultSchedule(RowReductions(), Elementwise())]
