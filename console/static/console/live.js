// The dashboard's live figures: one WebSocket to /ws/console/live/, numbers updated on every message.
// Reconnects with back-off when the connection drops. No inline script anywhere (CSP script-src 'self').
(function () {
  "use strict";
  var root = document.getElementById("live");
  if (!root) { return; }
  var state = document.getElementById("live-state");
  var delay = 1000;

  function show(text) { if (state) { state.textContent = text; } }

  function render(figures) {
    Object.keys(figures).forEach(function (key) {
      var cell = root.querySelector('[data-live="' + key + '"]');
      var value = figures[key];
      if (!cell || typeof value === "object") { return; }
      // Rates keep one decimal, as the server renders them; counts are whole numbers.
      cell.textContent = /_per_s$/.test(key) ? Number(value).toFixed(1) : String(value);
    });
    if (Array.isArray(figures.upstreams)) {
      figures.upstreams.forEach(function (upstream) {
        var cell = document.querySelector('[data-upstream="' + CSS.escape(upstream.url) + '"]');
        if (cell) {
          cell.textContent = upstream.healthy ? "healthy" : "unreachable";
          cell.className = "badge " + (upstream.healthy ? "ok" : "bad");
        }
      });
    }
    root.setAttribute("data-updated", figures.at || "");
  }

  function connect() {
    var scheme = window.location.protocol === "https:" ? "wss://" : "ws://";
    var socket = new WebSocket(scheme + window.location.host + "/ws/console/live/");
    socket.onopen = function () { delay = 1000; show("live"); };
    socket.onmessage = function (event) {
      try { render(JSON.parse(event.data)); } catch (err) { show("bad message"); }
    };
    socket.onclose = function (event) {
      if (event.code === 4403) {  // signed out, locked or no longer staff: retrying would not help
        show("stopped: sign in again to see live figures");
        return;
      }
      show("disconnected; retrying");
      window.setTimeout(connect, delay);
      delay = Math.min(delay * 2, 30000);
    };
  }
  connect();
})();
