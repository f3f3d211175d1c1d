// Shared by the browser-*.mjs scripts: Debian's Chromium, headless, driven by
// playwright-core (which never downloads a browser), plus a line protocol
// with the Rust test that runs the script (stdout: READY/… lines; stdin:
// lines from the test).
import { createInterface } from 'node:readline'
import { chromium } from 'playwright-core'

export const CHROMIUM = process.env.PUSHGATE_CHROMIUM || '/usr/bin/chromium'
export const ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync']

export async function openPage (url) {
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: ARGS, headless: true })
  const page = await browser.newPage()
  page.on('console', (m) => { if (m.type() === 'error' || m.type() === 'warning') console.error(`[page ${m.type()}] ${m.text()}`) })
  page.on('pageerror', (e) => console.error(`[page error] ${e.message}`))
  await page.goto(url)
  return { browser, page }
}

const lines = createInterface({ input: process.stdin })
const queue = []
const waiters = []
lines.on('line', (l) => { const w = waiters.shift(); if (w) w(l); else queue.push(l) })

/** The next line the Rust test writes to our stdin. */
export function fromTest () {
  return queue.length ? Promise.resolve(queue.shift()) : new Promise((resolve) => waiters.push(resolve))
}

export function say (...parts) { console.log(parts.join(' ')) }

/** Runs `main`; any failure prints FAIL and exits 1 (the Rust test asserts on both). */
export function run (main) {
  const watchdog = setTimeout(() => { say('FAIL watchdog: the script took longer than 110 s'); process.exit(1) }, 110000)
  main().then(() => { clearTimeout(watchdog); process.exit(0) }, (e) => { say('FAIL', e.stack || e); process.exit(1) })
}

export function check (cond, message) { if (!cond) throw new Error(message) }
