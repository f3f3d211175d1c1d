// pushgate browser client: one ES module, no build step. Served by pushgate
// at /client.js. Types: pushgate.d.ts.
//
//   const pg = new Pushgate('https://push.example.com', { token, getToken })
//   const sub = pg.subscribe(['user:42'], (event) => …)
//   await pg.publish('chat:room1', 'message', { text: 'hi' })
//
// Subscriptions stream over Server-Sent Events by default (read with fetch,
// so the client can see whether bytes arrive at all); when a proxy buffers
// the stream (no first bytes within `fallbackAfter`) they switch to
// long-polling by themselves. Publishing uses one WebSocket per client, and
// `transport: 'ws'` puts subscriptions on it too. Every transport resumes
// from the subscription's last cursor, reconnects with capped exponential
// backoff and full jitter, and honours the server's close codes.

export const STATES = ['connecting', 'open', 'reconnecting', 'offline', 'closed']

/** Full jitter: a uniform delay in [0, min(cap, base * 2^attempt)). */
export function backoffDelay (attempt, { base = 500, cap = 30000 } = {}, random = Math.random) {
  const ceiling = Math.min(cap, base * Math.pow(2, Math.min(attempt, 30)))
  return Math.floor(random() * ceiling)
}

/** Incremental text/event-stream parser (the WHATWG rules we need). */
export class SseParser {
  constructor (onEvent) {
    this.onEvent = onEvent
    this.buf = ''
    this.reset()
  }

  reset () { this.id = undefined; this.event = ''; this.data = []; this.seen = false }

  push (text) {
    this.buf += text
    let at
    while ((at = this.buf.search(/\r\n|\r|\n/)) >= 0) {
      const line = this.buf.slice(0, at)
      const len = this.buf[at] === '\r' && this.buf[at + 1] === '\n' ? 2 : 1
      // A lone \r at the end of a chunk may be half of \r\n: wait for more.
      if (this.buf[at] === '\r' && at + 1 === this.buf.length) break
      this.buf = this.buf.slice(at + len)
      this.line(line)
    }
  }

  line (line) {
    if (line === '') {
      if (this.seen) this.onEvent({ id: this.id, event: this.event || 'message', data: this.data.join('\n') })
      this.reset()
      return
    }
    if (line[0] === ':') return
    const colon = line.indexOf(':')
    const field = colon < 0 ? line : line.slice(0, colon)
    let value = colon < 0 ? '' : line.slice(colon + 1)
    if (value[0] === ' ') value = value.slice(1)
    if (field === 'data') { this.data.push(value); this.seen = true } else if (field === 'event') this.event = value
    else if (field === 'id') this.id = value
  }
}

const sleepFor = (env, ms, signal) => new Promise((resolve) => {
  const t = env.setTimeout(resolve, ms)
  signal?.addEventListener('abort', () => { env.clearTimeout(t); resolve() }, { once: true })
})

class HttpError extends Error {
  constructor (status, body, retryAfter) {
    super(body?.error?.message || `HTTP ${status}`)
    this.status = status
    this.code = body?.error?.code
    this.retryAfter = retryAfter
  }
}

export class Pushgate {
  /**
   * @param {string} url base URL of pushgate, e.g. https://push.example.com
   * @param {object} [options] see pushgate.d.ts
   */
  constructor (url, options = {}) {
    this.url = String(url || (globalThis.location && globalThis.location.origin)).replace(/\/+$/, '')
    this.token = options.token
    this.getToken = options.getToken
    this.transport = options.transport || 'auto'
    this.backoff = { base: 500, cap: 30000, ...options.backoff }
    this.fallbackAfter = options.fallbackAfter ?? 4000
    this.idleTimeout = options.idleTimeout ?? 45000
    this.pollWait = options.pollWait ?? 25
    this.onReset = options.onReset
    this.onError = options.onError || ((e) => globalThis.console?.warn('pushgate:', e.message || e))
    const g = globalThis
    this.env = {
      fetch: (...a) => g.fetch(...a),
      WebSocket: g.WebSocket,
      setTimeout: (...a) => g.setTimeout(...a),
      clearTimeout: (...a) => g.clearTimeout(...a),
      random: Math.random,
      events: g.addEventListener ? g : null,
      ...options.env
    }
    this.online = this.env.events ? globalThis.navigator?.onLine !== false : true
    this.subs = new Set()
    this.refs = 0
    this.stateListeners = new Set()
    this.state = this.online ? 'connecting' : 'offline'
    this.ws = null
    this.refreshing = null
    if (this.env.events) {
      this.onOnline = () => { this.online = true; this.each((c) => c.wake()); this.update() }
      this.onOffline = () => { this.online = false; this.each((c) => c.suspend()); this.update() }
      this.env.events.addEventListener('online', this.onOnline)
      this.env.events.addEventListener('offline', this.onOffline)
    }
  }

