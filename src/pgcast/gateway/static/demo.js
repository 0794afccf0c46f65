// The pgcast demo page: three bars driven by NOTIFY on channel "data".
// An ES module, no build step, on the gateway's browser client (pgcast.js):
// subscribe, then messages; the buttons publish. The client reconnects and
// subscribes again by itself.
import { connect } from "../pgcast.js";

const CHANNEL = "data";
const STEP = 10; // percent a bar grows per notification naming it

const statusEl = document.getElementById("status");
const logEl = document.getElementById("log");

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

const client = connect(new URL("ws", document.baseURI).href, { channels: [CHANNEL] });
client.on("subscribed", (reply) => setStatus("open", "listening on " + reply.channels.join(", ")));
client.on("message", (m) => {
  log(`${m.channel}: ${JSON.stringify(m.payload)} (pid ${m.pid})`);
  apply(m.payload);
});
client.on("notice", (notice) => log("notice: " + notice.message));
client.on("error", (err) => log("error: " + err.message));
client.on("gap", (gap) => log(`gap on ${gap.channel}: history ${gap.reason} (oldest ${gap.oldest})`));
client.on("disconnected", (ev) => setStatus(
  "closed", `disconnected (${ev.code}${ev.reason ? ": " + ev.reason : ""})${ev.final ? "" : "; retrying"}`));
client.on("retrying", () => setStatus("connecting", "reconnecting…"));

for (const button of document.querySelectorAll("button[data-colour]")) {
  button.addEventListener("click", () => {
    client.publish(CHANNEL, button.dataset.colour).catch((err) => log("not sent: " + err.message));
  });
}
