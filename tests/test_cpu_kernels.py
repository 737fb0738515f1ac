"""The hand-scheduled float32 CPU kernels (autoglm_compile/cpu_kernels.py): which ops get them, that their schedules
compute what the unscheduled loop nests compute, with the ops fused after them, and that builds with them match
ONNX Runtime on inputs other than the build's own."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from autoglm_compile import cpu_kernels
from autoglm_compile.pipeline import CompileOptions, compile_model
from autoglm_compile.target import resolve_target
from autoglm_compile.tvm_build import make_target
from conftest import make_model

tvm = pytest.importorskip("tvm")
ort = pytest.importorskip("onnxruntime")


def host_target():
    return make_target(resolve_target("host"))


def lanes() -> int:
    unit = cpu_kernels.vector_unit(host_target())
    if unit is None:
        pytest.skip("this CPU has none of AVX-512, AVX2 or NEON")
    return unit[0]


def const(rng, name, *shape, scale=0.2):
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def resnet_block(c: int = 32) -> onnx.ModelProto:
    """A strided 3x3 conv with padding, a 1x1 conv, a residual add and ReLUs, then a Gemm head (transB)."""
    rng = np.random.default_rng(1)
    inits = [const(rng, "w1", c, 16, 3, 3), const(rng, "b1", c), const(rng, "w2", c, c, 1, 1), const(rng, "b2", c),
             const(rng, "ws", c, 16, 1, 1), const(rng, "fc", 16, c)]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"]),
        helper.make_node("Conv", ["x", "ws"], ["s"], strides=[2, 2]),
        helper.make_node("Add", ["c2", "s"], ["a"]),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc"], ["y"], transB=1),
    ]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 14, 14])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])], inits)


def mobile_block(c: int = 32) -> onnx.ModelProto:
    """A conv, a strided depthwise conv with a HardSwish, a 1x1 conv with 18 channels (padded to whole vector blocks,
    sliced after), and a 2x2 stride-2 ConvTranspose with a Sigmoid (the PP-OCRv4 detector's head)."""
    rng = np.random.default_rng(5)
    inits = [const(rng, "w1", c, 8, 3, 3), const(rng, "dw", c, 1, 3, 3), const(rng, "db", c), const(rng, "w2", 18, c, 1, 1),
             const(rng, "wt", 18, 4, 2, 2), const(rng, "bt", 4)]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c1", "dw", "db"], ["d"], pads=[1, 1, 1, 1], strides=[2, 2], group=c),
        helper.make_node("HardSwish", ["d"], ["h"]),
        helper.make_node("Conv", ["h", "w2"], ["c2"]),
        helper.make_node("ConvTranspose", ["c2", "wt", "bt"], ["t"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Sigmoid", ["t"], ["y"]),
    ]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 20, 20])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 20, 20])], inits)


def attention_block(seq: int = 32, hidden: int = 64, heads: int = 2) -> onnx.ModelProto:
    """A projection with bias and an erf GELU, then one attention: scores with a padding mask, softmax, context."""
    rng = np.random.default_rng(2)
    d = hidden // heads
    inits = [const(rng, "wp", hidden, hidden), const(rng, "bp", hidden), const(rng, "wq", hidden, hidden), const(rng, "wk", hidden, hidden),
             const(rng, "wv", hidden, hidden),
             numpy_helper.from_array(np.array([1, seq, heads, d], np.int64), "split"),
             numpy_helper.from_array(np.array(1 / np.sqrt(2), np.float32), "rsqrt2"),
             numpy_helper.from_array(np.array(1, np.float32), "one"), numpy_helper.from_array(np.array(0.5, np.float32), "half"),
             numpy_helper.from_array(np.array(-1e4, np.float32), "neg"), numpy_helper.from_array(np.array(1 / np.sqrt(d), np.float32), "scale")]
    heads_of = lambda t: [helper.make_node("Reshape", [t, "split"], [t + "4"]), helper.make_node("Transpose", [t + "4"], [t + "h"], perm=[0, 2, 1, 3])]
    nodes = [
        helper.make_node("MatMul", ["x", "wp"], ["xp"]), helper.make_node("Add", ["xp", "bp"], ["h"]),
        helper.make_node("Mul", ["h", "rsqrt2"], ["hs"]), helper.make_node("Erf", ["hs"], ["e"]), helper.make_node("Add", ["e", "one"], ["e1"]),
        helper.make_node("Mul", ["h", "e1"], ["g0"]), helper.make_node("Mul", ["g0", "half"], ["g"]),
        helper.make_node("MatMul", ["g", "wq"], ["q"]), helper.make_node("MatMul", ["g", "wk"], ["k"]), helper.make_node("MatMul", ["g", "wv"], ["v"]),
        *heads_of("q"), *heads_of("k"), *heads_of("v"),
        helper.make_node("Transpose", ["kh"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["qh", "kt"], ["s0"]), helper.make_node("Mul", ["s0", "scale"], ["s1"]),
        helper.make_node("Sub", ["one", "mask"], ["m0"]), helper.make_node("Mul", ["m0", "neg"], ["m1"]),
        helper.make_node("Add", ["s1", "m1"], ["s2"]), helper.make_node("Softmax", ["s2"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "vh"], ["y"]),
    ]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, seq, hidden]),
                              helper.make_tensor_value_info("mask", TensorProto.FLOAT, [1, 1, 1, seq])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, heads, seq, d])], inits)


