// The pgcast demo page: three bars driven by NOTIFY on channel "data".
// Plain JavaScript, no build step. Speaks the gateway's WebSocket protocol:
// subscribe, then message frames; the buttons send publish frames.
"use strict";

const CHANNEL = "data";
const STEP = 10; // percent a bar grows per notification naming it

const statusEl = document.getElementById("status");
const logEl = document.getElementById("log");
let socket = null;
let retryMs = 500;

function setStatus(state, text) {
  statusEl.dataset.state = state;
  statusEl.textContent = text;
}

function log(text) {
  const item = document.createElement("li");
  item.textContent = text;
  logEl.prepend(item);
  while (logEl.children.length > 10) logEl.lastChild.remove();
}

// "green" grows the green bar by STEP (wrapping past 100); "green 70" or
// "green=70" sets it to 70%.
function apply(payload) {
  const match = /^\s*(red|green|blue)(?:\s*[ =:]\s*(\d{1,3}))?\s*$/i.exec(payload);
  if (!match) return false;
  const bar = document.getElementById("bar-" + match[1].toLowerCase());
  let value = Number(bar.dataset.value);
  if (match[2] !== undefined) {
    value = Math.min(100, Number(match[2]));
  } else {
    value = value >= 100 ? STEP : value + STEP;
  }
  bar.dataset.value = String(value);
  bar.dataset.count = String(Number(bar.dataset.count) + 1);
  bar.style.width = value + "%";
  return true;
}

function connect() {
  const url = new URL("ws", document.baseURI);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  setStatus("connecting", "connecting…");
  socket = new WebSocket(url);
  socket.onopen = () => {
    retryMs = 500;
    socket.send(JSON.stringify({ type: "subscribe", channels: [CHANNEL] }));
  };
  socket.onmessage = (ev) => {
    const frame = JSON.parse(ev.data);
    switch (frame.type) {
      case "subscribed":
        setStatus("open", "listening on " + frame.channels.join(", "));
        break;
      case "message":
        log(`${frame.channel}: ${JSON.stringify(frame.payload)} (pid ${frame.pid})`);
        apply(frame.payload);
        break;
      case "notice":
        log("notice: " + frame.message);
        break;
      case "error":
        log("error: " + frame.message);
        break;
    }
  };
  socket.onclose = (ev) => {
    setStatus("closed", `disconnected (${ev.code}${ev.reason ? ": " + ev.reason : ""}); retrying`);
    setTimeout(connect, retryMs);
    retryMs = Math.min(retryMs * 2, 10000);
  };
}

for (const button of document.querySelectorAll("button[data-colour]")) {
  button.addEventListener("click", () => {
    if (socket && socket.readyState === WebSocket.OPEN) {
      socket.send(JSON.stringify({ type: "publish", channel: CHANNEL, payload: button.dataset.colour }));
    }
  });
}

connect();
