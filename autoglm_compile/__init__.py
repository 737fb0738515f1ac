"""autoglm-compile: an ahead-of-time model compiler. ONNX or PyTorch in; a verified TVM artifact and a
latency / memory / accuracy report out.

    import autoglm_compile
    model = autoglm_compile.load("build/resnet50")   # runtime only: numpy + the TVM runtime
    outputs = model({"pixel_values": x})
"""
__version__ = "0.1.0"


def load(path, device=None, threads=None):
    """Load an artifact folder for running (see autoglm_compile.runtime)."""
    from .runtime import load as _load

    return _load(path, device, threads)


def compile(source, target="host", output=None, **kwargs):  # noqa: A001 - the API's natural name
    """Compile a model; keyword arguments are those of pipeline.CompileOptions. Returns the report."""
    from .pipeline import CompileOptions, compile_model

    return compile_model(CompileOptions(source=source, target=target, output=output, **kwargs))