  /** Calls `fn(state)` on every change; returns a function that stops it. */
  onState (fn) { this.stateListeners.add(fn); return () => this.stateListeners.delete(fn) }

  /**
   * Receives every event of `channels` (after `options.since`, or from now on).
   * @returns {Subscription}
   */
  subscribe (channels, onEvent, options = {}) {
    const sub = new Subscription(this, [].concat(channels), onEvent, options)
    this.subs.add(sub)
    if (this.transport === 'ws') return this.socket().add(sub), sub
    sub.conn = new StreamConnection(this, sub, this.transport === 'poll' ? 'poll' : 'sse')
    sub.conn.start()
    return sub
  }

  /** Publishes one event over the WebSocket; resolves with `{id, duplicate}` once it is durable. */
  publish (channel, type, data, options = {}) {
    return this.socket().publish({ channel, type, data, id: options.id })
  }

  close () {
    this.each((c) => c.stop())
    this.subs.clear()
    this.ws = null
    if (this.env.events) {
      this.env.events.removeEventListener('online', this.onOnline)
      this.env.events.removeEventListener('offline', this.onOffline)
    }
    this.setState('closed')
  }

  socket () {
    if (!this.ws) { this.ws = new WsConnection(this); this.ws.start() }
    return this.ws
  }

  each (fn) {
    const conns = new Set([...this.subs].map((s) => s.conn))
    if (this.ws) conns.add(this.ws)
    conns.forEach((c) => c && fn(c))
  }

  /** The client's state: the worst of its connections'. */
  update () {
    if (this.state === 'closed') return
    if (!this.online) return this.setState('offline')
    const states = []
    this.each((c) => states.push(c.state))
    const worst = ['reconnecting', 'connecting'].find((s) => states.includes(s))
    this.setState(worst || (states.length ? 'open' : 'connecting'))
  }

  setState (s) {
    if (s === this.state) return
    this.state = s
    this.stateListeners.forEach((fn) => { try { fn(s) } catch (e) { this.onError(e) } })
  }

  /** A new token from `getToken` (one call at a time), or false. */
  async renewToken () {
    if (!this.getToken) return false
    this.refreshing ??= Promise.resolve().then(this.getToken).finally(() => { this.refreshing = null })
    try {
      const t = await this.refreshing
      if (!t) return false
      this.token = t
      return true
    } catch (e) { this.onError(e); return false }
  }

  query (pairs) {
    const q = new URLSearchParams()
    for (const [k, v] of pairs) if (v !== undefined && v !== null) q.append(k, v)
    if (this.token) q.append('token', this.token)
    return q.toString()
  }
}

export class Subscription {
  constructor (client, channels, onEvent, options) {
    this.client = client
    this.channels = channels
    this.onEvent = onEvent
    this.onReset = options.onReset || client.onReset
    this.cursor = options.since ?? null
    this.ref = 's' + (++client.refs)
    this.conn = null
  }

  get state () { return this.conn ? this.conn.state : 'closed' }
  get transport () { return this.conn ? this.conn.mode : null }

  deliver (event) {
    this.cursor = event.id
    try { this.onEvent(event) } catch (e) { this.client.onError(e) }
  }

  reset (info) {
    if (info.resume_from) this.cursor = info.resume_from
    try { this.onReset?.(info, this) } catch (e) { this.client.onError(e) }
  }

  close () {
    this.client.subs.delete(this)
    if (this.conn instanceof WsConnection) this.conn.remove(this)
    else this.conn?.stop()
    this.conn = null
    this.client.update()
  }
}

/** Reconnect bookkeeping shared by the transports. */
class Connection {
  constructor (client) {
    this.client = client
    this.env = client.env
    this.state = 'connecting'
    this.attempt = 0
    this.stopped = false
    this.suspended = !client.online
    this.waiting = null
  }

  set (state) { this.state = state; this.client.update() }
  start () { if (!this.suspended) this.connect() }
  stop () { this.stopped = true; this.waiting?.abort(); this.disconnect() }
  suspend () { this.suspended = true; this.state = 'reconnecting'; this.disconnect() }
  wake () {
    if (this.stopped || (!this.suspended && this.state === 'open')) return
    this.suspended = false
    this.attempt = 0
    if (this.waiting) this.waiting.abort()
    else this.connect()
  }

  opened () { this.attempt = 0; this.set('open') }

