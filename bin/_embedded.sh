# Shared by bin/run and bin/manage: the embedded default's environment (development settings, the issuer
# on PORT, the bundled fake vLLM on FAKE_PORT), so a command run by hand sees the settings the server has.
# usage: . bin/_embedded.sh   (any variable already set wins; sets EMBEDDED to true or false)
# DATABASE_URL or REDIS_URL set means a real deployment, not the embedded default: then nothing here is set
# (EMBEDDED=false), so config/settings.py checks that deployment's own settings: development mode, its
# secret key and an http issuer are never a silent default for a production database.
if [ -n "${DATABASE_URL:-}" ] || [ -n "${REDIS_URL:-}" ]; then
  EMBEDDED=false
  return 0
fi
EMBEDDED=true
export DJANGO_DEBUG=${DJANGO_DEBUG:-true}
PORT=${PORT:-8000}
FAKE_PORT=${FAKE_PORT:-8001}
export PORTCULLIS_ISSUER=${PORTCULLIS_ISSUER:-http://127.0.0.1:$PORT}
export VLLM_UPSTREAMS=${VLLM_UPSTREAMS:-http://127.0.0.1:$FAKE_PORT}
