// The dashboard at /: live events from the log and live, the inbound
// inspector with raw headers and the pretty-printed body, and an endpoint
// created from the page with its attempts listed.
// Usage: node browser-dashboard.mjs http://127.0.0.1:PORT
import { openPage, run, say, check } from './lib.mjs'

run(async () => {
  const base = process.argv[2]
  const { browser, page } = await openPage(`${base}/`)
  // Live events: history first (since=earliest), then a live one.
  await page.fill('#channels', 'user:demo')
  await page.check('#history')
  await page.click('#watch')
  await page.locator('#events .item').first().waitFor({ timeout: 10000 })
  await page.locator('#livestate', { hasText: 'live' }).waitFor({ timeout: 10000 })
  const r = await fetch(`${base}/v1/publish`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ channel: 'user:demo', type: 'dash.live', data: { n: 1 } }) })
  check(r.ok, `publish ${r.status}`)
  say('step live')
  await page.locator('#events .item', { hasText: 'dash.live' }).waitFor({ timeout: 5000 })
  await page.locator('#events .item', { hasText: 'payment_intent.succeeded' }).click()
  const shown = JSON.parse(await page.textContent('#event'))
  check(shown.type === 'payment_intent.succeeded' && shown.source === 'demo', `event detail: ${JSON.stringify(shown)}`)

  say('step inspector')
  // Inspector: the accepted webhook, with its signature header and body.
  await page.click('nav button[data-tab=inbound]')
  await page.locator('#ibl .item', { hasText: 'accepted' }).first().click()
  await page.locator('#ibd pre', { hasText: 'stripe-signature' }).waitFor({ timeout: 5000 })
  const body = await page.locator('#ibd pre').nth(2).textContent()
  check(body.includes('"object": {'), 'the body is pretty-printed')

  say('step endpoints')
  // Endpoints: create one from the page; it is listed with its attempts.
  await page.click('nav button[data-tab=endpoints]')
  await page.fill('#epurl', 'http://127.0.0.1:9/hook')
  await page.fill('#epch', 'user:demo')
  await page.click('#epadd')
  await page.waitForFunction(() => document.getElementById('epsecret').textContent !== '', null, { timeout: 5000 })
  const created = await page.textContent('#epsecret')
  check(created.includes('whsec_'), `endpoint created: ${created}`)
  await page.locator('#epl .item', { hasText: '127.0.0.1:9/hook' }).click()
  await page.locator('#epd h3', { hasText: 'Attempts' }).waitFor({ timeout: 5000 })
  say('OK dashboard')
  await browser.close()
})
