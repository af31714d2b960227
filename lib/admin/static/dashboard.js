/* Shroud proxy dashboard: polls the JSON API every 2 s and renders with the DOM API only
 * (textContent, never innerHTML with data, so a hostile hostname cannot inject markup).
 * One file, no build step; uPlot (vendored) draws the charts. */
(function () {
  'use strict';

  const POLL_MS = 2000;          // live enough to watch a transfer, cheap for the proxy
  const REQUEST_MS = 10000;      // a poll's GET gives up after 5 periods: slow is fine, hung is not
  const csrf = document.querySelector('meta[name=csrf-token]').content;
  const $ = (sel, root) => (root || document).querySelector(sel);
  const $$ = (sel, root) => Array.from((root || document).querySelectorAll(sel));
  window.shroud = { charts: {}, polls: 0 };   // inspected by the browser tests

  // --- formatting ----------------------------------------------------------------------------
  const UNITS = ['B', 'KB', 'MB', 'GB', 'TB', 'PB'];
  function fmtBytes(n) {
    n = Number(n) || 0;
    let i = 0;
    while (Math.abs(n) >= 1000 && i < UNITS.length - 1) { n /= 1000; i++; }
    return (i === 0 ? String(Math.round(n)) : n.toFixed(n < 10 ? 2 : n < 100 ? 1 : 0)) + ' ' + UNITS[i];
  }
  const fmtRate = (n) => fmtBytes(n) + '/s';
  const fmtInt = (n) => (Number(n) || 0).toLocaleString('en-US');
  function fmtDuration(s) {
    s = Math.max(0, Math.floor(s));
    const d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600), m = Math.floor(s % 3600 / 60);
    if (d) return d + 'd ' + h + 'h';
    if (h) return h + 'h ' + m + 'm';
    if (m) return m + 'm ' + (s % 60) + 's';
    return s + 's';
  }
  const fmtAgo = (ts) => fmtDuration(Date.now() / 1000 - ts) + ' ago';
  /* One time zone everywhere, UTC (the proxy's logs and the audit store are in UTC, and two
   * operators in two zones read the same page): cards, tooltips, the chart's axis and legend. */
  const fmtTime = (ts) => new Date(ts * 1000).toISOString().replace('T', ' ').slice(0, 19) + ' UTC';
  const fmtClock = (ts, seconds) => new Date(ts * 1000).toISOString().slice(11, seconds ? 19 : 16);

  function el(tag, props, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === 'class') e.className = v;
      else if (k === 'text') e.textContent = v;
      else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
      else if (k === 'dataset') Object.assign(e.dataset, v);
      else e.setAttribute(k, v);
    }
    for (const c of children) if (c !== null && c !== undefined) e.append(c);
    return e;
  }
  const setText = (sel, text) => { const e = $(sel); if (e) e.textContent = text; };
  /* A table body's rows, or one row across every column saying why there are none (a table
   * of headers alone reads as "still loading" or "broken"). */
  function fillBody(tbody, rows, none) {
    if (rows.length) { tbody.replaceChildren(...rows); return; }
    const columns = tbody.closest('table').querySelectorAll('thead th').length;
    tbody.replaceChildren(el('tr', { class: 'empty-row' }, el('td', { colspan: columns, text: none })));
  }
  const emptyText = (s, none, noMatch) => (s.q || s.protocol ? noMatch : none);

  // --- talking to the API --------------------------------------------------------------------
  function toLogin() {
    location.href = '/login?next=' + encodeURIComponent(location.pathname + location.search);
  }
  /* fetch(url, opts) and its JSON body, given up after timeoutMs (0: never). A poll's request
   * that hangs (a wedged worker, a lost connection) would otherwise hold the poll's one request
   * in flight forever and freeze the page; aborted, it fails like an unreachable proxy and the
   * next poll runs. */
  async function request(url, opts, timeoutMs) {
    const ctl = new AbortController();
    const timer = timeoutMs ? setTimeout(() => ctl.abort(), timeoutMs) : null;
    try {
      const r = await fetch(url, Object.assign({ credentials: 'same-origin', signal: ctl.signal }, opts));
      if (r.status === 401) { toLogin(); throw new Error('logged out'); }
      const body = await r.json().catch((e) => { if (ctl.signal.aborted) throw e; return {}; });
      return [r, body];
    } catch (e) {
      if (ctl.signal.aborted) throw new Error('no answer in ' + timeoutMs / 1000 + ' s');
      throw e;
    } finally {
      clearTimeout(timer);
    }
  }
  async function getJSON(url) {
    const [r, body] = await request(url, { headers: { Accept: 'application/json' } }, REQUEST_MS);
    if (!r.ok) { const e = new Error(body.error || r.statusText); e.status = r.status; e.body = body; throw e; }
    return body;
  }
  /* An operator's action: no deadline, since giving up would not undo it and "failed" would
   * be wrong when it went through late. */
  async function post(url, body) {
    const [r, data] = await request(url, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', 'X-CSRF-Token': csrf, Accept: 'application/json' },
      body: JSON.stringify(body || {}),
    }, 0);
    if (!r.ok) throw new Error(data.error || r.statusText);
    return data;
  }
  function toast(text, error) {
    const t = el('div', { class: 'toast' + (error ? ' error' : ''), text });
    $('#toasts').append(t);
    setTimeout(() => t.remove(), 6000);
  }
  function banner(text) {
    const b = $('#banner');
    b.hidden = !text;
    b.textContent = text || '';
  }

  /* Poll fn every POLL_MS while the tab is visible; one request in flight at a time, so a
   * slow proxy is never piled on, and none longer than REQUEST_MS (getJSON), so a hung one
   * cannot stop the polling. */
  function poll(fn) {
    let timer = null, running = false;
    async function tick() {
      clearTimeout(timer);
      if (running) return;
      running = true;
      try {
        await fn();
        window.shroud.polls++;
        $('#live') && $('#live').classList.remove('stale');
        setText('#live-text', 'live');
        banner('');
      } catch (e) {
        if (e.message !== 'logged out') {
          $('#live') && $('#live').classList.add('stale');
          setText('#live-text', 'stale');
          if (!e.status) banner('Cannot reach the proxy: ' + e.message);
        }
      } finally {
        running = false;
        if (!document.hidden) timer = setTimeout(tick, POLL_MS);
      }
    }
    document.addEventListener('visibilitychange', () => { if (!document.hidden) tick(); });
    tick();
    return tick;
  }

  // --- the confirm dialog --------------------------------------------------------------------
  function confirmAction(title, text, okLabel) {
    const d = $('#confirm');
    setText('#confirm-title', title);
    setText('#confirm-text', text);
    $('#confirm-ok').textContent = okLabel || 'Confirm';
    $('#confirm-reason').value = '';
    return new Promise((resolve) => {
      d.addEventListener('close', () => resolve(d.returnValue === 'ok' ? $('#confirm-reason').value : null), { once: true });
      d.returnValue = '';
      d.showModal();
    });
  }
  async function act(title, text, okLabel, url, body, done) {
    const reason = await confirmAction(title, text, okLabel);
    if (reason === null) return;
    try {
      const r = await post(url, Object.assign({ detail: reason }, body));
      toast(done(r));
    } catch (e) { toast(title + ' failed: ' + e.message, true); }
    refresh && refresh();
  }
  let refresh = null;

  // --- charts --------------------------------------------------------------------------------
  function makeChart(container, name) {
    if (!window.uPlot) { container.textContent = 'chart library did not load'; return null; }
    const axis = { stroke: '#8b96a5', grid: { stroke: '#29313c', width: 1 }, ticks: { stroke: '#29313c' } };
    const opts = {
      width: Math.max(300, container.clientWidth), height: 240,
      cursor: { drag: { x: false, y: false } },
      padding: [null, 32, null, null],  // room for the last time label (it was clipped)
      tzDate: (ts) => uPlot.tzDate(new Date(ts * 1000), 'Etc/UTC'),  // ticks on UTC minutes
      scales: { x: { time: true }, y: { range: (u, min, max) => [0, Math.max(1000, max * 1.1)] } },
      // x ticks a whole number of 10 s buckets apart (uPlot would split a 10 s chart in
      // half-seconds, each label then printed twice)
      axes: [Object.assign({}, axis, { values: fmtAxisTimes, incrs: [10, 20, 30, 60, 120, 300, 600, 900, 1800, 3600] }),
        Object.assign({}, axis, { size: 84, values: (u, vals) => vals.map(fmtAxisRate) })],
      series: [
        { label: 'UTC', value: (u, v) => v == null ? '–' : fmtClock(v, true) },
        { label: 'in', stroke: '#4cc38a', fill: 'rgba(76,195,138,.15)', width: 1.5, value: (u, v) => v == null ? '–' : fmtRate(v) },
        { label: 'out', stroke: '#f0a33a', fill: 'rgba(240,163,58,.12)', width: 1.5, value: (u, v) => v == null ? '–' : fmtRate(v) },
      ],
    };
    const u = new uPlot(opts, [[], [], []], container);
    const resize = () => u.setSize({ width: Math.max(300, container.clientWidth), height: 240 });
    window.addEventListener('resize', resize);
    window.shroud.charts[name] = u;
    wireRange(u);
    return u;
  }
  /* The chart shows the last `chartRange` seconds of the hour the API sends (range buttons). */
  let chartRange = Number(localStorage.getItem('shroud.range') || 3600);
  let lastChart = null;
  function updateChart(u, c) {
    if (!u || !c) return;
    lastChart = c;
    const from = c.t.length ? c.t[c.t.length - 1] - chartRange : 0;
    let i = 0;
    while (i < c.t.length && c.t[i] <= from) i++;
    u.setData([c.t.slice(i), c.in.slice(i), c.out.slice(i)]);
  }
  function wireRange(u) {
    const mark = () => $$('.range button').forEach((b) => b.classList.toggle('active', Number(b.dataset.range) === chartRange));
    $$('.range button').forEach((b) => b.addEventListener('click', () => {
      chartRange = Number(b.dataset.range);
      localStorage.setItem('shroud.range', String(chartRange));
      mark();
      if (lastChart) updateChart(u, lastChart);
    }));
    mark();
  }
  /* Tick labels as 24-hour UTC clock times, with seconds when ticks are closer than a minute. */
  function fmtAxisTimes(u, vals, axisIdx, space, incr) {
    return vals.map((v) => fmtClock(v, incr < 60));
  }
  function fmtAxisRate(n) {
    const s = fmtRate(n);
    return s.replace(/\.0+ /, ' ');
  }

  // --- sortable, searchable, paginated tables -------------------------------------------------
  function tableState(defaults) {
    const p = new URLSearchParams(location.search);
    const s = {
      q: p.get('q') || '', sort: p.get('sort') || defaults.sort, order: p.get('order') || defaults.order,
      page: Number(p.get('page') || 1), per_page: Number(p.get('per_page') || 50), protocol: p.get('protocol') || '',
    };
    s.save = () => {
      const q = new URLSearchParams();
      for (const k of ['q', 'sort', 'order', 'page', 'per_page', 'protocol']) if (s[k] && String(s[k]) !== String(defaults[k] ?? '')) q.set(k, s[k]);
      history.replaceState(null, '', location.pathname + (q.toString() ? '?' + q : ''));
    };
    s.query = () => {
      const q = new URLSearchParams({ sort: s.sort, order: s.order, page: s.page, per_page: s.per_page });
      if (s.q) q.set('q', s.q);
      if (s.protocol) q.set('protocol', s.protocol);
      return q.toString();
    };
    return s;
  }
  function wireTable(table, s, reload) {
    const mark = () => $$('th[data-sort]', table).forEach((th) => {
      th.classList.toggle('sorted', th.dataset.sort === s.sort);
      th.classList.toggle('asc', th.dataset.sort === s.sort && s.order === 'asc');
    });
    $$('th[data-sort]', table).forEach((th) => th.addEventListener('click', () => {
      if (s.sort === th.dataset.sort) s.order = s.order === 'asc' ? 'desc' : 'asc';
      else { s.sort = th.dataset.sort; s.order = ['name', 'owner', 'peer', 'key', 'protocol'].includes(s.sort) ? 'asc' : 'desc'; }
      s.page = 1; mark(); s.save(); reload();
    }));
    mark();
    const search = $('#search');
    if (search) {
      search.value = s.q;
      let t = null;
      search.addEventListener('input', () => { clearTimeout(t); t = setTimeout(() => { s.q = search.value.trim(); s.page = 1; s.save(); reload(); }, 200); });
    }
    const proto = $('#protocol');
    if (proto) { proto.value = s.protocol; proto.addEventListener('change', () => { s.protocol = proto.value; s.page = 1; s.save(); reload(); }); }
    const per = $('#per-page');
    if (per) { per.value = String(s.per_page); per.addEventListener('change', () => { s.per_page = Number(per.value); s.page = 1; s.save(); reload(); }); }
    $('#prev') && $('#prev').addEventListener('click', () => { if (s.page > 1) { s.page--; s.save(); reload(); } });
    $('#next') && $('#next').addEventListener('click', () => { s.page++; s.save(); reload(); });
  }
  function renderPager(res, s) {
    s.page = res.page;
    setText('#total', fmtInt(res.total));
    const lo = res.total ? (res.page - 1) * res.per_page + 1 : 0;
    setText('#pageinfo', lo + '–' + Math.min(res.total, res.page * res.per_page) + ' of ' + fmtInt(res.total) + ' · page ' + res.page + '/' + res.pages);
    $('#prev').disabled = res.page <= 1;
    $('#next').disabled = res.page >= res.pages;
  }
  /* The public address a visitor opens (https://NAME[:port]), in a new tab. */
  const publicLink = (href, text, title) => el('a', { class: 'public-link', href, text, title, target: '_blank', rel: 'noopener noreferrer' });
  const hostHref = (proto, name) => '/h/' + encodeURIComponent(proto) + '/' + encodeURIComponent(name);
  function refusalText(r) {
    const parts = Object.entries(r || {}).map(([k, v]) => k.replace(/_/g, ' ') + ' ' + v);
    return parts.length ? parts.join(', ') : '';
  }

  // --- pages ---------------------------------------------------------------------------------
  const pages = {};

  pages.overview = function () {
    const chart = makeChart($('#chart'), 'main');
    const s = tableState({ sort: 'name', order: 'asc', page: 1, per_page: 50, protocol: '', q: '' });
    const tbody = $('#hostnames tbody');
    async function load() {
      const [o, res] = await Promise.all([getJSON('/api/overview'), getJSON('/api/hostnames?' + s.query())]);
      setText('#stat-uptime', fmtDuration(o.uptime));
      setText('#stat-started', 'since ' + fmtTime(o.started));
      setText('#stat-bindings', fmtInt(o.bindings));
      setText('#stat-keys', fmtInt(o.keys) + ' client key' + (o.keys === 1 ? '' : 's') + (o.keys_unproven ? ' (+' + o.keys_unproven + ' unproven)' : '') + (o.blocked_hostnames ? ' · ' + o.blocked_hostnames + ' blocked' : ''));
      setText('#stat-tunnels', fmtInt(o.tunnels));
      setText('#stat-streams', fmtInt(o.streams_open) + ' open stream' + (o.streams_open === 1 ? '' : 's'));
      setText('#stat-connections', fmtInt(o.connections));
      setText('#stat-refusals', fmtInt(o.refusals_total) + ' refused');
      setText('#stat-rate-in', fmtRate(o.rate_in));
      setText('#stat-rate-out', fmtRate(o.rate_out));
      setText('#stat-bytes-in', fmtBytes(o.bytes_in) + ' total');
      setText('#stat-bytes-out', fmtBytes(o.bytes_out) + ' total');
      $('#stat-bytes-in').dataset.bytes = o.bytes_in;
      $('#stat-bytes-out').dataset.bytes = o.bytes_out;
      setText('#fingerprint', o.fingerprint);
      $('#listeners').replaceChildren(...Object.entries(o.listeners).map(([k, v]) => el('li', {}, el('span', { text: k }), el('span', { text: v }))));
      const refs = Object.entries(o.refusals).sort((a, b) => b[1] - a[1]);
      $('#refusals').replaceChildren(...(refs.length ? refs.map(([k, v]) => el('li', {}, el('span', { text: k.replace(/_/g, ' ') }), el('span', { class: 'refused', text: fmtInt(v) })))
        : [el('li', { class: 'muted', text: 'none' })]));
      updateChart(chart, o.chart);
      fillBody(tbody, res.items.map((b) => el('tr', { dataset: { name: b.name, protocol: b.protocol } },
        el('td', { class: 'name' }, el('span', { class: 'badge proto', text: b.protocol }), ' ', el('a', { href: hostHref(b.protocol, b.name), text: b.name }),
          b.link ? publicLink(b.link, '↗', 'open ' + b.link) : null),
        el('td', { class: 'key', title: (b.owner || 'unsigned') + ' (' + b.method + ')', text: b.owner_short }),
        el('td', { class: 'num', text: fmtInt(b.tunnels) }),
        el('td', { class: 'num', text: fmtInt(b.streams_open) }),
        el('td', { class: 'num', text: fmtInt(b.connections) }),
        el('td', { class: 'num in', text: fmtBytes(b.bytes_in), dataset: { bytes: b.bytes_in }, 'data-col': 'bytes_in' }),
        el('td', { class: 'num out', text: fmtBytes(b.bytes_out), dataset: { bytes: b.bytes_out }, 'data-col': 'bytes_out' }),
        el('td', { class: 'num', text: fmtRate(b.rate_in + b.rate_out), title: 'in ' + fmtRate(b.rate_in) + ', out ' + fmtRate(b.rate_out) }),
        el('td', { class: 'num' + (b.refusals_total ? ' refused' : ''), text: fmtInt(b.refusals_total), title: refusalText(b.refusals) || 'none' }),
        el('td', { title: fmtTime(b.bound_at), text: fmtAgo(b.bound_at) }))),
        emptyText(s, 'No hostnames are bound. Clients appear here as soon as they bind.', 'No hostname matches this search.'));
      renderPager(res, s);
    }
    wireTable($('#hostnames'), s, () => refresh());
    refresh = poll(load);
  };

  // A tunnel's key as Auth claimed it: proven only once a signed bind verified on this tunnel
  // (anyone who knows a client's public key can claim it; docs/OPERATIONS.md).
  function keyCell(t) {
    if (!t.key || t.key_proven) return el('td', { class: 'key', title: t.key || 'unsigned', text: t.key_short });
    return el('td', { class: 'key unproven', title: t.key + ' (claimed in Auth, not proven by a signed bind: do not block it for this tunnel)' },
      t.key_short, ' ', el('span', { class: 'badge gone', text: 'unproven' }));
  }

  pages.hostname = function () {
    const protocol = document.body.dataset.protocol, name = document.body.dataset.name;
    const chart = makeChart($('#chart'), 'main');
    let owner = null;
    async function load() {
      let d;
      try {
        d = await getJSON('/api/hostnames/' + encodeURIComponent(protocol) + '/' + encodeURIComponent(name));
      } catch (e) {
        if (e.status !== 404) throw e;
        d = e.body;
      }
      const state = $('#h-state');
      state.className = 'badge state ' + (d.blocked ? 'blocked' : d.bound ? 'ok' : 'gone');
      state.textContent = d.blocked ? 'blocked' : d.bound ? 'bound' : 'not bound';
      $('#block-host').hidden = !!d.blocked;
      $('#unblock-host').hidden = !d.blocked;
      if (!d.bound) {
        $('#h-meta').replaceChildren(el('span', { text: d.blocked ? 'Blocked by the operator: public requests are refused and binds are refused.' : 'No client has this name bound right now.' }));
        $('#block-key').hidden = true;
        fillBody($('#tunnels tbody'), [], 'No live tunnel.');
        return;
      }
      owner = d.owner;
      $('#block-key').hidden = !owner || d.owner_blocked;
      $('#h-meta').replaceChildren(
        el('span', {}, 'URL ', d.link ? publicLink(d.link, d.link) : el('b', { text: d.url })),
        el('span', {}, 'owner ', el('b', { class: 'mono', title: d.owner || '', text: d.owner_short }), ' via ' + d.method),
        el('span', {}, 'bound ', el('b', { title: fmtTime(d.bound_at), text: fmtAgo(d.bound_at) })));
      setText('#h-tunnels', fmtInt(d.tunnels));
      setText('#h-streams', fmtInt(d.streams_open));
      setText('#h-connections', fmtInt(d.connections));
      setText('#h-refusals', d.refusals_total ? fmtInt(d.refusals_total) + ' refused: ' + refusalText(d.refusals) : 'none refused');
      setText('#h-rate-in', fmtRate(d.rate_in));
      setText('#h-rate-out', fmtRate(d.rate_out));
      setText('#h-bytes-in', fmtBytes(d.bytes_in) + ' total');
      setText('#h-bytes-out', fmtBytes(d.bytes_out) + ' total');
      $('#h-bytes-in').dataset.bytes = d.bytes_in;
      $('#h-bytes-out').dataset.bytes = d.bytes_out;
      updateChart(chart, d.chart);
      fillBody($('#tunnels tbody'), d.tunnel_list.map((t) => el('tr', { dataset: { tunnel: t.id } },
        el('td', { text: String(t.id) }),
        el('td', { class: 'mono', text: t.peer }),
        keyCell(t),
        el('td', { text: t.transport }),
        el('td', { title: fmtTime(t.connected_at), text: fmtAgo(t.connected_at) }),
        el('td', { class: 'num', text: t.heartbeat_rtt_ms == null ? '–' : t.heartbeat_rtt_ms.toFixed(1) + ' ms' }),
        el('td', { class: 'num', text: fmtInt(t.streams_open) + ' / ' + fmtInt(t.streams_total) }),
        el('td', { class: 'num in', text: fmtBytes(t.bytes_in) }),
        el('td', { class: 'num out', text: fmtBytes(t.bytes_out) }),
        el('td', { class: 'num' }, el('button', {
          class: 'btn danger ghost small disconnect', text: 'Disconnect',
          onclick: () => act('Disconnect tunnel ' + t.id + '?', 'Closes the tunnel from ' + t.peer + ' now. The client will reconnect with backoff unless its key or name is blocked.', 'Disconnect',
            '/api/tunnels/' + t.id + '/disconnect', {}, () => 'Tunnel ' + t.id + ' disconnected'),
        })))), 'No live tunnel.');
    }
    $('#block-host').addEventListener('click', () => act('Block ' + name + '?', 'Public connections for ' + name + ' are refused at once (HTTP 403 / TLS access_denied), its live binding is dropped and binds are refused until you unblock it.', 'Block',
      '/api/block', { kind: 'hostname', target: name }, (r) => name + ' blocked (' + r.bindings_dropped + ' live binding(s) dropped)'));
    $('#unblock-host').addEventListener('click', () => act('Unblock ' + name + '?', 'Clients may bind ' + name + ' again; the public is routed as soon as one does.', 'Unblock',
      '/api/unblock', { kind: 'hostname', target: name }, () => name + ' unblocked'));
    $('#block-key').addEventListener('click', () => act('Block key ' + (owner || '').slice(0, 16) + '…?', 'Every tunnel of this key is disconnected and every bind by it refused, for all its names.', 'Block key',
      '/api/block', { kind: 'key', target: owner }, (r) => 'key blocked (' + r.tunnels_disconnected + ' tunnel(s) disconnected)'));
    refresh = poll(load);
  };

  pages.tunnels = function () {
    const s = tableState({ sort: 'connected_at', order: 'desc', page: 1, per_page: 50, protocol: '', q: '' });
    async function load() {
      const res = await getJSON('/api/tunnels?' + s.query());
      fillBody($('#tunnels tbody'), res.items.map((t) => el('tr', { dataset: { tunnel: t.id } },
        el('td', { text: String(t.id) }),
        el('td', { class: 'mono', text: t.peer }),
        keyCell(t),
        el('td', { class: 'wrap' }, ...t.names.flatMap((n, i) => {
          const [p, ...rest] = n.split('/');
          const a = el('a', { href: hostHref(p, rest.join('/')), text: rest.join('/') });
          return i ? [', ', a] : [a];
        })),
        el('td', { title: fmtTime(t.connected_at), text: fmtAgo(t.connected_at) }),
        el('td', { class: 'num', text: t.heartbeat_rtt_ms == null ? '–' : t.heartbeat_rtt_ms.toFixed(1) + ' ms' }),
        el('td', { class: 'num', text: fmtInt(t.streams_open) + ' / ' + fmtInt(t.streams_total) }),
        el('td', { class: 'num', text: fmtBytes(t.bytes_in) + ' / ' + fmtBytes(t.bytes_out) }),
        el('td', { class: 'num' }, el('button', {
          class: 'btn danger ghost small disconnect', text: 'Disconnect',
          onclick: () => act('Disconnect tunnel ' + t.id + '?', 'Closes the tunnel from ' + t.peer + ' now. The client will reconnect with backoff unless blocked.', 'Disconnect',
            '/api/tunnels/' + t.id + '/disconnect', {}, () => 'Tunnel ' + t.id + ' disconnected'),
        })))), emptyText(s, 'No live tunnel. Clients appear here as soon as they connect.', 'No tunnel matches this search.'));
      renderPager(res, s);
    }
    wireTable($('#tunnels'), s, () => refresh());
    refresh = poll(load);
  };

  pages.blocks = function () {
    function blockRows(items, kind) {
      return items.map((b) => el('tr', { dataset: { target: b.target } },
        el('td', { class: kind === 'key' ? 'key' : 'name', text: b.target }),
        el('td', { title: fmtTime(b.since), text: fmtAgo(b.since) }),
        el('td', { text: b.actor }),
        el('td', { class: 'wrap', text: b.detail }),
        el('td', { class: 'num' }, el('button', {
          class: 'btn ghost small unblock', text: 'Unblock',
          onclick: () => act('Unblock ' + b.target + '?', kind === 'key' ? 'This key may bind again.' : 'Clients may bind this name again.', 'Unblock',
            '/api/unblock', { kind, target: b.target }, () => b.target + ' unblocked'),
        }))));
    }
    async function load() {
      const [bl, au] = await Promise.all([getJSON('/api/blocks'), getJSON('/api/audit?limit=200')]);
      setText('#n-hosts', String(bl.hostnames.length));
      setText('#n-keys', String(bl.keys.length));
      fillBody($('#blocked-hostnames tbody'), blockRows(bl.hostnames, 'hostname'), 'No hostname is blocked.');
      fillBody($('#blocked-keys tbody'), blockRows(bl.keys, 'key'), 'No key is blocked.');
      fillBody($('#audit tbody'), au.items.map((e) => el('tr', {},
        el('td', { title: fmtTime(e.time), text: fmtTime(e.time) }),
        el('td', { text: e.actor }),
        el('td', {}, el('span', { class: 'badge' + (e.action.startsWith('block') ? ' blocked' : ''), text: e.action })),
        el('td', { class: 'mono', text: e.target }),
        el('td', { class: 'wrap', text: e.detail }))), 'No operator action yet: blocks, unblocks and disconnects are listed here.');
    }
    $('#block-form').addEventListener('submit', async (ev) => {
      ev.preventDefault();
      const kind = $('#block-kind').value, target = $('#block-target').value.trim();
      try {
        const r = await post('/api/block', { kind, target, detail: $('#block-reason').value });
        toast(target + ' blocked' + (kind === 'key' ? ' (' + r.tunnels_disconnected + ' tunnel(s) disconnected)' : ' (' + r.bindings_dropped + ' live binding(s) dropped)'));
        $('#block-target').value = ''; $('#block-reason').value = '';
      } catch (e) { toast('Block failed: ' + e.message, true); }
      refresh();
    });
    refresh = poll(load);
  };

  pages.fleet = function () {
    async function load() {
      const f = await getJSON('/api/fleet');
      setText('#fleet-store', f.store + (f.reachable ? '' : ' (unreachable: showing the last answer)'));
      setText('#n-instances', String(f.instances.length));
      setText('#n-names', fmtInt(f.names_total) + (f.truncated ? '+' : ''));
      fillBody($('#instances tbody'), f.instances.map((i) => el('tr', { dataset: { instance: i.id } },
        el('td', { class: 'mono', text: i.id + (i.this ? ' (this)' : '') }),
        el('td', { text: i.hostname }),
        el('td', {}, el('span', { class: 'badge' + (i.state === 'live' ? '' : ' blocked'), text: i.state })),
        el('td', { class: 'mono wrap', text: Object.entries(i.addresses).map(([k, v]) => k + ' ' + v).join(', ') }),
        el('td', { class: 'num', text: fmtInt(i.tunnels) }),
        el('td', { class: 'num', text: fmtInt(i.names) }),
        el('td', { class: 'num', text: fmtInt(i.connections) }),
        el('td', { class: 'num', text: fmtInt(i.forwarded_in) + ' / ' + fmtInt(i.forwarded_out) }),
        el('td', { class: 'num', text: fmtRate(i.rate_in) + ' / ' + fmtRate(i.rate_out) }),
        el('td', { title: fmtTime(i.heartbeat), text: fmtAgo(i.heartbeat) }))), 'No instance has reported to the store yet.');
      const t = f.totals;
      $('#fleet-totals').replaceChildren(el('th', { colspan: '4', text: 'Fleet' }),
        el('td', { class: 'num', text: fmtInt(t.tunnels) }), el('td', {}),
        el('td', { class: 'num', text: fmtInt(t.connections) }),
        el('td', { class: 'num', text: fmtInt(t.forwarded_in) + ' / ' + fmtInt(t.forwarded_out) }),
        el('td', { class: 'num', text: fmtRate(t.rate_in) + ' / ' + fmtRate(t.rate_out) }), el('td', {}));
      fillBody($('#fleet-names tbody'), f.names.map((n) => el('tr', { dataset: { name: n.name } },
        el('td', { class: 'name', text: n.name }),
        el('td', { text: n.protocols.join(', ') }),
        el('td', { class: 'key', title: n.key || 'unsigned', text: n.key_short }),
        el('td', { class: 'mono wrap', text: n.instances.join(', ') }),
        el('td', { class: 'num', text: fmtInt(n.tunnels) }),
        el('td', { class: 'num' }, n.blocked ? el('span', { class: 'badge blocked', text: 'blocked' }) : el('button', {
          class: 'btn danger ghost small block', text: 'Block',
          onclick: () => act('Block ' + n.name + ' on every instance?', 'Visitors are refused and live bindings dropped on every proxy of the fleet; binds are refused.', 'Block',
            '/api/block', { kind: 'hostname', target: n.name }, () => n.name + ' blocked fleet-wide'),
        })))), 'No name is bound anywhere in the fleet.');
    }
    refresh = poll(load);
  };

  document.addEventListener('DOMContentLoaded', () => {
    const fn = pages[document.body.dataset.page];
    if (fn) fn();
  });
})();
