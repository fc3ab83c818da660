# syntax=docker/dockerfile:1
# The olmo-disagg image: the router, the prefill/decode workers and Ray, one image for
# every container of the Kubernetes manifests (k8s/) and for scripts/launch_ray_cluster.sh.
#
#   docker build -t olmo-disagg:0.1.0 .                           # CPU (target: llvm)
#   docker build --build-arg EXTRAS=gpu -t olmo-disagg:0.1.0-gpu .  # adds the gpu extra
#
# Compiling for `target: cuda` also needs a CUDA compiler in the image (nvcc, or NVRTC
# through the cuda-bindings package, TVM's default); for that build FROM an image that
# has one and Python 3.11: --build-arg BASE_IMAGE=<cuda-devel image with python3.11>.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# Extras of this project to install ("gpu", or empty).
ARG EXTRAS=""
# ray[default] adds the dashboard agent on top of the project's ray dependency: it serves
# Ray's Prometheus metrics (metrics-export-port) and the /api/healthz endpoint that the
# Kubernetes probes (and KubeRay's defaults) use. Keep it equal to pyproject's ray pin.
ARG RAY_VERSION=2.60.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAY_AUTH_MODE=disabled \
    RAY_USAGE_STATS_ENABLED=0

# g++: TVM links every compiled model library with the system C++ compiler at run time
# (the compiled-library cache then spares restarts that work).
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*

# An unprivileged user; uid/gid 1000 is what the Kubernetes manifests run as.
RUN groupadd --gid 1000 olmo \
    && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/olmo --shell /bin/bash olmo

# Install the project as the README does (`pip install .`), into the system Python so
# that `olmo-serve` and `ray` are in /usr/local/bin, on PATH even for the login shells
# KubeRay starts Ray with. .dockerignore lets only the packages and pyproject through.
COPY . /tmp/olmo-disagg
RUN cd /tmp/olmo-disagg \
    && pip install ".${EXTRAS:+[${EXTRAS}]}" "ray[default]==${RAY_VERSION}" \
    && cd / \
    && rm -rf /tmp/olmo-disagg \
    && olmo-serve --help >/dev/null \
    && python -c "import olmo_model.demo as d; assert (d.DEMO_MODEL_DIR / 'model.safetensors').is_file()"

USER 1000:1000
WORKDIR /home/olmo
ENV HOME=/home/olmo

# 50051 router API (gRPC), 8000 router API (OpenAI-compatible HTTP, /metrics), 50061
# prefill worker, 50071 decode worker, 6379 Ray GCS, 10001 Ray client, 8265 Ray
# dashboard, 8080 Ray metrics, 52365 Ray dashboard agent.
EXPOSE 50051 8000 50061 50071 6379 10001 8265 8080 52365

# The manifests give every container its own command; alone, the image runs the local
# cluster on the demo model: docker run -p 50051:50051 olmo-disagg:0.1.0
CMD ["olmo-serve", "up", "--serve", "--router-host", "0.0.0.0"]