def winograd_block() -> onnx.ModelProto:
    """3x3 stride-1 convs on a 9x12 input (tiles of 2 and 4 do not divide it): one with bias and ReLU, one with a
    residual add, one without padding (7x10 out)."""
    rng = np.random.default_rng(7)
    inits = [const(rng, "wa", 32, 16, 3, 3), const(rng, "ba", 32), const(rng, "wb", 32, 32, 3, 3), const(rng, "wc", 16, 32, 3, 3), const(rng, "bc", 16)]
    nodes = [
        helper.make_node("Conv", ["x", "wa", "ba"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["ra"]),
        helper.make_node("Conv", ["ra", "wb"], ["b"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["b", "ra"], ["s"]),
        helper.make_node("Relu", ["s"], ["rs"]),
        helper.make_node("Conv", ["rs", "wc", "bc"], ["y"]),
    ]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 9, 12])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 7, 10])], inits)


WINOGRAD_PAIRS = 32 * 16 + 32 * 32 + 16 * 32  # winograd_block's (output, input) channel pairs: a 3x3 weight each


def build(tmp_path, model: onnx.ModelProto, target: str = "host", preset: str = "O2", schedule: str | None = None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    out = tmp_path / "out"
    config = None
    if schedule is not None:
        config = tmp_path / "config.yaml"
        config.write_text(f"extends: {preset}\nschedule: {schedule}\n")
    return path, out, compile_model(CompileOptions(source=str(path), target=target, output=out, runs=2, preset=preset, config_path=config))


def check_on_new_inputs(path, out, make, rtol=1e-4, atol=1e-4) -> None:
    import autoglm_compile

    model = autoglm_compile.load(out)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(123)
    for _ in range(3):
        feeds = {i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32) for i in make().graph.input}
        if "mask" in feeds:
            feeds["mask"] = (np.arange(feeds["mask"].size) < feeds["mask"].size * 3 // 4).astype(np.float32).reshape(feeds["mask"].shape)
        (got,), (want,) = model(feeds), sess.run(None, feeds)
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("make, preset, convs, matmuls, attentions", [
    (resnet_block, "O2", 3, 1, 0),
    (attention_block, "O2", 0, 6, 0),
    (mobile_block, "O2", 3, 0, 0),
])
def test_builds_with_the_kernels_match_onnxruntime_on_other_inputs(tmp_path, make, preset, convs, matmuls, attentions):
    """The build's own check runs on its seeded inputs; an out-of-bounds write (a slice once inlined into a
    kernel's write-back) passed it and failed on the next inputs, so these run the artifact on new ones."""
    import autoglm_compile

    lanes()
    path, out, report = build(tmp_path, make(), preset=preset)
    assert report.result == "ok" and report.accuracy.ok
    note = next(n for n in report.schedule if "hand-scheduled fp32 kernels" in n)
    transposes = ", 1 ConvTranspose" if make is mobile_block else ""
    assert note.startswith(f"{convs} Conv{transposes} and {matmuls} MatMul/Gemm with hand-scheduled fp32 kernels")
    assert (f"{attentions} Attention as two" in note) == bool(attentions)
    assert ("1 of the convs depthwise" in note) == (make is mobile_block)
    assert ("1 with their output channels padded" in note) == (make is mobile_block)
    assert "Winograd" not in note  # mobile_block's 3x3 stride-1 conv has 8 input channels: fewer than WINOGRAD_MIN_CHANNELS
    check_on_new_inputs(path, out, make)


@pytest.mark.parametrize("setting, tiles", [("2", "F(2x2, 3x3) x3"), ("4", "F(4x4, 3x3) x3"), ("auto", "F(2x2, 3x3) x3")])
def test_winograd_convs_match_onnxruntime_on_other_inputs(tmp_path, setting, tiles):
    """3x3 stride-1 convs as Winograd F(m x m, 3 x 3), with outputs that the tiles do not divide, padding on all sides
    or none, and a bias, a residual add and ReLUs fused after the output transform; the report counts the weights
    as built (the transformed weights: (m + 2)^2 / 9 times the conv's)."""
    lanes()
    path, out, report = build(tmp_path, winograd_block(), schedule=f"{{winograd: {setting}}}")
    assert report.result == "ok" and report.accuracy.ok
    note = next(n for n in report.schedule if "hand-scheduled fp32 kernels" in n)
    assert f"3 of the convs (3x3, stride 1) as Winograd {tiles}" in note
    check_on_new_inputs(path, out, winograd_block, atol=1e-4)
    _, _, direct = build(tmp_path / "direct", winograd_block(), schedule="{winograd: 0}")
    assert "Winograd" not in next(n for n in direct.schedule if "hand-scheduled fp32 kernels" in n)
    alpha = (2 if setting != "4" else 4) + 2
    assert report.memory.weight_bytes - direct.memory.weight_bytes == (alpha * alpha - 9) * WINOGRAD_PAIRS * 4


@pytest.mark.parametrize("setting, oh, ow, want", [(2, 56, 56, 2), (4, 7, 7, 4), (0, 56, 56, 0), ("auto", 56, 56, 4), ("auto", 28, 28, 4),
                                                   ("auto", 14, 14, 2), ("auto", 7, 7, 2), ("auto", 20, 28, 4), ("auto", 9, 12, 2)])
def test_winograd_tile_auto_takes_4x4_tiles_on_large_outputs(setting, oh, ow, want):
    assert cpu_kernels.winograd_tile(setting, oh, ow) == want


def test_winograd_setting_is_checked(tmp_path):
    from autoglm_compile.config import load_config
    from autoglm_compile.errors import InputError

    config = tmp_path / "config.yaml"
    config.write_text("extends: O2\nschedule: {winograd: 3}\n")
    with pytest.raises(InputError, match="schedule.winograd"):
        load_config(path=config)


def scheduled_against_plain(mod, target, names: set[str]) -> list[str]:
    """Every PrimFunc of the legalized mod with a block in names: scheduled (cpu_kernels.schedule_func) against the
    same PrimFunc unscheduled, on the same random buffers; the names of those checked."""
    from tvm.relax.backend.cpu_generic import pipeline as p

    with target:
        mod = tvm.transform.Sequential(p.library_dispatch_passes(target) + p.legalize_passes(target))(mod)
    rng = np.random.default_rng(0)
    checked = []
    for gvar, func in mod.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc) or not cpu_kernels._block_names(func) & names:
            continue
        plain = func.with_attr("global_symbol", "main")
        unit = cpu_kernels.vector_unit(target)
        scheduled = cpu_kernels.schedule_func(plain, unit[0], unit[1])
        assert scheduled.attrs["tirx.is_scheduled"]
        args = [rng.standard_normal([int(d) for d in b.shape]).astype(b.dtype) for b in plain.params]
        results = []
        for fn in (plain, scheduled):
            tensors = [tvm.runtime.tensor(a.copy()) for a in args]
            tvm.compile(tvm.IRModule({"main": fn}), target=target)(*tensors)
            results.append([t.numpy() for t in tensors])
        for got, want in zip(*results):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=gvar.name_hint)
        checked.append(gvar.name_hint)
    return checked


