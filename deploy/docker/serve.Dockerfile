# `canary-trt serve` (OpenAI-compatible transcription API) on PyTorch's CUDA runtime image.
#
#   docker build -f deploy/docker/serve.Dockerfile -t canary-trt-serve:0.1.0 .
#
# pytorch/pytorch:2.10.0-cuda12.8-cudnn9-runtime: torch 2.10 on CUDA 12.8. The TensorRT encoder runs on
# tensorrt-cu12 10.14.1 from PyPI: the CUDA 12 build of the TensorRT release the Triton image carries
# (TensorRT-LLM 1.2.1 pins 10.14.1), as plans only load in the TensorRT version that built them. A TensorRT-LLM
# decoder (--engine-dir) needs the TensorRT-LLM that built the engine, which this image does not carry: serve
# it from the Triton image (triton.Dockerfile).
# Not built or run by this project's CI.
FROM pytorch/pytorch:2.10.0-cuda12.8-cudnn9-runtime

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /opt/canary-trt
COPY pyproject.toml README.md ./
COPY engine ./engine
COPY runtime ./runtime
COPY build ./build
# torch is already in the image and satisfies torch>=2.4, so pip keeps it.
RUN pip install ".[serving,onnx,longform]" "tensorrt-cu12==10.14.1.48.post1" \
    && python3 -c "import runtime.server, fastapi, tensorrt; print('canary-trt ok')"

# SIGTERM goes straight to the server (exec form, PID 1), which drains before exiting.
USER 1000
EXPOSE 8000
ENTRYPOINT ["canary-trt", "serve", "--host", "0.0.0.0", "--port", "8000"]
