# Triton Inference Server with the TensorRT-LLM backend, plus canary-trt for the Python models of the
# repository that `canary-trt triton-repo` writes (canary_qwen, and the ensemble's pre/post-processing).
#
#   docker build -f deploy/docker/triton.Dockerfile -t canary-trt-triton:0.1.0 .
#
# 26.05-trtllm-python-py3: TensorRT-LLM 1.2.1 (TensorRT 10.14.1, CUDA 13.1, Python 3.12; per Triton's
# compatibility matrix, triton-inference-server/server PR #8801). The tensorrtllm (C++) backend that the
# ensemble uses exists in TensorRT-LLM 1.0-1.2 only (the 1.3 line removed it), and engines built by
# build/build_decoder.py must come from the same TensorRT-LLM version as the backend: build them in this image.
# Not built or run by this project's CI.
FROM nvcr.io/nvidia/tritonserver:26.05-trtllm-python-py3

WORKDIR /opt/canary-trt
COPY pyproject.toml README.md ./
COPY engine ./engine
COPY runtime ./runtime
COPY build ./build
# --no-deps: keep the image's own torch, TensorRT and TensorRT-LLM (pip could otherwise pull another torch);
# canary-trt's other dependencies are small and have wheels. The Python backend's stubs run this Python, so the
# models find canary-trt in its site-packages.
RUN pip install --no-cache-dir --no-deps . \
    && pip install --no-cache-dir "safetensors>=0.4" "tokenizers>=0.19" "huggingface_hub>=0.23" \
       "soundfile>=0.12.1" "soxr>=0.3" "tqdm>=4.60" "av>=14" \
    && python3 -c "import runtime.triton.repository, tensorrt_llm, tensorrt; print('canary-trt ok')"

EXPOSE 8000 8001 8002
CMD ["tritonserver", "--model-repository=/repository"]