  /** Waits out the backoff (or `minimum`, if longer), then connects again. */
  async retry (minimum = 0) {
    if (this.stopped || this.suspended) return
    this.set('reconnecting')
    const delay = Math.max(minimum, backoffDelay(this.attempt++, this.client.backoff, this.env.random))
    this.waiting = new AbortController()
    await sleepFor(this.env, delay, this.waiting.signal)
    this.waiting = null
    if (!this.stopped && !this.suspended) this.connect()
  }
}

/** SSE read with fetch, or long-polling: one per subscription. */
class StreamConnection extends Connection {
  constructor (client, sub, mode) {
    super(client)
    this.sub = sub
    this.mode = mode
    this.abort = null
  }

  disconnect () { const a = this.abort; this.abort = null; a?.abort() }

  async connect () {
    this.disconnect()
    const abort = this.abort = new AbortController()
    let error = null
    try {
      if (this.mode === 'poll') await this.poll(abort)
      else await this.stream(abort)
    } catch (e) { error = e }
    // Replaced by a newer attempt, stopped, or gone offline: nothing to do.
    if (this.abort !== abort || this.stopped || this.suspended) return
    this.abort = null
    if (abort.why === 'fallback') return this.connect()
    if (abort.why === 'expired') { await this.client.renewToken(); return this.retry() }
    if (error instanceof HttpError) {
      if (error.status === 401 && await this.client.renewToken()) return this.retry()
      if (error.status === 401 || error.status === 403 || error.status === 400) {
        this.client.onError(error)
        this.stopped = true
        return this.set('closed')
      }
      return this.retry((error.retryAfter || 0) * 1000)
    }
    this.retry()
  }

  channelPairs () { return this.sub.channels.map((c) => ['channel', c]) }

  async get (path, pairs, signal) {
    const res = await this.env.fetch(`${this.client.url}${path}?${this.client.query(pairs)}`, {
      signal, cache: 'no-store', headers: { accept: path === '/v1/stream' ? 'text/event-stream' : 'application/json' }
    })
    if (!res.ok) {
      let body = null
      try { body = await res.json() } catch {}
      throw new HttpError(res.status, body, Number(res.headers.get('retry-after')) || 0)
    }
    return res
  }

  /** Long-polling: `next` is always the cursor to send next. */
  async poll (abort) {
    const sub = this.sub
    // The first request does not wait, so the state is `open` at once.
    for (let first = true; ; first = false) {
      const pairs = this.channelPairs()
      if (sub.cursor) pairs.push(['after', sub.cursor])
      if (sub.cursor && !first) pairs.push(['wait', this.client.pollWait])
      const page = await (await this.get('/v1/events', pairs, abort.signal)).json()
      if (abort.signal.aborted) return
      if (this.state !== 'open') this.opened()
      if (page.reset) sub.reset({ reason: 'cursor_reset', resume_from: null })
      for (const event of page.events) sub.deliver(event)
      sub.cursor = page.next
    }
  }

  async stream (abort) {
    const sub = this.sub
    const env = this.env
    if (!sub.cursor) {
      // Learn where "now" is first, so a reconnect before the first event
      // misses nothing.
      sub.cursor = (await (await this.get('/v1/events', this.channelPairs(), abort.signal)).json()).next
    }
    const fallBack = () => { this.mode = 'poll'; abort.why = 'fallback'; abort.abort() }
    // No bytes (some proxies hold back the headers too) within
    // fallbackAfter: something between us buffers the stream.
    let timer = env.setTimeout(fallBack, this.client.fallbackAfter)
    let res
    try {
      res = await this.get('/v1/stream', [...this.channelPairs(), ['last_event_id', sub.cursor]], abort.signal)
    } catch (e) { env.clearTimeout(timer); throw e }
    const reader = res.body.getReader()
    const decoder = new TextDecoder()
    let gotBytes = false
    // Some proxies pass the first bytes and hold back the rest. Until a lone
    // heartbeat (`: ping`) gets through, ask the log now and then whether it
    // has an event this stream has not delivered.
    let proven = false
    let probe
    const check = async () => {
      if (proven || abort.signal.aborted) return
      const before = sub.cursor
      try {
        const page = await (await this.get('/v1/events', [...this.channelPairs(), ['after', before], ['limit', 1]], abort.signal)).json()
        if (page.events.length && sub.cursor === before) {
          await sleepFor(env, 1000, abort.signal) // an event in flight gets a moment
          if (!proven && sub.cursor === before && !abort.signal.aborted) return fallBack()
        }
      } catch { return }
      probe = env.setTimeout(check, this.client.fallbackAfter)
    }
    probe = env.setTimeout(check, this.client.fallbackAfter)
    const parser = new SseParser((m) => {
      if (m.event === 'message') return sub.deliver(JSON.parse(m.data))
      if (m.event === 'pushgate.reset') return sub.reset(JSON.parse(m.data))
      if (m.event === 'pushgate.expired') { abort.why = 'expired'; abort.abort() }
    })
    try {
      for (;;) {
        const { value, done } = await reader.read()
        if (done) break
        env.clearTimeout(timer)
        timer = env.setTimeout(() => { abort.why = 'idle'; abort.abort() }, this.client.idleTimeout)
        const text = decoder.decode(value, { stream: true })
        if (!gotBytes) { gotBytes = true; this.opened() } else if (text.startsWith(': ping')) proven = true
        parser.push(text)
      }
    } finally {
      env.clearTimeout(timer)
      env.clearTimeout(probe)
      reader.cancel().catch(() => {})
    }
  }
}

