"""canary-trt engine: the exact PyTorch Canary-Qwen-2.5B model, its loader and (later) its compiled stages."""
