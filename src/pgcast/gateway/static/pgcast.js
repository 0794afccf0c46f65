// pgcast.js: the browser client of the pgcast gateway (an ES module, no build step).
//
//   import { connect } from "/pgcast.js";
//   const client = connect("/ws", { token: () => fetchToken() });
//   client.on("message", (m) => console.log(m.channel, m.payload, m.id));
//   client.on("gap", (g) => console.warn("history lost on", g.channel, g.reason));
//   await client.subscribe(["orders"]);
//
// It speaks the gateway's WebSocket protocol (pgcast.gateway._protocol). On any
// close it reconnects with exponential backoff and full jitter, subscribes again,
// and resumes durable channels from the last log id it saw on each ("since"),
// dropping what it already delivered (ids at or below that position): every
// durable message once, in order. When history the page needed is gone (pruned,
// or another incarnation of the log: a new "epoch") it emits "gap" before the
// replay, as the gateway said. Types: pgcast.d.ts beside this file.

const SUBPROTOCOL = "pgcast";
const TOKEN_SUBPROTOCOL = "pgcast.token.";
// A subprotocol is an HTTP token (RFC 9110 5.6.2); another token goes in an auth frame.
const HTTP_TOKEN = /^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/;
// Closes that will repeat on every attempt: refused (policy), not authenticated.
const FINAL_CLOSE_CODES = new Set([1008, 4003]);
// A connection lost sooner than this after opening does not reset the backoff,
// so a gateway that accepts and then closes at once is not hammered.
const STABLE_MS = 5000;

export const DEFAULT_BACKOFF = Object.freeze({ initial: 500, max: 30000, multiplier: 2 });

/** The delay before reconnect attempt `attempt` (0 for the first), in ms: "full
 * jitter", a uniform draw in [0, min(max, initial * multiplier^attempt)). */
export function backoffDelay(attempt, backoff = DEFAULT_BACKOFF, random = Math.random) {
  const { initial, max, multiplier } = { ...DEFAULT_BACKOFF, ...backoff };
  const ceiling = Math.min(max, initial * Math.pow(multiplier, Math.max(0, attempt)));
  return Math.floor(random() * ceiling);
}

function checkBackoff(backoff) {
  const b = { ...DEFAULT_BACKOFF, ...(backoff || {}) };
  for (const key of ["initial", "max", "multiplier"]) {
    const v = b[key];
    if (typeof v !== "number" || !Number.isFinite(v) || v <= 0) throw new RangeError(`backoff.${key} must be a positive number, not ${v}`);
  }
  if (b.multiplier < 1) throw new RangeError(`backoff.multiplier must be >= 1, not ${b.multiplier}`);
  if (b.max < b.initial) throw new RangeError(`backoff.max (${b.max}) is below backoff.initial (${b.initial})`);
  return b;
}

function checkChannels(channels, what) {
  if (typeof channels === "string") channels = [channels];
  if (!Array.isArray(channels) || channels.length === 0) throw new TypeError(`${what} needs a non-empty list of channel names`);
  for (const c of channels) {
    if (typeof c !== "string" || c === "") throw new TypeError(`channel names are non-empty strings, not ${JSON.stringify(c)}`);
  }
  return [...new Set(channels)];
}

function checkPosition(id, what) {
  if (!Number.isSafeInteger(id) || id < 0) throw new RangeError(`${what} must be a log id (an integer >= 0), not ${JSON.stringify(id)}`);
  return id;
}

/** Durable channels' positions (the last log id delivered) and the duplicate check. */
export class Positions {
  constructor() { this.last = new Map(); }
  /** Whether a message with `id` on `channel` is new; if so it becomes the position. */
  admit(channel, id) {
    if (typeof id !== "number") return true; // not durable: no position, no duplicates
    const last = this.last.get(channel);
    if (last !== undefined && id <= last) return false;
    this.last.set(channel, id);
    return true;
  }
  /** The `since` of a subscribe for `channels`: {channel: id} for those with a position. */
  since(channels) {
    const known = channels.filter((c) => this.last.has(c));
    return known.length ? Object.fromEntries(known.map((c) => [c, this.last.get(c)])) : null;
  }
  set(channel, id) { this.last.set(channel, id); }
  forget(channel) { this.last.delete(channel); }
}

