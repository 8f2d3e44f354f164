# Local path only (docker/build-local.sh): the stand-in for the CUDA PyTorch base of
# docker/worker.Dockerfile on machines without a registry or a GPU: the local Python base
# with a CPU-only torch build (~180 MB instead of ~3.5 GB of CUDA wheels). No torchvision: the
# package does not import it (benchmarks/ does), and PyPI's torchvision only loads with a CUDA torch.
ARG BASE_IMAGE=sweeper-base:local
FROM ${BASE_IMAGE}
ARG TORCH_REQUIREMENTS="torch"
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN pip install ${TORCH_REQUIREMENTS} \
 && python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
