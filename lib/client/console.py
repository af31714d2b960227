"""The client's console: what it serves, through which proxies and circuits, and each visitor.

Public API::

    console = Console(client, fingerprint, tor_mode, live=True, stream=sys.stderr)
                                 # clock=time.time, monotonic=time.monotonic: injectable
    console.start()              # live: a rich Live panel owns the bottom of the terminal, and
                                 # every log record prints above it (never into it)
    console.tor_progress(percent, summary)   # start_tor's progress callback
    console.tor_ready(text)      # e.g. "SOCKS 127.0.0.1:9050"
    client.on_change, client.on_stream = console.changed, console.stream_done
    console.refresh()            # redraw; the entry point calls it once a second
    console.stop()               # the last panel stays on the screen
    shown(text) -> str           # a proxy's StartProxy text as a log line or panel may show it

Live (on a terminal), the panel shows what ngrok's does, for Shroud:

- the identity key's fingerprint (what DNS TXT proofs and allow-lists name) and Tor's state;
- a Forwarding line per public name and proxy -> local target;
- a row per tunnel: proxy, state, Tor exit, streams, bytes, heartbeat round trip, and its last
  error in full (wrapped by the terminal's width, never cut);
- the last CONNECTION_ROWS visitor connections: time, visitor, name, bytes, duration, result.

Plain (elsewhere): a log line per tunnel state change and per visitor connection; connection
lines are rate-limited (visitors trigger them) and say how many were left out.
"""
from __future__ import annotations

import collections
import logging
import sys
import time
from typing import Callable

from rich.console import Console as RichConsole
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from lib.tokenbucket import TokenBucket

log = logging.getLogger("shroud.client")

CONNECTION_ROWS = 10  # visitor connections kept for the panel; older ones scroll away
# Plain mode: visitors decide how many connections there are, so their log lines are bounded:
# a burst of CONNECTION_LOG_BURST, then CONNECTION_LOG_RATE a second.
CONNECTION_LOG_RATE = 5.0
CONNECTION_LOG_BURST = 20


class LiveLogHandler(logging.Handler):
    """Prints each record above the live panel (rich redraws the panel under it)."""

    def __init__(self, console: RichConsole):
        super().__init__()
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.console.print(Text(self.format(record)), highlight=False)
        except Exception:  # logging's contract: a handler never raises
            self.handleError(record)