/** An error the gateway sent back (an error frame), or a request the client gave up on. */
export class PgcastError extends Error {
  constructor(message, details = {}) {
    super(message);
    this.name = "PgcastError";
    Object.assign(this, details);
  }
}

/** Connect to the gateway at `url` (`/ws`, `ws://host:port/ws`, ...). See pgcast.d.ts. */
export function connect(url, options = {}) {
  return new Client(url, options);
}

export class Client {
  constructor(url, options = {}) {
    const base = typeof document !== "undefined" ? document.baseURI : undefined;
    const u = new URL(url || "/ws", base);
    if (u.protocol === "http:") u.protocol = "ws:";
    else if (u.protocol === "https:") u.protocol = "wss:";
    if (u.protocol !== "ws:" && u.protocol !== "wss:") {
      throw new TypeError(`the gateway URL must be ws:, wss:, http: or https:, not ${u.protocol}`);
    }
    this.url = u.toString();
    this.backoff = checkBackoff(options.backoff);
    this.token = options.token ?? null;
    this.tokenVia = options.tokenVia ?? "auto";
    if (!["auto", "subprotocol", "frame", "query"].includes(this.tokenVia)) {
      throw new TypeError(`tokenVia must be "auto", "subprotocol", "frame" or "query", not ${JSON.stringify(this.tokenVia)}`);
    }
    for (const [key, fallback] of [["pingInterval", 25000], ["pingTimeout", 10000], ["requestTimeout", 30000]]) {
      const v = options[key] ?? fallback;
      if (typeof v !== "number" || !(v >= 0)) throw new RangeError(`${key} must be milliseconds (a number >= 0), not ${v}`);
      this[key] = v;
    }
    this.random = options.random ?? Math.random;
    this.WebSocket = options.WebSocket ?? globalThis.WebSocket;
    this.positions = new Positions();
    this.epoch = null; // the log's epoch the positions come from
    this.groups = []; // {channels, pending: [{resolve, reject}]}, in subscribe order
    this.listeners = new Map();
    this.requests = new Map(); // ref -> {kind, resolve, reject, timer, group?, since?}
    this.nextRef = 1;
    this.state = "connecting";
    this.socket = this.timer = this.pingTimer = this.pongTimer = this.disconnectedAt = null;
    this.attempt = this.reconnects = 0;
    this.everOpen = this.closed = false;
    if (options.channels) {
      checkChannels(options.channels, "channels");
      // A refusal by the gateway is an "error" event already; only the rest is reported here.
      this.subscribe(options.channels, { since: options.since })
        .catch((err) => err instanceof PgcastError || this._emit("error", err));
    }
    this._open();
  }

  /** Call `listener` for each event of `type`; returns a function removing it. */
  on(type, listener) {
    if (typeof listener !== "function") throw new TypeError("a listener must be a function");
    (this.listeners.get(type) ?? this.listeners.set(type, new Set()).get(type)).add(listener);
    return () => this.off(type, listener);
  }

  off(type, listener) { this.listeners.get(type)?.delete(listener); }

  _emit(type, detail) {
    const listeners = [...(this.listeners.get(type) || [])];
    if (listeners.length === 0 && (type === "error" || type === "gap")) {
      // Never silent: an unheard error or gap goes to the console.
      console.warn(`pgcast: ${type}`, detail);
    }
    for (const listener of listeners) {
      try { listener(detail); } catch (err) {
        setTimeout(() => { throw err; }); // reported, but stops neither the others nor the client
      }
    }
  }

  /** The channels subscribed to (confirmed or still to be). */
  get channels() { return [...new Set(this.groups.flatMap((g) => g.channels))]; }

