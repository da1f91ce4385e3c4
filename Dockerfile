# syntax=docker/dockerfile:1
# One image for the farm's worker, controller and dashboard: docker-compose.yml picks the role
# with its command (`fuzzfarm worker`, `fuzzfarm controller`, `fuzzfarm dashboard`).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# Build stage: wheels for the project (its native hooks are C, so gcc) and every dependency,
# so that the runtime stage installs from local files only and carries no compiler.
FROM ${PYTHON_IMAGE} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY fuzzfarm ./fuzzfarm
COPY kernel_emu ./kernel_emu
COPY fuzz ./fuzz
COPY corpus ./corpus
COPY workers ./workers
COPY dashboard ./dashboard
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM ${PYTHON_IMAGE} AS runtime
# the wheels are mounted, not copied, so they take no layer in the final image; --no-index
# keeps the install to what the build stage produced
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels rustux-fuzzfarm
RUN useradd --create-home --uid 10001 --user-group fuzzfarm
USER fuzzfarm
WORKDIR /home/fuzzfarm
ENV PYTHONUNBUFFERED=1 \
    FUZZFARM_CACHE=/home/fuzzfarm/cache
CMD ["fuzzfarm", "--help"]
