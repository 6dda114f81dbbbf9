#!/usr/bin/env sh
# A worker of pool "$1" in its own checkout: clone (once), point DVC at the shared remote, start.
# Credentials come from the environment (docker-compose.yml, from the untracked .env): Prefect's auth
# string, the MLflow worker account, the DVC remote's scoped S3 account; none is written to the checkout
# but the DVC remote's endpoint in .dvc/config.local (git ignores it).
set -eu
pool="$1"
checkout=/work/alignment
if [ ! -d "$checkout/.git" ]; then
  git clone --quiet -- "$ALIGNMENT_GIT_URL" "$checkout"
fi
cd "$checkout"
dvc remote add --local --force --default shared "$DVC_REMOTE_URL"
# verify: every file pulled is hashed again, so an object planted in the remote under another's hash
# is refused instead of checked out
dvc remote modify --local shared verify true
if [ -n "${AWS_ENDPOINT_URL:-}" ]; then
  dvc remote modify --local shared endpointurl "$AWS_ENDPOINT_URL"
fi
exec python -m flows.workers start --pool "$pool" --name "$pool-$(hostname)"
