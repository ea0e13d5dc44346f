#!/bin/sh
# Portcullis container entrypoint: one image for every role, chosen by the first argument.
#
#   web       migrate, collectstatic, then serve config.asgi:application with uvicorn on port 8000
#   gateway   the same uvicorn, without migrations (gateway-only replicas behind a load balancer)
#   worker    the Celery worker
#   beat      the Celery beat scheduler: exactly one per deployment
#   fakevllm  the vLLM stand-in on port 8001, for machines without a GPU
#   migrate   apply migrations and exit (a one-shot job or init container)
#   *         anything else is run as a command, e.g. `python manage.py createsuperuser`
#
# Arguments after a role are passed on: `web --ssl-keyfile ... --ssl-certfile ...` reach uvicorn.
# The application reads its secrets itself, from NAME or NAME_FILE (Docker secrets). This script prints no
# secret and never traces itself (no `set -x`): every value it handles stays out of the logs.
set -eu

# libpq reads PGPASSWORD; Docker secrets are files, so PGPASSWORD_FILE fills it and DATABASE_URL needs no
# password. An explicit PGPASSWORD wins.
if [ -n "${PGPASSWORD_FILE:-}" ] && [ -z "${PGPASSWORD:-}" ]; then
    if ! PGPASSWORD=$(cat -- "$PGPASSWORD_FILE"); then
        echo "entrypoint: PGPASSWORD_FILE names a file that cannot be read: $PGPASSWORD_FILE" >&2
        exit 78  # EX_CONFIG
    fi
    export PGPASSWORD
fi

# uvicorn runs with --no-proxy-headers, always: its own proxy-header handling would put a hop of
# X-Forwarded-For, which a client can forge, in scope["client"]. Portcullis needs the true socket peer there:
# it walks X-Forwarded-For from the right across PORTCULLIS_TRUSTED_PROXIES itself. An argument that would
# turn uvicorn's handling back on (the last of two flags wins) is refused before anything runs.
refuse_proxy_header_args() {
    for arg in "$@"; do
        case "$arg" in
            --proxy-headers | --forwarded-allow-ips | --forwarded-allow-ips=*)
                echo "entrypoint: $arg is not allowed: set PORTCULLIS_TRUSTED_PROXIES instead" >&2
                exit 64  # EX_USAGE
                ;;
        esac
    done
}

# Several uvicorn workers are several processes: /metrics must add up what all of them counted, which
# prometheus-client does from files in PROMETHEUS_MULTIPROC_DIR. The directory must start empty (stale
# files would be counted again), so a given one is emptied and a missing one is made under /tmp.
metrics_dir_prepare() {
    if [ -n "${PROMETHEUS_MULTIPROC_DIR:-}" ]; then
        mkdir -p -- "$PROMETHEUS_MULTIPROC_DIR"
        find "$PROMETHEUS_MULTIPROC_DIR" -mindepth 1 -maxdepth 1 -name '*.db' -delete
    else
        PROMETHEUS_MULTIPROC_DIR=$(mktemp -d /tmp/portcullis-metrics.XXXXXX)
    fi
    export PROMETHEUS_MULTIPROC_DIR
}

# After SIGTERM uvicorn stops accepting, then waits for the responses still open (a long stream lasts
# minutes) at most UVICORN_TIMEOUT_GRACEFUL_SHUTDOWN seconds before it cancels them; only then does the
# application's shutdown hand its buffered usage and audit records to Redis (up to 10 s,
# gateway/redisbatch.py STOP_BUDGET_S) or spool them. Without a bound the wait never ends, and the
# orchestrator's SIGKILL (compose's stop_grace_period, Kubernetes' terminationGracePeriodSeconds: 30 s)
# takes those records with it. 15 s + 10 s leaves 5 s of those 30 for spooling and exit; raise the grace
# period with this timeout (docker/README.md, "Stopping").
serve() {
    metrics_dir_prepare
    exec uvicorn config.asgi:application --host 0.0.0.0 --port 8000 --loop uvloop --http config.protocol:AuditedHttpToolsProtocol \
        --workers "${WEB_CONCURRENCY:-4}" --no-proxy-headers --no-server-header \
        --timeout-graceful-shutdown "${UVICORN_TIMEOUT_GRACEFUL_SHUTDOWN:-15}" "$@"
}

if [ "$#" -eq 0 ]; then
    echo "usage: entrypoint.sh web|gateway|worker|beat|ingest|fakevllm|migrate|COMMAND [ARGS...]" >&2
    exit 64  # EX_USAGE
fi

role=$1
case "$role" in
    web)
        shift
        refuse_proxy_header_args "$@"
        python manage.py migrate --noinput
        python manage.py collectstatic --noinput
        serve "$@"
        ;;
    gateway)
        shift
        refuse_proxy_header_args "$@"
        serve "$@"
        ;;
    worker)
        shift
        exec celery -A config worker -l info --concurrency "${CELERY_CONCURRENCY:-2}" "$@"
        ;;
    beat)
        shift
        exec celery -A config beat -l info --schedule /tmp/celerybeat-schedule "$@"
        ;;
    ingest)
        shift
        # the audit stream's ingest without Celery's broker: it keeps draining a Redis at its maxmemory,
        # which stops Celery (audit/management/commands/ingest.py)
        exec python manage.py ingest "$@"
        ;;
    fakevllm)
        shift
        # `python -m fakevllm` needs no Django settings, so the stand-in gets none of the application's
        # secrets; like vLLM it requires the upstream API key when one is configured, read as vLLM reads it
        # from VLLM_API_KEY (in the environment, which only its own user can read, not on the command line,
        # which every process can). uvicorn.run() would take WEB_CONCURRENCY (meant for web) as a worker
        # count, which needs an import string: drop it.
        unset WEB_CONCURRENCY
        set -- --host 0.0.0.0 --port 8001 --models "${FAKEVLLM_MODELS:-demo-model}" "$@"
        if [ -n "${VLLM_API_KEY_FILE:-}" ]; then
            if ! api_key=$(cat -- "$VLLM_API_KEY_FILE") || [ -z "$api_key" ]; then
                echo "entrypoint: VLLM_API_KEY_FILE is unreadable or empty: $VLLM_API_KEY_FILE" >&2
                exit 78
            fi
            export VLLM_API_KEY="$api_key"
        else
            unset VLLM_API_KEY
        fi
        exec python -m fakevllm "$@"
        ;;
    migrate)
        shift
        exec python manage.py migrate --noinput "$@"
        ;;
    *)
        exec "$@"
        ;;
esac
