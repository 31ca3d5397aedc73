# Image for cluster nodes (launcher + KubeRay): the official Ray image for our Ray/Python, plus the project.
# The base runs as the non-root user `ray`.
#
# CUDA: `pip install -e .` brings torch==2.11.0 from PyPI, whose Linux wheels carry their own CUDA 13.0 libraries
# (nvidia-*-cu13 packages); the base image's CUDA userspace is not what torch uses.  The NVIDIA *driver* comes from
# the host, and CUDA 13 needs the r580 series or newer: the node images in cluster/ray-cluster.yaml and the GPU node
# labels in cluster/kuberay/ are chosen for that (docs/cluster.md).  NVIDIA_REQUIRE_CUDA (replacing the base's, which
# states the base's own CUDA) makes the NVIDIA container runtime refuse to start this image on a driver too old for
# CUDA 13 instead of letting training fail later; the build checks that it names the CUDA of the torch it installed.
FROM rayproject/ray:2.60.0-py311-gpu
ENV NVIDIA_REQUIRE_CUDA="cuda>=13.0"
WORKDIR /home/ray/audio-jepa
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users service ./service
COPY --chown=ray:users jobs ./jobs
COPY --chown=ray:users tuning ./tuning
COPY --chown=ray:users cluster ./cluster
RUN pip install --no-cache-dir -e . \
 && pip install --no-cache-dir --no-deps "tinysoundfont>=0.3" \
 && python -c "import service.model, jobs.pretrain" \
 && python -c "import os, torch; need = 'cuda>=' + str(torch.version.cuda); got = os.environ['NVIDIA_REQUIRE_CUDA']; assert got == need, (got, need, torch.__version__)"
USER ray
ENV PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
