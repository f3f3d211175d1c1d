// A signed Stripe webhook (the demo's Pay button: the server signs it and
// posts it to its own /webhooks/demo) → the toast is on the page within 5 s.
// Usage: node browser-toast.mjs http://127.0.0.1:PORT
import { openPage, run, say, check } from './lib.mjs'

run(async () => {
  const base = process.argv[2]
  const { browser, page } = await openPage(`${base}/demo`)
  await page.waitForFunction(() => window.pushgateDemo && document.getElementById('state').dataset.state === 'open', null, { timeout: 15000 })
  const started = Date.now()
  await page.click('#pay')
  const toast = page.locator('.toast', { hasText: 'Payment received' })
  await toast.first().waitFor({ state: 'visible', timeout: 5000 })
  const ms = Date.now() - started
  const text = await toast.first().textContent()
  check(/Payment received: \$\d+\.\d\d/.test(text), `toast text: ${text}`)
  const raw = JSON.parse(await page.textContent('#raw'))
  check(raw.type === 'payment_intent.succeeded' && raw.channel === 'user:demo' && raw.source === 'demo', `raw event: ${JSON.stringify(raw)}`)
  check(await page.getAttribute('#state', 'data-state') === 'open', 'the indicator shows open')
  say('OK toast after', ms, 'ms:', text)
  await browser.close()
})