def test_the_scheduled_kernels_compute_what_their_loop_nests_compute():
    """Every fused kernel of the attention block: scheduled (the register tile, the GELU and the mask computed on
    it) against the same PrimFunc unscheduled."""
    from autoglm_compile.inputs import InputSpec
    from autoglm_compile.tvm_build import import_relax

    lanes()
    target = host_target()
    mod = import_relax(attention_block(), [InputSpec("x", (1, 32, 64), "float32"), InputSpec("mask", (1, 1, 1, 32), "float32")])
    mod, summary = cpu_kernels.rewrite(mod, target)
    assert summary.matmuls == 6
    checked = scheduled_against_plain(mod, target, {cpu_kernels.DENSE, cpu_kernels.CONV, cpu_kernels.DEPTHWISE})
    assert len(checked) == 4  # the projection with its GELU; q, k and v (one PrimFunc); the scores with the mask; the context


@pytest.mark.parametrize("m", [2, 4])
def test_the_scheduled_winograd_transforms_compute_what_their_loop_nests_compute(m):
    """The input transforms (with the pad before them) and the output transforms (with the bias, residual add and
    ReLU fused after them) of winograd_block, scheduled, against their loop nests."""
    from autoglm_compile.inputs import InputSpec
    from autoglm_compile.tvm_build import import_relax

    lanes()
    target = host_target()
    mod, summary = cpu_kernels.rewrite(import_relax(winograd_block(), [InputSpec("x", (1, 16, 9, 12), "float32")]), target, winograd=m)
    assert summary.winograd == {m: 3}
    from tvm import relax

    mod = tvm.transform.Sequential([relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(), relax.transform.FuseOps(),
                                    relax.transform.FuseTIR()])(mod)
    checked = scheduled_against_plain(mod, target, {cpu_kernels.WINO_IN, cpu_kernels.WINO_OUT})
    assert len(checked) == 6, checked
    assert sum("add" in n and "relu" in n for n in checked) >= 1, checked  # an epilogue fused after an output transform


