"""The command line: a thin layer over the Python API.

    autoglm-compile MODEL [--target T] [-o OUT]     (short for: autoglm-compile compile MODEL ...)
    autoglm-compile run ARTIFACT [--input NAME=FILE.npy] [--check]
    autoglm-compile targets | passes | doctor

Exit codes: 0 ok, 1 internal error (traceback), 2 usage or input error, 3 accuracy check failed, 4 budget failed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from pathlib import Path
from typing import Iterator, List, Optional

import typer
from rich.console import Console

from .errors import CompileError, ExitCode

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compile ONNX and PyTorch models ahead of time with TVM, verified against ONNX Runtime.")
err = Console(stderr=True)
COMMANDS = ("compile", "run", "tune-merge", "bundle-runtime", "targets", "passes", "doctor")


def fail(e: CompileError) -> typer.Exit:
    err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
    if e.hint:
        err.print(f"Hint: {e.hint}", highlight=False, soft_wrap=True)
    return typer.Exit(int(e.exit_code))


class RichProgress:
    def __init__(self, quiet: bool):
        self.quiet = quiet
        self._status = None
        self._stage = ""

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self.quiet:
            yield
            return
        with err.status(f"[bold]{name}[/]…", spinner="dots") as status:
            self._status, self._stage = status, name
            try:
                yield
            finally:
                self._status = None
        err.print(f"[green]✓[/] {name}", highlight=False)

    def update(self, text: str) -> None:
        if self._status is not None:
            self._status.update(f"[bold]{self._stage}[/] {text}")

    def note(self, text: str) -> None:
        if not self.quiet:
            err.print(f"  [dim]{text}[/]", highlight=False)


@app.command("compile")
def compile_cmd(
    model: str = typer.Argument(..., help="an .onnx file, a .pt2, a TorchScript file, or package.module:factory"),
    target: str = typer.Option("host", "--target", "-t", help="target name, alias or YAML path (see 'targets')"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="artifact folder [default: build/<model name>]"),
    opt_level: int = typer.Option(2, "-O", min=0, max=3, help="preset configs/O<N>.yaml"),
    config: Optional[Path] = typer.Option(None, "--config", help="pipeline YAML (may 'extends: O2')"),
    dump_config: bool = typer.Option(False, "--dump-config", help="print the resolved config and exit"),
    input_shape: List[str] = typer.Option([], "--input-shape", "-s", help="NAME=1x3x224x224[:dtype]; repeatable. Shape buckets: NAME=1x3x224x224,8x3x224x224 builds one variant per shape into one artifact, dispatched by the input's shape (bucket k takes the k-th shape of every input that lists several)"),
    dim: List[str] = typer.Option([], "--dim", help="value for a symbolic dim by name, e.g. batch=1; repeatable. Shape buckets: batch=1,4,8, or a range batch=1..8 (1, 2, 4, 8: doubling up to the end)"),
    sample_inputs: Optional[Path] = typer.Option(None, "--sample-inputs", help="FILE.npz (arrays by input name) or a folder of .npz files: verification and latency use them instead of random inputs"),
    input_value: List[str] = typer.Option([], "--input-value", help="NAME=V: freeze a scalar input into the graph as a constant (before the passes); repeatable"),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="allow full unpickling of a PyTorch file"),
    weights: Optional[str] = typer.Option(None, "--weights", help="state_dict for a module:factory model (loaded with weights_only=True)"),
    archive: bool = typer.Option(False, "--archive", help="also write <output>.tar.gz"),
    seed: Optional[int] = typer.Option(None, "--seed", help="seed of the random verification inputs"),
    runs: Optional[int] = typer.Option(None, "--runs", min=1, help="timed runs"),
    verify_each_pass: bool = typer.Option(False, "--verify-each-pass", help="check outputs under ONNX Runtime after every pass"),
    precision: Optional[str] = typer.Option(None, "--precision", help="fp32, fp16 (CUDA targets: TVM's ToMixedPrecision, float32 accumulation; others: adds convert-float16), int8 (calibrated QDQ; needs --calib-data or --calib-synthetic) or mixed (int8 where the accuracy budget allows)"),
    calib_data: Optional[Path] = typer.Option(None, "--calib-data", help="int8/mixed calibration data: FILE.npz (arrays by input name; a leading extra dim holds several samples) or a folder of .npz files"),
    calib_method: Optional[str] = typer.Option(None, "--calib-method", help="minmax, entropy or percentile (ONNX Runtime's calibrators) [default: minmax]"),
    calib_synthetic: bool = typer.Option(False, "--calib-synthetic", help="calibrate on random inputs; the report marks the result 'not representative'"),
    accuracy_budget: Optional[str] = typer.Option(None, "--accuracy-budget", help="fp16/int8/mixed accuracy budget on the verification inputs, e.g. cosine>=0.995, max-rel<=0.02, top1-agree>=0.99 (exit 4 if unmet) [default: cosine>=0.999 fp16, cosine>=0.99 int8, exit 3]"),
    max_latency_ms: Optional[float] = typer.Option(None, "--max-latency-ms", help="budget on p50 latency (exit 4)"),
    max_error: Optional[float] = typer.Option(None, "--max-error", help="budget on max abs error (exit 4)"),
    max_memory_mb: Optional[float] = typer.Option(None, "--max-memory-mb", help="budget on the memory the model needs: weights + inputs + peak activations + workspace, MB = 10^6 bytes (exit 4). A model that exceeds the target's memory_capacity_gb fails with exit 2 regardless"),
    fallback: Optional[str] = typer.Option(None, "--fallback", help="onnxruntime|none: run the nodes the target cannot (TVM: nodes its importer lacks; NPU: outside the vendor's op list) on ONNX Runtime's CPU provider [default: onnxruntime on TVM targets, none on NPU targets]"),
    no_fallback: bool = typer.Option(False, "--no-fallback", help="short for --fallback none"),
    backend: str = typer.Option("tvm", "--backend", help="tvm, or auto: also time the whole model on ONNX Runtime and package the faster (the report keeps TVM's own latency)"),
    tune: bool = typer.Option(False, "--tune", help="tune the schedules with MetaSchedule (llvm targets); results are cached per target and reused"),
    tune_trials: Optional[int] = typer.Option(None, "--tune-trials", min=1, help="max tuning trials over all tasks (implies --tune) [default: 64 per task]"),
    tune_time: Optional[str] = typer.Option(None, "--tune-time", help="tuning time budget: seconds or 90s, 10m, 1h30m (implies --tune) [default: 10m]"),
    tuning_db: Optional[Path] = typer.Option(None, "--tuning-db", help="tuning database folder, e.g. one shared in CI (implies --tune) [default: ~/.cache/autoglm-compile/tuning]"),
    tune_strict: bool = typer.Option(False, "--tune-strict", help="fail (exit 2) on a task missing from the tuning database instead of tuning it (implies --tune)"),
    cuda_graph: Optional[bool] = typer.Option(None, "--cuda-graph/--no-cuda-graph", help="CUDA targets: run the kernels as CUDA graphs (Relax's RewriteCUDAGraph) [default: on]"),
    tune_export: Optional[Path] = typer.Option(None, "--tune-export", help="DIR: write the tasks missing from the tuning database there, to tune on the target machine (python -m autoglm_compile.tune_worker DIR/spec.json), then 'tune-merge DIR'; this build uses default schedules for them (implies --tune)"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON on stdout"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress and no table"),
) -> None:
    """Compile MODEL for a target into a verified artifact and print the report."""
    from .pipeline import CompileOptions, compile_model, resolve_config
    from .report import print_report

    opts = CompileOptions(
        source=model, target=target, output=output, preset=f"O{opt_level}", config_path=config,
        input_shapes=list(input_shape), dims=list(dim), sample_inputs=sample_inputs, input_values=list(input_value), trust_pickle=trust_pickle, weights=weights, archive=archive,
        seed=seed, runs=runs, verify_each_pass=verify_each_pass, precision=precision, calib_data=calib_data, calib_method=calib_method,
        calib_synthetic=calib_synthetic, accuracy_budget=accuracy_budget, max_latency_ms=max_latency_ms, max_error=max_error, max_memory_mb=max_memory_mb,
        fallback="none" if no_fallback else fallback, backend=backend,
        tune=tune, tune_trials=tune_trials, tune_time=tune_time, tuning_db=tuning_db, tune_strict=tune_strict, tune_export=tune_export,
        cuda_graph=cuda_graph,
    )
    try:
        if no_fallback and fallback not in (None, "none"):
            raise CompileError(f"--no-fallback and --fallback {fallback} contradict each other", "give one of them")
        if dump_config:
            import yaml

            from .target import resolve_target

            typer.echo(yaml.safe_dump(resolve_config(opts, resolve_target(opts.target)).model_dump(), sort_keys=False))
            return
        report = compile_model(opts, RichProgress(quiet or as_json))
        code = 0
    except CompileError as e:
        report = getattr(e, "report", None)
        if report is not None and e.exit_code in (ExitCode.ACCURACY, ExitCode.BUDGET) and not quiet:
            _show(report, as_json)
        raise fail(e)
    except KeyboardInterrupt:
        err.print("interrupted: no artifact was written")
        raise typer.Exit(130)
    if not quiet or as_json:
        _show(report, as_json)
    if not as_json and not quiet:
        err.print(f"artifact: [bold]{opts.resolved_output()}[/]", highlight=False)
    raise typer.Exit(code)


def _show(report, as_json: bool) -> None:
    from .report import print_report

    if as_json:
        typer.echo(report.model_dump_json(indent=2))
    else:
        print_report(report, err)


@app.command("run")
def run_cmd(
    artifact: Path = typer.Argument(..., help="an artifact folder written by autoglm-compile"),
    input: List[str] = typer.Option([], "--input", "-i", help="NAME=FILE.npy, or FILE.npz with arrays by name; repeatable"),
    save: Optional[Path] = typer.Option(None, "--save", help="write the outputs to this .npz"),
    check: bool = typer.Option(False, "--check", help="compare with the ONNX Runtime outputs stored in the artifact (exit 3 on mismatch)"),
    as_json: bool = typer.Option(False, "--json", help="print the output summary as JSON"),
    profile: Optional[int] = typer.Option(None, "--profile", min=1, help="N: time every kernel over N runs of the (first) inputs and print where the time goes (TVM artifacts of one shape)"),
) -> None:
    """Run an artifact on this machine. Without --input it runs the artifact's stored verification inputs (those of
    every bucket, for an artifact with shape buckets)."""
    import numpy as np

    from .runtime import ArtifactError, load

    try:
        model = load(artifact)
        stored = not input
        if stored:  # (bucket, inputs, verify entry): one per bucket, or one unlabelled for a single-shape artifact
            entries = model.manifest["verify"]
            cases = []
            for v in entries if isinstance(entries, list) else [dict(entries, bucket=None)]:
                with np.load(artifact / v["inputs"]) as z:
                    cases.append((v["bucket"], {k: z[k] for k in z.files}, v))
        else:
            feeds = {}
            for item in input:
                feeds.update(_read_input(item))
            cases = [(None, feeds, None)]
        results = [(label, model(feeds), v) for label, feeds, v in cases]
    except ArtifactError as e:
        raise fail(CompileError(str(e), e.hint))
    from .pipeline import summarize

    kernels = _profile(model, cases[0][1], profile) if profile else None
    names = [o["name"] for o in model.outputs]
    summaries = [(label, [summarize(n, a) for n, a in zip(names, outputs)]) for label, outputs, _ in results]
    if save:
        np.savez(save, **{(f"{label}/{n}" if label else n): a for label, outputs, _ in results for n, a in zip(names, outputs)})
    if as_json:
        doc: dict = {"inputs": "stored verification inputs" if stored else "given"}
        if summaries[0][0] is None:
            doc["outputs"] = summaries[0][1]
        else:
            doc["buckets"] = [{"bucket": label, "outputs": summary} for label, summary in summaries]
        if kernels is not None:
            doc["profile"] = {"runs": profile, "kernels": [dataclasses.asdict(k) for k in kernels]}
        typer.echo(json.dumps(doc, indent=2))
    else:
        for label, summary in summaries:
            for s in summary:
                typer.echo(f"{label + ': ' if label else ''}{s['name']}: {s['dtype']}{s['shape']} mean={s['mean']:.6g} std={s['std']:.6g} abs_sum={s['abs_sum']:.6g}")
        if kernels is not None:
            _print_profile(kernels, profile)
    if check:
        from .measure import compare

        if not stored:
            raise fail(CompileError("--check compares the stored verification inputs' outputs", "leave out --input to use them"))
        failed = False
        for label, outputs, v in results:
            with np.load(artifact / v["expected"]) as z:
                expected = [z[n] for n in names]
            from .precision import Budget

            budget = Budget.model_validate(v["budget"]) if v.get("budget") else None  # fp16/int8/mixed artifacts
            result = compare(outputs, expected, names, v["rtol"], v["atol"], budget)
            worst = max(o.max_abs for o in result.outputs)
            err.print(f"{label + ': ' if label else ''}check vs ONNX Runtime ({result.check_text()}): {'PASS' if result.ok else 'FAIL'}, max abs {worst:.3g}")
            failed = failed or not result.ok
        if failed:
            raise typer.Exit(int(ExitCode.ACCURACY))


PROFILE_ROWS = 15


def _profile(model, feeds: dict, runs: int) -> list:
    from .runtime import ArtifactError, CompiledModel

    if not isinstance(model, CompiledModel):
        raise fail(CompileError(f"--profile times the kernels of a TVM artifact of one shape; this one is {type(model).__name__}",
                                "profile one variant of a bucketed artifact (its variants/<bucket> folder); artifacts with ONNX Runtime segments or for NPU targets cannot be profiled"))
    try:
        return model.profile(feeds, runs)
    except ArtifactError as e:
        raise fail(CompileError(str(e), e.hint))


def _print_profile(kernels: list, runs: int) -> None:
    total = sum(k.ms for k in kernels)
    typer.echo(f"profile: {total:.3f} ms per run in {sum(k.calls for k in kernels)} calls, mean of {runs} runs; the {min(PROFILE_ROWS, len(kernels))} slowest:")
    for k in kernels[:PROFILE_ROWS]:
        typer.echo(f"  {k.ms:10.3f} ms {k.ms / total * 100 if total else 0:5.1f} % {k.calls:5d}x  {k.name}")


def _read_input(item: str) -> dict:
    import numpy as np

    name, sep, path = item.partition("=")
    file = Path(path if sep else name)
    if not file.is_file():
        raise fail(CompileError(f"input file not found: {file}", "give NAME=FILE.npy or FILE.npz"))
    try:
        if file.suffix == ".npz":
            with np.load(file) as z:
                return {k: z[k] for k in z.files}
        return {name: np.load(file)}
    except (ValueError, OSError) as e:
        raise fail(CompileError(f"cannot read {file}: {e}", "save inputs with numpy.save / numpy.savez")) from None


@app.command("tune-merge")
def tune_merge_cmd(
    folder: Path = typer.Argument(..., help="the folder written by --tune-export, after tune_worker ran on the target"),
    target: str = typer.Option(..., "--target", "-t", help="the target the tasks were exported for"),
    tuning_db: Optional[Path] = typer.Option(None, "--tuning-db", help="tuning database folder [default: ~/.cache/autoglm-compile/tuning]"),
) -> None:
    """Merge tuning records measured on the target machine into the tuning database."""
    from .target import resolve_target
    from .tuning import merge_export
    from .tvm_build import make_target

    try:
        path, best, kept = merge_export(folder, make_target(resolve_target(target)), tuning_db)
    except CompileError as e:
        raise fail(e)
    err.print(f"merged {len(best)} task(s) into {path}" + (f"; {len(kept)} keep the default GPU schedule, which tuning did not beat" if kept else ""), highlight=False)
    for name, us in sorted(best.items(), key=lambda kv: -kv[1]):
        typer.echo(f"{name}\t{us:.1f} us")
    for name, us in sorted(kept.items(), key=lambda kv: -kv[1]):
        typer.echo(f"{name}\t{us:.1f} us (default)")


@app.command("bundle-runtime")
def bundle_runtime_cmd(
    target: str = typer.Option("host", "--target", "-t", help="the target whose artifacts the device runs"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="bundle folder [default: build/runtime-<target>]"),
    python: Optional[str] = typer.Option(None, "--python", help="the device's Python, X.Y [default: this one's]"),
    as_json: bool = typer.Option(False, "--json", help="print the bundle's BUNDLE.json"),
) -> None:
    """Write the TVM runtime a device needs to run artifacts (no compiler): PYTHONPATH=DIR TVM_USE_RUNTIME_LIB=1."""
    from .bundle import write_bundle

    try:
        bundle = write_bundle(target, output, python, log=lambda text: err.print(text, highlight=False))
    except CompileError as e:
        raise fail(e)
    i = bundle.info
    if as_json:
        typer.echo(json.dumps({"path": str(bundle.path), **i}, indent=2))
        return
    source = i["from"] if isinstance(i["from"], str) else f"the {i['arch']} wheels"
    err.print(f"wrote {bundle.path}: {i['bytes'] / 2**20:.1f} MiB, {i['files']} files, TVM {i['versions']['apache-tvm']} runtime for {i['arch']}"
              f"{' + CUDA' if i['cuda'] else ''}, CPython {i['python']} (from {source})", highlight=False, soft_wrap=True)
    err.print(f"on the device: PYTHONPATH={bundle.path.name} TVM_USE_RUNTIME_LIB=1 python3 ...; it needs {', '.join(i['needs'])}", highlight=False, soft_wrap=True)


@app.command("targets")
def targets_cmd(as_json: bool = typer.Option(False, "--json")) -> None:
    """List the target descriptors."""
    from rich.table import Table

    from .target import builtin_targets

    targets = builtin_targets()
    if as_json:
        typer.echo(json.dumps({n: t.model_dump(exclude={"source"}) for n, t in targets.items()}, indent=2))
        return
    table = Table("name", "kind", "backend", "arch / cpu", "precisions", "aliases", "description")
    for t in targets.values():
        arch = t.cuda.arch if t.cuda else (t.npu.soc_version or t.npu.vendor) if t.npu else (t.cpu.mcpu or t.cpu.triple) if t.cpu else "-"
        table.add_row(t.name, t.kind, t.backend, arch, ",".join(t.precisions), ",".join(t.aliases), t.description)
    Console().print(table)


@app.command("passes")
def passes_cmd(as_json: bool = typer.Option(False, "--json")) -> None:
    """List the registered graph passes and their options."""
    from rich.table import Table

    from .pass_manager import registered_passes

    passes = registered_passes()
    rows = {n: {"doc": c.doc(), "options": {k: "(required)" if f.is_required() else repr(f.default) for k, f in c.Options.model_fields.items()}, "module": c.__module__} for n, c in passes.items()}
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table("pass", "what it does", "options")
    for n, r in rows.items():
        table.add_row(n, r["doc"], ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "-")
    Console().print(table)


@app.command("doctor")
def doctor_cmd() -> None:
    """Check the installation: versions, the TVM compiler, LLVM, the host CPU, nvcc."""
    import importlib.metadata as md
    import shutil

    from rich.table import Table

    table = Table("check", "result")
    ok = True
    for dist in ("autoglm-compile", "apache-tvm", "apache-tvm-ffi", "onnx", "onnxruntime", "onnx-graphsurgeon", "numpy", "pydantic", "torch"):
        try:
            table.add_row(dist, md.version(dist))
        except md.PackageNotFoundError:
            table.add_row(dist, "[yellow]not installed[/]" if dist == "torch" else "[red]not installed[/]")
            ok = ok and dist == "torch"
    try:
        from tvm.target import codegen

        from .target import cpu_flags, detect_host_cpu

        cpu = detect_host_cpu()
        table.add_row("TVM compiler", f"LLVM {codegen.llvm_version_major()}")
        table.add_row("host CPU", f"{cpu.triple} {cpu.mcpu}, {cpu.cores} cores")
        wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "asimddp", "sve")
        table.add_row("CPU features", " ".join(f for f in cpu_flags() if f in wanted) or "-")
    except Exception as e:  # doctor reports, it does not crash
        ok = False
        table.add_row("TVM compiler", f"[red]unavailable: {e}[/]")
    table.add_row("nvcc", shutil.which("nvcc") or "[yellow]not found (CUDA targets cannot be built)[/]")
    table.add_row("aarch64 linker", shutil.which("aarch64-linux-gnu-gcc") or "[yellow]not found (aarch64 targets cannot be linked: install Debian's gcc-aarch64-linux-gnu)[/]")
    Console().print(table)
    raise typer.Exit(0 if ok else int(ExitCode.USAGE))


def main(argv: list[str] | None = None) -> None:
    """Console entry point. A first argument that is no command is a model: `autoglm-compile m.onnx` compiles."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and not args[0].startswith("-") and args[0] not in COMMANDS:
        args.insert(0, "compile")
    app(args=args, prog_name="autoglm-compile")


if __name__ == "__main__":
    main()
