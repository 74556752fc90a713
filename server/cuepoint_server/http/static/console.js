// The admin console: live now over a WebSocket; funnels, scenarios, validate, replay and explain as JSON calls.
"use strict";

(() => {
  const { api, el, clear, time, dateTime, show, announce } = Cuepoint;
  const $ = (id) => document.getElementById(id);
  let lastLive = null;
  let paused = false;

  async function boot() {
    const config = await api("GET", "/api/config");
    if (!config.auth) $("token-hint").textContent = "Not needed: this server runs without an auth file.";
    try {
      const session = await api("GET", "/api/console/session");
      Cuepoint.setCsrf(session.csrf);
      start();
    } catch (e) {
      show($("signin"), true);
      $("token").focus();
    }
  }

  $("signin-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    $("signin-error").textContent = "";
    try {
      const session = await api("POST", "/api/console/session", { token: $("token").value });
      $("token").value = "";
      Cuepoint.setCsrf(session.csrf);
      show($("signin"), false);
      start();
    } catch (e) {
      $("signin-error").textContent = "Sign-in refused: " + e.message;
    }
  });

  $("sign-out").addEventListener("click", async () => {
    try { await api("POST", "/api/console/session/sign-out"); } catch (e) { /* signed out anyway */ }
    location.reload();
  });

  function start() {
    show($("console"), true);
    show($("pause"), true);
    show($("sign-out"), true);
    show($("link-state"), true);
    Cuepoint.socket("/api/console/ws", (msg) => { if (msg.type === "live") renderLive(msg.live); }, (state) => {
      $("link-state").textContent = state === "open" ? "live" : "reconnecting…";
      $("link-state").className = "badge " + (state === "open" ? "ok" : "warn");
    });
    loadFunnels();
    loadHandling();
    loadScenarios();
    setInterval(loadFunnels, 10000);
  }

  // -- live now ------------------------------------------------------------------------------------

  function card(label, value, id) {
    return el("div", { class: "card", id }, el("span", { class: "n", text: String(value) }), el("span", { class: "k", text: label }));
  }

  function renderLive(live) {
    lastLive = live;
    setPaused(live.offers_paused);
    const cards = clear($("live-cards"));
    cards.append(
      card("live", live.counts.live, "count-live"),
      card("idle", live.counts.idle, "count-idle"),
      card("inactive", live.counts.inactive, "count-inactive"),
      card("pending cues", live.pending_cues, "count-pending"),
      card("waiting engagements", live.queues.reduce((n, q) => n + q.waiting, 0), "count-waiting"),
      card("callbacks scheduled", (live.callbacks || []).filter((c) => c.state === "callback_requested").length, "count-callbacks"),
    );
    const segments = {};
    for (const s of live.sessions) for (const name of s.segments) segments[name] = (segments[name] || 0) + 1;
    for (const [name, n] of Object.entries(segments).sort()) cards.append(card("in segment " + name, n, "segment-" + name));
    const needle = $("filter").value.trim().toLowerCase();
    const body = clear($("sessions"));
    for (const s of live.sessions) {
      const text = [s.device_id, s.app_id, s.status, ...s.segments, s.pending_cue ? s.pending_cue.scenario_id : ""].join(" ").toLowerCase();
      if (needle && !text.includes(needle)) continue;
      const statusClass = s.status === "live" ? "ok" : s.status === "idle" ? "warn" : "bad";
      body.append(el("tr", { "data-device": s.device_id },
        el("td", {}, el("button", { type: "button", class: "linkish", onclick: () => explain(s.device_id), "aria-label": "Explain " + s.device_id }, s.device_id)),
        el("td", { text: s.app_id + " " + (s.context["app.version"] || "") }),
        el("td", {}, el("span", { class: "badge " + statusClass, text: s.status })),
        el("td", { text: s.last_signal_at ? time(s.last_signal_at) : "—" }),
        el("td", { text: s.segments.join(", ") || "—" }),
        el("td", { text: s.pending_cue ? s.pending_cue.scenario_id + " until " + time(s.pending_cue.expires_at) : "—" }),
        el("td", { text: s.engagement_id ? s.engagement_state : "—" }),
        el("td", { class: "version", text: s.replica_id || "—" }),
      ));
    }
    const unanswered = live.unanswered_replicas || [];
    $("live-unanswered").textContent = unanswered.length ? "Not shown: the sessions of replica(s) that did not answer: " + unanswered.join(", ") : "";
    $("live-unanswered").classList.toggle("hidden", !unanswered.length);
    if (!body.firstChild) body.append(el("tr", {}, el("td", { colspan: 8, class: "muted", text: "No sessions" + (needle ? " match the filter" : "") })));
    const queues = clear($("queues"));
    for (const q of live.queues) {
      queues.append(el("tr", { "data-queue": q.queue }, el("td", { text: q.queue }), el("td", { text: String(q.waiting) }), el("td", { text: q.waiting ? Math.round(q.longest_wait) + " s" : "—" }), el("td", { text: String(q.associates) }), el("td", { text: String(q.available) })));
    }
  }

  $("filter").addEventListener("input", () => { if (lastLive) renderLive(lastLive); });

  // -- the emergency switch ---------------------------------------------------------------------------

  function setPaused(value) {
    paused = value;
    $("pause").textContent = paused ? "Resume offers" : "Pause all offers";
    $("pause").setAttribute("aria-pressed", paused ? "true" : "false");
    $("pause").className = paused ? "primary" : "danger";
    show($("paused-banner"), paused);
  }

  $("pause").addEventListener("click", async () => {
    const want = !paused;
    if (want && !confirmPause()) return;
    const result = await api("POST", "/api/console/pause", { paused: want, reason: "console" });
    setPaused(result.offers_paused);
    announce(result.offers_paused ? "Offers paused" : "Offers resumed");
  });

  function confirmPause() { return true; }

  // -- funnels ---------------------------------------------------------------------------------------------

  const STEPS = [["qualified", ""], ["blocked_total", "blocked"], ["offered", ""], ["accepted", ""], ["engaged", ""], ["resolved", "resolved"], ["outcome", "outcome"]];

  function pct(rate) { return rate === null || rate === undefined ? "—" : (rate * 100).toFixed(1) + "%"; }

  async function loadFunnels() {
    $("funnel-error").textContent = "";
    const params = new URLSearchParams({ since: $("period").value, by: $("group-by").value });
    let data;
    try { data = await api("GET", "/api/console/funnel?" + params); }
    catch (e) { $("funnel-error").textContent = e.message; return; }
    const box = clear($("funnels"));
    if (!data.rows.length) box.append(el("p", { class: "muted span-12", text: "No decisions in this period." }));
    for (const row of data.rows) {
      const blocked = Object.entries(row.blocked);
      const values = Object.assign({}, row, { blocked_total: blocked.reduce((n, [, c]) => n + c, 0) });
      const max = Math.max(1, ...STEPS.map(([k]) => values[k] || 0));
      const group = Object.entries(row.group).map(([k, v]) => k + "=" + v).join(", ");
      const title = row.scenario_id + (group ? " · " + group : "");
      const chart = el("div", { class: "funnel", role: "img", "aria-label": "Funnel of " + title + ": " + STEPS.map(([k, label]) => (label || k) + " " + values[k]).join(", ") });
      for (const [key, kind] of STEPS) {
        const n = values[key] || 0;
        const bar = el("div", { class: "bar " + kind });
        bar.style.width = (100 * n / max).toFixed(1) + "%";
        chart.append(el("div", { class: "step", "data-step": key }, el("span", { text: key === "blocked_total" ? "blocked" : key }), el("div", {}, bar), el("span", { class: "n", text: String(n) })));
      }
      const lift = row.lift ? (row.lift.difference * 100).toFixed(1) + " pts (95% CI " + (row.lift.low * 100).toFixed(1) + " to " + (row.lift.high * 100).toFixed(1) + ")" : "needs sessions in both groups";
      // A scenario with A/B variants takes the full width, so its variants table fits without scrolling.
      const span = row.variants && row.variants.length ? "span-12" : "span-6";
      box.append(el("article", { class: "panel " + span, "data-scenario": row.scenario_id, "aria-label": "Funnel " + title },
        el("h3", { text: title }),
        chart,
        el("p", { class: "muted", text: "Blocked by: " + (blocked.map(([r, c]) => r + " " + c).join(", ") || "nothing") + " · declined " + row.declined + " · dismissed " + row.dismissed + " · ignored " + row.ignored + " · withdrawn " + row.withdrawn }),
        el("p", { class: "muted", "data-role": "wrap-up-outcomes", text: "Recorded at wrap-up: " + (Object.entries(row.wrap_up_outcomes || {}).map(([o, c]) => o.replace(/_/g, " ") + " " + c).join(", ") || "nothing yet") }),
        el("table", {},
          el("thead", {}, el("tr", {}, el("th", { scope: "col", text: "Group" }), el("th", { scope: "col", text: "Sessions" }), el("th", { scope: "col", text: "Converted" }), el("th", { scope: "col", text: "Conversion" }))),
          el("tbody", {},
            el("tr", {}, el("td", { text: "treated" }), el("td", { text: String(row.treated.sessions) }), el("td", { text: String(row.treated.converted) }), el("td", { text: pct(row.treated.conversion_rate) })),
            el("tr", {}, el("td", { text: "holdout" }), el("td", { text: String(row.holdout.sessions) }), el("td", { text: String(row.holdout.converted) }), el("td", { text: pct(row.holdout.conversion_rate) })))),
        el("p", {}, "Treated minus holdout: ", el("strong", { text: lift })),
        variantsTable(row, title),
        feedbackLine(row),
      ));
    }
  }

  // A/B variants: conversion per variant with its 95% interval, the difference and two-sided p-value against
  // the control (the first), whether it is stopped, and the switch (AdminService.SetVariantStopped).
  function variantsTable(row, title) {
    if (!row.variants || !row.variants.length) return null;
    const body = el("tbody");
    for (const v of row.variants) {
      const ci = v.conversion_rate === null ? "—" : pct(v.ci[0]) + " to " + pct(v.ci[1]);
      const diff = v.control ? "control" : (v.difference >= 0 ? "+" : "") + (v.difference * 100).toFixed(1) + " pts";
      const switchButton = v.control ? el("span", { class: "muted", text: "—" }) : el("button", {
        type: "button", "aria-pressed": v.stopped ? "true" : "false",
        "aria-label": (v.stopped ? "Restart variant " : "Stop variant ") + v.variant_id + " of " + row.scenario_id,
        onclick: async () => {
          try {
            await api("POST", `/api/console/scenarios/${encodeURIComponent(row.scenario_id)}/variants/${encodeURIComponent(v.variant_id)}/stopped`, { stopped: !v.stopped, reason: "console" });
            announce("Variant " + v.variant_id + " of " + row.scenario_id + (v.stopped ? " restarted" : " stopped"));
          } catch (e) { announce(e.message); }
          loadFunnels();
          loadScenarios();
        },
      }, v.stopped ? "Restart" : "Stop");
      body.append(el("tr", { "data-variant": v.variant_id },
        el("th", { scope: "row", text: v.variant_id + (v.control ? " (control)" : "") }),
        el("td", { text: String(v.offered) }),
        el("td", { text: String(v.accepted) }),
        el("td", { text: String(v.sessions) }),
        el("td", { text: String(v.converted) }),
        el("td", { text: pct(v.conversion_rate) }),
        el("td", { text: ci }),
        el("td", { text: diff }),
        el("td", { text: v.control ? "—" : v.p_value.toFixed(3) }),
        el("td", {}, el("span", { class: "badge " + (v.stopped ? "bad" : "ok"), text: v.stopped ? "stopped" : "running" })),
        el("td", {}, switchButton),
      ));
    }
    const head = ["Variant", "Offered", "Accepted", "Sessions", "Converted", "Conversion", "95% CI", "vs control", "p-value", "State", "Switch"];
    return el("div", { class: "scroll" },
      el("table", { class: "variants", "aria-label": "A/B variants of " + title },
        el("thead", {}, el("tr", {}, head.map((h) => el("th", { scope: "col", text: h })))),
        body));
  }

  // Ratings asked after the engagements (CSAT 1-5, NPS 0-10).
  function feedbackLine(row) {
    if (!row.feedback || !row.feedback.length) return null;
    const parts = row.feedback.map((f) => {
      let text = f.kind.toUpperCase() + ": " + f.responses + " response(s), average " + f.average_score.toFixed(2) + ", satisfied " + pct(f.satisfied_share);
      if (f.kind === "nps") text += ", NPS " + (f.net_promoter_score >= 0 ? "+" : "") + f.net_promoter_score.toFixed(0);
      return text;
    });
    return el("p", { class: "feedback" }, "Feedback: ", el("strong", { text: parts.join(" · ") }));
  }

  // -- handling times -----------------------------------------------------------------------------------

  function clock(seconds) {
    const whole = Math.round(seconds);
    return Math.floor(whole / 60) + ":" + String(whole % 60).padStart(2, "0");
  }

  async function loadHandling() {
    $("handling-error").textContent = "";
    let data;
    try { data = await api("GET", "/api/console/handling?" + new URLSearchParams({ since: $("period").value })); }
    catch (e) { $("handling-error").textContent = e.message; return; }
    for (const [id, rows, key] of [["handling-queues", data.queues, "queue"], ["handling-associates", data.associates, "associate_id"]]) {
      const body = clear($(id));
      if (!rows.length) body.append(el("tr", {}, el("td", { colspan: "8", class: "muted", text: "No engagements ended in this period." })));
      for (const f of rows) {
        body.append(el("tr", { "data-key": f[key] },
          el("th", { scope: "row", text: f[key] }),
          el("td", { text: String(f.engagements) }),
          el("td", { text: clock(f.average_handle) }),
          el("td", { text: clock(f.median_handle) }),
          el("td", { text: clock(f.average_wrap_up) }),
          el("td", { text: clock(f.median_wrap_up) }),
          el("td", { text: String(f.awaiting_wrap_up) }),
          el("td", { text: clock(f.average_wait) })));
      }
    }
  }

  $("funnel-refresh").addEventListener("click", loadFunnels);
  $("funnel-refresh").addEventListener("click", loadHandling);
  $("period").addEventListener("change", loadHandling);
  $("period").addEventListener("change", loadFunnels);
  $("group-by").addEventListener("change", loadFunnels);

  // -- scenarios ------------------------------------------------------------------------------------------

  async function loadScenarios() {
    const data = await api("GET", "/api/console/scenarios");
    setPaused(data.offers_paused);
    $("scenario-version").textContent = "Version " + data.version + (data.last_error ? " · last reload failed: " + data.last_error : "");
    $("versions-differ").classList.toggle("hidden", !data.versions_differ);
    const replicas = clear($("replicas"));
    for (const r of data.replicas || []) {
      const state = !r.alive ? "gone" : r.draining ? "draining" : "serving";
      replicas.append(el("tr", { "data-replica": r.replica_id },
        el("td", { class: "version", text: r.replica_id + (r.this ? " (this one)" : "") }),
        el("td", { text: r.address + " · " + r.host }),
        el("td", { class: "version", text: r.scenarios_version || "—" }),
        el("td", {}, el("span", { class: "badge " + (state === "serving" ? "ok" : state === "draining" ? "warn" : "bad"), text: state })),
        el("td", { text: time(r.last_seen) }),
      ));
    }
    const body = clear($("scenarios"));
    for (const s of data.scenarios) {
      const toggle = el("button", {
        type: "button", id: "toggle-" + s.id, "aria-pressed": s.enabled ? "true" : "false",
        disabled: !s.enabled_in_file, "aria-label": (s.enabled ? "Disable " : "Enable ") + s.id,
        onclick: async () => {
          try {
            await api("POST", `/api/console/scenarios/${encodeURIComponent(s.id)}/enabled`, { enabled: !s.enabled });
            announce(s.id + (s.enabled ? " disabled" : " enabled"));
          } catch (e) { announce(e.message); }
          loadScenarios();
        },
      }, s.enabled ? "Disable" : "Enable");
      body.append(el("tr", { "data-scenario": s.id },
        el("td", {}, el("strong", { text: s.id }), el("br"), el("span", { class: "muted", text: s.name })),
        el("td", { text: s.file }),
        el("td", { class: "version", text: s.version }),
        el("td", { text: String(s.priority) }),
        el("td", { text: s.queue }),
        el("td", { text: s.holdout ? (s.holdout * 100).toFixed(0) + "%" : "—" }),
        el("td", { class: "variants", text: (s.variants || []).map((v) => v.id + (v.control ? " (control)" : "") + (v.stopped ? " stopped" : "")).join(", ") || "—" }),
        el("td", {}, el("span", { class: "badge " + (s.enabled ? "ok" : "bad"), text: s.enabled ? "enabled" : s.enabled_in_file ? "disabled" : "off in file" })),
        el("td", {}, toggle),
      ));
    }
  }

  // -- validate and replay ------------------------------------------------------------------------------------

  $("validate").addEventListener("click", async () => {
    try {
      const result = await api("POST", "/api/console/validate", { text: $("validate-text").value, name: "pasted.yaml" });
      $("validate-out").textContent = result.ok ? "ok: " + result.scenarios.length + " scenario(s) valid" : result.text + "\n" + result.issues.length + " problem(s) found";
    } catch (e) { $("validate-out").textContent = e.message; }
  });

  $("replay").addEventListener("click", async () => {
    try {
      const result = await api("POST", "/api/console/replay", { trace: $("replay-text").value, name: "trace" });
      $("replay-out").textContent = result.output + (result.error ? "invalid trace:\n" + result.error : "");
    } catch (e) { $("replay-out").textContent = e.message; }
  });

  // -- explain ---------------------------------------------------------------------------------------------

  async function explain(deviceId) {
    $("explain-device").value = deviceId;
    const facts = clear($("explain-facts"));
    const body = clear($("explain"));
    let data;
    try { data = await api("GET", "/api/console/explain/" + encodeURIComponent(deviceId)); }
    catch (e) { facts.append(el("dt", { text: "Error" }), el("dd", { class: "error", text: e.message })); return; }
    facts.append(
      el("dt", { text: "Connected" }), el("dd", { text: data.connected ? "yes" : "no" }),
      el("dt", { text: "Segments" }), el("dd", { text: data.segments.join(", ") || "—" }),
      el("dt", { text: "Milestones" }), el("dd", { text: data.milestones.join(", ") || "—" }),
    );
    for (const d of data.decisions.slice().reverse()) {
      body.append(el("tr", {}, el("td", { text: dateTime(d.time) }), el("td", { text: d.scenario_id }),
        el("td", {}, el("span", { class: "badge " + (d.outcome === "offered" ? "ok" : "warn"), text: d.outcome })),
        el("td", { text: d.reason || "—" }), el("td", { text: d.detail || "" })));
    }
    if (!data.decisions.length) body.append(el("tr", {}, el("td", { colspan: 5, class: "muted", text: "No decisions stored for this device." })));
    $("explain-title").scrollIntoView();
  }

  $("explain-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const id = $("explain-device").value.trim();
    if (id) explain(id);
  });

  boot();
})();
