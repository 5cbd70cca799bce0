# claudesrv and the Claude Code CLI in one image: a non-root user, the data (sessions, workspaces, event logs
# and the CLI's own transcripts) in the /data volume, listening on tcp:3000 with tokens.
#
#   docker build -t claudesrv .
#   docker run -d -p 3000:3000 -v claudesrv-data:/data \
#     -e ANTHROPIC_API_KEY -e CLAUDESRV_AUTH_TOKENS="$(cat tokens.txt)" claudesrv
#   # or the tokens from a file:  -v "$PWD/tokens.txt:/run/secrets/claudesrv-tokens:ro" claudesrv \
#   #                               --auth-token-file /run/secrets/claudesrv-tokens
#
# Arguments after the image name are added to claudesrv's (e.g. --log-format json, --max-runs 8).

# Debian bookworm: Node.js 22 from the image, Python 3.11 from Debian
FROM node:22-bookworm-slim

ARG CLAUDE_CODE_VERSION=latest

# tini reaps what the CLI's tools leave behind (the daemon is PID 1's only child); git for Claude's tools
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv tini git ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && npm install -g "@anthropic-ai/claude-code@${CLAUDE_CODE_VERSION}" \
    && npm cache clean --force

COPY setup.py README.md LICENSE /src/
COPY claudesrv /src/claudesrv
COPY twisted /src/twisted
RUN python3 -m venv /opt/claudesrv \
    && /opt/claudesrv/bin/pip install --no-cache-dir /src \
    && /opt/claudesrv/bin/python -c 'from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))' \
    && rm -rf /src

RUN useradd --system --create-home --home-dir /home/claudesrv --uid 10001 claudesrv \
    && mkdir -p /data \
    && chown claudesrv:claudesrv /data

# the CLI's transcripts live in the volume too, so sessions resume after the container is replaced;
# the CLI cannot update itself here (rebuild the image instead)
ENV PATH=/opt/claudesrv/bin:$PATH \
    CLAUDE_CONFIG_DIR=/data/claude \
    DISABLE_AUTOUPDATER=1 \
    PYTHONUNBUFFERED=1

USER claudesrv
WORKDIR /data
VOLUME ["/data"]
EXPOSE 3000

HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:3000/healthz', timeout=4)"]

# tcp:3000 on every interface: claudesrv refuses to start without a token (CLAUDESRV_AUTH_TOKENS or
# --auth-token-file), and SIGTERM (docker stop) ends the turns cleanly within --kill-grace + 5 s
ENTRYPOINT ["tini", "--", "claudesrv", "--data-dir", "/data", "--listen", "tcp:3000"]
CMD []