@pytest.mark.parametrize("with_bias", [True, False])
def test_relax_attention_is_written_as_the_kernels_matmuls(with_bias):
    """relax.nn.attention (O3's fuse-attention; TVM's own kernel for it is a plain loop nest on CPUs): two matmuls
    and a softmax, and the same result."""
    from tvm import relax

    from autoglm_compile.tvm_build import ScheduleContext, build, lower

    width = lanes()
    b, s, n, h = 1, 2 * width, 2, width
    bb = relax.BlockBuilder()
    q, k, v = (relax.Var(name, relax.TensorType((b, s, n, h), "float32")) for name in "qkv")
    bias = relax.Var("bias", relax.TensorType((b, n, s, s), "float32"))
    params = [q, k, v, bias] if with_bias else [q, k, v]
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(relax.op.nn.attention(q, k, v, bias if with_bias else None, scale=0.3))
        bb.emit_func_output(out)
    desc = resolve_target("host")
    context = ScheduleContext(desc=desc, cpu_kernels=True)
    lowered, target = lower(bb.get(), desc, "default", context)
    assert any(n.startswith("0 Conv and 2 MatMul/Gemm") and "1 Attention as two" in n for n in context.notes), context.notes
    rng = np.random.default_rng(4)
    arrays = [rng.standard_normal([int(d) for d in p.ty.shape]).astype(np.float32) for p in params]
    vm = relax.VirtualMachine(build(lowered, target).executable, tvm.cpu())
    got = vm["main"](*[tvm.runtime.tensor(a) for a in arrays]).numpy()
    qt, kt, vt = (a.transpose(0, 2, 1, 3) for a in arrays[:3])
    scores = qt @ kt.transpose(0, 1, 3, 2) * 0.3 + (arrays[3] if with_bias else 0)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    want = ((probs / probs.sum(-1, keepdims=True)) @ vt).transpose(0, 2, 1, 3)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_a_slice_after_the_kernel_is_not_inlined_into_its_write_back():
    """TVM's reverse_compute_inline accepts a consumer that reads part of the tile, and the write-back then writes
    the whole tile into the smaller output (heap corruption, seen once): only consumers of the tile's shape are
    inlined; the slice runs after the kernel, and its result is right."""
    from tvm import te

    width = lanes()
    a = te.placeholder((16, 32), name="a")
    wp = te.placeholder((1, 32, width), name="wp")
    dense = cpu_kernels._dense(a, wp)
    part = te.compute((16, width // 2), lambda i, j: dense[i, j] + 1.0, name="part")
    scheduled = cpu_kernels.schedule_func(te.create_prim_func([a, wp, part]), width, (8, 2))
    assert "part" in cpu_kernels._block_names(scheduled)
    lib = tvm.compile(tvm.IRModule({"main": scheduled}), target=host_target())
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((16, 32)).astype(np.float32), rng.standard_normal((32, width)).astype(np.float32)
    out = tvm.runtime.tensor(np.zeros((16, width // 2), np.float32))
    lib(tvm.runtime.tensor(x), tvm.runtime.tensor(w.reshape(1, 32, width)), out)
    np.testing.assert_allclose(out.numpy(), (x @ w)[:, :width // 2] + 1.0, rtol=1e-5, atol=1e-5)


def test_what_stays_on_the_default_path_and_why():
    """A depthwise conv gets its own kernel; output channels that no vector block divides are padded to whole blocks
    (and sliced after); a grouped conv that is not depthwise keeps the default path, and the summary says why."""
    from autoglm_compile.inputs import InputSpec
    from autoglm_compile.tvm_build import import_relax

    width = lanes()
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["c", "dw"], ["d"], pads=[1, 1, 1, 1], group=width),
             helper.make_node("Conv", ["d", "odd"], ["y"]),
             helper.make_node("Conv", ["x", "g"], ["z"], group=2)]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 6, 6])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, width + 1, 6, 6]),
                        helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, width, 6, 6])],
                       [const(rng, "w", width, 8, 3, 3), const(rng, "dw", width, 1, 3, 3), const(rng, "odd", width + 1, width, 1, 1),
                        const(rng, "g", width, 4, 1, 1)])
    _, summary = cpu_kernels.rewrite(import_relax(model, [InputSpec("x", (1, 8, 6, 6), "float32")]), host_target())
    assert (summary.convs, summary.depthwise, summary.padded) == (3, 1, 1)
    assert summary.kept == {"Conv: grouped (not depthwise)": 1}


