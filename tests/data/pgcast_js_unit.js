// Unit checks of pgcast.js, run inside Chromium by tests/test_gateway_browser_client.py
// (page.evaluate of this function). No server: a scripted WebSocket stands in for
// the transport, so the client's handling of each gateway frame is checked alone;
// the end-to-end tests of the same file run it against real gateways.
// Returns {check name: "ok" or why it failed}.
async () => {
  const m = await import("/pgcast.js");

  class FakeSocket {
    constructor(url, protocols) {
      this.url = url;
      this.protocols = protocols;
      this.sent = [];
      FakeSocket.all.push(this);
    }
    send(text) { this.sent.push(JSON.parse(text)); }
    close(code, reason) { this.closedWith = [code, reason]; }
    open() { this.onopen({}); }
    recv(frame) { this.onmessage({ data: JSON.stringify(frame) }); }
    drop(code = 1006, reason = "") { this.onclose({ code, reason }); }
  }
  FakeSocket.all = [];

  function check(cond, what) {
    if (!cond) throw new Error(what);
  }
  function same(a, b, what) {
    const x = JSON.stringify(a), y = JSON.stringify(b);
    if (x !== y) throw new Error(`${what}: got ${x}, expected ${y}`);
  }
  const tick = () => new Promise((r) => setTimeout(r, 5));
  async function until(cond, what) {
    for (let i = 0; i < 400; i++) { // bounded: 2 s
      if (cond()) return;
      await tick();
    }
    throw new Error(`timed out waiting for ${what}`);
  }
  async function socketNumber(n) {
    await until(() => FakeSocket.all.length >= n, `socket #${n}`);
    return FakeSocket.all[n - 1];
  }
  function client(options = {}) {
    FakeSocket.all = [];
    const c = m.connect("ws://127.0.0.1:9/ws", {
      WebSocket: FakeSocket, backoff: { initial: 1, max: 1 }, pingInterval: 0, ...options,
    });
    const seen = [];
    for (const type of ["message", "gap", "reconnected", "duplicate", "error", "closed", "disconnected"]) {
      c.on(type, (ev) => seen.push([type, ev]));
    }
    return { c, seen };
  }
  const messages = (seen) => seen.filter(([t]) => t === "message").map(([, ev]) => [ev.channel, ev.id]);

  const checks = {
    backoff_full_jitter() {
      same(m.backoffDelay(0, undefined, () => 0), 0, "a draw of 0");
      same(m.backoffDelay(0, undefined, () => 0.999999), 499, "first ceiling 500");
      same(m.backoffDelay(3, undefined, () => 0.999999), 3999, "ceiling doubles");
      same(m.backoffDelay(30, undefined, () => 0.999999), 29999, "capped at max");
      same(m.backoffDelay(2, { initial: 100, max: 250, multiplier: 3 }, () => 0.5), 125, "custom");
      const draws = new Set();
      for (let i = 0; i < 50; i++) draws.add(m.backoffDelay(4));
      check(draws.size > 10, "Math.random jitter spreads the delays");
      for (const d of draws) check(d >= 0 && d < 8000, `delay ${d} outside [0, 8000)`);
    },
    backoff_refuses_bad_options() {
      for (const [backoff, words] of [
        [{ initial: -1 }, "backoff.initial"], [{ multiplier: 0.5 }, "backoff.multiplier"],
        [{ max: 10, initial: 100 }, "backoff.max"], [{ max: NaN }, "backoff.max"],
      ]) {
        let err = null;
        try { m.connect("ws://127.0.0.1:9/ws", { WebSocket: FakeSocket, backoff }); } catch (e) { err = e; }
        check(err instanceof RangeError && err.message.includes(words), `${JSON.stringify(backoff)}: ${err}`);
      }
    },
    positions_drop_duplicates() {
      const p = new m.Positions();
      same([p.admit("a", 5), p.admit("a", 5), p.admit("a", 4), p.admit("a", 6)],
        [true, false, false, true], "per-channel order");
      same(p.admit("b", 1), true, "channels are independent");
      same([p.admit("c", undefined), p.admit("c", undefined)], [true, true], "no id: not durable");
      same(p.since(["a", "b", "c"]), { a: 6, b: 1 }, "since");
      same(p.since(["c"]), null, "no position");
    },
    async resumes_from_positions_and_reports_gaps() {
      const { c, seen } = client();
      const done = c.subscribe(["a", "b"]);
      const s1 = await socketNumber(1);
      same(s1.protocols, ["pgcast"], "no token: the pgcast subprotocol only");
      s1.open();
      const sub1 = s1.sent[0];
      same([sub1.type, sub1.channels, sub1.since], ["subscribe", ["a", "b"], undefined], "first subscribe");
      s1.recv({ type: "subscribed", channels: ["a", "b"], epoch: "E1", ref: sub1.ref });
      same((await done).epoch, "E1", "subscribe() resolves with the reply");
      for (const [ch, id] of [["a", 5], ["a", 6], ["b", 3], ["a", 6]]) {
        s1.recv({ type: "message", channel: ch, payload: "p", pid: 1, id });
      }
      same(messages(seen), [["a", 5], ["a", 6], ["b", 3]], "duplicate dropped");
      s1.drop();
      const s2 = await socketNumber(2);
      s2.open();
      const sub2 = s2.sent[0];
      same([sub2.channels, sub2.since, sub2.epoch], [["a", "b"], { a: 6, b: 3 }, "E1"], "resume frame");
      s2.recv({ type: "subscribed", channels: ["a", "b"], epoch: "E1", ref: sub2.ref,
                recovered: { a: true, b: false }, oldest: { b: 10 }, reason: { b: "pruned" } });
      s2.recv({ type: "message", channel: "a", payload: "p", pid: 1, id: 6 }); // replayed again
      s2.recv({ type: "message", channel: "b", payload: "p", pid: 1, id: 10 });
      await until(() => seen.some(([t]) => t === "reconnected"), "reconnected");
      const gaps = seen.filter(([t]) => t === "gap").map(([, g]) => g);
      same(gaps, [{ channel: "b", since: 3, oldest: 10, reason: "pruned", epoch: "E1" }], "gap");
      same(messages(seen).slice(3), [["b", 10]], "after the gap");
      const order = seen.map(([t]) => t).filter((t) => t === "gap" || t === "message");
      same(order.slice(3), ["gap", "message"], "the gap comes before the replay");
      c.close();
    },
    async a_new_epoch_resets_positions() {
      const { c, seen } = client();
      c.subscribe(["a"], { since: 40 });
      const s1 = await socketNumber(1);
      s1.open();
      same(s1.sent[0].since, { a: 40 }, "since given by the page");
      same(s1.sent[0].epoch, undefined, "no epoch known yet");
      s1.recv({ type: "subscribed", channels: ["a"], epoch: "E1", ref: s1.sent[0].ref,
                recovered: { a: true } });
      s1.recv({ type: "message", channel: "a", payload: "p", pid: 1, id: 41 });
      s1.drop();
      const s2 = await socketNumber(2);
      s2.open();
      same([s2.sent[0].since, s2.sent[0].epoch], [{ a: 41 }, "E1"], "resume frame");
      s2.recv({ type: "subscribed", channels: ["a"], epoch: "E2", ref: s2.sent[0].ref,
                recovered: { a: false }, oldest: { a: 1 }, reason: { a: "epoch" } });
      s2.recv({ type: "message", channel: "a", payload: "p", pid: 1, id: 1 });
      same(messages(seen), [["a", 41], ["a", 1]], "ids of the new log are not duplicates");
      same(c.epoch, "E2", "the new epoch is kept");
      same(seen.filter(([t]) => t === "gap")[0][1].reason, "epoch", "gap reason");
      c.close();
    },
    async a_gap_notice_during_the_replay_is_a_gap() {
      const { c, seen } = client();
      c.subscribe(["a"], { since: 7 });
      const s1 = await socketNumber(1);
      s1.open();
      s1.recv({ type: "subscribed", channels: ["a"], epoch: "E1", ref: s1.sent[0].ref, recovered: { a: true } });
      s1.recv({ type: "notice", event: "gap", channel: "a", since: 9, oldest: null, reason: "pruned",
                epoch: "E1", message: "messages of 'a' after 9 are no longer in the log" });
      s1.recv({ type: "notice", event: "gap", channel: "other", since: 1, oldest: 5, reason: "pruned" });
      const gaps = seen.filter(([t]) => t === "gap").map(([, g]) => g);
      same(gaps, [{ channel: "a", since: 9, oldest: null, reason: "pruned", epoch: "E1" }], "gap");
      c.close();
    },
    async backoff_grows_and_a_short_connection_does_not_reset_it() {
      const { c } = client({ backoff: { initial: 1, max: 8, multiplier: 2 }, random: () => 0.999 });
      const delays = [];
      c.on("retrying", (r) => delays.push(r.delay));
      (await socketNumber(1)).drop(); // refused before opening
      (await socketNumber(2)).drop();
      const s3 = await socketNumber(3);
      s3.open();
      s3.drop(); // accepted, then closed at once
      (await socketNumber(4)).drop();
      (await socketNumber(5)).drop();
      await socketNumber(6);
      same(delays, [0, 1, 3, 7, 7], "full-jitter ceilings 1, 2, 4, 8, 8 (max)");
      c.close();
    },
    async tokens_by_subprotocol_frame_or_query() {
      let { c } = client({ token: "abc.DEF-ghi_1" });
      let s = await socketNumber(1);
      same(s.protocols, ["pgcast", "pgcast.token.abc.DEF-ghi_1"], "an HTTP token: subprotocol");
      c.close();
      ({ c } = client({ token: async () => "has space/and=" }));
      s = await socketNumber(1);
      same(s.protocols, ["pgcast"], "not an HTTP token: no subprotocol");
      s.open();
      same(s.sent[0], { type: "auth", token: "has space/and=" }, "auth first frame");
      c.close();
      ({ c } = client({ token: "t", tokenVia: "query" }));
      s = await socketNumber(1);
      same(new URL(s.url).searchParams.get("token"), "t", "query token");
      c.close();
    },
    async a_refused_subscribe_rejects_and_is_not_resent() {
      const { c, seen } = client();
      const p = c.subscribe(["x", "y"]);
      const s1 = await socketNumber(1);
      s1.open();
      s1.recv({ type: "error", message: "not allowed to subscribe to 'y'", ref: s1.sent[0].ref });
      let err = null;
      try { await p; } catch (e) { err = e; }
      check(err && err.message.includes("not allowed") && err.channels.includes("y"), `rejection: ${err}`);
      same(c.channels, [], "nothing subscribed");
      check(seen.some(([t]) => t === "error"), "an error event");
      s1.drop();
      const s2 = await socketNumber(2);
      s2.open();
      same(s2.sent, [], "nothing sent again");
      c.close();
    },
    async publish_while_disconnected_rejects_at_once() {
      const { c } = client();
      let err = null;
      try { await c.publish("a", "x"); } catch (e) { err = e; }
      check(err && err.message.includes("not connected"), `publish: ${err}`);
      const s1 = await socketNumber(1);
      s1.open();
      const sent = c.publish("a", { n: 1 });
      same(s1.sent[0].payload, { n: 1 }, "a JSON payload");
      s1.recv({ type: "published", channel: "a", ref: s1.sent[0].ref });
      same((await sent).type, "published", "resolved on published");
      c.close();
    },
    async final_close_codes_stop_reconnecting() {
      const { c, seen } = client({ token: "bad" });
      const s1 = await socketNumber(1);
      s1.open();
      s1.drop(4003, "authenticate first");
      same(c.state, "closed", "state");
      same(seen.filter(([t]) => t === "closed").length, 1, "closed event");
      for (let i = 0; i < 5; i++) await tick();
      same(FakeSocket.all.length, 1, "no second connection");
    },
    async unsubscribe_forgets_the_position() {
      const { c } = client();
      c.subscribe(["a"]);
      const s1 = await socketNumber(1);
      s1.open();
      s1.recv({ type: "subscribed", channels: ["a"], ref: s1.sent[0].ref });
      s1.recv({ type: "message", channel: "a", payload: "p", pid: 1, id: 9 });
      c.unsubscribe(["a"]);
      same(s1.sent[1].type, "unsubscribe", "unsubscribe frame");
      same(c.positions.since(["a"]), null, "position forgotten");
      c.subscribe(["a"]);
      same(s1.sent[2].since, undefined, "a new subscribe starts live");
      c.close();
    },
  };

  const results = {};
  for (const [name, fn] of Object.entries(checks)) {
    try {
      await fn();
      results[name] = "ok";
    } catch (err) {
      results[name] = String(err && err.stack || err);
    }
  }
  return results;
}
