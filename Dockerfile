# Tessera web service and jobs, CPU build. Data (SQLite, images, masks, models) lives in /data.
#   docker build -t tessera .
#   docker run -p 8000:8000 -v tessera-data:/data \
#     -e TESSERA_SECRET_KEY="$(python3 -c 'import secrets; print(secrets.token_urlsafe(48))')" tessera
# The image runs in production mode: a secret key is required (share one between containers),
# and cookies are HTTPS-only (serve it behind TLS; set TESSERA_TRUSTED_PROXIES to the proxy).
# For PostgreSQL set TESSERA_DATABASE_URL and run `tessera db upgrade` once before serving.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TESSERA_DATA_DIR=/data \
    TESSERA_ENVIRONMENT=production

WORKDIR /srv/tessera

# CPU wheels of PyTorch first: the default index would bring CUDA builds of several GB.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.14.1 torchvision==0.29.1

COPY pyproject.toml README.md alembic.ini ./
COPY app ./app
COPY ml ./ml
COPY migrations ./migrations
COPY frontend ./frontend
# Editable, so that alembic.ini, migrations/ and frontend/ are found next to the code.
# With the PostgreSQL driver and the S3 client: compose.yaml and deploy/k8s use both.
RUN pip install -e ".[postgres,s3]" && useradd --system --home /data tessera && mkdir -p /data \
    && chown tessera /data

USER tessera
VOLUME /data
EXPOSE 8000
HEALTHCHECK CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz')"
CMD ["tessera", "serve", "--host", "0.0.0.0", "--port", "8000"]