def test_no_kernels_without_a_vector_unit_they_are_written_for():
    target = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64"})  # SSE2 only
    assert cpu_kernels.vector_unit(target) is None
    assert "no hand-scheduled fp32 kernels" in cpu_kernels.KernelSummary(None).describe()


def test_tuning_leaves_the_kernels_alone():
    """Their PrimFuncs are marked scheduled before task extraction: no tuning task holds one."""
    from tvm.s_tir import meta_schedule as ms

    from autoglm_compile import tuning
    from autoglm_compile.inputs import InputSpec
    from autoglm_compile.tvm_build import import_relax

    lanes()
    target = host_target()
    mod, summary = cpu_kernels.rewrite(import_relax(resnet_block(), [InputSpec("x", (1, 16, 14, 14), "float32")]), target)
    assert (summary.convs, summary.matmuls) == (3, 1)
    before, _ = tuning._phases(target)
    with target:
        mod = tvm.transform.Sequential(before)(mod)
    tasks = ms.relax_integration.extract_tasks(mod, target)
    assert sum(tuning._scheduled(t) for t in tasks) == 4  # the three convs and the head (with what is fused after them)
    assert all(not cpu_kernels._block_names(t.dispatched[0]["main"]) & {cpu_kernels.CONV, cpu_kernels.DENSE} for t in tasks if not tuning._scheduled(t))


