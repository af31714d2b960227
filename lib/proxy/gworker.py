"""gunicorn's gevent worker, with each accepted connection shown to the proxy first.

    worker_class = "lib.proxy.gworker.ShroudGeventWorker"     # in gunicorn.conf.py

Identical to ``gunicorn.workers.ggevent.GeventWorker`` (gevent patched after fork, one
StreamServer per listening socket, gunicorn's own HTTP parser) except :meth:`handle`: when the
proxy runs in one-port mode, ``post_worker_init`` sets ``worker.shroud_router`` (a
lib.proxy.oneport.OnePortRouter) and every connection on ``$PORT`` goes to its ``dispatch`` first.
What it hands back (the dashboard's requests, their head replayed) gunicorn serves as usual;
tunnels and routed public connections never reach the WSGI app.
"""
from __future__ import annotations

from gunicorn.workers.ggevent import GeventWorker


class ShroudGeventWorker(GeventWorker):
    shroud_router = None  # set by shroud_proxy.start_in_worker in one-port mode

    def handle(self, listener, client, addr):
        router = self.shroud_router
        if router is not None:
            client.setblocking(1)
            try:
                client = router.dispatch(client, addr)
            except Exception:
                self.log.exception("one-port dispatch failed for %s", addr)
                client.close()
                return
            if client is None:
                return
        super().handle(listener, client, addr)
