# The SCAN service image, in two variants; API and workers run it with different commands.
#   docker build -t scan-service:cpu .             # API and CPU worker: CPU torch, faiss-cpu
#   docker build --build-arg VARIANT=gpu --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 \
#                -t scan-service:gpu .             # GPU worker: CUDA torch, faiss-gpu-cu12 (no faiss-cpu)
# docker/requirements.py derives each variant's list from pyproject.toml; docker-compose.yml builds both.
FROM python:3.11-slim

ARG VARIANT=cpu
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    SCAN_VAR_DIR=/data

RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 && rm -rf /var/lib/apt/lists/*
WORKDIR /srv/scan

# Dependencies first (cached layer), then the code.
COPY pyproject.toml README.md ./
COPY docker/requirements.py ./docker/
RUN python docker/requirements.py "$VARIANT" > /tmp/requirements.txt \
    && pip install --extra-index-url "$TORCH_INDEX" -r /tmp/requirements.txt
COPY ml ./ml
COPY app ./app
COPY workers ./workers
COPY cli ./cli
COPY migrations ./migrations
COPY alembic.ini ./
RUN pip install --no-deps . && useradd --create-home --uid 1000 scan && mkdir -p /data && chown scan /data
USER scan
VOLUME ["/data"]
EXPOSE 8000
CMD ["uvicorn", "app.main:app", "--host", "0.0.0.0", "--port", "8000"]
