"""On-device runtime: onnxruntime + numpy + a tokenizer library, never torch or transformers."""
