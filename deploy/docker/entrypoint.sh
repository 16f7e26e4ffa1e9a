#!/bin/sh
# The image's entrypoint. `docker run IMAGE [ARGS]`: ARGS are a reranker-server command (serve,
# download, --help, ...), unless the first one is a program of the image (python, sh, ...): that
# runs as itself. exec, so the program is PID 1 and gets `docker stop`'s SIGTERM.
if [ "$#" -gt 0 ] && [ "${1#-}" = "$1" ] && command -v "$1" >/dev/null 2>&1; then
    exec "$@"
fi
exec reranker-server "$@"
