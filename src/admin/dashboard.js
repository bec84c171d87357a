// waitless dashboard: polls /stats every second, keeps the last 5 minutes here, draws them
// with uPlot (vendored, served from /dashboard/uplot.js). No other requests.
"use strict";
(function () {
  const KEEP = 300; // samples (seconds)
  const COLORS = { proxy: "#1f6feb", peer: "#c2410c", nobody: "#6b7280", census: "#7c3aed",
    backend: "#b3261e" };
  const $ = (id) => document.getElementById(id);
  const ring = { t: [], series: {} }; // series[key] = array aligned with t
  const charts = {}; // key -> { plot, keys }
  let prev = null; // previous snapshot's cumulative ledger figures, by key
  let polls = 0;

  function el(tag, attrs, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    for (const kid of kids) e.append(kid);
    return e;
  }
  const num = (n) => (n === null || n === undefined ? "–" : Number(n).toLocaleString("en"));
  const tw = (c) => (c ? c.time_wait : null);
  const sum = (xs) => xs.reduce((a, b) => a + (b || 0), 0);
  const safeId = (s) => String(s).replace(/[^A-Za-z0-9_-]/g, "_");

  function push(key, value) {
    if (!ring.series[key]) ring.series[key] = new Array(ring.t.length - 1).fill(null);
    ring.series[key].push(value);
  }
  function trim() {
    while (ring.t.length > KEEP) {
      ring.t.shift();
      for (const k in ring.series) ring.series[k].shift();
    }
    for (const k in ring.series) { // keys that stopped being reported
      while (ring.series[k].length < ring.t.length) ring.series[k].push(null);
    }
  }
  // Closes per second since the previous poll, from a cumulative ledger count.
  function rate(key, cumulative, now) {
    let r = null;
    if (prev && prev.v[key] !== undefined && cumulative >= prev.v[key]) {
      r = (cumulative - prev.v[key]) / Math.max(0.001, now - prev.t);
    }
    return r;
  }

  function chart(key, container, lines) {
    const keys = lines.map((l) => l.key);
    const data = [ring.t.slice(), ...keys.map((k) => (ring.series[k] || []).slice())];
    let c = charts[key];
    if (!c || c.container !== container || typeof uPlot === "undefined") {
      if (typeof uPlot === "undefined") return;
      container.textContent = "";
      const width = Math.max(240, container.clientWidth || 300);
      const opts = {
        width, height: 160,
        cursor: { drag: { x: false, y: false } },
        legend: { live: false },
        scales: { x: { time: true } },
        series: [{}, ...lines.map((l) => ({ label: l.label, stroke: l.color, width: 2,
          dash: l.dash, points: { show: false }, spanGaps: true }))],
        axes: [{}, { size: 40 }],
      };
      c = charts[key] = { plot: new uPlot(opts, data, container), container };
    } else {
      c.plot.setData(data);
    }
  }
  window.addEventListener("resize", () => {
    for (const k in charts) {
      const c = charts[k];
      c.plot.setSize({ width: Math.max(240, c.container.clientWidth || 300), height: 160 });
    }
  });

  function row(label, ...cells) {
    return el("tr", {}, el("td", {}, label), ...cells.map((c) => el("td", {}, String(c))));
  }

  function listenerCard(l) {
    const id = "listener-" + safeId(l.name);
    const lg = l.ledger;
    const card = el("article", {
      class: "card listener", id, "data-name": l.name, "data-policy": l.time_wait,
      "data-tw-peer": lg.time_wait_peer, "data-tw-proxy": lg.time_wait_proxy,
      "data-tw-nobody": lg.time_wait_nobody,
      "data-census-tw": tw(l.census) === null ? "" : tw(l.census),
    });
    card.append(el("h3", {}, l.name, el("span", { class: "tag" }, l.protocol),
      el("span", { class: "tag" }, "time_wait = " + l.time_wait)));
    card.append(el("div", { class: "muted" }, l.listen));
    const e = l.errors;
    const t = el("table", {});
    t.append(el("tr", {}, el("th", {}, "TIME_WAIT"), el("th", {}, "ledger"), el("th", {}, "census")));
    t.append(row("on clients", num(lg.time_wait_peer), "–"));
    t.append(row("on waitless", num(lg.time_wait_proxy), num(tw(l.census))));
    t.append(row("nowhere", num(lg.time_wait_nobody), "–"));
    card.append(t);
    const t2 = el("table", {});
    t2.append(row("connections", num(l.connections)));
    t2.append(row("open now", num(l.active)));
    if (l.census) t2.append(row("established (census)", num(l.census.established)));
    t2.append(row("requests", num(l.requests)));
    t2.append(row("refused (max_clients)", num(l.rejected)));
    t2.append(row("errors connect / timeout / busy / upstream",
      [e.connect, e.timeout, e.busy, e.upstream].map(num).join(" / ")));
    if (l.tls) {
      t2.append(row("TLS handshakes", num(l.tls.handshakes)));
      t2.append(row("TLS errors", num(sum(Object.values(l.tls.errors || {})))));
    }
    card.append(t2);
    card.append(el("div", { class: "chart", id: "chart-" + id }));
    return card;
  }

  function serverCard(u, s) {
    const id = "server-" + safeId(u.name + "-" + s.server);
    const lg = s.ledger;
    const total = s.opened + s.reused;
    const reuse = total ? Math.round((100 * s.reused) / total) + "%" : "–";
    const card = el("article", {
      class: "card server", id, "data-upstream": u.name, "data-server": s.server,
      "data-tw-peer": lg.time_wait_peer, "data-tw-proxy": lg.time_wait_proxy,
      "data-tw-nobody": lg.time_wait_nobody,
      "data-census-server-tw": tw(s.census_server) === null ? "" : tw(s.census_server),
      "data-census-proxy-tw": tw(s.census_proxy) === null ? "" : tw(s.census_proxy),
    });
    card.append(el("h3", {}, u.name + " → " + s.server,
      el("span", { class: "tag " + s.state }, s.state),
      el("span", { class: "tag" }, "time_wait = " + u.time_wait)));
    const t = el("table", {});
    t.append(el("tr", {}, el("th", {}, "TIME_WAIT"), el("th", {}, "ledger"), el("th", {}, "census")));
    t.append(row("on the server", num(lg.time_wait_peer), s.census_server ? num(tw(s.census_server)) : "not local"));
    t.append(row("on waitless", num(lg.time_wait_proxy), num(tw(s.census_proxy))));
    t.append(row("nowhere", num(lg.time_wait_nobody), "–"));
    card.append(t);
    const t2 = el("table", {});
    t2.append(row("weight", s.weight));
    t2.append(row("idle / open", num(s.idle) + " / " + num(s.open)));
    t2.append(row("reused / opened", num(s.reused) + " / " + num(s.opened) + " (" + reuse + " reused)"));
    t2.append(row("connect errors / retries", num(s.connect_errors) + " / " + num(s.retries)));
    if (s.resets || s.resets_skipped) t2.append(row("resets / skipped", num(s.resets) + " / " + num(s.resets_skipped)));
    card.append(t2);
    card.append(el("div", { class: "chart", id: "chart-" + id }));
    return card;
  }

  function figure(cls, n, k, id) {
    return el("div", { class: "figure " + cls, id, "data-n": n === null ? "" : n },
      el("div", { class: "n" }, num(n)), el("div", { class: "k" }, k));
  }

  function render(snap) {
    const now = Date.now() / 1000;
    const L = snap.listeners, S = [];
    for (const u of snap.upstreams) for (const s of u.servers) S.push([u, s]);
    const ledger = (f) => sum(L.map((l) => l.ledger[f])) + sum(S.map(([, s]) => s.ledger[f]));
    const onClients = sum(L.map((l) => l.ledger.time_wait_peer));
    const onServers = sum(S.map(([, s]) => s.ledger.time_wait_peer));
    const onProxy = ledger("time_wait_proxy");
    const nowhere = ledger("time_wait_nobody");
    const local = S.filter(([, s]) => s.census_server);
    const backendCensus = local.length ? sum(local.map(([, s]) => tw(s.census_server))) : null;
    const proxyCensus = sum(L.map((l) => tw(l.census))) + sum(S.map(([, s]) => tw(s.census_proxy)));

    const h = $("headline");
    if (snap.census_error) {
      h.className = "headline unknown";
      h.textContent = "The kernel's census could not be read: " + snap.census_error;
    } else if (backendCensus === null) {
      h.className = "headline unknown";
      h.textContent = "No upstream server runs on this host: its TIME_WAIT is not in this census.";
    } else {
      h.className = "headline " + (backendCensus === 0 ? "good" : "bad");
      h.textContent = backendCensus === 0 ? "The backends hold 0 TIME_WAIT."
        : "The backends hold " + num(backendCensus) + " TIME_WAIT.";
      h.setAttribute("data-backend-tw", backendCensus);
      h.append(el("small", {}, "Where it went instead: " + num(onProxy) + " closes left it on waitless, " +
        num(onClients) + " on the clients, " + num(nowhere) + " nowhere (RST)."));
    }

    const f = $("figures");
    f.textContent = "";
    f.append(
      figure("proxy", onProxy, "TIME_WAIT on waitless (ledger); census now: " + num(proxyCensus), "fig-proxy"),
      figure("peer", onClients, "TIME_WAIT on clients (ledger)", "fig-clients"),
      figure("nobody", nowhere, "nowhere: closed by RST (ledger)", "fig-nobody"),
      figure("backend", backendCensus, "TIME_WAIT on the backends (census now); ledger: " + num(onServers), "fig-backend"),
    );

    // The ring: one sample per poll.
    ring.t.push(now);
    const v = {};
    const sample = (key, value) => push(key, value);
    const rated = (key, cumulative) => { v[key] = cumulative; sample(key, rate(key, cumulative, now)); };
    sample("census:proxy", proxyCensus);
    sample("census:backend", backendCensus);
    rated("rate:proxy", onProxy);
    rated("rate:peer", onClients + onServers);
    rated("rate:nobody", nowhere);
    for (const l of L) {
      const k = "l:" + l.name;
      sample(k + ":census", tw(l.census));
      rated(k + ":proxy", l.ledger.time_wait_proxy);
      rated(k + ":peer", l.ledger.time_wait_peer);
      rated(k + ":nobody", l.ledger.time_wait_nobody);
    }
    for (const [u, s] of S) {
      const k = "s:" + u.name + ":" + s.server;
      sample(k + ":census", tw(s.census_server));
      sample(k + ":census_proxy", tw(s.census_proxy));
      sample(k + ":idle", s.idle);
      rated(k + ":opened", s.opened);
      rated(k + ":reused", s.reused);
    }
    trim();
    prev = { t: now, v };

    const ls = $("listeners");
    ls.textContent = "";
    for (const l of L) ls.append(listenerCard(l));
    const ss = $("servers");
    ss.textContent = "";
    for (const [u, s] of S) ss.append(serverCard(u, s));

    // Cards are rebuilt each poll: their charts with them (cheap at these sizes).
    for (const k in charts) if (!k.startsWith("total")) delete charts[k];
    chart("total", $("chart-total"), [
      { key: "census:proxy", label: "census: on waitless", color: COLORS.proxy },
      { key: "census:backend", label: "census: on backends", color: COLORS.backend },
      { key: "rate:proxy", label: "closes/s → waitless", color: COLORS.proxy, dash: [4, 4] },
      { key: "rate:peer", label: "closes/s → peers", color: COLORS.peer, dash: [4, 4] },
      { key: "rate:nobody", label: "closes/s → nowhere", color: COLORS.nobody, dash: [4, 4] },
    ]);
    for (const l of L) {
      const k = "l:" + l.name;
      chart(k, $("chart-listener-" + safeId(l.name)), [
        { key: k + ":census", label: "census TW", color: COLORS.census },
        { key: k + ":proxy", label: "/s → waitless", color: COLORS.proxy, dash: [4, 4] },
        { key: k + ":peer", label: "/s → clients", color: COLORS.peer, dash: [4, 4] },
        { key: k + ":nobody", label: "/s → nowhere", color: COLORS.nobody, dash: [4, 4] },
      ]);
    }
    for (const [u, s] of S) {
      const k = "s:" + u.name + ":" + s.server;
      chart(k, $("chart-server-" + safeId(u.name + "-" + s.server)), [
        { key: k + ":census", label: "server TW", color: COLORS.backend },
        { key: k + ":idle", label: "idle", color: COLORS.census },
        { key: k + ":opened", label: "opened/s", color: COLORS.peer, dash: [4, 4] },
        { key: k + ":reused", label: "reused/s", color: COLORS.proxy, dash: [4, 4] },
      ]);
    }
  }

  async function poll() {
    try {
      const r = await fetch("/stats", { cache: "no-store" });
      if (!r.ok) throw new Error("/stats: HTTP " + r.status);
      render(await r.json());
      polls += 1;
      $("dash").setAttribute("data-polls", polls);
      $("status").textContent = "updated " + new Date().toLocaleTimeString();
    } catch (e) {
      $("status").textContent = "waitless unreachable (" + e.message + "); retrying";
    }
    setTimeout(poll, 1000);
  }
  poll();
})();
