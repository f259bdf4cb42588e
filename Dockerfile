# gate as a container: `docker run --rm -v "$PWD:/work" -w /work gate scan MODEL --baseline DIR`
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/gate
COPY pyproject.toml constraints.txt README.md ./
COPY gate/ ./gate/
COPY policies/ ./policies/

# CPU-only torch from the PyTorch CPU index keeps the image small (no CUDA libraries).
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
    && pip install -c constraints.txt . \
    && useradd --create-home --uid 1001 gate

USER gate
WORKDIR /github/workspace
ENTRYPOINT ["gate"]
CMD ["--help"]
