"""Self-attention as one CUDA kernel: out = softmax(Q K^T * scale + bias) V for every head, in place of the five to
seven kernels that Relax's default lowering launches for it (the Q and K head transposes, the score matmul with its
scale and mask, the softmax, the P x V matmul and the transpose back).

At batch 1 those kernels are small: BERT-base's per layer take 3.5-5 us each on the H200 (docs/benchmarks.md), and
torch.compile runs attention as one SDPA kernel. The rewrite (`fuse_attention`) finds the pattern in a Relax module
after ToMixedPrecision,

    permute_dims(matmul(softmax(matmul(permute_dims(q, [0,2,1,3]), permute_dims(k, [0,2,3,1])) * scale [+ bias]),
                        permute_dims(v, [0,2,1,3])), [0,2,1,3])

with q, k, v [batch, sequence, heads, head_dim] and casts anywhere along it, and replaces it with a call of
`attention_kernel`. The kernel reads q, k and v as [batch, sequence, columns] at a column offset: where they are the
three parts of a split of one tensor (merge-parallel-matmuls' Q/K/V projection), it reads that tensor, and the
split (a kernel per part) goes too.

One thread block per (batch, head, ROWS query rows), THREADS threads. The block stages its query rows (float32) and
the head's V (in its own dtype) in shared memory, 16 bytes per load; in the score phase each thread takes one key
against the block's rows (against a group of them, `row_split`, when there are fewer keys than threads) with that
key's K row in registers; THREADS / ROWS threads per row take the softmax's max and sum through shared partials;
each thread then sums P x V for one column of the output over a group of rows. Scores, softmax and sums are float32
(Relax's mixed-precision graph rounds the scores to float16 before the scale; this does not).

The kernel holds all of a head's keys at once (no online softmax): it is taken where its shared memory fits in the
48 KiB a kernel gets without opting in (`shared_bytes`), e.g. 128 keys with head_dim 64 (29.5 KiB in float16, 45.5
KiB in float32), and where head_dim divides the block's threads. Anything else keeps the default lowering.
`gpu=False` builds the same kernel with its thread loops serial and its buffers global, which runs on the CPU: each
phase is its own loop over the threads, so that running them one after another is what the barriers between them do
on the GPU (tests check the kernel that way against NumPy).

On the H200, BERT-base fp16 (batch 1, seq 128, CUDA graph): 0.73-0.81 ms against 0.96-1.01 ms on the default
kernels, alternating in each of four calls; the kernel takes 6.7-7.0 us per layer (docs/benchmarks.md).
"""
from __future__ import annotations

from dataclasses import dataclass

from .relax_util import mutate_functions

ROWS = 16  # query rows per thread block
THREADS = 128  # threads per block: at 16 rows, 8 threads per row in the softmax (256 was no faster on the H200)
SHARED_LIMIT = 48 * 1024  # a kernel's shared memory without cudaFuncSetAttribute
DTYPES = ("float16", "float32")