  /** Subscribe to `channels`; resolves with the gateway's `subscribed` reply once they
   * are live. `since`: a log id, or {channel: id}, where durable channels start. */
  subscribe(channels, options = {}) {
    if (this.closed) return Promise.reject(new PgcastError("the client is closed"));
    let list;
    const start = new Map();
    try {
      list = checkChannels(channels, "subscribe");
      const since = options.since;
      if (typeof since === "number") {
        for (const c of list) start.set(c, checkPosition(since, "since"));
      } else if (since !== undefined && since !== null && typeof since === "object") {
        for (const [c, id] of Object.entries(since)) {
          if (!list.includes(c)) throw new RangeError(`since names ${JSON.stringify(c)}, which is not being subscribed to`);
          start.set(c, checkPosition(id, `since[${JSON.stringify(c)}]`));
        }
      } else if (since !== undefined && since !== null) {
        throw new TypeError(`since must be a log id or {channel: id}, not ${JSON.stringify(since)}`);
      }
    } catch (err) {
      return Promise.reject(err);
    }
    // A channel already subscribed to keeps its subscription and position.
    const fresh = list.filter((c) => !this._has(c));
    for (const c of fresh) if (start.has(c)) this.positions.set(c, start.get(c));
    if (fresh.length === 0) return Promise.resolve({ type: "subscribed", channels: list });
    return new Promise((resolve, reject) => {
      const group = { channels: fresh, pending: [{ resolve, reject }] };
      this.groups.push(group);
      if (this.state === "open") this._sendSubscribe(group);
    });
  }

  _has(channel) { return this.groups.some((g) => g.channels.includes(channel)); }

  /** Stop receiving `channels`; their positions are forgotten. */
  unsubscribe(channels) {
    let list;
    try { list = checkChannels(channels, "unsubscribe"); } catch (err) { return Promise.reject(err); }
    const gone = new Set(list);
    for (const g of this.groups) {
      g.channels = g.channels.filter((c) => !gone.has(c));
      if (g.channels.length === 0) this._settle(g, new PgcastError("unsubscribed before the gateway confirmed the subscribe"));
    }
    this.groups = this.groups.filter((g) => g.channels.length > 0);
    for (const c of list) this.positions.forget(c);
    if (this.state !== "open") return Promise.resolve({ type: "unsubscribed", channels: list });
    return this._request({ type: "unsubscribe", channels: list }, "unsubscribe");
  }

  /** Publish `payload` (text, or any JSON value) on `channel`; resolves once the
   * gateway sent the NOTIFY. Rejects at once while disconnected (nothing is queued). */
  publish(channel, payload) {
    if (this.state !== "open") return Promise.reject(new PgcastError(`not connected (${this.state}): the message was not sent`));
    return this._request({ type: "publish", channel, payload: payload === undefined ? "" : payload }, "publish");
  }

  /** Send a fresh token (before the old one expires); resolves on `authenticated`. */
  authenticate(token) {
    if (typeof token !== "string" || token === "") return Promise.reject(new TypeError("authenticate() needs the token, a non-empty string"));
    return this._request({ type: "auth", token }, "auth");
  }

  /** Close for good: no reconnect; pending requests are rejected. */
  close() {
    if (this.closed) return;
    this.closed = true;
    this._setState("closed");
    clearTimeout(this.timer);
    this._stopPings();
    const socket = this.socket;
    this.socket = null;
    if (socket) { socket.onopen = socket.onmessage = socket.onclose = socket.onerror = null; socket.close(1000, "closed by the page"); }
    this._failRequests("the client was closed");
    for (const g of this.groups) this._settle(g, new PgcastError("the client was closed"));
    this.groups = [];
    this._emit("closed", { code: 1000, reason: "closed by the page", final: true });
  }

  // -- the connection --------------------------------------------------------

  _setState(state) {
    if (this.state !== state) this._emit("state", (this.state = state));
  }

  async _token() {
    const t = this.token;
    if (t === null || t === undefined) return null;
    const value = typeof t === "function" ? await t() : t;
    if (value !== null && value !== undefined && (typeof value !== "string" || value === "")) {
      throw new TypeError("token must be a non-empty string (or a function returning one)");
    }
    return value ?? null;
  }