class Console:
    def __init__(self, client, fingerprint: str, tor_mode: str, live: bool,
                 stream=None, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic):
        self.client = client
        self.fingerprint = fingerprint
        self.live = live
        self.stream = stream or sys.stderr
        self.clock = clock
        self.tor_state = {"launch": "starting", "none": "none: the proxies see this "
                          "machine's address; the origin is NOT hidden"}.get(tor_mode,
                                                                             "attaching")
        self.connections: collections.deque = collections.deque(maxlen=CONNECTION_ROWS)
        self.connection_count = 0
        self.dirty = False
        self._last: dict = {}  # tunnel index -> last state seen (plain mode)
        self._log_limit = TokenBucket(CONNECTION_LOG_BURST, CONNECTION_LOG_RATE, monotonic)
        self._live: Live | None = None
        self._handler: LiveLogHandler | None = None
        self._saved_handlers: list = []

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        if not self.live:
            return
        rich = RichConsole(file=self.stream, force_terminal=True)
        self._live = Live(self.render(), console=rich, auto_refresh=False,
                          redirect_stdout=True, redirect_stderr=True)
        self._live.start()
        root = logging.getLogger()
        self._handler = LiveLogHandler(rich)
        if root.handlers:
            self._handler.setFormatter(root.handlers[0].formatter)
        self._saved_handlers = root.handlers[:]
        root.handlers[:] = [self._handler]

    def stop(self) -> None:
        if self._live is None:
            return
        self.refresh()
        self._live.stop()
        logging.getLogger().handlers[:] = self._saved_handlers
        self._live = None

    def refresh(self) -> None:
        self.dirty = False
        if self._live is not None:
            self._live.update(self.render(), refresh=True)

    # --- events ---------------------------------------------------------------------------

    def tor_progress(self, percent: int, summary: str) -> None:
        self.tor_state = f"bootstrapping {percent}%: {summary}"
        if self.live:
            self.refresh()
        else:
            log.info("tor bootstrap %d%%: %s", percent, summary)

    def tor_ready(self, text: str) -> None:
        self.tor_state = f"ready, {text}"
        self.refresh()

    def changed(self, runner) -> None:
        """A tunnel changed state. Live: the next refresh shows it. Plain: a line when a tunnel
        comes online or starts connecting afresh (not when it retries: lib.client.tunnels
        logged the failure and the retry in one line already)."""
        self.dirty = True
        if self.live or runner.state == self._last.get(runner.index):
            return
        self._last[runner.index] = runner.state
        if runner.state == "online" or (runner.state == "connecting"
                                        and runner.retry_at is None):
            log.info("tunnel %s: %s", runner.proxy, runner.state)

    def stream_done(self, record) -> None:
        self.connection_count += 1
        self.connections.append(record)
        if self.live or not log.isEnabledFor(logging.INFO) or not self._log_limit.take():
            return  # (a line nobody would see costs no token: --log-level warning)
        dropped, self._log_limit.dropped = self._log_limit.dropped, 0
        log.info("visitor %s -> %s via %s: %s in, %s out, %.2f s, %s%s", shown(record.visitor),
                 shown(record.name), record.proxy, size(record.bytes_in), size(record.bytes_out),
                 record.duration, record.result,
                 f" ({dropped} connections before this one not logged)" if dropped else "")

    # --- the panel ------------------------------------------------------------------------

    def render(self) -> Group:
        rows = self.client.status()
        # Two lines: the 64-digit fingerprint fits an 80-column terminal on its own line.
        head = Text.assemble(("Shroud client", "bold"), "\nidentity key ",
                             (self.fingerprint, "cyan"), "\nTor: ", self.tor_state)
        parts = [head, self._forwarding(rows), self._tunnels(rows)]
        if self.connections:
            parts.append(self._connection_table())
        parts.append(Text("Ctrl-C to stop", style="dim"))
        return Group(*parts)

    def _forwarding(self, rows: list[dict]) -> Table:
        t = Table.grid(padding=(0, 1))
        t.add_column(style="bold")
        t.add_column()
        for r in rows:
            for url in r["bound"]:
                target = r.get("targets", {}).get(url, "?")
                t.add_row("Forwarding", f"{url} (proxy {r['proxy']}) -> {target}")
            for name, why in r["refused"].items():
                t.add_row(Text("Refused", style="red"), f"{name} on {r['proxy']}: {why}")
        if not any(r["bound"] for r in rows):
            t.add_row("Forwarding", Text("nothing yet: no tunnel has bound a name", "dim"))
        return t

    def _tunnels(self, rows: list[dict]) -> Group:
        t = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
        for col, justify in (("proxy", "left"), ("state", "left"), ("exit", "left"),
                             ("streams", "right"), ("total", "right"), ("in", "right"),
                             ("out", "right"), ("rtt", "right")):
            t.add_column(col, justify=justify, overflow="fold")
        now = self.clock()
        for r in rows:
            state = r["state"]
            if state == "backoff" and r.get("retry_at"):
                state = f"retry in {max(0, r['retry_at'] - now):.0f} s"
            style = {"online": "green", "backoff": "yellow", "error": "red"}.get(r["state"])
            exit_ = (r["circuit"] or {}).get("exit") or ("-" if r["circuit"] is None else "?")
            rtt = (f"{r['heartbeat_rtt_ms']:.0f}ms" if r["heartbeat_rtt_ms"] is not None
                   else "-")
            t.add_row(r["proxy"], Text(state, style=style or ""), exit_,
                      str(r["streams_open"]), str(r["streams_total"]), size(r["bytes_in"]),
                      size(r["bytes_out"]), rtt)
        # Errors below the table, in full: the terminal wraps them and rich counts the lines.
        errors = [Text(f"{r['proxy']}: {r['error']}", style="red") for r in rows
                  if r["error"] and r["state"] != "online"]
        return Group(t, *errors)

    def _connection_table(self) -> Table:
        t = Table(box=None, pad_edge=False, show_edge=False, header_style="bold",
                  title=f"Connections ({self.connection_count})", title_justify="left")
        for col, justify in (("time", "left"), ("visitor", "left"), ("name", "left"),
                             ("in", "right"), ("out", "right"), ("duration", "right"),
                             ("result", "left")):
            t.add_column(col, justify=justify, overflow="fold")
        for c in self.connections:
            t.add_row(time.strftime("%H:%M:%S", time.localtime(c.started)),
                      Text(shown(c.visitor)), Text(shown(c.name)),
                      size(c.bytes_in), size(c.bytes_out), f"{c.duration:.2f}s",
                      Text(c.result, style="green" if c.result == "ok" else "red"))
        return t


def shown(text: str) -> str:
    """A proxy's text (StartProxy's ClientAddr and Url, in a connection's record) as a line of
    the log or a cell of the panel may show it: control characters escaped (a CRLF in a
    ClientAddr wrote a line of the proxy's making into the client's log), at most 200
    characters (a log line or a panel cell stays about one screen line; an address or a URL
    of a usual name fits, and longer text is a peer padding it); the panel takes it as Text,
    not markup."""
    text = text[:200]
    return text if text.isprintable() else repr(text)[1:-1]


def size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}TiB"
