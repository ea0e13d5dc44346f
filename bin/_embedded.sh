# Shared by bin/run and bin/manage: the embedded default's environment (development settings, the issuer
# on PORT, the bundled fake vLLM on FAKE_PORT), so a command run by hand sees the settings the server has.
# usage: . bin/_embedded.sh   (any variable already set wins)
export DJANGO_DEBUG=${DJANGO_DEBUG:-true}
PORT=${PORT:-8000}
FAKE_PORT=${FAKE_PORT:-8001}
export PORTCULLIS_ISSUER=${PORTCULLIS_ISSUER:-http://127.0.0.1:$PORT}
export VLLM_UPSTREAMS=${VLLM_UPSTREAMS:-http://127.0.0.1:$FAKE_PORT}
