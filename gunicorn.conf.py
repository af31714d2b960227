"""gunicorn settings: `gunicorn -c gunicorn.conf.py shroud_proxy:app` (the Procfile's command).

WEB_CONCURRENCY gevent workers (default: one per core) each run the whole proxy: the raw
listeners (tunnel, https, http, discovery) are opened by the master before it forks, one
SO_REUSEPORT socket per worker slot (on_starting, pre_fork; lib/proxy/prefork.py says why), and
every worker accepts on all of them, and on gunicorn's own port, whose WSGI app is the admin
dashboard. A public connection that lands on a worker without a live tunnel for its name is
handed, socket and peeked bytes, to the worker that has one (lib/proxy/workers.py, over Unix
sockets in a private run directory). Proxy options come from SHROUD_*
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
from lib.proxy import prefork  # noqa: E402

reexec_with_jemalloc()

# gunicorn's gevent worker, with one hook: connections go to the one-port router first.
worker_class = "lib.proxy.gworker.ShroudGeventWorker"
# Live tunnel state lives in each worker; a visitor on another worker is handed over to it.
try:
    workers = prefork.worker_count()
except prefork.PreforkError as _e:
    sys.exit(f"gunicorn.conf.py: {_e}")
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


# Opened in the master before the fork, one socket per worker slot and listener, inherited by
# every worker (and by the replacement of one that died: its queued connections wait for it).
_shared = {"listeners": {}, "run_dir": None, "slots": {}}


def on_starting(server):
    import shroud_proxy

    from lib.errors import ListenError

    _check_own_port(server)
    try:
        plan = prefork.listener_plan(shroud_proxy.listener_addrs(_argv()))
        _shared["listeners"] = prefork.open_listeners(plan, slots=server.cfg.workers)
    except prefork.PreforkError as e:
        sys.exit(f"shroud_proxy: cannot start: {e}")
    except ListenError as e:  # one line naming the flag, as the worker would say it
        sys.exit(f"shroud_proxy: cannot start: "
                 f"{e.line(shroud_proxy.LISTENER_FLAG.get(e.listener))}")
    _shared["run_dir"] = prefork.make_run_dir()


def _check_own_port(server):
    """gunicorn's own port (the dashboard; everything on $PORT in one-port mode): a port in
    use is one line naming the variable that set it, before gunicorn retries it five times and
    prints a Python address tuple each time. A probe, bound and closed: gunicorn still binds
    (and still reports a port taken between the two)."""
    import socket

    from lib.errors import ListenError
    from lib.hostport import format_hostport

    if os.environ.get("GUNICORN_FD") or os.environ.get("LISTEN_FDS"):
        return  # sockets inherited (a USR2 upgrade, systemd's socket activation): held already
    where = "$PORT" if _port else "SHROUD_ADMIN_ADDR"
    for addr in server.cfg.address:
        if not isinstance(addr, tuple):
            continue  # a unix socket: gunicorn's own message
        probe = socket.socket(socket.AF_INET6 if ":" in addr[0] else socket.AF_INET)
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn binds
            probe.bind(addr[:2])
        except OSError as e:
            line = ListenError("admin", format_hostport(addr[0], addr[1]), e).line(where)
            sys.exit(f"shroud_proxy: cannot start: {line}")
        finally:
            probe.close()


def pre_fork(server, worker):
    # The master's objects (gunicorn, the modules it imported) go to the permanent generation
    # before each fork: a worker's collections then never write their gc headers, so those
    # pages stay shared with the master instead of being copied into every worker (-6 MiB
    # private memory per worker; bench/README.md "The cost of a loop turn, and the collector").
    import gc

    gc.freeze()
    taken = set(_shared["slots"].values())
    worker.shroud_slot = min(set(range(len(taken) + 1)) - taken)
    _shared["slots"][worker] = worker.shroud_slot


def child_exit(server, worker):
    _shared["slots"].pop(worker, None)


def on_exit(server):
    import shutil

    for socks in _shared["listeners"].values():
        for sock in socks:
            sock.close()
    if _shared["run_dir"]:
        shutil.rmtree(_shared["run_dir"], ignore_errors=True)


def worker_exit(server, worker):
    """A worker's last act: its proxy stops as `python shroud_proxy.py` does on SIGTERM (leaves
    the fleet, closes its store), then the process ends without the interpreter's teardown, as
    multiprocessing's forked children do. That teardown collected gunicorn's log handlers after
    gevent.thread's globals were gone, and logging's clean-up printed "Exception ignored in
    _removeHandlerRef ... TypeError" from gevent's patched lock at every stop."""
    import logging

    import shroud_proxy

    if worker.pid != os.getpid():
        return  # the master, told of a worker found already gone (Arbiter.kill_worker)
    shroud_proxy.stop_in_worker()
    code = _exit_code(sys.exc_info()[1])
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _exit_code(exc) -> int:
    """The status the worker was leaving with: gunicorn calls worker_exit in a `finally` while
    the worker's SystemExit propagates (0, or an error code that stops the master)."""
    if not isinstance(exc, SystemExit):
        return 1
    if exc.code is None or isinstance(exc.code, int):
        return exc.code or 0
    return 1


def post_worker_init(worker):
    import shroud_proxy

    listeners = prefork.slot_listeners(_shared["listeners"], worker.shroud_slot)
    shroud_proxy.start_in_worker(_argv(), worker, listeners=listeners,
                                 run_dir=_shared["run_dir"])


def _argv() -> list:
    return shlex.split(os.environ.get("SHROUD_ARGS", ""))
