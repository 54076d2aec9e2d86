# The SCAN service image: API, GPU worker and CPU worker run the same image with different commands.
#   docker build -t scan .                          # CPU torch (small image, runs anywhere)
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t scan:gpu .
# The GPU build pulls CUDA wheels of torch; faiss stays the CPU build unless EXTRAS=gpu is added
# (faiss-gpu-cu12). docker-compose.yml builds both variants.
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG EXTRAS=""
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    SCAN_VAR_DIR=/data

RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 && rm -rf /var/lib/apt/lists/*
WORKDIR /srv/scan

# Dependencies first (cached layer), then the code.
COPY pyproject.toml README.md ./
RUN mkdir -p ml app workers && touch ml/__init__.py app/__init__.py workers/__init__.py \
    && pip install --extra-index-url "$TORCH_INDEX" ".${EXTRAS:+[$EXTRAS]}" \
    && pip uninstall -y scan-service
COPY ml ./ml
COPY app ./app
COPY workers ./workers
COPY migrations ./migrations
COPY alembic.ini ./
RUN pip install --no-deps . && useradd --create-home --uid 1000 scan && mkdir -p /data && chown scan /data
USER scan
VOLUME ["/data"]
EXPOSE 8000
CMD ["uvicorn", "app.main:app", "--host", "0.0.0.0", "--port", "8000"]
