// Unit tests for the browser client (node --test clients/js/test/).
// The network is faked at the fetch / WebSocket seam; timers are real but short.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { Pushgate, backoffDelay, SseParser } from '../pushgate.js'

const tick = (ms = 5) => new Promise((resolve) => setTimeout(resolve, ms))
async function until (cond, what, ms = 2000) {
  const end = Date.now() + ms
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`)
    await tick(2)
  }
}

/** A fake fetch: each request is answered by the next handler for its path. */
function fakeFetch () {
  const requests = []
  const handlers = { '/v1/events': [], '/v1/stream': [] }
  const fetch = async (url, init) => {
    const u = new URL(url)
    const req = { url: u, path: u.pathname, q: u.searchParams, init }
    requests.push(req)
    const h = handlers[u.pathname].shift()
    if (!h) return new Promise((resolve, reject) => init.signal.addEventListener('abort', () => reject(new DOMException('aborted', 'AbortError'))))
    return h(req)
  }
  return { fetch, requests, handlers }
}

const json = (body, status = 200, headers = {}) => new Response(JSON.stringify(body), { status, headers: { 'content-type': 'application/json', ...headers } })

/** An SSE response whose body the test writes to. */
function sseStream (req) {
  let ctl
  const body = new ReadableStream({ start (c) { ctl = c } })
  req.init.signal.addEventListener('abort', () => { try { ctl.error(new DOMException('aborted', 'AbortError')) } catch {} })
  const enc = new TextEncoder()
  return {
    response: new Response(body, { headers: { 'content-type': 'text/event-stream' } }),
    write: (text) => ctl.enqueue(enc.encode(text)),
    end: () => ctl.close()
  }
}

const env = (extra) => ({ events: null, random: () => 0.5, ...extra })
const fast = { backoff: { base: 4, cap: 20 }, fallbackAfter: 60, idleTimeout: 5000 }

test('backoff: full jitter under an exponential, capped ceiling', () => {
  const b = { base: 100, cap: 1000 }
  assert.equal(backoffDelay(0, b, () => 0), 0)
  assert.equal(backoffDelay(0, b, () => 0.999999), 99)
  assert.equal(backoffDelay(1, b, () => 0.999999), 199)
  assert.equal(backoffDelay(3, b, () => 0.999999), 799)
  assert.equal(backoffDelay(4, b, () => 0.999999), 999, 'capped')
  assert.equal(backoffDelay(1000, b, () => 0.999999), 999, 'no overflow')
  assert.equal(backoffDelay(2, b, () => 0.5), 200)
  for (let i = 0; i < 200; i++) {
    const d = backoffDelay(5, b)
    assert.ok(d >= 0 && d < 1000)
  }
})

test('SSE parser: chunks, CRLF, comments, ids, named events, multi-line data', () => {
  const got = []
  const p = new SseParser((m) => got.push(m))
  p.push('retry: 2000\n: pushgate\n\nid: 1-t\nda')
  p.push('ta: {"a":1}\r')
  p.push('\n\r\nevent: pushgate.reset\nid: 9-t\ndata: x\ndata: y\n\n: ping\n\n')
  assert.deepEqual(got, [
    { id: '1-t', event: 'message', data: '{"a":1}' },
    { id: '9-t', event: 'pushgate.reset', data: 'x\ny' }
  ])
})

test('SSE: learns the head, resumes from the last cursor, reports state', async () => {
  const f = fakeFetch()
  const streams = []
  f.handlers['/v1/events'].push(() => json({ events: [], next: '5-t', reset: false }))
  f.handlers['/v1/stream'].push((req) => { const s = sseStream(req); streams.push(s); return s.response })
  f.handlers['/v1/stream'].push((req) => { const s = sseStream(req); streams.push(s); return s.response })
  const pg = new Pushgate('http://pg.test/', { ...fast, token: 'tok', env: env({ fetch: f.fetch }) })
  const states = []
  pg.onState((s) => states.push(s))
  const got = []
  const sub = pg.subscribe(['user:1', 'user:2'], (e) => got.push(e))
  await until(() => streams.length === 1, 'first stream')
  const first = f.requests.find((r) => r.path === '/v1/stream')
  assert.deepEqual(first.q.getAll('channel'), ['user:1', 'user:2'])
  assert.equal(first.q.get('last_event_id'), '5-t', 'resumes from the head learned before the first event')
  assert.equal(first.q.get('token'), 'tok')
  streams[0].write('retry: 2000\n\n')
  await until(() => pg.state === 'open', 'open')
  streams[0].write('id: 6-t\ndata: {"id":"6-t","channel":"user:1","data":1}\n\n')
  await until(() => got.length === 1, 'event')
  assert.equal(sub.cursor, '6-t')
  streams[0].end()
  await until(() => streams.length === 2, 'reconnect')
  const second = f.requests.filter((r) => r.path === '/v1/stream')[1]
  assert.equal(second.q.get('last_event_id'), '6-t')
  streams[1].write(': hi\n\n')
  await until(() => pg.state === 'open', 'open again')
  assert.deepEqual(states, ['open', 'reconnecting', 'open'])
  assert.equal(sub.transport, 'sse')
  pg.close()
  assert.equal(pg.state, 'closed')
})

test('SSE: pushgate.reset moves the cursor and calls onReset', async () => {
  const f = fakeFetch()
  const streams = []
  for (let i = 0; i < 2; i++) f.handlers['/v1/stream'].push((req) => { const s = sseStream(req); streams.push(s); return s.response })
  const resets = []
  const pg = new Pushgate('http://pg.test', { ...fast, env: env({ fetch: f.fetch }) })
  const sub = pg.subscribe('news', () => {}, { since: '3-old', onReset: (info) => resets.push(info) })
  await until(() => streams.length === 1, 'stream')
  assert.equal(f.requests[0].path, '/v1/stream', 'a known cursor needs no head lookup')
  streams[0].write('retry: 1\n\nevent: pushgate.reset\nid: 9-t\ndata: {"reason":"cursor_expired","resume_from":"9-t"}\n\n')
  await until(() => resets.length === 1, 'reset')
  assert.equal(resets[0].reason, 'cursor_expired')
  assert.equal(sub.cursor, '9-t')
  streams[0].end()
  await until(() => streams.length === 2, 'reconnect')
  assert.equal(f.requests[1].q.get('last_event_id'), '9-t', 'never resets twice')
  pg.close()
})

test('a stream that delivers no bytes falls back to long-polling and keeps the cursor', async () => {
  const f = fakeFetch()
  f.handlers['/v1/stream'].push((req) => sseStream(req).response) // headers, then silence
  f.handlers['/v1/events'].push(() => json({ events: [{ id: '8-t', channel: 'c', data: 1 }], next: '8-t', reset: false }))
  f.handlers['/v1/events'].push(() => json({ events: [], next: '9-t', reset: true }))
  const got = []
  const resets = []
  const pg = new Pushgate('http://pg.test', { ...fast, env: env({ fetch: f.fetch }), onReset: (i) => resets.push(i) })
  const sub = pg.subscribe('c', (e) => got.push(e.id), { since: '7-t' })
  await until(() => f.requests.filter((r) => r.path === '/v1/events').length >= 3, 'polls')
  const polls = f.requests.filter((r) => r.path === '/v1/events')
  assert.equal(polls[0].q.get('after'), '7-t')
  assert.equal(polls[0].q.get('wait'), null, 'the first poll answers at once')
  assert.equal(polls[1].q.get('wait'), '25', 'then they are long polls')
  assert.equal(polls[1].q.get('after'), '8-t')
  assert.equal(polls[2].q.get('after'), '9-t')
  assert.deepEqual(got, ['8-t'])
  assert.equal(resets.length, 1)
  assert.equal(sub.transport, 'poll')
  assert.equal(pg.state, 'open')
  pg.close()
})

test('HTTP 401 asks getToken and retries; 403 stops with an error', async () => {
  const f = fakeFetch()
  f.handlers['/v1/stream'].push(() => json({ error: { code: 'unauthorized', message: 'expired' } }, 401))
  f.handlers['/v1/stream'].push((req) => sseStream(req).response)
  let asked = 0
  const pg = new Pushgate('http://pg.test', { ...fast, token: 'old', getToken: async () => { asked++; return 'new' }, env: env({ fetch: f.fetch }) })
  pg.subscribe('c', () => {}, { since: '1-t' })
  await until(() => f.requests.length === 2, 'retry')
  assert.equal(asked, 1)
  assert.equal(f.requests[1].q.get('token'), 'new')
  pg.close()

  const g = fakeFetch()
  g.handlers['/v1/stream'].push(() => json({ error: { code: 'forbidden', message: 'no grant' } }, 403))
  const errors = []
  const pg2 = new Pushgate('http://pg.test', { ...fast, env: env({ fetch: g.fetch }), onError: (e) => errors.push(e) })
  const sub = pg2.subscribe('c', () => {}, { since: '1-t' })
  await until(() => errors.length === 1, 'error')
  assert.equal(errors[0].code, 'forbidden')
  assert.equal(sub.state, 'closed')
  await tick(40)
  assert.equal(g.requests.length, 1, 'a refusal is not retried')
})

/** A fake WebSocket that a test drives. */
function fakeWebSocket () {
  const sockets = []
  class FakeWS {
    constructor (url) { this.url = new URL(url); this.sent = []; this.readyState = 0; sockets.push(this) }
    send (text) { this.sent.push(JSON.parse(text)) }
    close () { this.readyState = 3 }
    open () { this.readyState = 1; this.onopen?.() }
    recv (op) { this.onmessage?.({ data: JSON.stringify(op) }) }
    drop (code) { this.readyState = 3; this.onclose?.({ code }) }
  }
  return { FakeWS, sockets }
}

test('WebSocket: resubscribes from the last cursor after 1012, renews the token on 4001', async () => {
  const { FakeWS, sockets } = fakeWebSocket()
  let n = 0
  const pg = new Pushgate('https://pg.test', { ...fast, transport: 'ws', token: 't0', getToken: () => 't' + (++n), env: env({ WebSocket: FakeWS }) })
  const got = []
  const a = pg.subscribe(['chat:a'], (e) => got.push(['a', e.id]))
  const b = pg.subscribe(['user:1'], (e) => got.push(['b', e.id]), { since: '2-t' })
  assert.equal(sockets[0].url.protocol, 'wss:')
  assert.equal(sockets[0].url.pathname, '/v1/ws')
  assert.equal(sockets[0].url.searchParams.get('token'), 't0')
  sockets[0].open()
  assert.equal(pg.state, 'open')
  const [subA, subB] = sockets[0].sent
  assert.deepEqual([subA.op, subA.channels, subA.since], ['subscribe', ['chat:a'], undefined])
  assert.deepEqual([subB.op, subB.channels, subB.since], ['subscribe', ['user:1'], '2-t'])
  sockets[0].recv({ op: 'subscribed', channels: ['chat:a'], cursor: '4-t', ref: subA.ref })
  assert.equal(a.cursor, '4-t', 'the start cursor makes a reconnect before any event gapless')
  sockets[0].recv({ op: 'event', event: { id: '5-t', channel: 'user:1' } })
  sockets[0].recv({ op: 'event', event: { id: '6-t', channel: 'chat:a' } })
  assert.deepEqual(got, [['b', '5-t'], ['a', '6-t']])

  sockets[0].drop(1012)
  assert.equal(pg.state, 'reconnecting')
  await until(() => sockets.length === 2, 'reconnect after 1012')
  sockets[1].open()
  assert.deepEqual(sockets[1].sent.map((o) => o.since), ['6-t', '5-t'])
  assert.equal(sockets[1].url.searchParams.get('token'), 't0')

  sockets[1].drop(4001)
  await until(() => sockets.length === 3, 'reconnect after 4001')
  assert.equal(n, 1, 'getToken was called before reconnecting')
  assert.equal(sockets[2].url.searchParams.get('token'), 't1')
  sockets[2].open()
  sockets[2].recv({ op: 'reset', reason: 'cursor_expired', resume_from: '40-t', ref: sockets[2].sent[1].ref })
  assert.equal(b.cursor, '40-t')
  a.close()
  assert.deepEqual(sockets[2].sent.at(-1), { op: 'unsubscribe', channels: ['chat:a'] })
  pg.close()
})

test('WebSocket publish resolves on ack and is resent with the same idempotency key after a drop', async () => {
  const { FakeWS, sockets } = fakeWebSocket()
  const pg = new Pushgate('http://pg.test', { ...fast, env: env({ WebSocket: FakeWS }) })
  const p = pg.publish('chat:a', 'msg', { text: 'hi' })
  assert.equal(sockets.length, 1, 'publishing opens the WebSocket')
  sockets[0].open()
  const frame = sockets[0].sent[0]
  assert.equal(frame.op, 'publish')
  assert.equal(frame.channel, 'chat:a')
  assert.ok(frame.id, 'an idempotency key is generated')
  sockets[0].drop(1006)
  await until(() => sockets.length === 2, 'reconnect')
  sockets[1].open()
  assert.deepEqual(sockets[1].sent[0], frame, 'the unacknowledged publish is sent again, unchanged')
  sockets[1].recv({ op: 'ack', ref: frame.ref, id: '10-t', duplicate: true })
  assert.deepEqual(await p, { id: '10-t', duplicate: true })

  const refused = pg.publish('user:9', 'msg', {})
  const f2 = sockets[1].sent.at(-1)
  sockets[1].recv({ op: 'error', code: 'forbidden', message: 'no', ref: f2.ref })
  await assert.rejects(refused, (e) => e.code === 'forbidden')
  pg.close()
})

test('offline stops reconnecting; online reconnects at once', async () => {
  const { FakeWS, sockets } = fakeWebSocket()
  const win = new EventTarget()
  const pg = new Pushgate('http://pg.test', { transport: 'ws', backoff: { base: 60000, cap: 60000 }, env: env({ WebSocket: FakeWS, events: win }) })
  pg.subscribe('c', () => {})
  sockets[0].open()
  win.dispatchEvent(new Event('offline'))
  assert.equal(pg.state, 'offline')
  await tick(20)
  assert.equal(sockets.length, 1, 'no attempts while offline')
  win.dispatchEvent(new Event('online'))
  assert.equal(sockets.length, 2, 'online reconnects without waiting out the backoff')
  sockets[1].open()
  assert.equal(pg.state, 'open')
  pg.close()
})

test('a proxy that passes the first bytes but holds back events is caught by the probe', async () => {
  const f = fakeFetch()
  let stream
  f.handlers['/v1/stream'].push((req) => { stream = sseStream(req); return stream.response })
  // The probe finds an event the stream has not delivered; then polling takes over.
  f.handlers['/v1/events'].push(() => json({ events: [{ id: '8-t', channel: 'c', data: 1 }], next: '8-t', reset: false }))
  f.handlers['/v1/events'].push(() => json({ events: [{ id: '8-t', channel: 'c', data: 1 }], next: '8-t', reset: false }))
  const got = []
  const pg = new Pushgate('http://pg.test', { ...fast, env: env({ fetch: f.fetch }) })
  const sub = pg.subscribe('c', (e) => got.push(e.id), { since: '7-t' })
  await until(() => stream, 'stream')
  stream.write('retry: 2000\n: pushgate\n\n')
  await until(() => sub.transport === 'poll', 'fallback', 4000)
  await until(() => got.length === 1, 'the held-back event, by polling')
  assert.deepEqual(got, ['8-t'])
  const probe = f.requests.find((r) => r.path === '/v1/events')
  assert.equal(probe.q.get('after'), '7-t')
  assert.equal(probe.q.get('limit'), '1')
  pg.close()
})

test('a stream whose heartbeat gets through is trusted: no more probes', async () => {
  const f = fakeFetch()
  let stream
  f.handlers['/v1/stream'].push((req) => { stream = sseStream(req); return stream.response })
  const pg = new Pushgate('http://pg.test', { ...fast, env: env({ fetch: f.fetch }) })
  const sub = pg.subscribe('c', () => {}, { since: '7-t' })
  await until(() => stream, 'stream')
  stream.write('retry: 2000\n\n')
  await tick(10)
  stream.write(': ping\n\n')
  await tick(200)
  assert.equal(f.requests.filter((r) => r.path === '/v1/events').length, 0)
  assert.equal(sub.transport, 'sse')
  pg.close()
})
