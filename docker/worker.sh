#!/usr/bin/env sh
# A worker of pool "$1" in its own checkout: clone (once), point DVC at the shared remote, start.
set -eu
pool="$1"
checkout=/work/alignment
if [ ! -d "$checkout/.git" ]; then
  git clone --quiet "$ALIGNMENT_GIT_URL" "$checkout"
fi
cd "$checkout"
dvc remote add --local --force --default shared "$DVC_REMOTE_URL"
if [ -n "${AWS_ENDPOINT_URL:-}" ]; then
  dvc remote modify --local shared endpointurl "$AWS_ENDPOINT_URL"
fi
exec python -m flows.workers start --pool "$pool" --name "$pool-$(hostname)"