  async _open() {
    this._setState(this.everOpen ? "reconnecting" : "connecting");
    let token;
    try { token = await this._token(); } catch (err) {
      this._emit("error", new PgcastError(`getting the token failed: ${err && err.message}`, { cause: err }));
      this._retry();
      return;
    }
    if (this.closed) return;
    let url = this.url;
    const protocols = [SUBPROTOCOL];
    let authFrame = null;
    if (token !== null) {
      let via = this.tokenVia;
      if (via === "auto") via = HTTP_TOKEN.test(token) ? "subprotocol" : "frame";
      if (via === "subprotocol") protocols.push(TOKEN_SUBPROTOCOL + token);
      else if (via === "frame") authFrame = token;
      else { const u = new URL(url); u.searchParams.set("token", token); url = u.href; }
    }
    let socket;
    try { socket = new this.WebSocket(url, protocols); } catch (err) {
      this._emit("error", new PgcastError(`cannot open ${this.url}: ${err && err.message}`, { cause: err }));
      this._retry();
      return;
    }
    this.socket = socket;
    socket.onopen = () => {
      if (authFrame !== null) socket.send(JSON.stringify({ type: "auth", token: authFrame }));
      this._opened();
    };
    socket.onmessage = (ev) => {
      if (socket === this.socket) this._frame(ev.data); // not from a socket given up on
    };
    socket.onclose = (ev) => this._lost(socket, ev.code, ev.reason);
    socket.onerror = () => { /* a close follows, with its code */ };
  }

  _opened() {
    const again = this.everOpen;
    this.everOpen = true;
    this.openedAt = Date.now();
    this._setState("open");
    this._startPings();
    const socket = this.socket;
    const sends = this.groups.map((g) => this._sendSubscribe(g));
    if (!again) {
      this._emit("open", { url: this.url });
      return;
    }
    this.reconnects += 1;
    const downtime = this.disconnectedAt === null ? 0 : Date.now() - this.disconnectedAt;
    Promise.allSettled(sends).then((results) => {
      if (this.closed || this.socket !== socket) return; // lost again meanwhile
      this._emit("reconnected", {
        attempts: this.reconnects,
        downtime,
        channels: this.channels,
        replies: results.filter((r) => r.status === "fulfilled").map((r) => r.value),
      });
    });
  }

  _lost(socket, code, reason) {
    if (socket !== this.socket) return;
    this.socket = null;
    this._stopPings();
    this._failRequests(`the connection closed (${code}${reason ? ": " + reason : ""}) before the gateway answered`);
    if (this.closed) return;
    if (this.state === "open") {
      this.disconnectedAt = Date.now();
      if (this.disconnectedAt - this.openedAt >= STABLE_MS) this.attempt = 0;
    }
    const final = FINAL_CLOSE_CODES.has(code);
    this._emit("disconnected", { code, reason, final });
    if (final) {
      this.closed = true;
      this._setState("closed");
      for (const g of this.groups) this._settle(g, new PgcastError(`the gateway refused the client (${code}: ${reason})`, { code }));
      this.groups = [];
      this._emit("closed", { code, reason, final: true });
      return;
    }
    this._retry();
  }

