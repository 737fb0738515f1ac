"""int8 and mixed precision: calibrated INT8 with ONNX Runtime's quantization tools, and accuracy-driven protection.

It runs at the end of the graph stage (pipeline.stage_passes), on the optimized graph, and replaces it with a QDQ
model (QuantizeLinear/DequantizeLinear around the quantized nodes), which is what the later stages build and what
the artifact's model.opt.onnx holds:

1. Calibration data: precision.calibration.data (--calib-data): an .npz with arrays by input name (an array with
   one more leading dim than the input holds that many samples) or a folder of .npz files, at most `samples`
   samples; or, with `synthetic` (--calib-synthetic), random inputs drawn by the verification inputs' rule, which
   the report marks "not representative". Neither: exit 2.
2. Preparation: where per-channel weights need it, the ONNX-domain opset is raised to 13 (DequantizeLinear's `axis`
   is opset 13; opset 12 with per-channel gives an invalid model) with the convert-opset pass; then ONNX Runtime's
   quant_pre_process (shape inference and its basic graph optimizations, e.g. Conv+BatchNormalization). Nodes
   without a name get one, since nodes_to_exclude addresses nodes by name.
3. quantize_static in QDQ format: activations uint8 (asymmetric, per tensor), weights int8 (symmetric, per channel),
   ONNX Runtime's MinMax, Entropy (2048 histogram bins into 128, see `calibrate`) or Percentile calibrator. The
   ranges are computed once and read back from a calibration cache in every later round.
4. The accuracy budget's metric (precision.py) of the QDQ model on ONNX Runtime against ONNX Runtime's outputs of
   the source model, on the verification inputs (the sample inputs, else the seeded random ones). If the budget
   holds, done. Otherwise:
5. Each quantized activation tensor's contribution to the output error: the float model with only that tensor
   passed through its QuantizeLinear/DequantizeLinear (the QDQ model's scale and zero point), its outputs' cosine to
   the float outputs on the first verification input. One ONNX Runtime session holds every candidate behind a 0/1
   switch input, and runs once per tensor. At most `scan` tensors are measured when there are more: first those
   whose range is so stretched that most of their non-zero values quantize to zero or their values use at most
   16 levels (an attention mask's -3.4e38 added to the scores: their SQNR is high, since the huge values dominate
   the norm), then those with the lowest quantization SQNR on the float activations (one run). This orders the
   candidates, the least harmful first: those not measured by their SQNR, then the measured ones by contribution.
6. The protection search (`search`), at most `max_rounds` trials, each one the QDQ model with a set of activation
   tensors left in float (their QuantizeLinear/DequantizeLinear pairs removed, `float_tensors`; the weights stay
   int8) measured on ONNX Runtime: it starts with every activation in float and quantizes them back in that order,
   in batches that are kept only while the budget holds, with `margin` to spare (cosine>=0.99: 0.991; the TVM
   build's int8 arithmetic rounds differently), on the verification inputs and the `search_calibration`
   calibration samples that every node quantized hurts most (on a few sample inputs alone the search overfits
   them). A single tensor that breaks it stays in
   float, with the metric it gave. So every accepted step meets the budget, whether or not the errors of separate
   tensors add up. A default budget still unmet is exit 3 (nothing written); a budget the user gave is exit 4
   (the artifact holds the best model found).

Nodes named in `keep_float` (node names or op types) are never quantized. The report lists every node kept in float,
with the tensor it was kept for, the metric the search measured with that tensor quantized, its contribution
and SQNR.

TVM: the Relax ONNX importer maps QuantizeLinear/DequantizeLinear to relax.op.quantize/dequantize, and the Conv,
MatMul and Gemm between them take the dequantized float32 tensors: the int8 model is simulated in float. The report
says so ("int8 kernels: no"). Vendor-onnx targets: the QDQ ONNX is the deliverable, verified on ONNX Runtime CPU;
their opset is kept, so below 13 the weights are per tensor (a warning says so).
"""
from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import AccuracyError, InputError
from .precision import (Budget, CalibrationReport, ProtectedNode, ProtectionRound, QuantizationReport, budget_value,
                        metric_value)

FLUSHED = 0.5  # a tensor with at least this share of its non-zero values quantized to zero is always scanned
FEW_LEVELS = 16  # ... and so is one whose values use at most this many of the 256 quantized levels
PER_CHANNEL_OPSET = 13  # DequantizeLinear's `axis` (per-channel) is opset 13
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
FORMAT = "QDQ (QuantizeLinear/DequantizeLinear); activations uint8 asymmetric per tensor, weights int8 symmetric {granularity}"
CALIB_HINT = "give --calib-data FILE.npz (arrays by input name, a leading extra dim for several samples) or a folder of .npz files, or --calib-synthetic for random data (not representative)"
TVM_KERNELS = ("no (QDQ simulated in float): TVM's ONNX importer turns QuantizeLinear/DequantizeLinear into "
               "relax quantize/dequantize, and Conv/MatMul/Gemm run in float32 on the dequantized tensors")


