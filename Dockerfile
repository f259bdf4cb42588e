# gate as a container (also the GitHub Action's image):
#   docker build -t gate . && docker run --rm --network none -v "$PWD:/github/workspace" gate scan MODEL --baseline DIR
#
# Build arguments (all optional; `make image` passes them through):
#   BASE_IMAGE       a Python 3.11 image with python3 -m venv and libseccomp.so.2
#                    (default python:3.11-slim; a Debian bookworm rootfs with python3,
#                    python3-venv, libseccomp2, ca-certificates and passwd works too).
#   TORCH_INDEX_URL  where the CPU-only torch wheel comes from (default: the PyTorch CPU index).
#   WHEELHOUSE       a directory of wheels inside the build context (default `wheelhouse`).
#                    When it holds any *.whl, everything (torch, the runtime dependencies and
#                    gate's build backend) is installed from it alone, with
#                    `pip --no-index --find-links`: no network at build time.
#   GATE_EXTRAS      e.g. `hf` for Hugging Face checkpoint directories (transformers and
#                    tokenizers, ~100 MB).
ARG BASE_IMAGE=python:3.11-slim

# --- build stage: a virtual environment in /opt/gate; the sources and wheels stay here -------
FROM ${BASE_IMAGE} AS build

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG WHEELHOUSE=wheelhouse
ARG GATE_EXTRAS=""

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY policies/ ./policies/
COPY gate/ ./gate/
# The glob lets the wheelhouse be absent: then only constraints.txt lands in /wheelhouse.
COPY constraints.txt ${WHEELHOUSE}* /wheelhouse/

# CPU-only torch keeps the image small (no CUDA libraries); every other dependency is pinned
# by constraints.txt. To stay under the 1.2 GB size target nothing is byte-compiled at install
# time except gate itself, and torch's C++ headers and test binaries (unused at run time) and
# the venv's pip are dropped.
RUN python3 -m venv /opt/gate \
    && if ls /wheelhouse/*.whl > /dev/null 2>&1; then \
         echo "installing from the wheelhouse only (--no-index)"; \
         /opt/gate/bin/pip install --no-compile --no-index --find-links /wheelhouse \
           -c /wheelhouse/constraints.txt torch==2.13.0 ".${GATE_EXTRAS:+[$GATE_EXTRAS]}"; \
       else \
         /opt/gate/bin/pip install --no-compile --index-url "$TORCH_INDEX_URL" torch==2.13.0 \
         && /opt/gate/bin/pip install --no-compile -c /wheelhouse/constraints.txt \
           ".${GATE_EXTRAS:+[$GATE_EXTRAS]}"; \
       fi \
    && SITE="$(/opt/gate/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
    && rm -rf "$SITE/torch/include" "$SITE/torch/test" \
    && /opt/gate/bin/python -m pip uninstall --yes --quiet pip \
    && /opt/gate/bin/python -m compileall -q "$SITE/gate"

# --- run stage ---------------------------------------------------------------------------------
FROM ${BASE_IMAGE}

# The image runs with a read-only root filesystem (`--read-only --tmpfs /tmp`), so everything
# gate writes goes under /tmp: the sandbox's private working directories (TMPDIR) and the
# activation cache with its key (XDG_CACHE_HOME; without it the cache would sit in the
# read-only home and gate would run uncached). Under GitHub Actions $RUNNER_TEMP is used
# instead when it exists in the container.
ENV PATH=/opt/gate/bin:$PATH \
    TMPDIR=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

COPY --from=build /opt/gate /opt/gate

# uid 1001 is the GitHub-hosted runner's user, so /github/workspace and the GITHUB_OUTPUT /
# GITHUB_STEP_SUMMARY files mounted by the runner are writable without running as root.
# The sandboxed model child's seccomp filter needs libseccomp.so.2 from the base image.
# Importing every gate module and the libraries it loads lazily writes bytecode for just those
# modules (torch, numpy, scikit-learn, ...; tens of MB, not all of torch): each run, and each sandboxed child, then
# loads torch several times faster than from source, which a read-only root cannot cache.
RUN python3 -c "import ctypes; ctypes.CDLL('libseccomp.so.2')" \
      || { echo "BASE_IMAGE lacks libseccomp.so.2 (Debian: libseccomp2)" >&2; exit 1; } \
    && PYTHONDONTWRITEBYTECODE='' python3 -c "import importlib, pkgutil, gate; \
[importlib.import_module(m.name) for m in pkgutil.walk_packages(gate.__path__, 'gate.') \
 if not m.name.startswith(('gate.__main__', 'gate.models.hf'))]; \
import torch, torch.jit, safetensors.torch, scipy.optimize, pyseccomp; \
import sklearn.decomposition, sklearn.ensemble, sklearn.svm" \
    && groupadd --gid 1001 gate \
    && useradd --create-home --uid 1001 --gid 1001 --shell /usr/sbin/nologin gate \
    && gate --version && gate policy show strict > /dev/null

USER 1001:1001
WORKDIR /github/workspace
# gate needs no network at run time: run the image with --network none.
ENTRYPOINT ["gate"]
CMD ["--help"]
