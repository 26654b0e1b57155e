# Redis for engines without a registry (`make image`): Debian's redis-server on the local base. The chart's
# redis.image (redis:7.4-alpine by default) and compose's redis service take it where Docker Hub is out of reach.
ARG BASE=modalink-debian:bookworm
FROM ${BASE}
RUN apt-get update && apt-get install -y --no-install-recommends redis-server && rm -rf /var/lib/apt/lists/* \
 && install -d -o 999 -g 999 /data  # a named volume mounted here takes this owner
USER 999:999
CMD ["redis-server"]