@pytest.mark.skipif(__import__("shutil").which("aarch64-linux-gnu-gcc") is None, reason="aarch64-linux-gnu-gcc is not installed (make install installs it)")
def test_cross_built_for_arm_with_neon_kernels(tmp_path):
    """NEON's 4 lanes: the conv net's kernels cross-compile for a Cortex-A76 and are in its library."""
    from autoglm_compile.libfile import read_elf

    _, out, report = build(tmp_path, resnet_block(), target="arm-cortex-a76")
    assert any(n.startswith("3 Conv and 1 MatMul/Gemm with hand-scheduled fp32 kernels (4-lane vectors") for n in report.schedule)
    symbols = read_elf(out / "model.so").dynamic_symbols()
    assert any(cpu_kernels.CONV in s for s in symbols) and any(cpu_kernels.DENSE in s for s in symbols)


def test_winograd_convs_cross_built_for_arm(tmp_path):
    """The Winograd transforms on NEON's 4 lanes: cross-compiled for a Cortex-A76, in its library."""
    from autoglm_compile.libfile import read_elf

    _, out, report = build(tmp_path, winograd_block(), target="arm-cortex-a76", schedule="{winograd: 4}")
    assert any("(4-lane vectors" in n and "3 of the convs (3x3, stride 1) as Winograd F(4x4, 3x3) x3" in n for n in report.schedule)
    symbols = read_elf(out / "model.so").dynamic_symbols()
    assert any(cpu_kernels.WINO_IN in s for s in symbols) and any(cpu_kernels.WINO_OUT in s for s in symbols)


@pytest.mark.parametrize("extent, n_blocks, preferred, want", [
    (112, 4, (8, 2), (8, 2)),   # ResNet-50's stem: the preferred tile divides
    (7, 32, (8, 2), (7, 2)),    # its 7x7 stage: 7 columns, still 14 accumulators
    (14, 16, (8, 2), (7, 2)),   # 14 columns: (14, 1) has as many accumulators; 7 is nearer 8 rows
    (127, 48, (8, 2), (1, 4)),  # a prime: the widest row of blocks
    (7, 8, (6, 2), (7, 1)),     # AVX2's 16 registers: no more than 12 accumulators
])
def test_register_tile_divides_and_fits_the_registers(extent, n_blocks, preferred, want):
    rows, blocks = cpu_kernels.register_tile(extent, n_blocks, *preferred)
    assert (rows, blocks) == want
    assert extent % rows == 0 and n_blocks % blocks == 0 and rows * blocks <= preferred[0] * preferred[1]


def test_untuned_int8_kernels_use_vpdpbusd_and_match_onnxruntime(tmp_path):
    """Untuned builds schedule int8_kernels' packed blocks too on AVX512-VNNI CPUs: every int8 kernel of the QDQ net
    (two convs, a matmul) is one vpdpbusd per 16 x 4 block, and the outputs agree with ONNX Runtime's int8 kernels
    within one output step."""
    from tvm import relax
    from tvm.target import codegen

    from autoglm_compile import int8_kernels
    from autoglm_compile.measure import run_ort
    from autoglm_compile.tvm_build import ScheduleContext, build, lower
    from test_int8_kernels import _import, qdq_net

    if "avx512vnni" not in set(codegen.llvm_get_cpu_features(host_target())):
        pytest.skip("this CPU has no AVX512-VNNI")
    model = qdq_net(tmp_path)
    mod, summary = int8_kernels.rewrite(_import(model), host_target())
    assert summary.packed == 3
    desc = resolve_target("host")
    lowered, target = lower(mod, desc, "default", ScheduleContext(desc=desc, cpu_kernels=True))
    assert int8_kernels.dot_kernels(lowered) == (3, 3)
    vm = relax.VirtualMachine(build(lowered, target).executable, tvm.cpu())
    step = float(numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "y_scale")))
    for sample in np.random.default_rng(3).standard_normal((3, 1, 3, 8, 8)).astype(np.float32) + 0.7:
        ours, want = vm["main"](tvm.runtime.tensor(sample)).numpy(), run_ort(model, {"x": sample})[0]
        np.testing.assert_allclose(ours, want, rtol=0, atol=step * 1.001)


