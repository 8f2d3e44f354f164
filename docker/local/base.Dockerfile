# Local path only (docker/build-local.sh): a Python base for machines that cannot pull images.
# ROOTFS is a Debian bookworm minbase root filesystem made with mmdebstrap and imported with
# `podman import`; this adds the virtual environment that plays the part of python:3.x-slim's
# system Python (Debian's own Python refuses `pip install` outside a venv, PEP 668).
ARG ROOTFS
FROM ${ROOTFS}
RUN python3 -m venv /opt/venv && /opt/venv/bin/python -m pip --version
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    VIRTUAL_ENV=/opt/venv \
    LANG=C.UTF-8
CMD ["python3"]
