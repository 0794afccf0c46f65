// Type-checked against pgcast.d.ts by tests/test_gateway_browser_client.py
// (tsc --strict): the client used as the README shows, and misuses that must
// be refused (each @ts-expect-error fails the check if no error comes).
import { backoffDelay, Client, connect, PgcastError, Positions } from "./pgcast.js";
import type { Gap, Message, Subscribed } from "./pgcast.js";

async function main(): Promise<void> {
  const client: Client = connect("/ws", {
    token: async () => "t",
    backoff: { initial: 100, max: 1000 },
    channels: ["orders"],
    since: { orders: 41 },
  });
  const off = client.on("message", (m: Message) => {
    const text: string = m.payload;
    const id: number | undefined = m.id;
    console.log(m.channel, text, id, m.pid);
  });
  off();
  client.on("gap", (g: Gap) => {
    const why: "pruned" | "epoch" | "unknown" = g.reason;
    const oldest: number | null = g.oldest;
    console.warn(g.channel, g.since, oldest, why);
  });
  client.on("reconnected", (r) => console.log(r.downtime, r.channels, r.replies.length));
  client.on("error", (e) => { if (e instanceof PgcastError) console.log(e.channels); });
  client.on("state", (s) => { if (s === "open") console.log(client.epoch); });
  const reply: Subscribed = await client.subscribe(["a", "b"], { since: 3 });
  console.log(reply.recovered?.a, reply.oldest?.b, reply.reason?.b);
  await client.publish("chat", { text: "hi" });
  await client.unsubscribe("a");
  await client.authenticate("fresh");
  const delay: number = backoffDelay(3, { initial: 10 });
  const p = new Positions();
  console.log(delay, p.admit("a", 1), p.since(["a"]), client.channels, client.url);
  client.close();

  // @ts-expect-error: an unknown event
  client.on("mesage", () => {});
  // @ts-expect-error: a message is not a number
  client.on("message", (m: number) => console.log(m));
  // @ts-expect-error: channels are strings
  await client.subscribe([1]);
  // @ts-expect-error: no such token transport
  connect("/ws", { tokenVia: "header" });
  // @ts-expect-error: since is a log id or a map of them
  await client.subscribe(["a"], { since: "3" });
}

void main();