@dataclass(frozen=True)
class AttentionShape:
    batch: int
    q_len: int
    kv_len: int
    heads: int
    head_dim: int
    dtype: str  # of q, k and v
    out_dtype: str
    bias_shape: tuple[int, int, int, int]  # broadcast to [batch, heads, q_len, kv_len]: each dim 1 or full
    bias_dtype: str
    scale: float
    # q, k and v as the kernel reads them: [batch, sequence, columns], head n at columns offset + n * head_dim. One
    # tensor with three offsets where they are the three parts of one split (a merged Q/K/V projection's output).
    columns: tuple[int, int, int] | None = None  # None: heads * head_dim each
    offsets: tuple[int, int, int] = (0, 0, 0)

    @property
    def cols(self) -> tuple[int, int, int]:
        return self.columns or (self.heads * self.head_dim,) * 3

    @property
    def row_split(self) -> int:
        """Row groups of the score phase: THREADS over the keys rounded up to a warp, a power of two up to ROWS."""
        split = 1
        while split < ROWS and THREADS // (2 * split) >= -(-self.kv_len // 32) * 32:
            split *= 2
        return split

    @property
    def score_stride(self) -> int:
        """Row stride of the shared score tile: kv_len padded so that a row starts `parts` banks after the previous
        one (the softmax's `parts` threads per row, 32 / parts rows per warp, then hit 32 different banks)."""
        parts = THREADS // ROWS
        return self.kv_len + (parts - self.kv_len) % 32

    @property
    def shared_bytes(self) -> int:
        item = 2 if self.dtype == "float16" else 4
        parts = THREADS // ROWS
        return 4 * ROWS * self.head_dim + item * self.kv_len * self.head_dim + 4 * ROWS * self.score_stride + 4 * 2 * ROWS * parts

    def supported(self) -> str | None:
        """None, or why the kernel does not take this attention."""
        if self.dtype not in DTYPES or self.out_dtype not in DTYPES:
            return f"dtype {self.dtype} -> {self.out_dtype}"
        if any(o % 8 or c % 8 for o, c in zip(self.offsets, self.cols)):
            return f"q/k/v columns {self.cols} at offsets {self.offsets} (16-byte loads)"
        if self.head_dim % 8 or THREADS % self.head_dim or ROWS % (THREADS // self.head_dim):
            return f"head_dim {self.head_dim} (it must be a multiple of 8 that divides {THREADS})"
        if self.shared_bytes > SHARED_LIMIT:
            return f"{self.kv_len} keys of head_dim {self.head_dim}: {self.shared_bytes} bytes of shared memory"
        full = (self.batch, self.heads, self.q_len, self.kv_len)
        if any(b not in (1, f) for b, f in zip(self.bias_shape, full)):
            return f"bias shape {self.bias_shape} against scores {full}"
        return None


def attention_kernel(shape: AttentionShape, gpu: bool = True):
    """The PrimFunc fused_attention(q, k, v, bias, out) for shape: q, k, v [batch, sequence, columns] (shape.cols,
    head n at shape.offsets + n * head_dim), bias broadcast to the scores, out [batch, q_len, heads, head_dim]. See
    the module docstring. gpu=False: thread loops serial and buffers global, for running it on a CPU."""
    from tvm.script import tirx as T

    s = shape
    b_n, sq, sk, n_h, h = s.batch, s.q_len, s.kv_len, s.heads, s.head_dim
    dt, odt, bdt = s.dtype, s.out_dtype, s.bias_dtype
    nt, rows = THREADS, ROWS
    q_tiles = -(-sq // rows)
    parts = nt // rows  # softmax threads per row
    per_part = -(-sk // parts)  # scores per softmax thread
    # score phase: the threads split the rows when there are fewer keys than threads (split rows by row_split)
    row_split = s.row_split
    keys = nt // row_split  # keys in flight: one per thread of a row group
    split_rows = rows // row_split
    key_rounds = -(-sk // keys)  # keys per thread
    groups = nt // h  # P x V: thread groups, each with rows // groups rows and one column per thread
    group_rows = rows // groups
    stride = s.score_stride
    vec = 16 // (2 if dt == "float16" else 4)  # elements of one 16-byte load
    row_vecs = h // vec
    (cq, ck, cv), (oq, ok, ov) = s.cols, s.offsets
    scale = float(s.scale)
    # bias index multipliers: 0 on a broadcast dim
    b0, b1, b2, b3 = (int(d > 1) for d in s.bias_shape)
    shared, local = ("shared", "local") if gpu else ("global", "global")

    def loop(extent, thread):
        return T.thread_binding(extent, thread=thread) if gpu else T.serial(extent)

    @T.prim_func(s_tir=True)
    def fused_attention(q: T.Buffer((b_n, sq, cq), dt), k: T.Buffer((b_n, sk, ck), dt), v: T.Buffer((b_n, sk, cv), dt),
                  bias: T.Buffer(s.bias_shape, bdt), out: T.Buffer((b_n, sq, n_h, h), odt)):
        T.func_attr({"tirx.noalias": True})
        for bx in loop(b_n * n_h * q_tiles, "blockIdx.x"):
            with T.sblock("attention"):
                T.reads()
                T.writes()
                qs = T.sblock_alloc_buffer((rows, h), "float32", scope=shared)
                vs = T.sblock_alloc_buffer((sk, h), dt, scope=shared)
                ss = T.sblock_alloc_buffer((rows * stride,), "float32", scope=shared)  # flat: compaction keeps the padding
                part = T.sblock_alloc_buffer((2, rows, parts), "float32", scope=shared)  # row max, row sum partials
                kr = T.sblock_alloc_buffer((h,), "float32", scope=local)
                acc = T.sblock_alloc_buffer((rows,), "float32", scope=local)
                red = T.sblock_alloc_buffer((2,), "float32", scope=local)
                xr = T.sblock_alloc_buffer((per_part,), "float32", scope=local)
                qt: T.let[T.int32] = bx % q_tiles
                hn: T.let[T.int32] = bx // q_tiles % n_h
                bb: T.let[T.int32] = bx // (q_tiles * n_h)
                # stage the block's query rows (zeros past the sequence) and the head's V, 16 bytes per load, every
                # load of a thread issued before the first is waited for (unrolled)
                for tx in loop(nt, "threadIdx.x"):
                    for it in T.unroll(-(-rows * row_vecs // nt)):
                        if it * nt + tx < rows * row_vecs:
                            qi: T.let[T.int32] = qt * rows + (it * nt + tx) // row_vecs
                            if qi < sq:
                                for e in T.vectorized(vec):
                                    qs[(it * nt + tx) // row_vecs, (it * nt + tx) % row_vecs * vec + e] = T.cast(
                                        q[bb, qi, oq + hn * h + (it * nt + tx) % row_vecs * vec + e], "float32")
                            else:
                                for e in T.vectorized(vec):
                                    qs[(it * nt + tx) // row_vecs, (it * nt + tx) % row_vecs * vec + e] = T.float32(0)
                    for it in T.unroll(-(-sk * row_vecs // nt)):
                        if it * nt + tx < sk * row_vecs:
                            for e in T.vectorized(vec):
                                vs[(it * nt + tx) // row_vecs, (it * nt + tx) % row_vecs * vec + e] = v[
                                    bb, (it * nt + tx) // row_vecs, ov + hn * h + (it * nt + tx) % row_vecs * vec + e]
                # scores: thread tx takes key tx % keys (+ keys, ...) against split_rows rows of the block (a
                # contiguous group of them), its K row in registers
                for tx in loop(nt, "threadIdx.x"):
                    for kt in T.serial(key_rounds):
                        if kt * keys + tx % keys < sk:
                            for d in T.unroll(row_vecs):
                                for e in T.vectorized(vec):
                                    kr[d * vec + e] = T.cast(k[bb, kt * keys + tx % keys, ok + hn * h + d * vec + e], "float32")
                            for r in T.unroll(split_rows):
                                acc[r] = T.float32(0)
                            for d in T.unroll(h):
                                for r in T.unroll(split_rows):
                                    acc[r] = acc[r] + qs[tx // keys * split_rows + r, d] * kr[d]
                            for r in T.unroll(split_rows):
                                ss[(tx // keys * split_rows + r) * stride + kt * keys + tx % keys] = acc[r] * T.float32(scale) + T.cast(
                                    bias[bb * b0, hn * b1, T.min(qt * rows + tx // keys * split_rows + r, sq - 1) * b2, (kt * keys + tx % keys) * b3],
                                    "float32")
                # softmax: the row max from `parts` threads' partial maxima
                for tx in loop(nt, "threadIdx.x"):
                    red[0] = T.min_value("float32")
                    for e in T.unroll(per_part):
                        if e * parts + tx % parts < sk:
                            red[0] = T.max(red[0], ss[tx // parts * stride + e * parts + tx % parts])
                    part[0, tx // parts, tx % parts] = red[0]
                for tx in loop(nt, "threadIdx.x"):
                    red[0] = part[0, tx // parts, 0]
                    for p in T.unroll(1, parts):
                        red[0] = T.max(red[0], part[0, tx // parts, p])
                    red[1] = T.float32(0)
                    # read all, then write all: a write right after its read puts a barrier between the two
                    for e in T.unroll(per_part):
                        if e * parts + tx % parts < sk:
                            xr[e] = T.exp(ss[tx // parts * stride + e * parts + tx % parts] - red[0])
                            red[1] = red[1] + xr[e]
                    for e in T.unroll(per_part):
                        if e * parts + tx % parts < sk:
                            ss[tx // parts * stride + e * parts + tx % parts] = xr[e]
                    part[1, tx // parts, tx % parts] = red[1]
                # out = P V / row sum: thread tx takes column tx % h of rows (tx // h) * group_rows ...
                for tx in loop(nt, "threadIdx.x"):
                    for r in T.unroll(group_rows):
                        acc[r] = T.float32(0)
                    for j in T.serial(sk):
                        for r in T.unroll(group_rows):
                            acc[r] = acc[r] + ss[(tx // h * group_rows + r) * stride + j] * T.cast(vs[j, tx % h], "float32")
                    for r in T.unroll(group_rows):
                        if qt * rows + tx // h * group_rows + r < sq:
                            red[1] = T.float32(0)
                            for p in T.unroll(parts):
                                red[1] = red[1] + part[1, tx // h * group_rows + r, p]
                            out[bb, qt * rows + tx // h * group_rows + r, hn, tx % h] = T.cast(acc[r] / red[1], odt)

    return fused_attention.with_attr("tirx.is_scheduled", True)


def fuse_attention(mod, found: list | None = None, gpu: bool = True):
    """Replace every self-attention of the pattern in the module docstring whose shape the kernel takes with one
    call of attention_kernel. `found`, when given, gets (AttentionShape, why not or None) for each match. gpu=False:
    the kernels' CPU form (tests run the rewritten module on the CPU)."""
    import numpy as np
    import tvm
    from tvm import relax
    from tvm.ir.expr import Constant

    from .int8_kernels import bound_value

    ops = {name: tvm.ir.Op.get(f"relax.{name}") for name in ("permute_dims", "matmul", "astype", "nn.softmax", "multiply", "divide", "add",
                                                              "reshape", "split")}

    @relax.expr_functor.mutator
    class FuseAttention(relax.PyExprMutator):
        def bound(self, expr):
            """expr's bound value, through variables and astype."""
            expr = bound_value(self, expr)
            while self.is_call(expr, "astype"):
                expr = bound_value(self, expr.args[0])
            return expr

        def is_call(self, expr, name, nargs=None):
            return isinstance(expr, relax.Call) and expr.op == ops[name] and (nargs is None or len(expr.args) == nargs)

        def permuted(self, expr, axes):
            """x where expr is permute_dims(x, axes) (through casts; x [B, S, N, H]), else None."""
            e = self.bound(expr)
            if self.is_call(e, "permute_dims") and e.attrs.axes is not None and [int(a) for a in e.attrs.axes] == axes:
                return e.args[0]
            return None

        def columns(self, t, width):
            """(x [B, S, C], offset): where the kernel reads t [B, S, N, H] (width = N * H columns). A reshape of one
            part of a split along the last axis (the merged Q/K/V projection's output) is read from the split's
            input, so that the split, a kernel per part, goes; any other t through a reshape to [B, S, width]."""
            b, s = int(t.ty.shape[0]), int(t.ty.shape[1])
            bound = self.lookup_binding(t) if isinstance(t, relax.Var) else None
            if self.is_call(bound, "reshape") and [int(d) for d in bound.args[0].ty.shape] == [b, s, width]:
                x = bound.args[0]
                part = self.lookup_binding(x) if isinstance(x, relax.Var) else None
                if isinstance(part, relax.TupleGetItem):
                    tup = part.tuple_value
                    tup = self.lookup_binding(tup) if isinstance(tup, relax.Var) else tup
                    if self.is_call(tup, "split") and int(tup.attrs.axis) in (-1, 2):
                        src = tup.args[0]
                        total = int(src.ty.shape[-1])
                        cut = tup.attrs.indices_or_sections
                        starts = [i * total // int(cut) for i in range(int(cut))] if not hasattr(cut, "__len__") else [0] + [int(c) for c in cut]
                        return src, starts[int(part.index)]
                return x, 0
            return self.builder_.emit(relax.op.reshape(t, [b, s, width])), 0

        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not (self.is_call(call, "permute_dims") and call.attrs.axes is not None and [int(a) for a in call.attrs.axes] == [0, 2, 1, 3]):
                return call
            pv = self.bound(call.args[0])
            if not self.is_call(pv, "matmul", 2):
                return call
            v = self.permuted(pv.args[1], [0, 2, 1, 3])
            soft = self.bound(pv.args[0])
            if v is None or not self.is_call(soft, "nn.softmax") or int(soft.attrs.axis) not in (-1, 3):
                return call
            x, bias = self.bound(soft.args[0]), None
            if self.is_call(x, "add", 2):
                left, right = (self.bound(a) for a in x.args)
                score_side = 0 if self.is_call(left, "matmul", 2) or self.is_call(left, "multiply", 2) or self.is_call(left, "divide", 2) else 1
                bias, x = x.args[1 - score_side], (left, right)[score_side]
            scale = 1.0
            if self.is_call(x, "multiply", 2) or self.is_call(x, "divide", 2):
                c = self.bound(x.args[1])  # a scalar constant, maybe cast
                c = c.value.numpy().reshape(-1) if isinstance(c, Constant) else None
                if c is None or c.size != 1 or c[0] == 0:
                    return call
                scale = float(c[0]) if self.is_call(x, "multiply") else 1.0 / float(c[0])
                x = self.bound(x.args[0])
            if not self.is_call(x, "matmul", 2):
                return call
            q, k = self.permuted(x.args[0], [0, 2, 1, 3]), self.permuted(x.args[1], [0, 2, 3, 1])
            if q is None or k is None:
                return call
            try:
                (b, sq, n, h), (_, sk, _, _) = ([int(d) for d in t.ty.shape] for t in (q, k))
                bias_shape = [int(d) for d in bias.ty.shape] if bias is not None else [1, 1, 1, 1]
            except (AttributeError, TypeError):  # dynamic shapes
                return call
            # the kernel takes q, k and v in the dtype the matmuls took (ToMixedPrecision's float16). They are cast
            # on their [B, S, C] source, a cast FuseOps puts into the kernel producing it, which then writes half
            # the bytes (the split-K sum of the Q/K/V projection writes float32).
            dtype = {str(t.ty.dtype) for t in (x.args[0], x.args[1], pv.args[1])}
            if len(bias_shape) > 4 or any([int(d) for d in t.ty.shape] != [b, sk, n, h] for t in (k, v)) or len(dtype) != 1:
                return call
            dtype = dtype.pop()
            bias_shape = [1] * (4 - len(bias_shape)) + bias_shape
            (q, oq), (k, ok), (v, ov) = (self.columns(t, n * h) for t in (q, k, v))
            cast = {}
            for t in (q, k, v):
                if t not in cast:
                    cast[t] = t if str(t.ty.dtype) == dtype else self.builder_.emit(relax.op.astype(t, dtype))
            q, k, v = cast[q], cast[k], cast[v]
            shape = AttentionShape(b, sq, sk, n, h, dtype, str(call.ty.dtype), tuple(bias_shape),
                                   str(bias.ty.dtype) if bias is not None else "float32", scale,
                                   tuple(int(t.ty.shape[-1]) for t in (q, k, v)), (oq, ok, ov))
            why = shape.supported()
            if found is not None:
                found.append((shape, why))
            if why is not None:
                return call
            if bias is None:
                bias = relax.const(np.zeros((1, 1, 1, 1), "float32"))
            elif len(bias.ty.shape) != 4:
                bias = self.builder_.emit(relax.op.reshape(bias, bias_shape))
            kernel = self.builder_.add_func(attention_kernel(shape, gpu), "fused_attention")
            return relax.call_tir(kernel, relax.Tuple([q, k, v, bias]), relax.TensorType((b, sq, n, h), shape.out_dtype))

    rewritten = mutate_functions(FuseAttention(mod), mod)
    # the replaced ops, and the reshapes and casts emitted for a match the kernel then did not take
    return relax.transform.DeadCodeElimination()(rewritten)


def describe(found: list) -> str:
    """The report's line on fuse_attention's matches: (AttentionShape, why not or None) each."""
    fused = [shape for shape, why in found if why is None]
    text = f"{len(fused)} self-attention(s) as one kernel each" if fused else "no self-attention fused"
    if fused:
        s = fused[0]
        text += f" ({s.heads} heads x {s.q_len} x {s.kv_len}, head_dim {s.head_dim}, {s.dtype})"
    reasons = sorted({why for _, why in found if why is not None})
    return text + (f"; {len(found) - len(fused)} left to the default kernels: {', '.join(reasons)}" if reasons else "")
