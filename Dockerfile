# megatron_var training image: NGC PyTorch (torch + Transformer Engine + apex, built together by NVIDIA)
# plus megatron-core 0.19.x and this package. Docs: docs/cluster.md. Lint: python docker/lint_dockerfile.py
#
# Pinned base, from the NGC PyTorch 25.12 release notes
# (docs.nvidia.com/deeplearning/frameworks/pytorch-release-notes/rel-25-12.html):
#   Ubuntu 24.04, Python 3.12 (/usr/local/lib/python3.12/dist-packages), CUDA 13.1.0,
#   PyTorch 2.10.0a0+b4e4ee81d3, Transformer Engine and apex preinstalled. The exact torch / TE / apex
#   versions of the image you build are printed by the first RUN step (docker/base_constraints.py).
#
# Build (repository root):
#   docker build -t megatron-var:0.1.0 .
#   docker build -t megatron-var:0.1.0 --build-arg CREATE_USER=1 --build-arg USER_UID="$(id -u)" .
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.12-py3
FROM ${BASE_IMAGE}

LABEL org.opencontainers.image.title="megatron_var" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.description="VAR alignment for Llama/Qwen on megatron-core"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# CUDA_DEVICE_MAX_CONNECTIONS=1: megatron-core's TP/SP communication overlap relies on a single
# hardware queue so that communication kernels are scheduled before the GEMMs they feed.
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CUDA_DEVICE_MAX_CONNECTIONS=1

WORKDIR /workspace/megatron_var

# 1. megatron-core in its own (rarely changing) layer. The constraints file pins the base image's
#    torch / TE / apex / numpy to their installed versions, so pip keeps them or fails loudly.
COPY docker/base_constraints.py docker/base_constraints.py
RUN python docker/base_constraints.py > /tmp/base-constraints.txt \
    && cat /tmp/base-constraints.txt \
    && pip install --no-cache-dir --constraint /tmp/base-constraints.txt "megatron-core>=0.19,<0.20"

# 2. This package (dependencies from pyproject.toml, same constraints; megatron-var-* console scripts), then
#    its launchers and tools.
COPY pyproject.toml setup.py README.md ./
COPY megatron_var ./megatron_var
COPY checkpoints_convert ./checkpoints_convert
RUN pip install --no-cache-dir --constraint /tmp/base-constraints.txt . \
    && python docker/base_constraints.py | diff /tmp/base-constraints.txt - \
    && python -c "import importlib.metadata as m; print('megatron-core', m.version('megatron-core'), '| megatron_var', m.version('megatron_var'))"
COPY examples ./examples
COPY tools ./tools

# 3. Optional non-root user: --build-arg CREATE_USER=1 --build-arg USER_UID="$(id -u)" so files written to
#    mounted checkpoint/run directories belong to you. Default: root, as in the NGC image.
#    An existing account with that UID (Ubuntu 24.04 ships "ubuntu" as 1000) is reused.
ARG CREATE_USER=0
ARG USER_UID=0
RUN if [ "${CREATE_USER}" = 1 ]; then \
        if [ "${USER_UID}" = 0 ]; then echo "CREATE_USER=1 needs --build-arg USER_UID=<non-zero uid>" >&2; exit 2; fi; \
        getent passwd "${USER_UID}" > /dev/null || useradd --create-home --uid "${USER_UID}" --shell /bin/bash var; \
        chown -R "${USER_UID}" /workspace/megatron_var; \
    elif [ "${USER_UID}" != 0 ]; then \
        echo "USER_UID=${USER_UID} needs --build-arg CREATE_USER=1" >&2; exit 2; \
    fi
USER ${USER_UID}

# No HEALTHCHECK: this is a batch training image, not a service.
CMD ["python", "-m", "megatron_var.cli.train", "--help"]
