// The associate desk: one WebSocket carries what the core sends this associate; actions are JSON POSTs.
"use strict";

(() => {
  const { api, el, clear, time, dateTime, show, announce } = Cuepoint;
  const $ = (id) => document.getElementById(id);
  const CHANNEL_NAMES = { audio: "Audio", screen_share: "Screen share", chat: "Chat", video: "Video" };

  let live = null;            // the socket
  let queueConfig = {};       // queue -> {dispositions, canned_replies, offer_timeout}
  let offer = null;           // {engagement, deadline}
  let countdownTimer = null;
  let current = null;         // the assigned engagement
  let shown = new Set();      // message and signal ids on screen: a resumed desk is sent some of them again
  let pc = null;              // RTCPeerConnection of the current call
  let localStream = null;

  // -- sign-in ------------------------------------------------------------------------------

  async function boot() {
    const config = await api("GET", "/api/config");
    show($("noauth"), !config.auth);
    if (!config.auth) $("token-hint").textContent = "Not needed: this server runs without an auth file.";
    try {
      const session = await api("GET", "/api/desk/session");
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
    const queues = $("queues").value.split(",").map((q) => q.trim()).filter(Boolean);
    try {
      const session = await api("POST", "/api/desk/session", {
        token: $("token").value,
        associate_id: $("associate-id").value,
        display_name: $("display-name").value,
        queues,
      });
      $("token").value = "";
      Cuepoint.setCsrf(session.csrf);
      show($("signin"), false);
      start();
    } catch (e) {
      $("signin-error").textContent = "Sign-in refused: " + e.message;
      $("token").focus();
    }
  });

  $("sign-out").addEventListener("click", async () => {
    try { await api("POST", "/api/desk/session/sign-out"); } catch (e) { /* signed out anyway */ }
    if (live) live.stop();
    location.reload();
  });

  function start() {
    show($("desk"), true);
    show($("status-box"), true);
    show($("sign-out"), true);
    show($("link-state"), true);
    live = Cuepoint.socket("/api/desk/ws", onEvent, (state) => {
      $("link-state").textContent = state === "open" ? "connected" : "reconnecting…";
      $("link-state").className = "badge " + (state === "open" ? "ok" : "warn");
    });
  }

  // -- events from the server ------------------------------------------------------------

  function onEvent(msg) {
    switch (msg.type) {
      case "signed_in":
        queueConfig = msg.queue_config || {};
        $("who").textContent = (msg.display_name || msg.associate_id) + " · " + msg.queues.join(", ");
        $("status").value = msg.status;
        if (msg.resumed) announce("Reconnected: your engagements are still yours.");
        else if (current) {
          // Away longer than the grace period: the server gave the engagement back to its queue.
          closeCall();
          $("last-wrap").textContent = "Your connection was lost too long: the engagement went back to its queue.";
          current = null;
          show($("work"), false);
          show($("idle"), true);
        }
        break;
      case "queues": renderCounts(msg.queues); break;
      case "offered": showOffer(msg); break;
      case "offer_withdrawn":
        if (offer && offer.engagement.engagement_id === msg.engagement_id) {
          hideOffer();
          announce("The offer was withdrawn: " + msg.reason);
        }
        break;
      case "assigned": showEngagement(msg.engagement); break;
      case "chat": if (isCurrent(msg)) addChat(msg); break;
      case "upgrade_request": if (isCurrent(msg)) userAsks(msg); break;
      case "channel_change": if (isCurrent(msg)) channelChanged(msg); break;
      case "call_signal": if (isCurrent(msg)) callSignal(msg); break;
      case "journey": if (isCurrent(msg)) msg.items.forEach((item) => addJourney(item, true)); break;
      case "ended": ended(msg); break;
      case "error":
        $("last-wrap").textContent = "The server ended the desk session: " + msg.error;
        break;
    }
  }

  function isCurrent(msg) { return current && current.engagement_id === msg.engagement_id; }

  function renderCounts(queues) {
    const box = clear($("queue-counts"));
    for (const q of queues) {
      box.append(el("span", { class: "count", "data-queue": q.queue },
        q.queue + ": " + q.waiting + " waiting" + (q.waiting ? " (longest " + q.longest_wait + " s)" : "") + " · " + q.available + "/" + q.associates + " free"));
    }
  }

  // -- the incoming notice ------------------------------------------------------------------

  function showOffer(msg) {
    const e = msg.engagement;
    const ctx = e.context.context || {};
    offer = { engagement: e, deadline: Date.now() + msg.timeout * 1000 };
    const body = clear($("notice-body"));
    if (e.kind === "callback") body.append(callbackBadge(e), " ");
    body.append(
      el("strong", { text: e.context.cue.title || e.context.trigger.scenario_name || e.context.cue.scenario_id }), " — ",
      "“" + e.context.cue.message + "” · ",
      (ctx["device.model"] || "unknown device") + " · app " + (ctx["app.version"] || "?") + " · queue " + e.queue,
    );
    show($("notice"), true);
    tick();
    clearInterval(countdownTimer);
    countdownTimer = setInterval(tick, 250);
    const what = e.kind === "callback" ? "Callback to make" : "Incoming engagement";
    announce(what + " from queue " + e.queue + ". Accept or decline.");
    $("accept").focus();
  }

  function tick() {
    if (!offer) return;
    const left = Math.max(0, Math.ceil((offer.deadline - Date.now()) / 1000));
    $("countdown").textContent = String(left);
    if (left === 0) hideOffer();
  }

  function hideOffer() {
    offer = null;
    clearInterval(countdownTimer);
    show($("notice"), false);
  }

  $("accept").addEventListener("click", async () => {
    if (!offer) return;
    const id = offer.engagement.engagement_id;
    hideOffer();
    try { await api("POST", `/api/desk/engagements/${id}/accept`); } catch (e) { announce("Accept failed: " + e.message); }
  });

  $("decline").addEventListener("click", async () => {
    if (!offer) return;
    const id = offer.engagement.engagement_id;
    hideOffer();
    await api("POST", `/api/desk/engagements/${id}/decline`, { reason: $("decline-reason").value });
    announce("Declined.");
  });

  // -- the engagement --------------------------------------------------------------------------

  function fact(dl, name, value, attrs) {
    dl.append(el("dt", { text: name }), el("dd", attrs || {}, value === undefined || value === null || value === "" ? "—" : value));
  }

  // A callback the user chose: the associate phones them (the user is not waiting in the app).
  function callbackBadge(e) {
    const number = e.callback_number ? " · call " + e.callback_number : "";
    return el("span", { class: "badge warn", "data-field": "callback", text: "Callback, asked for " + dateTime(e.callback_at) + number });
  }

  function showEngagement(e) {
    current = e;
    shown = new Set();
    $("last-wrap").textContent = "";
    show($("idle"), false);
    show($("work"), true);
    const c = e.context;
    const ctx = c.context || {};
    const dl = clear($("context"));
    fact(dl, "Device", ctx["device.model"], { "data-field": "device.model" });
    fact(dl, "OS", [ctx["device.os"], ctx["device.os_version"]].filter(Boolean).join(" "), { "data-field": "device.os" });
    fact(dl, "App", [c.app_id, ctx["app.version"]].filter(Boolean).join(" "), { "data-field": "app.version" });
    fact(dl, "Locale", ctx["device.locale"]);
    fact(dl, "Zone", ctx["device.timezone"]);
    fact(dl, "Location", [ctx["location.city"], ctx["location.region"], ctx["location.country"]].filter(Boolean).join(", "));
    const identity = c.user_id
      ? [c.user_id + " ", el("span", { class: "badge " + (c.user_verified ? "ok" : "warn"), text: c.user_verified ? "verified" : "claimed" })]
      : (c.redacted_fields.includes("user.id") ? el("span", { class: "badge warn", text: "redacted" }) : "anonymous");
    fact(dl, "User", identity, { "data-field": "user.id" });
    for (const [key, value] of Object.entries(c.user_attributes || {})) fact(dl, key === "tier" ? "Tier" : "user." + key, String(value));
    for (const key of c.redacted_fields || []) if (key !== "user.id") fact(dl, key, el("span", { class: "badge warn", text: "redacted" }));
    for (const [key, value] of Object.entries(ctx)) if (key.startsWith("attributes.")) fact(dl, key, String(value));
    const consentClass = c.consent === "full" ? "ok" : c.consent === "essential" ? "warn" : "bad";
    fact(dl, "Consent", el("span", { class: "badge " + consentClass, text: c.consent }));
    fact(dl, "Segments", (c.trigger.segments || []).join(", "));

    const why = clear($("why"));
    const t = c.trigger || {};
    // The file's name is enough for an associate (the server's folder says nothing to them).
    const base = (path) => String(path).split(/[\\/]/).pop();
    fact(why, "Scenario", (t.scenario_name || c.cue.scenario_id) + (t.scenario_file ? " (" + base(t.scenario_file) + ")" : ""));
    fact(why, "Cue", "“" + c.cue.message + "” by " + (CHANNEL_NAMES[c.cue.channel] || c.cue.channel));
    fact(why, "Priority", "scenario " + t.priority + " · engagement " + (c.priority || 0));
    fact(why, "Queue", e.queue + (t.queue && t.queue !== e.queue ? " (routed from " + t.queue + ")" : ""));
    if (e.kind === "callback") fact(why, "Kind", callbackBadge(e));
    const rule = c.routing_rule;
    fact(why, "Routing rule", rule
      ? (rule.name || "routing.rules[" + rule.index + "]") + (rule.file ? " (" + base(rule.file) + ":" + rule.line + ")" : "") +
        " → " + rule.queue + (rule.priority ? ", priority " + (rule.priority > 0 ? "+" : "") + rule.priority : "") +
        (rule.skills.length ? ", skills " + rule.skills.join(", ") : "")
      : "none matched: the scenario's queue", { "data-field": "routing-rule" });
    for (const [outcome, score] of Object.entries(c.scores || t.scores || {})) {
      const p = typeof score.probability === "number" ? (score.probability * 100).toFixed(0) + "%" : "—";
      fact(why, "Score: " + outcome, p + (score.status ? " (" + score.status + ")" : ""));
    }
    fact(why, "Milestones", (t.milestones || []).join(", "));
    const rows = clear($("conditions"));
    const held = (t.conditions || []).concat(rule ? rule.conditions : []);
    for (const [path, text] of held) {
      const observed = /\(([^()]*)\)\s*$/.exec(text);
      rows.append(el("tr", {}, el("td", { text: path + ": " + text.replace(/\s*\([^()]*\)\s*$/, "") }), el("td", { text: observed ? observed[1] : "held" })));
    }

    // One timeline: the device's signals and milestones reached, earlier cues with how they ended, earlier engagements with outcomes.
    const journey = clear($("journey"));
    const entries = (c.journey || []).map((item) => ({ time: item.time, item }));
    for (const cue of c.prior_cues || []) {
      entries.push({ time: cue.created_at, item: { kind: "cue", name: "cue " + cue.scenario_id, time: cue.created_at, payload: { answer: cue.status } } });
    }
    for (const p of c.prior_engagements || []) {
      entries.push({ time: p.created_at, item: { kind: "engagement", name: "engagement " + p.scenario_id, time: p.created_at, payload: { disposition: p.disposition || "none", recorded: p.wrap_up_outcome || "none", outcome: p.outcome || "none" } } });
    }
    entries.sort((a, b) => a.time - b.time);
    for (const entry of entries) addJourney(entry.item, false);
    for (const item of e.journey_since || []) addJourney(item, true);
    journey.scrollTop = journey.scrollHeight;
    const prior = clear($("prior"));
    for (const p of c.prior_engagements || []) {
      prior.append(el("li", {}, Cuepoint.dateTime(p.created_at) + " · " + p.scenario_id + " · " + (p.disposition || "no disposition") + (p.wrap_up_outcome ? " · recorded " + p.wrap_up_outcome.replace(/_/g, " ") : "") + (p.outcome ? " · outcome " + p.outcome : "")));
    }
    if (!(c.prior_engagements || []).length) prior.append(el("li", { text: "none" }));

    clear($("transcript"));
    for (const line of e.transcript || []) addChat(line);
    clear($("calllog"));
    clear($("user-asks"));
    setChannel(e.channel);
    const conf = queueConfig[e.queue] || e.queue_config || {};
    const canned = clear($("canned"));
    canned.append(el("option", { value: "", text: (conf.canned_replies || []).length ? "Canned replies…" : "No canned replies for this queue" }));
    for (const line of conf.canned_replies || []) canned.append(el("option", { value: line, text: line }));
    const disp = clear($("disposition"));
    const codes = (conf.dispositions || []).length ? conf.dispositions : ["resolved", "not_resolved", "follow_up"];
    disp.append(el("option", { value: "", text: "Choose…" }));
    for (const code of codes) disp.append(el("option", { value: code, text: code.replace(/_/g, " ") }));
    const outcomes = clear($("outcome"));
    outcomes.append(el("option", { value: "", text: "Choose…" }));
    for (const o of conf.outcomes || []) outcomes.append(el("option", { value: o.id, text: o.label }));
    $("notes").value = "";
    $("wrap-error").textContent = "";
    announce("Engagement accepted. Context loaded.");
    $("work").focus();
  }

  function addJourney(item, fresh) {
    if (item.signal_id) {
      if (shown.has("signal:" + item.signal_id)) return;
      shown.add("signal:" + item.signal_id);
    }
    const props = Object.entries(item.payload || {}).map(([k, v]) => k + "=" + (typeof v === "object" ? JSON.stringify(v) : v)).join(" ");
    const label = item.kind === "context" ? "context " + (item.name || "update") : item.kind === "milestone" ? "milestone " + item.name : item.name;
    $("journey").append(el("li", { class: (fresh ? "fresh " : "") + "kind-" + item.kind }, el("span", { class: "when", text: time(item.time) }), el("strong", { text: label }), el("span", { class: "props", text: props })));
    $("journey").scrollTop = $("journey").scrollHeight;
  }

  // -- chat ---------------------------------------------------------------------------------------

  function addChat(msg) {
    if (msg.message_id) {
      if (shown.has("chat:" + msg.message_id)) return;
      shown.add("chat:" + msg.message_id);
    }
    const who = msg.sender === "associate" ? "You" : msg.sender === "user" ? "User" : "System";
    $("transcript").append(el("li", { class: msg.sender }, el("span", { class: "from", text: who + " · " + time(msg.time) }), msg.text));
    $("transcript").scrollTop = $("transcript").scrollHeight;
  }

  $("canned").addEventListener("change", () => {
    if ($("canned").value) { $("chat-text").value = $("canned").value; $("canned").value = ""; $("chat-text").focus(); }
  });

  $("chat-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const text = $("chat-text").value;
    if (!current || !text.trim()) return;
    try {
      await api("POST", `/api/desk/engagements/${current.engagement_id}/chat`, { text });
      $("chat-text").value = "";
    } catch (e) { announce("Message not sent: " + e.message); }
  });

  // -- channel and call set-up (WebRTC in this page; offers and answers relayed by the server) ------

  function setChannel(channel) {
    $("channel").textContent = CHANNEL_NAMES[channel] || channel;
    $("channel").dataset.channel = channel;
  }

  function callLog(text) { $("calllog").append(el("li", { text: time(Date.now() / 1000) + " " + text })); }

  for (const id of ["ask-screen", "ask-audio", "ask-video"]) {
    $(id).addEventListener("click", async () => {
      if (!current) return;
      const channel = $(id).dataset.channel;
      try {
        await api("POST", `/api/desk/engagements/${current.engagement_id}/upgrade`, { channel });
        callLog("asked the user for " + CHANNEL_NAMES[channel].toLowerCase());
      } catch (e) { callLog("request failed: " + e.message); }
    });
  }

  function userAsks(msg) {
    const box = $("user-asks");
    const answer = async (accepted) => {
      clear(box);
      await api("POST", `/api/desk/engagements/${current.engagement_id}/upgrade-response`, { request_id: msg.request_id, accepted });
    };
    clear(box).append(
      el("span", { text: "The user asks for " + (CHANNEL_NAMES[msg.channel] || msg.channel).toLowerCase() + ":" }),
      el("button", { type: "button", class: "primary", onclick: () => answer(true) }, "Allow"),
      el("button", { type: "button", onclick: () => answer(false) }, "Refuse"),
    );
    announce("The user asks for " + msg.channel);
  }

  function channelChanged(msg) {
    const what = (CHANNEL_NAMES[msg.channel] || msg.channel).toLowerCase();
    if (!msg.accepted) { callLog((msg.requested_by === "associate" ? "the user refused " : "refused: ") + what); return; }
    setChannel(msg.channel);
    callLog((msg.requested_by === "associate" ? "the user accepted " : "switched to ") + what);
    announce("Channel is now " + what);
    if (msg.requested_by === "associate" && msg.channel !== "chat") startCall(msg.channel);
  }

  function newConnection() {
    closeCall();
    pc = new RTCPeerConnection({ iceServers: [] });
    pc.addEventListener("connectionstatechange", () => callLog("connection " + pc.connectionState));
    pc.addEventListener("track", (event) => { $("remote-audio").srcObject = event.streams[0]; });
    return pc;
  }

  async function localMedia(channel) {
    try {
      localStream = await navigator.mediaDevices.getUserMedia({ audio: true, video: channel === "video" });
      for (const track of localStream.getTracks()) pc.addTrack(track, localStream);
    } catch (e) {
      callLog("no microphone: " + e.message);
      pc.addTransceiver("audio");
    }
    if (channel === "screen_share") pc.addTransceiver("video", { direction: "recvonly" });
  }

  function gathered(conn) {
    if (conn.iceGatheringState === "complete") return Promise.resolve();
    return new Promise((resolve) => {
      const done = () => { if (conn.iceGatheringState === "complete") resolve(); };
      conn.addEventListener("icegatheringstatechange", done);
      setTimeout(resolve, 2000);
    });
  }

  async function sendSignal(kind, payload) {
    await api("POST", `/api/desk/engagements/${current.engagement_id}/call-signal`, { kind, payload });
  }

  async function startCall(channel) {
    const conn = newConnection();
    await localMedia(channel);
    await conn.setLocalDescription(await conn.createOffer());
    await gathered(conn);
    const sdp = conn.localDescription.sdp;
    callLog("sending call offer (" + sdp.length + " bytes)");
    await sendSignal("offer", sdp);
  }

  async function callSignal(msg) {
    const text = msg.payload.text || "";
    if (msg.kind === "offer") {
      callLog("call offer received (" + text.length + " bytes)");
      const conn = newConnection();
      try {
        await conn.setRemoteDescription({ type: "offer", sdp: text });
        await localMedia(current.channel);
        await conn.setLocalDescription(await conn.createAnswer());
        await gathered(conn);
        await sendSignal("answer", conn.localDescription.sdp);
        callLog("call answer sent");
      } catch (e) { callLog("offer not usable: " + e.message); }
    } else if (msg.kind === "answer") {
      callLog("call answer received (" + text.length + " bytes)");
      if (!pc) return;
      try {
        await pc.setRemoteDescription({ type: "answer", sdp: text });
        callLog("call set up: " + pc.signalingState);
      } catch (e) { callLog("answer not usable: " + e.message); }
    } else if (msg.kind === "candidate") {
      if (pc) { try { await pc.addIceCandidate(JSON.parse(text)); } catch (e) { callLog("candidate not usable"); } }
    } else if (msg.kind === "hangup") {
      callLog("the user hung up");
      closeCall();
    }
  }

  function closeCall() {
    if (pc) { pc.close(); pc = null; }
    if (localStream) { localStream.getTracks().forEach((t) => t.stop()); localStream = null; }
  }

  $("hangup").addEventListener("click", async () => {
    if (!current) return;
    closeCall();
    await sendSignal("hangup", "");
    callLog("hung up");
  });

  // -- wrap-up ----------------------------------------------------------------------------------------

  $("wrap-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!current) return;
    $("wrap-error").textContent = "";
    const disposition = $("disposition").value;
    if (!disposition) { $("wrap-error").textContent = "Choose a disposition."; $("disposition").focus(); return; }
    const outcome = $("outcome").value;
    if (!outcome) { $("wrap-error").textContent = "Choose an outcome."; $("outcome").focus(); return; }
    try {
      const id = current.engagement_id;
      await api("POST", `/api/desk/engagements/${id}/wrap-up`, { disposition, outcome, notes: $("notes").value });
      // After the user left the core sends nothing more: finish here (a later "ended" is ignored).
      ended({ engagement_id: id, disposition, ended_by: "associate" });
    } catch (e) { $("wrap-error").textContent = e.message; }
  });

  function ended(msg) {
    if (!isCurrent(msg)) return;
    if (msg.ended_by === "user" && current.userLeft) return;  // told again after a reconnect
    if (msg.ended_by === "user") {
      current.userLeft = true;
      callLog("the user ended the engagement; wrap up to finish");
      announce("The user ended the engagement. Wrap up to finish.");
      closeCall();
      return;
    }
    closeCall();
    $("last-wrap").textContent = "Wrapped up " + current.engagement_id.slice(0, 8) + " as " + msg.disposition + ".";
    current = null;
    show($("work"), false);
    show($("idle"), true);
    announce("Wrapped up.");
  }

  $("status").addEventListener("change", async () => {
    try { await api("POST", "/api/desk/status", { status: $("status").value }); announce("Status " + $("status").value); }
    catch (e) { announce("Status not changed: " + e.message); }
  });

  boot();
})();
