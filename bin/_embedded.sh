# shellcheck shell=bash
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
# shellcheck disable=SC2034  # EMBEDDED is read by the script that sources this
EMBEDDED=true
export DJANGO_DEBUG=${DJANGO_DEBUG:-true}
PORT=${PORT:-8000}
FAKE_PORT=${FAKE_PORT:-8001}
export PORTCULLIS_ISSUER=${PORTCULLIS_ISSUER:-http://127.0.0.1:$PORT}
export VLLM_UPSTREAMS=${VLLM_UPSTREAMS:-http://127.0.0.1:$FAKE_PORT}
# var/ holds the database with the sealed signing keys, the secret key they are sealed under, and the demo's
# passwords: everything made from here on is this user's alone, and what an older version left readable by
# others (0644 files in a 0755 folder) is made so too. Only Portcullis's own entries are touched, so a
# PORTCULLIS_VAR_DIR that names a shared folder is not made private as a whole.
umask 077
var_dir=${PORTCULLIS_VAR_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/var}
if [ -O "$var_dir" ] && [ ! -k "$var_dir" ] \
  && { [ -e "$var_dir/portcullis.sqlite3" ] || [ -e "$var_dir/secret-key" ]; }; then
  chmod 700 "$var_dir"
fi
for entry in "$var_dir"/portcullis.sqlite3 "$var_dir"/portcullis.sqlite3-* "$var_dir"/secret-key \
  "$var_dir"/demo-credentials.json "$var_dir"/audit-spool; do
  if [ -O "$entry" ] && [ ! -L "$entry" ]; then
    chmod -R go-rwx "$entry"
  fi
done
unset var_dir entry
