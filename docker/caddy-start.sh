#!/bin/sh
# Start of the `tls` profile's Caddy (compose.yaml mounts this at /etc/caddy/start.sh): derive the site it
# serves from PORTCULLIS_ISSUER, check it against the published port, then run the command given (caddy).
#
# The issuer is not a Caddy site address: in one, a path ("https://host/", with the trailing slash the
# application itself drops) becomes a path matcher, so Caddy would answer every other path with an empty
# 200; and a port ("https://host:8443") becomes the port Caddy listens on inside the container, where
# nothing is published. So Caddy gets the host alone (PORTCULLIS_SITE_HOST) and always listens on 443
# and 80 inside; the issuer's port (443 unless it names one) must be the host port those 443 are published
# on (PORTCULLIS_HTTPS_PUBLISH), or the issuer in every token would point where nothing answers.
set -eu

fail() {
    echo "proxy: $*" >&2
    exit 78  # EX_CONFIG
}

issuer=${PORTCULLIS_ISSUER:-}
case "$issuer" in
    https://*) ;;
    *) fail "PORTCULLIS_ISSUER must be https://HOST or https://HOST:PORT, not '$issuer'" ;;
esac
authority=${issuer#https://}
while [ "${authority%/}" != "$authority" ]; do  # trailing slashes, as the application drops them
    authority=${authority%/}
done
case "$authority" in
    *:*) host=${authority%:*} port=${authority##*:} ;;
    *) host=$authority port=443 ;;
esac
case "$host" in
    "" | *[!A-Za-z0-9.-]*)
        fail "PORTCULLIS_ISSUER must be https://HOST or https://HOST:PORT, with no path: '$issuer'"
        ;;
esac
case "$port" in
    "" | *[!0-9]*) fail "PORTCULLIS_ISSUER has no valid port: '$issuer'" ;;
esac
publish=${PORTCULLIS_HTTPS_PUBLISH:-443}
published=${publish##*:}
if [ "$published" != "$port" ]; then
    fail "PORTCULLIS_ISSUER ($issuer) says port $port, but Caddy's HTTPS is published on port $published" \
        "(PORTCULLIS_HTTPS_PUBLISH=$publish): make them the same"
fi

PORTCULLIS_SITE_HOST=$host
export PORTCULLIS_SITE_HOST
exec "$@"
