# kvtier: `kvtier serve` on the embedded tiers (+ Redis when KVTIER_REDIS_URL is set).
# CPU build by default; for CUDA use a CUDA base image and TORCH_INDEX=https://download.pytorch.org/whl/cu124.
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1

# torch first, from the CPU index: a bare `torch` requirement would pull several GB of CUDA wheels
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"

WORKDIR /app
COPY pyproject.toml README.md requirements.lock ./
COPY kvstore ./kvstore
COPY eviction ./eviction
COPY retrieval ./retrieval
COPY sparse_attn ./sparse_attn
COPY service ./service
COPY connectors ./connectors
COPY kvtier ./kvtier
RUN grep -v '^torch==' requirements.lock > /tmp/constraints.txt && pip install -c /tmp/constraints.txt '.[server,redis,retrieval]' && useradd --system --uid 10001 --home /data kvtier && mkdir -p /data && chown kvtier /data

USER kvtier
ENV KVTIER_HOST=0.0.0.0 KVTIER_PORT=8080 KVTIER_GRPC_PORT=50051 KVTIER_DATA_DIR=/data
VOLUME ["/data"]
EXPOSE 8080 50051
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/readyz', timeout=2)"
# SIGTERM: in-flight requests finish (KVTIER_GRACEFUL_SHUTDOWN_S), then the store closes
STOPSIGNAL SIGTERM
ENTRYPOINT ["kvtier", "serve"]
