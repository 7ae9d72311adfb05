"""gunicorn settings for production; `wxcoupon serve --gunicorn-config` loads this."""
import os

bind = os.environ.get("WXCOUPON_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_class = "sync"  # the handler is short and CPU-bound; nginx buffers slow clients
timeout = 10  # Weixin gives up after 5 s; a request alive at 10 s is stuck
graceful_timeout = 20
keepalive = 5
max_requests = 20000  # recycle workers now and then; jitter avoids all at once
max_requests_jitter = 2000
accesslog = "-"
errorlog = "-"
# nginx in front is the one proxy trusted for X-Forwarded-* headers.
forwarded_allow_ips = "127.0.0.1"
control_socket_disable = True