def vectorized_blocks(func) -> set[str]:
    """The names of the blocks under a vectorized loop of func."""
    from tvm.s_tir.stmt import SBlock

    from autoglm_compile.memory_fit import walk_stmts

    found: set[str] = set()

    def visit(stmt):
        if isinstance(stmt, tvm.tirx.For) and stmt.kind == tvm.tirx.ForKind.VECTORIZED and int(stmt.extent) > 1:
            walk_stmts(stmt.body, lambda s: found.add(s.name_hint) if isinstance(s, SBlock) else None)

    walk_stmts(func.body, visit)
    return found


@pytest.mark.parametrize("op", ["layer_norm", "softmax"])
def test_row_reductions_sum_vector_partials_and_compute_what_their_loop_nests_compute(op):
    """A residual add and layer norm, or a softmax: each reduction over a row summed in vector partial sums (an rfactor
    block), the rows spread over the cores, the result equal to the loop nest's."""
    from tvm import te, topi

    width = lanes()
    target = host_target()
    if op == "layer_norm":  # as Relax legalizes it (int64 loops, a unit batch loop)
        from tvm import relax

        bb = relax.BlockBuilder()
        x, g, b = (relax.Var(n, relax.TensorType(shape, "float32")) for n, shape in (("x", (1, 8, 96)), ("g", (96,)), ("b", (96,))))
        with bb.function("main", [x, g, b]):
            bb.emit_func_output(bb.emit(relax.op.nn.layer_norm(x, g, b, axes=[-1], epsilon=1e-5)))
        plain = next(f for _, f in relax.transform.LegalizeOps()(bb.get()).functions_items() if isinstance(f, tvm.tirx.PrimFunc))
        plain = plain.with_attr("global_symbol", "main")
    else:
        s = te.placeholder((1, 2, 8, 64), "float32", name="s")
        plain = te.create_prim_func([s, topi.nn.fast_softmax(s, axis=-1)]).with_attr("global_symbol", "main")
    assert cpu_kernels._row_reductions_only(plain)  # the variance reads the row's mean too: still one tensor reduced
    sch = cpu_kernels.schedule_row_reductions(plain, width)
    assert sch is not None
    names = cpu_kernels._block_names(sch.mod["main"])
    assert sum(n.endswith("_rf_update") for n in names) == 2, names  # mean and variance; max and sum of exponentials
    assert vectorized_blocks(sch.mod["main"]) >= names & {n for n in names if n.endswith("_rf_update")}  # the partial sums
    rng = np.random.default_rng(0)
    args = [rng.standard_normal([int(d) for d in t.shape]).astype("float32") for t in plain.params]
    results = []
    for fn in (plain, sch.mod["main"]):
        tensors_ = [tvm.runtime.tensor(a.copy()) for a in args]
        tvm.compile(tvm.IRModule({"main": fn}), target=target)(*tensors_)
        results.append(tensors_[-1].numpy())
    np.testing.assert_allclose(results[1], results[0], rtol=1e-5, atol=1e-5)


def test_a_matmul_left_on_the_default_path_is_not_a_row_reduction():
    from tvm import te

    a, w = te.placeholder((8, 16), name="a"), te.placeholder((16, 4), name="w")
    k = te.reduce_axis((0, 16), "k")
    assert not cpu_kernels._row_reductions_only(te.create_prim_func([a, w, te.compute((8, 4), lambda i, j: te.sum(a[i, k] * w[k, j], axis=k))]))


