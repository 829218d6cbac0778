# syntax=docker/dockerfile:1
# The kvmesh image: `kvmesh serve ROLE`; the manifests in k8s/ pass the role as the first argument.
#
#   CPU (default):  docker build -t kvmesh:0.1.0-cpu .
#   CUDA:           docker build -t kvmesh:0.1.0-cuda \
#                     --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#                     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#
# The torch index must match the base: .../whl/cpu for a CPU base, the .../whl/cuXYZ of the base's
# CUDA version for a CUDA one. torch stays pinned to pyproject.toml's version.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS python
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# CUDA base images ship no Python: install the distribution's (python:*-slim already has one).
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

FROM python AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# torch first, from the index that matches the base; installing kvmesh then finds it satisfied.
RUN python3 -m venv /opt/venv \
    && pip install --no-cache-dir torch==2.13.0 --index-url "${TORCH_INDEX_URL}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY kvmesh/ kvmesh/
COPY gateway/ gateway/
COPY prefill_service/ prefill_service/
COPY decode_service/ decode_service/
COPY cache_store/ cache_store/
# The default model ships inside the package; it is also copied to a fixed path the manifests name
# (KVMESH_MODEL), so a pod's model does not depend on where pip put site-packages.
RUN pip install --no-cache-dir . \
    && mkdir -p /opt/kvmesh/models \
    && cp -r "$(python -c 'import kvmesh; print(kvmesh.default_model_path())')" /opt/kvmesh/models/default

FROM python
RUN useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin kvmesh
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/kvmesh /opt/kvmesh
USER 10001:10001
WORKDIR /home/kvmesh
# gateway 50051, cache store 50060, prefill 50070, decode 50080 (as in k8s/base), metrics 9400.
EXPOSE 50051 50060 50070 50080 9400
ENTRYPOINT ["kvmesh", "serve"]
CMD ["--help"]
