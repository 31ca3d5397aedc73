# Image for cluster nodes (launcher + KubeRay): the official Ray image for our Ray/Python/CUDA, plus
# the project.  The base runs as the non-root user `ray`.
FROM rayproject/ray:2.60.0-py311-gpu
WORKDIR /home/ray/audio-jepa
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users service ./service
COPY --chown=ray:users jobs ./jobs
COPY --chown=ray:users tuning ./tuning
COPY --chown=ray:users cluster ./cluster
RUN pip install --no-cache-dir -e . \
 && pip install --no-cache-dir --no-deps "tinysoundfont>=0.3" \
 && python -c "import service.model, jobs.pretrain"
USER ray
ENV PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
