// The WebSocket chat: publish and receive; after a server restart it
// reconnects with backoff and publishes again.
// Protocol: READY after the first message round-trips; the test restarts the
// server and writes RESTARTED.
import { openPage, run, say, check, fromTest } from './lib.mjs'

async function send (page, text) {
  await page.fill('#chat-form input[name=text]', text)
  await page.click('#chat-form button')
  await page.waitForFunction((t) => window.pushgateDemo.chat.some((e) => e.data.text === t), text, { timeout: 15000 })
}

run(async () => {
  const base = process.argv[2]
  const { browser, page } = await openPage(`${base}/demo?backoff=300#chat`)
  await page.waitForFunction(() => window.pushgateDemo && window.pushgateDemo.chatStates.includes('open'), null, { timeout: 15000 })
  await send(page, 'before restart')
  say('READY')
  await fromTest()
  const started = Date.now()
  await page.waitForFunction(() => { const s = window.pushgateDemo.chatStates; return s.includes('reconnecting') && s.at(-1) === 'open' }, null, { timeout: 30000 })
  const ms = Date.now() - started
  await send(page, 'after restart')
  const texts = await page.evaluate(() => window.pushgateDemo.chat.map((e) => e.data.text))
  check(JSON.stringify(texts) === JSON.stringify(['before restart', 'after restart']), `chat log: ${texts}`)
  const states = await page.evaluate(() => window.pushgateDemo.chatStates)
  const lis = await page.locator('#chat-log li').count()
  check(lis === 2, `two messages on the page, got ${lis}`)
  say('OK chat reconnected', ms, 'ms after the restart and published again; states:', states.join('>'))
  await browser.close()
})
