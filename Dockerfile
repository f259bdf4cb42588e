# gate as a container (also the GitHub Action's image):
#   docker build -t gate . && docker run --rm --network none -v "$PWD:/github/workspace" gate scan MODEL --baseline DIR
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# Optional extras, e.g. `docker build --build-arg GATE_EXTRAS=hf` for Hugging Face
# checkpoint directories (adds transformers and tokenizers, ~100 MB).
ARG GATE_EXTRAS=""

WORKDIR /opt/gate
COPY pyproject.toml constraints.txt README.md ./
COPY policies/ ./policies/
COPY gate/ ./gate/

# CPU-only torch from the PyTorch CPU index keeps the image small (no CUDA libraries); every
# other dependency is pinned by constraints.txt. The source tree is removed after the
# (non-editable) install: the wheel carries the policies, templates and schemas. To stay
# under the 1.2 GB size target, nothing is byte-compiled at install time except gate itself,
# and torch's C++ headers and test binaries (unused at run time) are dropped.
# uid 1001 is the GitHub-hosted runner's user, so /github/workspace and the GITHUB_OUTPUT /
# GITHUB_STEP_SUMMARY files mounted by the runner are writable without running as root.
RUN pip install --no-cache-dir --no-compile \
        --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
    && pip install --no-cache-dir --no-compile -c constraints.txt ".${GATE_EXTRAS:+[$GATE_EXTRAS]}" \
    && SITE="$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
    && rm -rf "$SITE/torch/include" "$SITE/torch/test" /opt/gate/gate /opt/gate/policies /opt/gate/build \
    && python -m compileall -q "$SITE/gate" \
    && groupadd --gid 1001 gate \
    && useradd --create-home --uid 1001 --gid 1001 --shell /usr/sbin/nologin gate \
    && gate --version && gate policy show strict > /dev/null

USER 1001:1001
WORKDIR /github/workspace
# gate needs no network at run time: run the image with --network none.
ENTRYPOINT ["gate"]
CMD ["--help"]
