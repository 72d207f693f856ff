// Drives the example pages in headless Chromium (Debian's, through playwright-core) and prints what a person would
// see, as one JSON object on stdout; tests/test_browser.py serves the pages, runs fluxrt and judges the result.
//
//   node build/browser/pages.js live-users|chat
//
// Environment: PAGES_URL (the static server's root), FLUXRT_URL (http://127.0.0.1:PORT), FLUXRT_WS
// (ws://127.0.0.1:PORT), TOKEN_ALICE, TOKEN_BOB, SDK_TEST_DSN (for SQL), CHROMIUM (the browser's path).

import { type Browser, type BrowserContext, chromium, type Page } from 'playwright-core'
import pg from 'pg'

function env(name: string): string {
  const value = process.env[name]
  if (!value) throw new Error(`${name} is not set: run this from tests/test_browser.py`)
  return value
}

async function sql(text: string, params: unknown[] = []): Promise<void> {
  const client = new pg.Client({ connectionString: env('SDK_TEST_DSN') })
  await client.connect()
  try {
    await client.query(text, params)
  } finally {
    await client.end()
  }
}

/** Open `path` in a page, collecting its console and errors (printed when something fails). */
async function open(context: BrowserContext, path: string, log: string[]): Promise<Page> {
  const page = await context.newPage()
  page.setDefaultTimeout(10_000)
  page.on('console', (message) => log.push(`${path} console.${message.type()}: ${message.text()}`))
  page.on('pageerror', (error) => log.push(`${path} error: ${error.message}`))
  return page
}

async function liveUsers(browser: Browser, log: string[]) {
  const context = await browser.newContext()
  const page = await open(context, 'live-users', log)
  const subscribed = page.waitForEvent('console', {
    predicate: (message) => message.text() === 'Subscribed to table:public.users',
    timeout: 10_000,
  })
  await page.goto(`${env('PAGES_URL')}/examples/live-users.html?token=${env('TOKEN_ALICE')}&server=${env('FLUXRT_WS')}`)
  await subscribed
  const lines = page.locator('#updates p')
  await sql("INSERT INTO public.users (id, name) VALUES (1, 'Ada')")
  await lines.filter({ hasText: 'New user: Ada' }).waitFor()
  await sql("UPDATE public.users SET name = 'Ada Lovelace' WHERE id = 1")
  await lines.filter({ hasText: 'Updated: Ada' }).waitFor()
  await sql('DELETE FROM public.users WHERE id = 1')
  await lines.filter({ hasText: 'Deleted: Ada Lovelace' }).waitFor()
  // Newest first, as the page inserts them.
  return lines.evaluateAll((ps) => ps.map((p) => ({ text: p.textContent, color: getComputedStyle(p).color })))
}

async function chat(browser: Browser, log: string[]) {
  const url = (who: string) =>
    `${env('PAGES_URL')}/examples/chat.html?token=${env(`TOKEN_${who}`)}&server=${env('FLUXRT_URL')}&room=test`
  const names = (page: Page) => page.locator('#online li').allTextContents()
  const aliceContext = await browser.newContext()
  const bobContext = await browser.newContext()
  const alice = await open(aliceContext, 'chat alice', log)
  const bob = await open(bobContext, 'chat bob', log)
  await alice.goto(url('ALICE'))
  await bob.goto(url('BOB'))
  for (const page of [alice, bob]) await page.locator('#online li', { hasText: 'bob' }).waitFor()
  await alice.locator('#online li', { hasText: 'alice' }).waitFor()
  await bob.locator('#online li', { hasText: 'alice' }).waitFor()
  const onlineBefore = { alice: await names(alice), bob: await names(bob) }

  await alice.locator('#text').fill('Hello Bob')
  await alice.locator('#composer button').click()
  await bob.locator('#messages li', { hasText: 'Hello Bob' }).waitFor()
  await alice.locator('#messages li', { hasText: 'Hello Bob' }).waitFor()
  const messages = {
    alice: await alice.locator('#messages li').allTextContents(),
    bob: await bob.locator('#messages li').allTextContents(),
  }

  await aliceContext.close()
  await bob.locator('#online li', { hasText: 'alice' }).waitFor({ state: 'detached' })
  return { onlineBefore, messages, onlineAfter: await names(bob) }
}

const scenarios = { 'live-users': liveUsers, chat } as const

async function main(): Promise<void> {
  const which = process.argv[2] as keyof typeof scenarios
  const scenario = scenarios[which]
  if (scenario === undefined) throw new Error(`usage: pages.js ${Object.keys(scenarios).join('|')}`)
  const browser = await chromium.launch({
    executablePath: env('CHROMIUM'),
    headless: true,
    // Playwright gives each launch a fresh, empty profile (--user-data-dir) of its own. Without the networking
    // flags Chromium keeps calling out to Google's services, which this machine's closed network refuses.
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
    timeout: 30_000,
  })
  const log: string[] = []
  try {
    const result = await scenario(browser, log)
    process.stdout.write(`${JSON.stringify({ result, log })}\n`)
  } catch (error) {
    process.stderr.write(`${String(error)}\n--- the pages said ---\n${log.join('\n')}\n`)
    process.exitCode = 1
  } finally {
    await browser.close()
  }
}

await main()
