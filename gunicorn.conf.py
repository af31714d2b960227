"""gunicorn settings: `gunicorn -c gunicorn.conf.py shroud_proxy:app` (the Procfile's command).

One gevent worker runs the whole proxy: its listeners start when the worker starts
(post_worker_init) and the WSGI app is the admin dashboard. Proxy options come from SHROUD_*
environment variables, as for `python shroud_proxy.py`. On a platform that gives one $PORT,
gunicorn serves on it.
"""
import os
import shlex

worker_class = "gevent"
# One worker: live tunnel state lives in the process (DESIGN.md, process model).
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

    shroud_proxy.start_in_worker(shlex.split(os.environ.get("SHROUD_ARGS", "")))
