"""Scripts copied into the artifacts of the vendor-onnx backend (NPU targets). Each is self-contained: it needs
numpy and the vendor's runtime (or onnxruntime on CPU), never autoglm_compile. runner.py is also what
`autoglm_compile.load` uses for such an artifact."""