@pytest.mark.parametrize("dtype", ["float32", "uint8"])
def test_channels_last_pool_is_vectorized_and_computes_what_its_loop_nest_computes(dtype):
    """An NHWC 3x3 stride-2 max pool with its pad and an op after it (ResNet-50's, and its int8 build's on uint8):
    the channels vectorized under the window's loops, the result equal to the loop nest's."""
    from tvm import te, topi

    width = lanes()
    x = te.placeholder((1, 9, 9, 64), dtype, name="x")
    pooled = topi.nn.pool2d(x, (3, 3), (2, 2), (1, 1), (1, 1, 1, 1), "max", layout="NHWC")
    after = te.compute(pooled.shape, lambda *i: pooled(*i) + tvm.tirx.const(1, dtype), name="after")
    plain = te.create_prim_func([x, after]).with_attr("global_symbol", "main")
    assert cpu_kernels._row_reductions_only(plain) and cpu_kernels.schedule_row_reductions(plain, width) is None
    sch = cpu_kernels.schedule_pool(plain, width)
    assert sch is not None
    assert {"pool_max_update", "after"} <= vectorized_blocks(sch.mod["main"])
    data = np.random.default_rng(0).integers(0, 200, (1, 9, 9, 64)).astype(dtype)
    results = []
    for fn in (plain, sch.mod["main"]):
        tensors = [tvm.runtime.tensor(data), tvm.runtime.tensor(np.zeros((1, 5, 5, 64), dtype))]
        tvm.compile(tvm.IRModule({"main": fn}), target=host_target())(*tensors)
        results.append(tensors[1].numpy())
    np.testing.assert_array_equal(results[1], results[0])


def head_block() -> onnx.ModelProto:
    """A classifier head whose 37 classes no vector width divides (PP-OCRv4's recognizer has 6625): MatMul + bias."""
    rng = np.random.default_rng(9)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 24])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 37])], [const(rng, "w", 24, 37), const(rng, "b", 37)])


def test_matmul_columns_padded_to_whole_blocks_and_sliced(tmp_path):
    """37 output columns: the weight padded with zero columns to whole vector blocks and the result sliced back
    (it stayed a single-threaded scalar loop nest: the recognizer's head took 24 of its 31 ms)."""
    lanes()
    path, out, report = build(tmp_path, head_block())
    note = next(n for n in report.schedule if "hand-scheduled fp32 kernels" in n)
    assert note.startswith("0 Conv and 1 MatMul/Gemm") and "1 with their output channels padded" in note and "default path" not in note
    check_on_new_inputs(path, out, head_block)


def test_a_layout_transpose_is_tiled_and_read_as_vectors_along_the_input(tmp_path):
    """NCHW -> NHWC with a pad inlined (what FuseOps makes of a pad before an NHWC conv): each tile read along the
    input's contiguous axis (W) as vectors, not along the output's (C), which misses the cache on every read."""
    import re

    from tvm import te, topi

    width = lanes()
    x = te.placeholder((1, 32, 16, 16), "float32", name="x")
    padded = topi.nn.pad(x, (0, 0, 1, 1), (0, 0, 1, 1))
    y = te.compute((1, 18, 18, 32), lambda n, h, w, c: padded[n, c, h, w], name="T_transpose")
    plain = te.create_prim_func([x, y]).with_attr("global_symbol", "main")
    x16 = te.placeholder((1, 32, 16, 32), "float32", name="x")  # W a multiple of the lanes: tiled
    y16 = te.compute((1, 16, 32, 32), lambda n, h, w, c: x16[n, c, h, w], name="T_transpose")
    tiled_src = te.create_prim_func([x16, y16]).with_attr("global_symbol", "main")
    for fn, vectors_along_w in ((plain, False), (tiled_src, True)):  # plain: W = 18, tiled with a tail, not vectorized
        sch = cpu_kernels.schedule_elementwise(fn, width)
        script = sch.mod["main"].script()
        vectorized = re.search(r"for (\w+) in T\.vectorized", script)
        w_binding = re.search(r"v_w = T\.axis\.spatial\([^\n]*", script).group(0)
        assert (vectorized is not None and vectorized.group(1) in w_binding) == vectors_along_w, script
        assert script.count("T.parallel") == 1 and f" * {width} + " in w_binding, script  # W tiled by the lanes
        data = np.random.default_rng(0).standard_normal([int(d) for d in fn.params[0].shape]).astype("float32")
        results = []
        for f in (fn, sch.mod["main"]):
            tensors = [tvm.runtime.tensor(data), tvm.runtime.tensor(np.zeros([int(d) for d in f.params[1].shape], "float32"))]
            tvm.compile(tvm.IRModule({"main": f}), target=host_target())(*tensors)
            results.append(tensors[1].numpy())
        np.testing.assert_array_equal(results[1], results[0])
