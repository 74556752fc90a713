// Shared by the desk and the console: JSON calls with the CSRF header, safe DOM building, the live socket.
"use strict";

const Cuepoint = (() => {
  let csrf = "";

  function setCsrf(token) { csrf = token || ""; }

  async function api(method, path, body) {
    const init = { method, credentials: "same-origin", headers: { "Accept": "application/json" } };
    if (method !== "GET") {
      init.headers["Content-Type"] = "application/json";
      init.headers["X-CSRF-Token"] = csrf;
      init.body = JSON.stringify(body || {});
    }
    const response = await fetch(path, init);
    let data = {};
    try { data = await response.json(); } catch (e) { data = {}; }
    if (!response.ok) {
      const error = new Error(data.error || ("HTTP " + response.status));
      error.status = response.status;
      error.field = data.field || "";
      throw error;
    }
    return data;
  }

  // Builds elements from data with textContent only: nothing a device sends is ever parsed as HTML.
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); return node; }

  function time(epoch) {
    if (!epoch) return "";
    return new Date(epoch * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  }

  function dateTime(epoch) {
    if (!epoch) return "";
    return new Date(epoch * 1000).toLocaleString([], { dateStyle: "short", timeStyle: "medium" });
  }

  function show(node, visible) { node.classList.toggle("hidden", !visible); }

  // One WebSocket to this server; reconnects after a drop unless `stop()` was called.
  function socket(path, onMessage, onState) {
    let ws = null;
    let stopped = false;
    let delay = 500;
    function open() {
      const scheme = location.protocol === "https:" ? "wss:" : "ws:";
      ws = new WebSocket(scheme + "//" + location.host + path);
      ws.addEventListener("open", () => { delay = 500; onState && onState("open"); });
      ws.addEventListener("message", (event) => {
        if (event.data === "pong") return;
        try { onMessage(JSON.parse(event.data)); } catch (e) { console.error(e); }
      });
      ws.addEventListener("close", () => {
        onState && onState("closed");
        if (!stopped) { setTimeout(open, delay); delay = Math.min(delay * 2, 10000); }
      });
    }
    open();
    return { stop() { stopped = true; if (ws) ws.close(); } };
  }

  function announce(text) {
    const region = document.getElementById("announcer");
    if (region) { region.textContent = ""; setTimeout(() => { region.textContent = text; }, 30); }
  }

  return { api, setCsrf, el, clear, time, dateTime, show, socket, announce };
})();