  _retry() {
    if (this.closed) return;
    this._setState("reconnecting");
    const delay = backoffDelay(this.attempt, this.backoff, this.random);
    this.attempt += 1;
    this._emit("retrying", { attempt: this.attempt, delay });
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this._open(), delay);
  }

  _startPings() {
    this._stopPings();
    if (!(this.pingInterval > 0)) return;
    this.pingTimer = setInterval(() => {
      if (this.state !== "open" || this.pongTimer !== null) return;
      const socket = this.socket;
      this.pongTimer = setTimeout(() => {
        // No frame at all within pingTimeout: the connection is dead.
        this.pongTimer = null;
        if (socket === this.socket && socket) {
          try { socket.close(4408, "no pong"); } catch { /* closing */ }
          this._lost(socket, 4408, "no answer to a ping");
        }
      }, this.pingTimeout);
      this._send({ type: "ping" });
    }, this.pingInterval);
  }

  _stopPings() {
    clearInterval(this.pingTimer); clearTimeout(this.pongTimer);
    this.pingTimer = this.pongTimer = null;
  }

  _send(frame) {
    if (!this.socket || this.state !== "open") return false;
    this.socket.send(JSON.stringify(frame));
    return true;
  }

  _request(frame, kind, extra = {}) {
    const ref = this.nextRef++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.requests.delete(ref);
        const err = new PgcastError(`no answer to ${kind} within ${this.requestTimeout} ms`);
        // The group stays, sent again after a reconnect; its callers hear now.
        if (extra.group) this._settle(extra.group, err);
        reject(err);
      }, this.requestTimeout);
      this.requests.set(ref, { kind, resolve, reject, timer, ...extra });
      if (!this._send({ ...frame, ref })) {
        clearTimeout(timer);
        this.requests.delete(ref);
        reject(new PgcastError(`not connected (${this.state}): ${kind} was not sent`));
      }
    });
  }

  _failRequests(message) {
    // A subscribe's group stays: it is sent again on the next connection, and
    // the promise subscribe() returned waits for that.
    for (const [ref, req] of this.requests) {
      clearTimeout(req.timer);
      this.requests.delete(ref);
      req.reject(new PgcastError(message));
    }
  }

  _settle(group, error, reply) {
    for (const p of group.pending.splice(0)) error ? p.reject(error) : p.resolve(reply);
  }

  _sendSubscribe(group) {
    const frame = { type: "subscribe", channels: group.channels };
    const since = this.positions.since(group.channels);
    if (since !== null) {
      frame.since = since;
      if (this.epoch !== null) frame.epoch = this.epoch;
    }
    return this._request(frame, "subscribe", { group, since });
  }

  // -- frames from the gateway -------------------------------------------------

  _frame(data) {
    clearTimeout(this.pongTimer); // any frame shows the connection is alive
    this.pongTimer = null;
    let f;
    try { f = JSON.parse(data); } catch {
      this._emit("error", new PgcastError(`the gateway sent a frame that is not JSON: ${String(data).slice(0, 80)}`));
      return;
    }
    const req = f.ref !== undefined ? this.requests.get(f.ref) : undefined;
    if (req) { this.requests.delete(f.ref); clearTimeout(req.timer); }
    switch (f.type) {
      case "message":
        // One sent before the gateway saw an unsubscribe: not wanted any more.
        if (!this._has(f.channel)) break;
        if (!this.positions.admit(f.channel, f.id)) this._emit("duplicate", { channel: f.channel, id: f.id });
        else this._emit("message", { channel: f.channel, payload: f.payload, pid: f.pid, ...(f.id !== undefined && { id: f.id }) });
        break;
      case "subscribed":
        this._subscribed(f, req);
        break;
      case "error": {
        const err = new PgcastError(f.message, { ref: f.ref });
        if (req) {
          if (req.kind === "subscribe") {
            // All or nothing: the gateway did not subscribe the group.
            this.groups = this.groups.filter((g) => g !== req.group);
            err.channels = req.group.channels;
            this._settle(req.group, err);
          } else {
            req.reject(err);
          }
        }
        this._emit("error", err);
        break;
      }
      case "notice":
        // A gap found during a replay (a prune racing it) comes as a notice.
        if (f.event === "gap" && this._has(f.channel)) this._gap(f.channel, f.since, f.oldest, f.reason, f.epoch);
        this._emit("notice", f);
        break;
      default: // unsubscribed, published, pong, authenticated (and a newer gateway's frames)
        if (req) req.resolve(f);
    }
  }

  _gap(channel, since, oldest, reason, epoch) {
    // After a new epoch the replay's ids start over: forget the old position.
    if (reason === "epoch") this.positions.forget(channel);
    this._emit("gap", { channel, since, oldest: oldest ?? null, reason: reason || "unknown", epoch });
  }

  _subscribed(f, req) {
    if (f.epoch !== undefined) {
      if (this.epoch !== null && f.epoch !== this.epoch) {
        // Another incarnation of the log: its ids are not comparable to ours.
        for (const c of f.channels) {
          if (!(f.recovered && c in f.recovered)) this.positions.forget(c);
        }
      }
      this.epoch = f.epoch;
    }
    for (const [channel, ok] of Object.entries(f.recovered || {})) {
      if (!ok) this._gap(channel, req?.since?.[channel], f.oldest?.[channel], f.reason?.[channel], f.epoch);
    }
    this._emit("subscribed", f);
    if (req) {
      req.resolve(f);
      if (req.group) this._settle(req.group, null, f);
    }
  }
}
