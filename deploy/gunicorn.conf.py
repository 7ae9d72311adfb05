"""gunicorn settings for production; `wxcoupon serve --gunicorn-config deploy/gunicorn.conf.py` loads this.

Run it through `wxcoupon serve`, not plain gunicorn: serve prepares the shared
Prometheus folder and marks exited workers dead in it.
"""
import os

bind = os.environ.get("WXCOUPON_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
# Sync workers: the handler is short and CPU-bound; nginx buffers slow clients.
# WXCOUPON_WEB_WORKER_CLASS=gevent serves many pushes at once per worker, and
# those in flight together share one transaction and its fsync
# (webhook/intake.py): about 1.8x the throughput, a longer p99 (bench/README.md).
# WXCOUPON_WEB_THREADS > 1 runs gthread workers instead (see workers/cli/service.py).
threads = int(os.environ.get("WXCOUPON_WEB_THREADS", "1"))
if os.environ.get("WXCOUPON_WEB_WORKER_CLASS", "sync").strip().lower() == "gevent":
    worker_class = "gevent"
    worker_connections = 256
else:
    worker_class = "gthread" if threads > 1 else "sync"
timeout = 10  # Weixin gives up after 5 s; a request alive at 10 s is stuck
graceful_timeout = 20  # supervisord's stopwaitsecs for web is 30
keepalive = 5  # nginx keeps upstream connections open (keepalive 16)
max_requests = 20000  # recycle workers now and then; jitter avoids all at once
max_requests_jitter = 2000
# The app logs each request itself (with its request id, JSON in production),
# so gunicorn's own access log would only repeat it.
accesslog = None
errorlog = "-"
# nginx in front is the one proxy trusted for X-Forwarded-Proto here; the app
# trusts X-Forwarded-For from exactly WXCOUPON_PROXIES proxies (set it to 1).
forwarded_allow_ips = "127.0.0.1"
control_socket_disable = True

if os.environ.get("WXCOUPON_LOG_FORMAT", "text").strip().lower() == "json":
    # gunicorn's own lines (boot, worker timeouts) in the same JSON format.
    logconfig_dict = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "webhook.logs.JSONFormatter"}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}},
        "loggers": {
            "gunicorn.error": {"level": "INFO", "handlers": ["stderr"], "propagate": False},
            # The app logs each request; gunicorn's access lines stay off.
            "gunicorn.access": {"level": "WARNING", "handlers": ["stderr"], "propagate": False},
        },
        "root": {"level": "WARNING", "handlers": ["stderr"]},
    }
