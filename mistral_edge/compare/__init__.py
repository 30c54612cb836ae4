"""Compare quant levels of one model: quality, memory and speed, measured the same way for every variant.

Protocol (`mistral-edge compare`, `run.run_compare`):
- Text: --text FILE (UTF-8) or --dataset wikitext-2 (test split), tokenized once
  without BOS; the first --n-windows (32) non-overlapping windows of --ctx (512)
  tokens. Each window is evaluated from an empty cache with chunked prefill
  (the export's chunk, min(128, W)) in all-logits mode; every token but the
  first of a window is scored (32 x 511 = 16352 tokens by default).
- Perplexity: exp(mean negative log-likelihood of the scored tokens).
- KL(fp32 || variant) per scored position, averaged, and top-1 agreement (the
  variant's argmax equals the reference's). The reference is the fp32 ONNX
  export at the largest W, measured first; its log-probabilities are kept on
  disk as uint16 codes on a per-position linear grid, logp ~= low + code * step
  (quality.GridLogProbs). Its own KL is therefore exactly 0.
- Memory: bundle size on disk (all files), weight and KV-cache bytes from the
  manifest's memory budget, and the peak RSS of a fresh process that loads the
  variant and runs the speed benchmark (speed.py).
- Speed: prefill of a 128-token prompt (the text's first tokens) and 64 decode
  steps, one warm-up run then the median of --runs runs, at --threads threads
  (recorded in every row).
- Determinism: ONNX Runtime CPU with a fixed thread count gives bit-identical
  logits run to run, and the windows are fixed, so quality numbers repeat exactly.
- Extra rows: the PyTorch reference in fp32 and bf16 (same windows, same KL
  reference), the same reference with bitsandbytes int8 (LLM.int8) / nf4
  linears (model/bnb.py; a note with the reason where bitsandbytes cannot run),
  and calibrated int4 (`int4-g32-awq`: AWQ scales, activation-weighted rounding
  and the most sensitive linears int8, all from --calib text; quantize/calibrate.py).
- --windows sweeps W: every quant at every W; W >= ctx cannot change quality
  under this protocol (each window fits the cache), only the KV-cache bytes.

This package's __init__ imports nothing: the speed worker (`python -m
mistral_edge.compare.speed`) must not pull torch into the process it measures.
"""
