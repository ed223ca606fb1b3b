# One image for all three processes (webhook, worker, flower); docker-compose.yml picks
# the command. The default command is the webhook, like the Procfile's `web` line.
FROM python:3.11-slim

# requirements.txt pins torch==2.13.0. On hosts other than ours, that pin resolves on PyPI
# to the default CUDA-enabled Linux wheel (several GB of NVIDIA libraries). This image
# installs torch first from the index below, which by default is PyTorch's CPU-only index;
# for a GPU image build with --build-arg TORCH_INDEX_URL=https://pypi.org/simple (or a
# https://download.pytorch.org/whl/cuXXX index). pip then sees torch already satisfied
# when it installs the rest of requirements.txt.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/data/hf

WORKDIR /app

COPY requirements.txt ./
RUN pip install "$(grep -E '^torch==' requirements.txt)" --index-url "${TORCH_INDEX_URL}" \
 && pip install -r requirements.txt

# Non-root user with a home (gunicorn keeps its control socket under $HOME). /data/hf is
# created and owned here so a fresh named volume mounted on it inherits the ownership.
RUN useradd --create-home --uid 10001 app \
 && mkdir -p /data/hf \
 && chown -R app:app /data

COPY common/ common/
COPY webhook/ webhook/
COPY worker/ worker/
COPY Procfile gunicorn.conf.py ./

USER app

EXPOSE 8000

# The Procfile's `web` line. gunicorn.conf.py binds 0.0.0.0:$PORT (default 8000) with
# $WEB_CONCURRENCY workers (default 2), both read at start-up, and prepares the metrics
# directory every gunicorn worker shares (without it /metrics shows one worker's counters).
CMD ["gunicorn", "-c", "gunicorn.conf.py", "webhook:create_app()"]
