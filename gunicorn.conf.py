"""gunicorn settings: `gunicorn -c gunicorn.conf.py shroud_proxy:app` (the Procfile's command).

One gevent worker runs the whole proxy: its listeners start when the worker starts
(post_worker_init) and the WSGI app is the admin dashboard. Proxy options come from SHROUD_*
environment variables, as for `python shroud_proxy.py`. On a platform that gives one $PORT,
gunicorn serves on it, and in one-port mode (only $PORT set, or SHROUD_ONE_PORT=1) everything
arrives there: the dashboard on the proxy's own hostname, tunnels as WebSockets at
/_shroud/tunnel, public HTTP routed by Host (lib/proxy/oneport.py, docs/DEPLOY.md).
"""
import os
import shlex
import sys

# On jemalloc when installed, like `python shroud_proxy.py` (lib/allocator.py): the master
# re-executes itself here, before it opens a socket; its workers are forked from it.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lib.allocator import reexec_with_jemalloc  # noqa: E402

reexec_with_jemalloc()

# gunicorn's gevent worker, with one hook: connections go to the one-port router first.
worker_class = "lib.proxy.gworker.ShroudGeventWorker"
# One worker: live tunnel state lives in the process (docs/DESIGN.md, "Process model").
workers = 1
worker_connections = int(os.environ.get("SHROUD_MAX_PUBLIC_CONNECTIONS", "20000"))
_port = os.environ.get("PORT")
bind = [f"0.0.0.0:{_port}"] if _port else [os.environ.get("SHROUD_ADMIN_ADDR", "127.0.0.1:8080")]
# Tunnels are long-lived; gunicorn must not recycle the worker under them.
timeout = 0
graceful_timeout = 10
keepalive = 75
accesslog = None
errorlog = "-"
loglevel = os.environ.get("SHROUD_LOG_LEVEL", "info")


def post_worker_init(worker):
    import shroud_proxy

    shroud_proxy.start_in_worker(shlex.split(os.environ.get("SHROUD_ARGS", "")), worker)
