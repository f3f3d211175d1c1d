// The server restarts while the page is open; events appended to the log
// while it was down arrive once each, in order, after the reconnect.
// Protocol: we print READY once the page is live and has event 1; the test
// restarts the server and writes the cursors it published ("IDS a b c").
import { openPage, run, say, check, fromTest } from './lib.mjs'

run(async () => {
  const base = process.argv[2]
  const { browser, page } = await openPage(`${base}/demo?backoff=300`)
  await page.waitForFunction(() => window.pushgateDemo && window.pushgateDemo.states.includes('open'), null, { timeout: 15000 })
  say('LIVE')
  const first = (await fromTest()).split(' ').slice(1)
  await page.waitForFunction((n) => window.pushgateDemo.events.length >= n, first.length, { timeout: 10000 })
  say('READY')
  const ids = (await fromTest()).split(' ').slice(1)
  const started = Date.now()
  const all = [...first, ...ids]
  await page.waitForFunction((n) => window.pushgateDemo.events.length >= n, all.length, { timeout: 30000 })
  const ms = Date.now() - started
  await page.waitForTimeout(1000) // anything repeated would arrive now
  const seen = await page.evaluate(() => window.pushgateDemo.events.map((e) => e.id))
  const states = await page.evaluate(() => window.pushgateDemo.states)
  check(JSON.stringify(seen) === JSON.stringify(all), `expected ${all.join(',')} once each, in order; saw ${seen.join(',')}`)
  check(states.includes('reconnecting'), `the page noticed the restart: ${states}`)
  check(states.at(-1) === 'open', `open again: ${states}`)
  say('OK', ids.length, 'missed events arrived once each', ms, 'ms after the restart; states:', states.join('>'))
  await browser.close()
})
