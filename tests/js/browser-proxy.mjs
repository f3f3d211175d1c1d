// Behind a buffering proxy (nginx, proxy_buffering on), the SSE stream
// delivers nothing; the client notices, falls back to long-polling by itself
// and still receives every event, including those published before it did.
// Protocol: LIVE once the page loaded; the test publishes and writes
// "IDS …"; we print POLLING after the fallback; the test publishes more
// and writes "IDS …" again.
import { openPage, run, say, check, fromTest } from './lib.mjs'

run(async () => {
  const base = process.argv[2]
  const { browser, page } = await openPage(`${base}/demo`)
  await page.waitForFunction(() => !!window.pushgateDemo, null, { timeout: 15000 })
  say('LIVE')
  const early = (await fromTest()).split(' ').slice(1)
  const started = Date.now()
  await page.waitForFunction(() => window.pushgateDemo.subscription.transport === 'poll', null, { timeout: 20000 })
  say('POLLING after', Date.now() - started, 'ms')
  const late = (await fromTest()).split(' ').slice(1)
  const all = [...early, ...late]
  await page.waitForFunction((n) => window.pushgateDemo.events.length >= n, all.length, { timeout: 30000 })
  await page.waitForTimeout(500)
  const seen = await page.evaluate(() => window.pushgateDemo.events.map((e) => e.id))
  check(JSON.stringify(seen) === JSON.stringify(all), `expected ${all.join(',')} once each; saw ${seen.join(',')}`)
  check(await page.getAttribute('#state', 'data-state') === 'open', 'the indicator shows open')
  say('OK long-polling delivered', all.length, 'events')
  await browser.close()
})
