# The sweeper image: one image for the `worker`, `data`, `launcher` and `report` services
# (docker-compose.yml) and for `docker run` on other GPU hosts (docs/DEPLOY.md).
#
#   docker build -f docker/worker.Dockerfile -t sweeper:latest .
#
# Layers, cheapest to rebuild last:
#   1. the CUDA + PyTorch base (torch comes from here and is never replaced by pip),
#   2. the dependencies named in pyproject.toml (rebuilt only when pyproject.toml changes),
#   3. the package itself: sweeper/ and experiments/, installed with --no-deps.
# Nothing is installed when a container starts.

# torch and torchvision are pinned to what this base ships (see the constraints step below);
# pick another tag of the same family to change CUDA or PyTorch. pyproject.toml asks for
# torch>=2.4 (torchvision, which the base also ships, is only for benchmarks/). docker/build-local.sh swaps in a CPU-only torch base made on
# the machine (no registry, no GPU).
ARG BASE_IMAGE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

# Optional groups from [project.optional-dependencies], comma separated. `gpu` (nvidia-ml-py)
# lets MLflow's system metrics read the worker's GPU; add e.g. "test" for the test tools.
ARG SWEEPER_EXTRAS="gpu"
# Numeric id of the unprivileged user; 10001 clashes with no distribution's default user.
ARG SWEEPER_UID=10001

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /opt/sweeper/src

# --- 2. dependencies: only pyproject.toml is in this layer's cache key -----------------------
COPY pyproject.toml ./
# constraints.txt pins every torch package the base provides, so no dependency can pull a
# different (CPU-only or other-CUDA) build; requirements.txt is [project].dependencies (+
# the extras asked for) and [build-system].requires, so step 3 needs no network.
RUN python -c "import sys; sys.exit(sys.version_info < (3, 11))" || pip install "tomli>=2.0"; \
    python -c "import importlib.metadata as md, os, sys; \
toml = __import__('tomllib' if sys.version_info >= (3, 11) else 'tomli'); \
doc = toml.load(open('pyproject.toml', 'rb')); \
project = doc['project']; \
extras = [e.strip() for e in os.environ.get('SWEEPER_EXTRAS', '').split(',') if e.strip()]; \
reqs = list(project.get('dependencies', [])) + list(doc.get('build-system', {}).get('requires', [])); \
reqs += [r for e in extras for r in project.get('optional-dependencies', {})[e]]; \
open('/opt/sweeper/requirements.txt', 'w').write(''.join(r + chr(10) for r in reqs)); \
have = {(d.metadata['Name'] or '').lower(): d.version for d in md.distributions()}; \
pins = [n + '==' + have[n] for n in ('torch', 'torchvision', 'torchaudio', 'triton') if n in have]; \
open('/opt/sweeper/constraints.txt', 'w').write(''.join(p + chr(10) for p in pins)); \
print('pinned from the base image:', *pins)" \
 && pip install -c /opt/sweeper/constraints.txt -r /opt/sweeper/requirements.txt \
 && python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# --- 3. the package ---------------------------------------------------------------------------
# README*/LICENSE* are globs so the build works whether or not they exist yet (pyproject.toml
# names README.md as the long description).
COPY pyproject.toml README* LICENSE* ./
COPY sweeper/ sweeper/
COPY experiments/ experiments/
RUN pip install --no-deps --no-build-isolation . \
 && rm -rf build *.egg-info \
 && sweeper --version

# --- runtime ----------------------------------------------------------------------------------
# /data is the datasets volume (filled by the `data` service, read-only for workers); it is
# created here owned by the user so a fresh named volume inherits that ownership.
RUN useradd --create-home --uid "${SWEEPER_UID}" --user-group --shell /bin/bash sweeper \
 && mkdir -p /data /home/sweeper/.sweeper/cores /home/sweeper/.sweeper/slots \
 && chown -R sweeper:sweeper /data /home/sweeper

ENV SWEEPER_HOME=/home/sweeper/.sweeper \
    SWEEPER_DATA_DIR=/data

USER sweeper
WORKDIR /home/sweeper

# Exit 0 when the Optuna storage and the MLflow tracking server both answer.
HEALTHCHECK --interval=60s --timeout=30s --start-period=60s --retries=3 \
    CMD ["sweeper", "doctor", "--quiet"]

# SIGTERM (docker stop, compose down, a Kubernetes eviction) makes the worker checkpoint to
# MLflow, hand its trial back and exit; give it time (compose: stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["sweeper"]
CMD ["worker", "--forever"]
