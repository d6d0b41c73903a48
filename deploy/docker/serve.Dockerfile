# `canary-trt serve` (OpenAI-compatible transcription API) on PyTorch's CUDA runtime image.
#
#   docker build -f deploy/docker/serve.Dockerfile -t canary-trt-serve:0.1.0 .
#
# pytorch/pytorch:2.10.0-cuda12.8-cudnn9-runtime: torch 2.10 on CUDA 12.8. The TensorRT encoder needs the
# tensorrt wheel (installed below from PyPI, extra "tensorrt"); a TensorRT-LLM decoder (--engine-dir) needs
# TensorRT-LLM of the version that built the engine, which this image does not carry: use the Triton image
# (triton.Dockerfile) for that, or add `pip install tensorrt_llm==<that version>`.
# Not built or run by this project's CI.
FROM pytorch/pytorch:2.10.0-cuda12.8-cudnn9-runtime

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /opt/canary-trt
COPY pyproject.toml README.md ./
COPY engine ./engine
COPY runtime ./runtime
COPY build ./build
# torch is already in the image and satisfies torch>=2.4, so pip keeps it.
RUN pip install ".[serving,onnx,longform,tensorrt]" \
    && python3 -c "import runtime.server, fastapi, tensorrt; print('canary-trt ok')"

# SIGTERM goes straight to the server (exec form, PID 1), which drains before exiting.
USER 1000
EXPOSE 8000
ENTRYPOINT ["canary-trt", "serve", "--host", "0.0.0.0", "--port", "8000"]