class _Captured(logging.Handler):
    """Collects the warnings ONNX Runtime's quantization tools log (to the root logger), for the report."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage().strip().splitlines()[0] if record.getMessage().strip() else ""
        if text and text not in self.messages:
            self.messages.append(text)


@contextlib.contextmanager
def _quiet(captured: _Captured | None = None):
    """ONNX Runtime's quantization tools print progress to stdout (which --json keeps for the report) and log
    warnings to the root logger: the prints are dropped, the warnings kept for the report."""
    handler = captured or _Captured()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield handler
    finally:
        root.removeHandler(handler)


# -------------------------------------------------------------------------------------------- calibration data

def load_calibration(path: str | Path, specs, limit: int) -> list[dict[str, np.ndarray]]:
    """Calibration samples from an .npz or a folder of them (the --sample-inputs format; an array with one more
    leading dim holds several samples), checked against the inputs; at most `limit`."""
    from .samples import load_samples

    names = [s.name for s in specs]
    samples: list[dict[str, np.ndarray]] = []
    for fname, arrays in load_samples(path, "--calib-data", CALIB_HINT):
        missing = [n for n in names if n not in arrays]
        if missing:
            raise InputError(f"calibration data {fname}: missing input '{missing[0]}'", f"the model takes: {', '.join(names)}")
        extra = [n for n in arrays if n not in names]
        if extra:
            raise InputError(f"calibration data {fname}: '{extra[0]}' is not a model input", f"the model takes: {', '.join(names)}")
        count = None
        for s in specs:
            a = arrays[s.name]
            if a.dtype.name != s.dtype:
                raise InputError(f"calibration data {fname}: input '{s.name}' is {a.dtype.name}, the model takes {s.dtype}", f"cast it: array.astype('{s.dtype}')")
            if tuple(a.shape) == tuple(s.shape):
                n = None
            elif a.ndim == len(s.shape) + 1 and tuple(a.shape[1:]) == tuple(s.shape):
                n = a.shape[0]
            else:
                raise InputError(f"calibration data {fname}: input '{s.name}' has shape {list(a.shape)}, the model takes {list(s.shape)}",
                                 f"give arrays of shape {list(s.shape)}, or [N, {', '.join(str(d) for d in s.shape)}] for N samples")
            if count is not None and n != count:
                raise InputError(f"calibration data {fname}: the inputs hold different numbers of samples", "stack the same number of samples for every input")
            count = n if count is None else count
        if count is None:
            samples.append(arrays)
        else:
            samples += [{k: v[i] for k, v in arrays.items()} for i in range(count)]
        if len(samples) >= limit:
            break
    return samples[:limit]


class _Reader:
    """ONNX Runtime's CalibrationDataReader over a list of feeds."""

    def __init__(self, samples: list[dict[str, np.ndarray]]):
        self.samples = samples
        self._it = iter(samples)

    def get_next(self):
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self.samples)

    def __len__(self) -> int:
        return len(self.samples)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._it = iter(self.samples[start_index:end_index])


def _reader(samples):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(_Reader, CalibrationDataReader):
        pass

    return Reader(samples)


# ---------------------------------------------------------------------------------------------- preparation

def onnx_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def strip_unused_opsets(model: onnx.ModelProto) -> None:
    """Drop opset imports no node uses (quant_pre_process writes every domain ONNX Runtime knows)."""
    used = {n.domain or "" for n in model.graph.node}
    keep = [o for o in model.opset_import if (o.domain or "") in used or o.domain in ("", "ai.onnx")]
    del model.opset_import[:]
    model.opset_import.extend(keep)


def name_nodes(model: onnx.ModelProto) -> None:
    """Give every node a unique name (nodes_to_exclude addresses nodes by name)."""
    seen = set()
    for i, n in enumerate(model.graph.node):
        if not n.name or n.name in seen:
            n.name = f"{n.op_type}_{i}" if f"{n.op_type}_{i}" not in seen else f"{n.op_type}_{i}_{len(seen)}"
        seen.add(n.name)


def upgrade_opset(model: onnx.ModelProto, opset: int, ir_version: int) -> onnx.ModelProto:
    from .config import PassSpec
    from .pass_manager import PassContext, run_passes

    out, _ = run_passes(model, [PassSpec(name="convert-opset", options={"opset": opset})], PassContext(ir_version=ir_version))
    return out


def _ir_version(model: onnx.ModelProto, wanted: int) -> int:
    need = onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    return max(wanted, need)