const WS_AUTH = 4001

/** One WebSocket per client: publishes, and subscriptions when `transport: 'ws'`. */
class WsConnection extends Connection {
  constructor (client) {
    super(client)
    this.mode = 'ws'
    this.subs = new Map()
    this.pending = new Map()
    this.seq = 0
    this.sock = null
  }

  add (sub) {
    sub.conn = this
    this.subs.set(sub.ref, sub)
    this.sendSubscribe(sub)
  }

  remove (sub) {
    if (this.subs.delete(sub.ref)) this.send({ op: 'unsubscribe', channels: sub.channels })
  }

  publish (event) {
    const ref = 'p' + (++this.seq)
    // An idempotency key makes a publish safe to send again after a reconnect.
    const frame = { op: 'publish', ...event, ref, id: event.id ?? `${ref}-${Math.floor(this.env.random() * 1e12).toString(36)}` }
    return new Promise((resolve, reject) => {
      this.pending.set(ref, { frame, resolve, reject })
      this.send(frame)
    })
  }

  send (op) {
    if (this.sock && this.sock.readyState === 1) this.sock.send(JSON.stringify(op))
  }

  sendSubscribe (sub) {
    this.send({ op: 'subscribe', channels: sub.channels, since: sub.cursor || undefined, ref: sub.ref })
  }

  disconnect () {
    const s = this.sock
    this.sock = null
    this.env.clearTimeout(this.idle)
    if (s) { s.onclose = s.onmessage = s.onopen = s.onerror = null; try { s.close(1000) } catch {} }
  }

  touch () {
    this.env.clearTimeout(this.idle)
    this.idle = this.env.setTimeout(() => {
      if (this.quiet) return this.lost()
      this.quiet = true
      this.send({ op: 'ping' })
      this.touch()
    }, this.client.idleTimeout / 2)
  }

  lost (code) {
    this.disconnect()
    if (code === WS_AUTH) {
      return this.client.renewToken().then((ok) => ok ? this.retry() : (this.set('closed'), this.client.onError(new Error('authentication failed (4001) and getToken gave no token'))))
    }
    this.retry()
  }

  connect () {
    this.disconnect()
    const base = this.client.url.replace(/^http/, 'ws')
    const q = this.client.query([])
    const sock = this.sock = new this.env.WebSocket(`${base}/v1/ws${q ? '?' + q : ''}`)
    sock.onopen = () => {
      this.opened()
      this.quiet = false
      this.touch()
      this.subs.forEach((sub) => this.sendSubscribe(sub))
      this.pending.forEach((p) => this.send(p.frame))
    }
    sock.onmessage = (m) => {
      this.quiet = false
      this.touch()
      let op
      try { op = JSON.parse(m.data) } catch { return }
      this.handle(op)
    }
    sock.onclose = (e) => { if (this.sock === sock) this.lost(e.code) }
  }

  handle (op) {
    if (op.op === 'event') {
      const ev = op.event
      for (const sub of this.subs.values()) {
        if (sub.channels.includes(ev.channel)) return sub.deliver(ev)
      }
      return
    }
    const sub = this.subs.get(op.ref)
    const pub = this.pending.get(op.ref)
    if (op.op === 'subscribed' && sub && !sub.cursor) sub.cursor = op.cursor
    else if (op.op === 'reset' && sub) sub.reset(op)
    else if (op.op === 'ack' && pub) { this.pending.delete(op.ref); pub.resolve({ id: op.id, duplicate: op.duplicate }) }
    else if (op.op === 'error') {
      const err = Object.assign(new Error(op.message), { code: op.code })
      if (pub) { this.pending.delete(op.ref); pub.reject(err) } else if (!(sub && op.code === 'already_subscribed')) this.client.onError(err)
    }
  }
}

export default Pushgate
