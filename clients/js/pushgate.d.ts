// Types for pushgate.js, the pushgate browser client (served at /client.js).

/** An event as every pushgate transport delivers it (contract section 1). */
export interface PushgateEvent<T = unknown> {
  /** The cursor: opaque, strictly increasing in log order. */
  id: string
  channel: string
  type: string
  source: string
  source_id: string | null
  /** RFC 3339 with milliseconds. */
  time: string
  data: T
}

export type State = 'connecting' | 'open' | 'reconnecting' | 'offline' | 'closed'

export interface ResetInfo {
  /** e.g. `cursor_expired`: the cursor could not be honoured. */
  reason: string
  /** Where the subscription continues: the oldest retained event. */
  resume_from: string | null
}

export interface BackoffOptions {
  /** First ceiling in ms (default 500); doubles per failed attempt. */
  base?: number
  /** Largest ceiling in ms (default 30000). Delays are uniform in [0, ceiling). */
  cap?: number
}

export interface PushgateOptions {
  /** Subscriber JWT (sent as `?token=`), or a publish key for backends. */
  token?: string
  /** Called for a new token when the server says the current one failed or expired (HTTP 401, close 4001). */
  getToken?: () => string | null | undefined | Promise<string | null | undefined>
  /** `auto` (default): subscriptions over SSE, falling back to long-polling; publishes over WebSocket.
   *  `ws`: subscriptions share the client's WebSocket too. `sse`, `poll`: force that transport. */
  transport?: 'auto' | 'sse' | 'ws' | 'poll'
  backoff?: BackoffOptions
  /** ms without a first byte on an SSE stream before falling back to long-polling (default 4000). */
  fallbackAfter?: number
  /** ms of silence (no byte, no ping) after which a connection is considered dead (default 45000). */
  idleTimeout?: number
  /** Seconds a long-poll is held open by the server (default 25). */
  pollWait?: number
  /** Default reset handler for subscriptions. */
  onReset?: (info: ResetInfo, sub: Subscription) => void
  /** Errors that are not an event: refused subscriptions, handler exceptions. Default: console.warn. */
  onError?: (error: Error & { code?: string; status?: number }) => void
  /** Test seam: replacements for fetch, WebSocket, timers, Math.random and the window. */
  env?: Record<string, unknown>
}

export interface SubscribeOptions {
  /** Resume after this cursor (`earliest` for all retained history). Default: from now on. */
  since?: string
  onReset?: (info: ResetInfo, sub: Subscription) => void
}

export declare class Subscription {
  readonly channels: string[]
  /** The last cursor seen; what a reconnect resumes from. */
  readonly cursor: string | null
  readonly state: State
  /** `sse`, `poll` or `ws`: `sse` becomes `poll` by itself behind a buffering proxy. */
  readonly transport: 'sse' | 'poll' | 'ws' | null
  close(): void
}

export declare class Pushgate {
  constructor(url?: string, options?: PushgateOptions)
  readonly state: State
  token?: string
  subscribe<T = unknown>(
    channels: string | string[],
    onEvent: (event: PushgateEvent<T>) => void,
    options?: SubscribeOptions,
  ): Subscription
  /** Resolves once the event is durable in the log. */
  publish(
    channel: string,
    type: string,
    data?: unknown,
    options?: { id?: string },
  ): Promise<{ id: string; duplicate: boolean }>
  onState(listener: (state: State) => void): () => void
  close(): void
}

/** Full jitter: a uniform delay in [0, min(cap, base * 2^attempt)). */
export declare function backoffDelay(attempt: number, options?: BackoffOptions, random?: () => number): number

export declare class SseParser {
  constructor(onEvent: (message: { id?: string; event: string; data: string }) => void)
  push(text: string): void
}

export default Pushgate