def prepare(model: onnx.ModelProto, per_channel: bool, ir_version: int, folder: Path) -> tuple[onnx.ModelProto, Path]:
    """The opset upgrade (per-channel) and ONNX Runtime's pre-processing; returns the float model and its path."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if per_channel and onnx_opset(model) < PER_CHANNEL_OPSET:
        model = upgrade_opset(model, PER_CHANNEL_OPSET, ir_version)
    src, out = folder / "float.onnx", folder / "prepared.onnx"
    onnx.save(model, str(src))
    quant_pre_process(str(src), str(out))
    prepared = onnx.load(str(out))
    strip_unused_opsets(prepared)
    name_nodes(prepared)
    prepared.ir_version = _ir_version(prepared, ir_version)
    onnx.save(prepared, str(out))
    return prepared, out


WIDE = 1e38  # a tensor reaching this magnitude overflows a float32 histogram's range (2 x 1.7e38 is inf)


class _FiniteHistograms:
    """ONNX Runtime's HistogramCollector (entropy, percentile) for the tensors it can histogram. A tensor whose values
    reach WIDE (an additive attention mask's -3.4e38, as in every transformers export) makes its float32 bin edges
    overflow ("Too many bins for data range"): it gets MinMax's range instead, its lowest and highest values."""

    def __init__(self, inner):
        self.inner, self.wide = inner, {}

    def collect(self, name_to_arr: dict[str, list[np.ndarray]]) -> None:
        fine = {}
        for name, arrays in name_to_arr.items():
            sized = [a for a in arrays if a.size]
            lo, hi = (min(float(np.nanmin(a)) for a in sized), max(float(np.nanmax(a)) for a in sized)) if sized else (0.0, 0.0)
            if max(abs(lo), abs(hi)) < WIDE:
                fine[name] = arrays
            else:
                old = self.wide.get(name, (lo, hi))
                self.wide[name] = (min(lo, old[0]), max(hi, old[1]))
        if fine:
            self.inner.collect(fine)

    def compute_collection_result(self) -> dict:
        from onnxruntime.quantization.calibrate import TensorData

        result = dict(self.inner.compute_collection_result()) if self.inner.histogram_dict else {}
        for name, (lo, hi) in self.wide.items():
            result[name] = TensorData(lowest=np.array(lo, np.float32), highest=np.array(hi, np.float32))
        return result


def calibrate(prepared_path: Path, samples, method: str, cache: Path) -> list[str]:
    """ONNX Runtime's calibrator over the samples, its ranges written to the calibration cache that quantize_static
    reads. Run here rather than inside quantize_static for one setting: quantize_static builds the Entropy
    calibrator with 128 histogram bins into 128 quantized bins, which leaves nothing to clip (the ranges come out
    equal to MinMax's); here it gets 2048 bins into 128, TensorRT's setting. MinMax and Percentile keep ONNX
    Runtime's defaults (Percentile: 2048 bins, 99.999th percentile, symmetric). Returns the tensors that a histogram
    method could not histogram and that took MinMax's range (_FiniteHistograms)."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import HistogramCalibrater, HistogramCollector, create_calibrator, save_tensors_data
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    extra = {"num_bins": 2048, "num_quantized_bins": 128} if method == "entropy" else {}
    with tempfile.TemporaryDirectory(prefix="autoglm-calib-") as tmp:
        calibrator = create_calibrator(Path(prepared_path), sorted(set(QLinearOpsRegistry) | set(QDQRegistry)), augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method=getattr(CalibrationMethod, METHODS[method]), extra_options=extra)
        collector = None
        if isinstance(calibrator, HistogramCalibrater):  # collect_data uses a collector already set
            c = calibrator
            calibrator.collector = collector = _FiniteHistograms(HistogramCollector(
                method=c.method, symmetric=c.symmetric, num_bins=c.num_bins, num_quantized_bins=c.num_quantized_bins, percentile=c.percentile, scenario=c.scenario))
        try:
            calibrator.collect_data(_reader(samples))
            save_tensors_data(calibrator.compute_data(), cache)
        except ValueError as e:
            raise InputError(f"--calib-method {method}: ONNX Runtime's calibrator failed: {str(e).strip().splitlines()[0][:200]}",
                             "use --calib-method minmax or percentile, or keep the tensor's nodes in float (precision.keep_float)") from None
    return sorted(collector.wide) if collector else []


def quantize(prepared_path: Path, out: Path, samples, cache: Path, method: str, per_channel: bool, exclude: list[str], ir_version: int,
             keep_activations: bool = False) -> onnx.ModelProto:
    """quantize_static in QDQ format, with the calibration ranges from the cache (calibrated first if it is not there).
    keep_activations: Relu and Clip stay in the model, quantized before and after (for float_tensors); by default
    quantize_static drops them where the QuantizeLinear after them clamps, which saves a requantize per conv."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not cache.is_file():
        calibrate(prepared_path, samples, method, cache)
    quantize_static(
        str(prepared_path), str(out), None,
        quant_format=QuantFormat.QDQ, per_channel=per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        calibrate_method=getattr(CalibrationMethod, METHODS[method]), nodes_to_exclude=list(exclude), calibration_cache_path=str(cache),
        extra_options={"QDQKeepRemovableActivations": keep_activations},
    )
    model = onnx.load(str(out))
    strip_unused_opsets(model)
    model.ir_version = _ir_version(model, ir_version)
    return model


# ------------------------------------------------------------------------------------------------ measuring

def evaluate(model: onnx.ModelProto, feeds: list[dict], refs: list[list[np.ndarray]], budget: Budget) -> float:
    """The budget's metric of the model on ONNX Runtime, the worst over the outputs and the inputs. Without ONNX
    Runtime's graph optimizations: the QDQ model's own arithmetic, which is what TVM builds (measure.reference_session)."""
    from .measure import reference_session

    sess = reference_session(model)
    worst = None
    for f, ref in zip(feeds, refs):
        v = budget_value(budget, sess.run(None, f), ref)
        worst = v if worst is None else budget.worse(worst, v)
    return worst


def activation_qparams(qdq: onnx.ModelProto, prepared: onnx.ModelProto) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Scale and zero point of each quantized float32 activation tensor of the prepared model, from the QDQ model.
    A graph output that is quantized keeps its name on the DequantizeLinear's output (its producer writes
    '<name>_QuantizeLinear_Input'); it is listed under its own name."""
    inits = {i.name: i for i in qdq.graph.initializer}
    produced = {o for n in prepared.graph.node for o in n.output} | {i.name for i in prepared.graph.input}
    weights = {i.name for i in prepared.graph.initializer}
    outputs = {o.name for o in prepared.graph.output}
    dq_output = {n.input[0]: n.output[0] for n in qdq.graph.node if n.op_type == "DequantizeLinear"}
    out = {}
    for n in qdq.graph.node:
        if n.op_type != "QuantizeLinear":
            continue
        name = n.input[0] if n.input[0] in produced else dq_output.get(n.output[0])
        if name not in produced or name in weights or name in out or (name != n.input[0] and name not in outputs):
            continue
        if n.input[1] not in inits or (len(n.input) > 2 and n.input[2] and n.input[2] not in inits):
            continue
        scale = numpy_helper.to_array(inits[n.input[1]])
        zp = numpy_helper.to_array(inits[n.input[2]]) if len(n.input) > 2 and n.input[2] else np.zeros((), np.uint8)
        if scale.size == 1 and zp.size == 1:
            out[name] = (scale.reshape(()), zp.reshape(()))
    return out


def dequantize(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int) -> np.ndarray:
    """DequantizeLinear in numpy, float32: (q - zero_point) * scale, per tensor or along `axis` (per channel)."""
    along = lambda a: np.asarray(a, np.float32).reshape([-1 if d == axis % q.ndim and np.size(a) > 1 else 1 for d in range(q.ndim)])  # noqa: E731
    return (q.astype(np.float32) - along(zero_point)) * along(scale)


def _fake_quant(x: np.ndarray, scale: np.ndarray, zp: np.ndarray) -> np.ndarray:
    info = np.iinfo(zp.dtype)
    z = float(zp)
    q = np.clip(np.round(x / float(scale)) + z, info.min, info.max)
    return (q - z) * float(scale)


def activation_stats(prepared: onnx.ModelProto, qparams: dict, feed: dict) -> tuple[dict[str, float], dict[str, float], dict[str, int]]:
    """Per quantized tensor, on the float model's activations (one run): its quantization SQNR in dB (its own error,
    not accumulated), the share of its non-zero values that quantize to zero, and how many quantized levels its
    values use. A range stretched by huge values (an attention mask's -3.4e38 added to the scores: a scale of 1e36)
    flushes the real values to zero while the SQNR stays high, since the huge values dominate the norm; the flushed
    share or the levels show it (MiniLM's masked scores: 2 levels, the real scores all flushed; with short sentences
    the masked entries are the majority, so the flushed share alone is low)."""
    from .measure import ort_session

    m = onnx.ModelProto()
    m.CopyFrom(prepared)
    outputs = {o.name for o in m.graph.output}
    names = [t for t in qparams if t not in outputs]
    m.graph.output.extend(helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in names)
    values = ort_session(m, optimize=False).run([o.name for o in m.graph.output], feed)
    acts = dict(zip([o.name for o in m.graph.output], values))
    sqnr, flushed, levels = {}, {}, {}
    for t, (s, z) in qparams.items():
        x = np.asarray(acts[t], np.float64)
        xq = _fake_quant(x, s, z)
        noise = float(np.linalg.norm(x - xq))
        sqnr[t] = 20 * np.log10(max(float(np.linalg.norm(x)), 1e-12) / max(noise, 1e-12))
        nonzero = x != 0
        flushed[t] = float(np.mean(xq[nonzero] == 0)) if nonzero.any() else 0.0
        info = np.iinfo(z.dtype)
        levels[t] = int(np.unique(np.clip(np.round(x / float(s)) + float(z), info.min, info.max)).size)
    return sqnr, flushed, levels




def switch_model(prepared: onnx.ModelProto, units: list[str], qparams: dict) -> onnx.ModelProto:
    """The float model in which tensor j becomes t + on_j * (DQ(Q(t)) - t), with on_j a scalar graph input."""
    import onnx_graphsurgeon as gs

    from .pass_manager import export_model

    g = gs.import_onnx(prepared)
    tensors = g.tensors()
    for j, name in enumerate(units):
        t = tensors[name]
        scale, zp = qparams[name]
        on = gs.Variable(f"__fq{j}_on", dtype=np.float32, shape=[])
        g.inputs.append(on)
        s, z = gs.Constant(f"__fq{j}_scale", np.asarray(scale, np.float32)), gs.Constant(f"__fq{j}_zp", np.asarray(zp))
        q = gs.Variable(f"__fq{j}_q", dtype=np.asarray(zp).dtype)
        dq, d, m = (gs.Variable(f"__fq{j}_{k}", dtype=np.float32) for k in ("dq", "d", "m"))
        out = gs.Variable(f"__fq{j}_out", dtype=np.float32, shape=t.shape)
        consumers = list(t.outputs)
        g.nodes += [
            gs.Node("QuantizeLinear", inputs=[t, s, z], outputs=[q]),
            gs.Node("DequantizeLinear", inputs=[q, s, z], outputs=[dq]),
            gs.Node("Sub", inputs=[dq, t], outputs=[d]),
            gs.Node("Mul", inputs=[d, on], outputs=[m]),
            gs.Node("Add", inputs=[t, m], outputs=[out]),
        ]
        for c in consumers:
            c.inputs = [out if x is t else x for x in c.inputs]
        if t in g.outputs:
            g.outputs = [out if x is t else x for x in g.outputs]
            t.name, out.name = f"{name}__float", name
    g.toposort()
    return export_model(g, prepared.ir_version)


def contributions(prepared: onnx.ModelProto, units: list[str], qparams: dict, feed: dict) -> dict[str, float]:
    """Output cosine to the float outputs with only tensor t quantized, for each t in units (the worst output)."""
    from .measure import ort_session

    if not units:
        return {}
    model = switch_model(prepared, units, qparams)
    sess = ort_session(model, optimize=False)
    off = {f"__fq{j}_on": np.array(0.0, np.float32) for j in range(len(units))}
    ref = sess.run(None, {**feed, **off})
    out = {}
    for j, name in enumerate(units):
        got = sess.run(None, {**feed, **off, f"__fq{j}_on": np.array(1.0, np.float32)})
        out[name] = min(metric_value("cosine", a, e) for a, e in zip(got, ref))
    return out


# ------------------------------------------------------------------------------------------------ protection

def _weight_name(dq) -> str:
    """The prepared model's name of the constant a DequantizeLinear reads (quantize_static stores it as NAME_quantized)."""
    return dq.input[0].removesuffix("_quantized")


def quantized_weights(qdq: onnx.ModelProto, prepared: onnx.ModelProto) -> dict[str, float]:
    """The constants of the prepared model that the QDQ model holds quantized (a conv's or matmul's weight and bias,
    and whatever constants quantize_static quantized for the other ops), each with its quantization SQNR in dB."""
    originals = {i.name: i for i in prepared.graph.initializer}
    inits = {i.name: i for i in qdq.graph.initializer}
    out = {}
    for n in qdq.graph.node:
        if n.op_type != "DequantizeLinear" or n.input[0] not in inits:
            continue
        name = _weight_name(n)
        if name not in originals or name in out:
            continue
        x = numpy_helper.to_array(originals[name]).astype(np.float64)
        z = numpy_helper.to_array(inits[n.input[2]]) if len(n.input) > 2 and n.input[2] else np.zeros(1)
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        noise = float(np.linalg.norm(x - dequantize(numpy_helper.to_array(inits[n.input[0]]), numpy_helper.to_array(inits[n.input[1]]), z, axis)))
        out[name] = 20 * np.log10(max(float(np.linalg.norm(x)), 1e-12) / max(noise, 1e-12))
    return out


def float_tensors(qdq: onnx.ModelProto, tensors, prepared: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """The QDQ model with the activation tensors in `tensors` left in float: their QuantizeLinear/DequantizeLinear
    pairs removed, the readers of the dequantized tensor reading the float one. Everything else keeps its
    quantization (the weights of the nodes around such a tensor too), so a Conv whose output stays float still
    computes in int8 on TVM. qdq must keep its Relus and Clips (quantize's keep_activations): by default
    quantize_static drops them where the QuantizeLinear after them can clamp, and removing that pair then loses the
    Relu (the PP-OCRv4 detector with every activation in float: cosine 0.0). With `prepared`, `tensors` may also name
    quantized weights (quantized_weights): their DequantizeLinear goes, and its readers read the prepared model's
    float initializer."""
    names = set(tensors)
    g = qdq.graph
    readers = defaultdict(list)
    for n in g.node:
        for i in n.input:
            readers[i].append(n)
    source = {n.output[0]: n.input[0] for n in g.node
              if n.op_type == "QuantizeLinear" and readers[n.output[0]] and all(r.op_type == "DequantizeLinear" for r in readers[n.output[0]])
              and (n.input[0] in names or any(r.output[0] in names for r in readers[n.output[0]]))}  # a graph output: see activation_qparams
    rename = {n.output[0]: source[n.input[0]] for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] in source}
    m = onnx.ModelProto()
    m.CopyFrom(qdq)
    nodes = [n for n in m.graph.node if not (n.op_type in QDQ_OPS and (n.output[0] in source or n.output[0] in rename))]
    for n in nodes:
        n.input[:] = [rename.get(i, i) for i in n.input]
    nodes += [helper.make_node("Identity", [rename[o.name]], [o.name]) for o in m.graph.output if o.name in rename]
    if prepared is not None:  # weights in `tensors` (quantized_weights): their readers read the float initializer
        originals = {i.name: i for i in prepared.graph.initializer}
        weight_dq = {n.output[0]: w for n in nodes if n.op_type == "DequantizeLinear" and (w := _weight_name(n)) in names and w in originals}
        nodes = [n for n in nodes if not (n.op_type == "DequantizeLinear" and n.output[0] in weight_dq)]
        for n in nodes:
            n.input[:] = [weight_dq.get(i, i) for i in n.input]
        present = {i.name for i in m.graph.initializer}
        m.graph.initializer.extend(originals[w] for w in dict.fromkeys(weight_dq.values()) if w not in present)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m


def hardest(qdq: onnx.ModelProto, model: onnx.ModelProto, samples: list[dict], budget: Budget, n: int) -> tuple[list[dict], list[list[np.ndarray]]]:
    """The n calibration samples on which the QDQ model (every node quantized) is furthest from the float model, by
    the budget's metric, and the float model's outputs on them (ONNX Runtime both; the QDQ model as in evaluate)."""
    from .measure import reference_session

    if n <= 0 or not samples:
        return [], []
    float_sess, q_sess = reference_session(model), reference_session(qdq)
    refs = [float_sess.run(None, f) for f in samples]
    values = [budget_value(budget, q_sess.run(None, f), r) for f, r in zip(samples, refs)]
    sign = 1.0 if budget.op == ">=" else -1.0
    worst = sorted(range(len(samples)), key=lambda i: sign * values[i] if values[i] == values[i] else -np.inf)[:n]
    return [samples[i] for i in worst], [refs[i] for i in worst]


def search(order: list[str], measure, budget: Budget, max_trials: int, note) -> tuple[list[str], float, list[tuple[list[str], float]], dict[str, tuple[int, float]]]:
    """Which activation tensors stay in float; measure(tensors) is the budget's metric with those in float. `order`
    lists the candidates, the least harmful first. It starts from every one in float (the weights alone quantized)
    and quantizes them in that order, in batches: a batch is kept when the budget still holds with it, and halved
    when not (doubled after one that held); a single tensor that breaks the budget stays in float. Every accepted
    step holds the budget, so the errors of separate tensors need not add up (on the PP-OCRv4 detector they partly
    cancel: keeping the worst tensors in float first, the other way round, made the output worse). At most
    `max_trials` measurements; what is left when they run out stays in float. Returns the float tensors, their
    metric, every trial (its float tensors and metric), and for each tensor that broke the budget, the trial
    (1-based) and the metric it gave."""
    floats = list(order)
    value = measure(floats)
    trials = [(list(floats), value)]
    note(f"int8: every activation in float, the weights in int8: {budget.metric} {value:.6g}")
    failed: dict[str, tuple[int, float]] = {}
    if not budget.holds(value):
        return floats, value, trials, failed
    i, step = 0, max(1, (len(order) + 1) // 2)  # quantizing all of them at once is the model that failed already
    while i < len(order) and len(trials) < max_trials:
        step = min(step, len(order) - i)
        batch = set(order[i:i + step])
        trial = [t for t in floats if t not in batch]
        v = measure(trial)
        trials.append((trial, v))
        if budget.holds(v):
            floats, value = trial, v
            i += step
            step *= 2
        elif step == 1:
            failed[order[i]] = (len(trials), v)
            i += 1
        else:
            step = (step + 1) // 2
        note(f"int8: trial {len(trials)}: {len(trial)} tensor(s) in float: {budget.metric} {v:.6g} ({'kept' if budget.holds(v) else 'not met'}); {len(floats)} in float so far")
    return floats, value, trials, failed


def _keep_float_nodes(prepared: onnx.ModelProto, keep: list[str]) -> list[str]:
    names = [n.name for n in prepared.graph.node]
    ops = defaultdict(list)
    for n in prepared.graph.node:
        ops[n.op_type].append(n.name)
    out, unknown = [], []
    for k in keep:
        if k in names:
            out.append(k)
        elif k in ops:
            out += ops[k]
        else:
            unknown.append(k)
    if unknown:
        raise InputError(f"precision.keep_float names '{unknown[0]}', which is neither a node nor an op type of the graph (after ONNX Runtime's pre-processing)",
                         "give node names or op types of the optimized graph: see model.opt.onnx of an fp32 build")
    return list(dict.fromkeys(out))


SCORE_OPS = ("Mul", "Div", "Add", "Cast")  # between attention's score MatMul and its Softmax: the scale and the mask
LAYOUT_OPS = ("Transpose", "Reshape", "Cast")  # between the projections and attention's MatMuls


def attention_nodes(model: onnx.ModelProto) -> list[str]:
    """The nodes of each self-attention, softmax(Q K^T * scale + mask) V: the score MatMul, the scale and mask ops, the
    Softmax, the P x V MatMul, and the Transposes/Reshapes that lead Q, K and V into them and the output out. On CUDA
    targets they stay float, so that the attention kernel (gpu_attention.fuse_attention, which takes no quantize or
    dequantize along its pattern) runs them; int8_kernels keeps attention's two-activation MatMuls float there anyway."""
    producer, consumers = _neighbours(model)

    def chain(tensor: str, forward: bool) -> list:
        nodes = []
        while True:
            if forward:
                nxt = consumers.get(tensor, [])
                if len(nxt) != 1 or nxt[0].op_type not in LAYOUT_OPS:
                    return nodes
                n = nxt[0]
                tensor = n.output[0]
            else:
                n = producer.get(tensor)
                if n is None or n.op_type not in LAYOUT_OPS or len(consumers.get(n.output[0], [])) != 1:
                    return nodes
                tensor = n.input[0]
            nodes.append(n)

    out = []
    for sm in (n for n in model.graph.node if n.op_type == "Softmax"):
        after = consumers.get(sm.output[0], [])
        if len(after) != 1 or after[0].op_type != "MatMul" or after[0].input[0] != sm.output[0]:
            continue
        pv, scores, t = after[0], [], sm.input[0]
        while t in producer and producer[t].op_type in SCORE_OPS:
            scores.append(producer[t])
            t = producer[t].input[0]
        qk = producer.get(t)
        if qk is None or qk.op_type != "MatMul":
            continue
        found = [qk, *scores, sm, pv]
        for x in (qk.input[0], qk.input[1], pv.input[1]):
            found += chain(x, forward=False)
        found += chain(pv.output[0], forward=True)
        out += [n.name for n in found if n.name not in out]
    return out


def _neighbours(prepared: onnx.ModelProto):
    producer, consumers = {}, defaultdict(list)
    for n in prepared.graph.node:
        for o in n.output:
            producer[o] = n
        for i in n.input:
            consumers[i].append(n)
    return producer, consumers


def _quantized_nodes(qdq: onnx.ModelProto) -> int:
    dq_out = {o for n in qdq.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return sum(1 for n in qdq.graph.node if n.op_type not in QDQ_OPS and any(i in dq_out for i in n.input))


def quantize_graph(job) -> None:
    """The int8/mixed step of the graph stage: job.model becomes the QDQ model (see the module docstring)."""
    import onnxruntime

    t0 = time.perf_counter()
    cfg, target, budget = job.config.precision_config, job.target, job.config.accuracy_budget
    cal = cfg.calibration
    note = job.progress.note
    if cal.data is not None:
        samples = load_calibration(cal.data, job.inputs, cal.samples)
        source, representative = str(cal.data), True
    elif cal.synthetic:
        from .inputs import index_ranges, random_inputs

        seed = job.config.verify.seed + 1
        ranges = index_ranges(job.model)
        samples = [random_inputs(job.inputs, seed + i, ranges) for i in range(cal.samples)]
        source, representative = "synthetic random inputs (--calib-synthetic; floats ~ N(0,1), the verification rule)", False
        job.report.warnings.append("int8 calibrated on synthetic random data: the ranges, and the accuracy below, are not representative of real inputs")
    else:  # resolve_config refuses this before any work; kept for API callers
        raise InputError(f"--precision {cfg.mode} needs calibration data", CALIB_HINT)
    per_channel = cfg.per_channel
    vendor = target.backend == "vendor-onnx"
    opset_before = onnx_opset(job.model)
    if per_channel and vendor and opset_before < PER_CHANNEL_OPSET:
        per_channel = False
        job.report.warnings.append(f"int8 on {target.name}: its opset is {opset_before}, and per-channel weights need opset {PER_CHANNEL_OPSET}: the weights are quantized per tensor")
    half = cfg.mode == "mixed" and job.config.relax_fp16 and target.backend == "tvm"  # the float part in float16 (ToMixedPrecision)
    if cfg.mode == "mixed" and "fp16" in target.precisions and not half:
        job.report.warnings.append(f"mixed: the nodes kept in float run in float32 on {target.name}; float16 for them is built on CUDA targets only (precision.fp16 relax)")
    feeds = [job.feeds] + [f for _n, f, _r in job.samples]
    refs = [job.reference] + [r for _n, _f, r in job.samples]
    ir = job.model.ir_version
    captured = _Captured()
    with tempfile.TemporaryDirectory(prefix="autoglm-int8-") as tmp, _quiet(captured):
        folder = Path(tmp)
        note(f"int8: preparing (opset {opset_before}, per-channel {per_channel})")
        prepared, prepared_path = prepare(job.model, per_channel, ir, folder)
        keep = _keep_float_nodes(prepared, cfg.keep_float)
        attention = attention_nodes(prepared) if target.kind == "cuda" and target.backend == "tvm" and job.config.schedule.attention_kernel else []
        keep += [n for n in attention if n not in keep]
        cache = folder / "calibration.json"

        def run(exclude: list[str]) -> tuple[onnx.ModelProto, float]:
            qdq = quantize(prepared_path, folder / "qdq.onnx", samples, cache, cal.method, per_channel, exclude, ir)
            return qdq, evaluate(qdq, feeds, refs, budget)

        note(f"int8: calibrating on {len(samples)} sample(s) ({cal.method})")
        wide = calibrate(prepared_path, samples, cal.method, cache)
        if wide:
            job.report.warnings.append(f"--calib-method {cal.method}: {len(wide)} tensor(s) reach {WIDE:.0e} in magnitude (an additive attention mask?), "
                                       f"which its histogram cannot hold: they took MinMax's range ({', '.join(wide[:3])}{', ...' if len(wide) > 3 else ''})")
        qdq, value = run(keep)
        first = value
        rounds = [ProtectionRound(round=0, tensors=0, float_nodes=len(keep), value=value, holds=budget.holds(value))]
        tensors: list[str] = []
        decided: dict[str, tuple[int, float]] = {}
        scanned = candidates = 0
        search_budget = None
        info: dict[str, tuple[float | None, float | None]] = {}
        producer, consumers = _neighbours(prepared)
        if not budget.holds(value) and cfg.max_rounds > 0:
            # the search removes pairs (float_tensors), which needs the Relus and Clips in the model: quantized again
            # with them kept (the budget held without the search, the model keeps quantize_static's default)
            kept = quantize(prepared_path, folder / "kept.onnx", samples, cache, cal.method, per_channel, keep, ir, keep_activations=True)
            qparams = activation_qparams(kept, prepared)
            candidates = len(qparams)
            units = list(qparams)
            sqnr, flushed, levels = activation_stats(prepared, qparams, feeds[0])
            if len(units) > cfg.scan:  # the degenerate tensors first (whatever their SQNR), then the lowest SQNR
                bad = {t for t in units if flushed[t] >= FLUSHED or levels[t] <= FEW_LEVELS}
                gone = sorted(bad, key=lambda t: (levels[t], -flushed[t]))
                units = (gone + sorted((t for t in units if t not in bad), key=lambda t: sqnr[t]))[: max(cfg.scan, len(gone))]
            note(f"int8: {budget.text} not met ({value:.4g}); measuring the contribution of {len(units)} of {candidates} tensor(s)")
            alone = contributions(prepared, units, qparams, feeds[0])
            scanned = len(alone)
            info = {t: (alone.get(t), sqnr.get(t)) for t in qparams}
            # the least harmful first: those not measured by their SQNR (the highest first), then the measured ones
            order = sorted((t for t in qparams if t not in alone), key=lambda t: -sqnr[t]) + sorted(alone, key=lambda t: -alone[t])
            # the search checks the calibration samples that every node quantized hurts most, besides the verification
            # inputs: on a few sample inputs alone it overfits them (MiniLM: met on 4 sentences, 7 of 222 others below
            # cosine 0.99)
            extra, extra_refs = hardest(kept, job.model, samples, budget, cfg.search_calibration)
            goal = budget.tightened(cfg.margin)  # the TVM build's int8 arithmetic rounds differently from ONNX Runtime's
            # First the activations alone (the search starts with every activation in float and the weights in int8).
            # Where the int8 weights alone already miss (the PP-OCRv4 recognizer's hardest calibration lines, MiniLM's
            # shortest sentences), the weights are candidates too, the least rounded first: the search then starts
            # from the float model, which always holds.
            search_feeds, search_refs = feeds + extra, refs + extra_refs
            measure = lambda fl: evaluate(float_tensors(kept, fl, prepared), search_feeds, search_refs, budget)  # noqa: E731
            floats, v, trials, decided = search(order, measure, goal, cfg.max_rounds, note)
            with_weights = not goal.holds(trials[0][1])
            if with_weights:
                weights = quantized_weights(kept, prepared)
                info.update({w: (None, db) for w, db in weights.items()})
                candidates += len(weights)
                floats, v, trials, decided = search(sorted(weights, key=lambda w: -weights[w]) + order, measure, goal, cfg.max_rounds, note)
            search_budget = (f"{goal.text} on {len(search_feeds)} input(s): the verification inputs and {len(extra)} calibration sample(s)"
                             + ("; the weights were candidates too (in int8 they alone missed it)" if with_weights else ""))
            for r, (fl, tv) in enumerate(trials, 1):
                nodes = set(keep) | {n.name for t in fl for n in ([producer[t]] if t in producer else []) + consumers[t]}
                rounds.append(ProtectionRound(round=r, tensors=len(fl), float_nodes=len(nodes), value=tv, holds=goal.holds(tv)))
            final = float_tensors(kept, floats, prepared)
            v = evaluate(final, feeds, refs, budget)  # the budget's own inputs
            if budget.holds(v) or budget.better(v, value):
                qdq, value, tensors = final, v, floats
    reasons = {n: "self-attention on a CUDA target: the attention kernel runs it in float (schedule.attention_kernel)" for n in attention}
    protected = [ProtectedNode(name=n, op=next(x.op_type for x in prepared.graph.node if x.name == n), reason=reasons.get(n, "keep_float in the config")) for n in keep]
    listed = set(keep)
    sign = 1.0 if budget.op == ">=" else -1.0  # the worst first: the lowest cosine, the highest max-rel
    worst_first = sorted(tensors, key=lambda t: (t not in decided, sign * decided[t][1] if t in decided else 0.0))
    for t in worst_first:
        cos, db = info.get(t, (None, None))
        trial, tv = decided.get(t, (None, None))
        why = (f"quantizing it on top of the others gave {budget.metric} {tv:.4g} (trial {trial})" if t in decided else
               f"the search did not reach it within precision.max_rounds ({cfg.max_rounds}) trials" if budget.holds(value) else
               "every activation is in float, and the budget is still not met")
        for n in ([producer[t]] if t in producer else []) + consumers[t]:
            if n.name in listed:
                continue
            listed.add(n.name)
            protected.append(ProtectedNode(
                name=n.name, op=n.op_type, tensor=t, alone_cosine=cos, local_sqnr_db=db, round=trial, trial_value=tv,
                reason=f"{'writes' if producer.get(t) is n else 'reads'} '{t}', kept in float: {why}",
            ))
    ok = budget.holds(value)
    job.report.quantization = QuantizationReport(
        mode=cfg.mode,
        format=FORMAT.format(granularity="per channel" if per_channel else "per tensor") + ("; float16 elsewhere (TVM's ToMixedPrecision: float16 operands, float32 accumulation)" if half else "; float32 elsewhere" if cfg.mode == "mixed" else ""),
        tool=f"onnxruntime.quantization {onnxruntime.__version__} (quant_pre_process, quantize_static)",
        opset=f"{opset_before} -> {onnx_opset(qdq)}",
        per_channel=per_channel,
        calibration=CalibrationReport(source=source, samples=len(samples), method=cal.method, representative=representative),
        budget=budget.describe(), value_before=first, value=value, ok=ok, quantized_nodes=_quantized_nodes(qdq),
        protected=protected, rounds=rounds, scanned=scanned, candidates=candidates, search_budget=search_budget,
        int8_kernels=("the vendor runtime's: the QDQ ONNX is the deliverable, verified here on ONNX Runtime CPU" if vendor else TVM_KERNELS),
        seconds=time.perf_counter() - t0,
    )
    job.model = qdq
    job.report.warnings += [f"onnxruntime.quantization: {m}" for m in captured.messages[:5]]
    if not ok:
        what = (f"{cfg.mode}: the accuracy budget {budget.describe()} is not met on ONNX Runtime: {budget.metric} {value:.6g} "
                f"({first:.6g} with every node quantized; {len(rounds) - 1} protection trial(s), {len(tensors)} tensor(s) kept in float)")
        if budget.source == "default":
            raise AccuracyError(what, "give representative --calib-data and --sample-inputs, raise precision.max_rounds or precision.scan, "
                                      "keep sensitive nodes in float (precision.keep_float), or state a budget with --accuracy-budget")
        job.report.warnings.append(what + "; the artifact holds the best model found")


# ---------------------------------------------------------------------------------------------- options, budgets

def apply_precision_flags(cfg, opts):
    """--calib-data, --calib-method, --calib-synthetic and --accuracy-budget over the config's precision section.
    int8/mixed without calibration data is an InputError (exit 2), before any work."""
    from .precision import BUDGET_HINT, parse_budget

    pc, cal = cfg.precision_config, cfg.precision_config.calibration
    calib_flags = [f for f, v in (("--calib-data", opts.calib_data), ("--calib-method", opts.calib_method), ("--calib-synthetic", opts.calib_synthetic)) if v]
    if calib_flags and cfg.precision not in ("int8", "mixed"):
        raise InputError(f"{calib_flags[0]} applies to int8 and mixed builds, and this build is {cfg.precision}", "add --precision int8 (or mixed)")
    if opts.calib_data is not None:
        cal.data = str(opts.calib_data)
    if opts.calib_method is not None:
        if opts.calib_method not in METHODS:
            raise InputError(f"unknown --calib-method '{opts.calib_method}'", f"valid methods: {', '.join(METHODS)}")
        cal.method = opts.calib_method
    if opts.calib_synthetic:
        cal.synthetic = True
    if opts.accuracy_budget is not None:
        if cfg.precision == "fp32":
            raise InputError("--accuracy-budget applies to fp16, int8 and mixed builds; fp32 builds are checked with rtol/atol",
                             "add --precision fp16|int8|mixed, or use --max-error for an fp32 budget")
        try:
            pc.budget = parse_budget(opts.accuracy_budget).text
        except ValueError as e:
            raise InputError(f"--accuracy-budget {opts.accuracy_budget}: {e}", BUDGET_HINT) from None
    if cfg.precision in ("int8", "mixed"):
        if cal.data is not None and cal.synthetic:
            raise InputError("calibration data and --calib-synthetic were both given", "give one: real data (--calib-data) or random data (--calib-synthetic)")
        if cal.data is None and not cal.synthetic:
            raise InputError(f"--precision {cfg.precision} needs calibration data", CALIB_HINT)
    return cfg


def accuracy_budget_failures(report) -> list[str]:
    """The failure of an accuracy budget the user gave, as a budget failure (exit 4): on the build's outputs where
    they were compared, else on the optimized graph, else on the quantization's own measure."""
    for what, acc in (("the build", report.accuracy), ("the optimized graph (ONNX Runtime)", report.graph_verify)):
        if acc is not None and acc.budget is not None:
            if acc.budget.source == "user" and not acc.ok:
                return [f"{what} misses the accuracy budget: {acc.check_text()}"]
            return []
    q = report.quantization
    if q is not None and not q.ok and "given by the user" in q.budget:
        return [f"the QDQ model misses the accuracy budget {q.budget} on ONNX Runtime: {q.value:.6g}"]
    return []
