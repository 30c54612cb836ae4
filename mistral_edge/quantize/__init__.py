"""Weight-only quantization: W [N out, K in] (y = x @ W.T) to int8 / int4, pure torch on CPU.

The exporter lays the results out as ONNX initializers (`pack_matmul_nbits`,
`blocked_qdq`); `error_stats` gives the per-tensor line of the export log.
Import the submodules directly: `spec` is torch-free and used by the on-device CLI.
"""
