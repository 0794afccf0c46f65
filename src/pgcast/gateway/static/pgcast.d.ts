// Types of pgcast.js, the browser client of the pgcast gateway.
// Served by the gateway at /pgcast.d.ts beside /pgcast.js.

/** Exponential backoff with full jitter, in milliseconds. */
export interface Backoff {
  /** The ceiling of the first delay (default 500). */
  initial?: number;
  /** The largest ceiling (default 30000). */
  max?: number;
  /** How much the ceiling grows per failed attempt (default 2). */
  multiplier?: number;
}

export declare const DEFAULT_BACKOFF: Readonly<Required<Backoff>>;

/** The delay before reconnect attempt `attempt` (0 for the first): a uniform
 * draw in [0, min(max, initial * multiplier ** attempt)). */
export declare function backoffDelay(
  attempt: number,
  backoff?: Backoff,
  random?: () => number,
): number;

/** A log id of a durable channel, or one per channel. */
export type Since = number | Record<string, number>;

export interface ConnectOptions {
  /** The token, or a function returning it (called before every connection,
   * so a fresh token is used after a reconnect). */
  token?: string | null | (() => string | null | Promise<string | null>);
  /** How the token is sent: "auto" (default) uses the `pgcast.token.<token>`
   * subprotocol when the token is an HTTP token (a JWT is), else an `auth`
   * first frame; "query" puts it in `?token=` (it then shows in URLs). */
  tokenVia?: "auto" | "subprotocol" | "frame" | "query";
  /** Channels to subscribe to at once. */
  channels?: string[];
  /** Where those channels' durable history starts (with `channels`). */
  since?: Since;
  backoff?: Backoff;
  /** Milliseconds between application pings (default 25000; 0: none). */
  pingInterval?: number;
  /** A connection silent this long after a ping is closed and reconnected (default 10000). */
  pingTimeout?: number;
  /** How long a request waits for its reply (default 30000). */
  requestTimeout?: number;
  /** Math.random unless given: the jitter's source. */
  random?: () => number;
  /** The WebSocket class (default globalThis.WebSocket). */
  WebSocket?: typeof WebSocket;
}

export interface SubscribeOptions {
  /** Start the durable channels after this log id (then the client keeps each
   * channel's position by itself). */
  since?: Since;
}

/** A notification. */
export interface Message {
  channel: string;
  /** The NOTIFY payload, as text (JSON.parse it if it is JSON). */
  payload: string;
  /** The backend pid of the sender. */
  pid: number;
  /** The log id, on durable channels only. */
  id?: number;
  /** Only when the payload's bytes were not valid UTF-8 (possible on a
   * database in SQL_ASCII): those bytes, in base64; `payload` then has
   * U+FFFD in place of each byte that is not UTF-8. */
  raw?: string;
}

/** The gateway's reply to a subscribe. */
export interface Subscribed {
  type: "subscribed";
  channels: string[];
  ref?: string | number;
  /** The log's epoch, when a durable channel is among `channels`. */
  epoch?: string;
  /** Whether each resumed durable channel's history was complete. */
  recovered?: Record<string, boolean>;
  /** The oldest log id still held (null: none), for each channel not recovered. */
  oldest?: Record<string, number | null>;
  reason?: Record<string, "pruned" | "epoch">;
}

/** History the page needed is gone: messages after `since` and before
 * `oldest` on `channel` will never arrive. Emitted before the replay (from
 * the `subscribed` reply), or during it (a `gap` notice: a prune raced it). */
export interface Gap {
  channel: string;
  /** The position the client resumed from. */
  since: number | undefined;
  /** The oldest log id the log still holds for the channel (null: none, or unknown). */
  oldest: number | null;
  /** "pruned": retention deleted them; "epoch": the log is another incarnation. */
  reason: "pruned" | "epoch" | "unknown";
  epoch: string | undefined;
}

export interface Reconnected {
  /** Reconnections so far. */
  attempts: number;
  /** Milliseconds without a connection. */
  downtime: number;
  /** The channels subscribed to again. */
  channels: string[];
  /** The gateway's replies to the subscribes sent again. */
  replies: Subscribed[];
}

export interface Disconnected {
  code: number;
  reason: string;
  /** True when the client gives up (1008 refused, 4003 not authenticated). */
  final: boolean;
}

export interface Notice {
  type: "notice";
  event: "reconnected" | "dropped" | "shutdown" | string;
  message: string;
  count?: number;
  [field: string]: unknown;
}

export type State = "connecting" | "open" | "reconnecting" | "closed";

export interface Events {
  message: Message;
  subscribed: Subscribed;
  gap: Gap;
  reconnected: Reconnected;
  disconnected: Disconnected;
  closed: Disconnected;
  retrying: { attempt: number; delay: number };
  open: { url: string };
  state: State;
  notice: Notice;
  /** An error frame, or a problem of the client's own. */
  error: PgcastError;
  /** A message dropped as already delivered (its id is at or below the position). */
  duplicate: { channel: string; id: number };
}

/** An error frame of the gateway, or a request the client gave up on. */
export declare class PgcastError extends Error {
  /** The channels of a refused subscribe (no longer subscribed to). */
  channels?: string[];
  code?: number;
  ref?: string | number;
}

/** Per-channel positions: the last log id delivered. */
export declare class Positions {
  last: Map<string, number>;
  /** Whether a message is new; if so its id becomes the position. */
  admit(channel: string, id: number | undefined): boolean;
  since(channels: string[]): Record<string, number> | null;
  set(channel: string, id: number): void;
  forget(channel: string): void;
}

export declare class Client {
  constructor(url?: string, options?: ConnectOptions);
  /** The WebSocket URL. */
  readonly url: string;
  readonly state: State;
  /** The log's epoch the positions belong to, once a gateway said it. */
  readonly epoch: string | null;
  readonly positions: Positions;
  /** The channels subscribed to (confirmed or about to be). */
  readonly channels: string[];
  on<K extends keyof Events>(type: K, listener: (event: Events[K]) => void): () => void;
  off<K extends keyof Events>(type: K, listener: (event: Events[K]) => void): void;
  subscribe(channels: string | string[], options?: SubscribeOptions): Promise<Subscribed>;
  unsubscribe(
    channels: string | string[],
  ): Promise<{ type: "unsubscribed"; channels: string[] }>;
  publish(channel: string, payload?: unknown): Promise<{ type: "published"; channel: string }>;
  /** Send a fresh token on the open connection (before the old one expires). */
  authenticate(token: string): Promise<{ type: "authenticated"; expires?: number }>;
  close(): void;
}

/** Connect to the gateway's WebSocket (`/ws` relative to the page by default). */
export declare function connect(url?: string, options?: ConnectOptions): Client;
