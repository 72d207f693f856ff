// Drives the example pages in headless Chromium (Debian's, through playwright-core) and prints what a person would
// see, as one JSON object on stdout; tests/test_browser.py serves the pages, runs fluxrt and judges the result.
//
//   node build/browser/pages.js live-users|chat|react-todos|react-todos-over-wss|status
//
// Environment: PAGES_URL (the static server's root), FLUXRT_URL (http://127.0.0.1:PORT), FLUXRT_WS
// (ws://127.0.0.1:PORT), TOKEN_ALICE, TOKEN_BOB, SDK_TEST_DSN (for SQL), CHROMIUM (the browser's path).
// status (tests/test_status_page.py) opens fluxrt's own page and needs only FLUXRT_URL, TOKEN_ALICE (refused: not
// a service role), TOKEN_SERVICE and SCREENSHOT (where to save one).
// react-todos (tests/test_sdk_react.py) runs fluxrt itself, to restart it, as the live tests do: the SDK_TEST_*
// variables of test/support/fluxrt.ts; PAGES_URL is then the example's serve.py, which also answers /api/todos.
// react-todos-over-wss (the same test file) too, with an https:// FLUXRT_URL, a HOME whose NSS database trusts the
// test CA, and UNTRUSTING_HOME, one whose does not.

import { type Browser, type BrowserContext, chromium, type Page } from 'playwright-core'
import pg from 'pg'
import { Fluxrt } from '../support/fluxrt.js'

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

/** What one user's todo page shows: `owner:title`, with ` ✓` when done, in id order. */
function todos(page: Page): Promise<string[]> {
  return page
    .locator('#todos li')
    .evaluateAll((items) =>
      items.map((li) => {
        const title = li.querySelector('.title')?.textContent ?? ''
        return `${(li as HTMLElement).dataset.owner}:${title}${li.classList.contains('done') ? ' ✓' : ''}`
      }),
    )
}

/** Until the page's list is `expected` and live; fails with what it shows instead. */
async function listIs(page: Page, who: string, expected: string[]): Promise<string[]> {
  const deadline = Date.now() + 30_000
  for (;;) {
    const shown = await todos(page)
    const status = await page.locator('#list-status').textContent()
    if (JSON.stringify(shown) === JSON.stringify(expected) && status === 'live') return shown
    if (Date.now() > deadline) {
      const connection = await page.locator('#connection').textContent()
      throw new Error(
        `${who}'s list is ${JSON.stringify(shown)} (${status}; ${connection}), expected ${JSON.stringify(expected)}`,
      )
    }
    await new Promise((resolve) => setTimeout(resolve, 25))
  }
}

/**
 * examples/react-todos as alice and bob in two browser contexts: rows changed with SQL show in each list as the
 * table's policy allows (own and shared todos), fluxrt restarted under them, presence. Every list is read after a
 * change both users see (a shared row), which comes after the ones before it in commit order: a change that should
 * not have reached a list would have shown by then.
 */
async function reactTodos(browser: Browser, log: string[]) {
  const fluxrt = new Fluxrt()
  await fluxrt.start()
  try {
    const insert = async (owner: string, title: string, shared = false) => {
      await sql('INSERT INTO public.todos (owner, title, shared) VALUES ($1, $2, $3)', [owner, title, shared])
    }
    await insert('alice', 'a1')
    await insert('bob', 'b1')
    await insert('carol', 's1', true)
    await insert('carol', 'c1')

    const users = ['alice', 'bob'] as const
    const contexts = { alice: await browser.newContext(), bob: await browser.newContext() }
    const pages = {} as Record<(typeof users)[number], Page>
    const loads = { alice: 0, bob: 0 }
    const sockets = { alice: 0, bob: 0 }
    for (const who of users) {
      const page = await open(contexts[who], `react-todos ${who}`, log)
      page.on('request', (request) => {
        if (request.method() === 'GET' && new URL(request.url()).pathname === '/api/todos') loads[who] += 1
      })
      page.on('websocket', () => {
        sockets[who] += 1
      })
      await page.goto(`${env('PAGES_URL')}/?token=${env(`TOKEN_${who.toUpperCase()}`)}&server=${env('FLUXRT_URL')}`)
      pages[who] = page
    }
    /** Until each page's online list shows alice and bob; fails with what they show instead. */
    const bothOnline = async () => {
      const deadline = Date.now() + 30_000
      for (;;) {
        const shown = {
          alice: await pages.alice.locator('#online li').allTextContents(),
          bob: await pages.bob.locator('#online li').allTextContents(),
        }
        if (users.every((who) => JSON.stringify(shown[who]) === '["alice","bob"]')) return shown
        if (Date.now() > deadline) throw new Error(`the online lists are ${JSON.stringify(shown)}, expected alice and bob`)
        await new Promise((resolve) => setTimeout(resolve, 25))
      }
    }

    const loaded = {
      alice: await listIs(pages.alice, 'alice', ['alice:a1', 'carol:s1']),
      bob: await listIs(pages.bob, 'bob', ['bob:b1', 'carol:s1']),
    }

    await insert('alice', 'a2')
    await insert('bob', 'b2')
    await sql("UPDATE public.todos SET title = 'a1 (edited)', done = true WHERE title = 'a1'")
    await insert('carol', 'c2')
    await sql("UPDATE public.todos SET title = 'c1 (edited)' WHERE title = 'c1'")
    await sql("DELETE FROM public.todos WHERE title = 'b1'")
    await insert('carol', 's2', true)
    await listIs(pages.alice, 'alice', ['alice:a1 (edited) ✓', 'carol:s1', 'alice:a2', 'carol:s2'])
    await listIs(pages.bob, 'bob', ['carol:s1', 'bob:b2', 'carol:s2'])
    await sql("DELETE FROM public.todos WHERE title = 's1'")
    await listIs(pages.alice, 'alice', ['alice:a1 (edited) ✓', 'alice:a2', 'carol:s2'])
    const changed = await listIs(pages.bob, 'bob', ['bob:b2', 'carol:s2'])
    const changedLists = { alice: await todos(pages.alice), bob: changed }

    const onlineBefore = await bothOnline()
    const loadsBefore = { ...loads }

    // Down: SIGTERM closes every connection (1001) and stop() waits for the process to exit, so the rows change
    // while nobody can deliver them; back up, each page resumes its channel from the last change it had.
    await fluxrt.stop()
    await insert('alice', 'a3')
    await sql("DELETE FROM public.todos WHERE title = 'a2'")
    await sql("UPDATE public.todos SET done = true WHERE title = 'b2'")
    await insert('carol', 'c3')
    await insert('carol', 's3', true)
    await fluxrt.start()
    const restarted = {
      alice: await listIs(pages.alice, 'alice', ['alice:a1 (edited) ✓', 'carol:s2', 'alice:a3', 'carol:s3']),
      bob: await listIs(pages.bob, 'bob', ['bob:b2 ✓', 'carol:s2', 'carol:s3']),
    }
    const socketsAfterRestart = { ...sockets }

    // Through the page: alice adds a todo and ticks one (serve.py writes them under the policy); the list shows
    // what fluxrt delivers, with no load.
    await pages.alice.locator('form input').fill('a4')
    await pages.alice.locator('form button').click()
    await pages.alice.locator('#todos li', { hasText: 'a4' }).waitFor()
    // A click, not check(): the box shows the row's `done`, which changes when the UPDATE arrives.
    await pages.alice.locator('#todos li', { hasText: 'a3' }).locator('input').click()
    await pages.alice.locator('#todos li.done', { hasText: 'a3' }).waitFor()
    await insert('carol', 's4', true)
    const fromThePage = {
      alice: await listIs(pages.alice, 'alice', [
        'alice:a1 (edited) ✓',
        'carol:s2',
        'alice:a3 ✓',
        'carol:s3',
        'alice:a4',
        'carol:s4',
      ]),
      bob: await listIs(pages.bob, 'bob', ['bob:b2 ✓', 'carol:s2', 'carol:s3', 'carol:s4']),
    }
    const loadsAfterRestart = { ...loads }
    // After the restart each page's room starts again from the new server's sync: wait for both to be back.
    const onlineAfterRestart = await bothOnline()

    await contexts.bob.close()
    await pages.alice.locator('#online li', { hasText: 'bob' }).waitFor({ state: 'detached' })
    const onlineAfterBobLeft = await pages.alice.locator('#online li').allTextContents()
    await contexts.alice.close()
    return {
      loaded,
      changed: changedLists,
      restarted,
      fromThePage,
      loads: { before: loadsBefore, afterRestart: loadsAfterRestart },
      sockets: socketsAfterRestart,
      online: { before: onlineBefore, afterRestart: onlineAfterRestart, afterBobLeft: onlineAfterBobLeft },
    }
  } finally {
    await fluxrt.close()
  }
}

/**
 * fluxrt's status page (GET /status): asked for a token, refused a user's, shown the node's statistics with a
 * service role's, plots of at least two samples; then reloaded, when the tab's token is used again. Reports every
 * value the page shows (data-value), its top channels, the points of each plot, the origins it requested and the
 * prompts it showed; saves a screenshot.
 */
async function status(browser: Browser, log: string[]) {
  const context = await browser.newContext({ viewport: { width: 1200, height: 900 } })
  const page = await open(context, 'status', log)
  const origins = new Set<string>()
  page.on('request', (request) => origins.add(new URL(request.url()).origin))
  const prompts: string[] = []
  const login = page.locator('#login')
  const prompt = async () => {
    await login.waitFor({ state: 'visible' })
    prompts.push((await page.locator('#login-message').textContent()) ?? '')
  }
  const submit = async (token: string) => {
    await page.locator('#token').fill(token)
    await page.locator('#login-form button').click()
  }
  /** Until the page has drawn `renders` more answers and every plot has at least two points. */
  const drawn = async (renders: number) => {
    await page.waitForFunction(
      (n) =>
        Number(document.body.dataset.ready ?? 0) >= n &&
        Array.from(document.querySelectorAll<SVGElement>('svg[data-series]')).every(
          (svg) => Number(svg.dataset.points) >= 2,
        ),
      renders,
      { timeout: 20_000 },
    )
  }
  await page.goto(`${env('FLUXRT_URL')}/status`)
  await prompt()
  await submit(env('TOKEN_ALICE'))
  await page.locator('#login-message', { hasText: 'refused' }).waitFor()
  await prompt()
  await submit(env('TOKEN_SERVICE'))
  await drawn(1)
  await page.reload()
  await drawn(2)
  const loginAfterReload = await login.isVisible()
  const shown = await page.evaluate(() => ({
    values: Object.fromEntries(
      Array.from(document.querySelectorAll<HTMLElement>('[data-stat]')).map((e) => [e.dataset.stat, e.dataset.value]),
    ),
    texts: Object.fromEntries(
      Array.from(document.querySelectorAll<HTMLElement>('[data-stat]')).map((e) => [e.dataset.stat, e.textContent]),
    ),
    channels: Array.from(document.querySelectorAll<HTMLElement>('#channels tr')).map((tr) => [
      tr.dataset.channel,
      Number(tr.querySelector('td.n')?.textContent),
    ]),
    points: Object.fromEntries(
      Array.from(document.querySelectorAll<SVGElement>('svg[data-series]')).map((svg) => [
        svg.dataset.series,
        svg.querySelector('polyline')?.getAttribute('points')?.split(' ').length ?? 0,
      ]),
    ),
    problem: document.querySelector('#problem')?.hasAttribute('hidden')
      ? null
      : document.querySelector('#problem')?.textContent,
  }))
  await page.screenshot({ path: env('SCREENSHOT'), fullPage: true })
  await context.close()
  return { ...shown, prompts, loginAfterReload, origins: [...origins] }
}

/**
 * examples/react-todos as alice over wss:// (tests/test_sdk_react.py): FLUXRT_URL is https://127.0.0.1:PORT and
 * fluxrt's certificate comes from a CA made at test time, which this browser trusts through the NSS database in its
 * HOME. A row inserted shows in the list. Then a browser run with UNTRUSTING_HOME (no such database) opens the same
 * page: its WebSocket must be refused and the list never live.
 */
async function reactTodosOverWss(browser: Browser, log: string[]) {
  const fluxrt = new Fluxrt()
  await fluxrt.start()
  try {
    const url = `${env('PAGES_URL')}/?token=${env('TOKEN_ALICE')}&server=${env('FLUXRT_URL')}`
    await sql("INSERT INTO public.todos (owner, title) VALUES ('alice', 't1')")
    const context = await browser.newContext()
    const page = await open(context, 'react-todos over wss', log)
    const sockets: string[] = []
    page.on('websocket', (socket) => sockets.push(socket.url()))
    await page.goto(url)
    await listIs(page, 'alice', ['alice:t1'])
    await sql("INSERT INTO public.todos (owner, title) VALUES ('alice', 't2')")
    const shown = await listIs(page, 'alice', ['alice:t1', 'alice:t2'])
    const connection = await page.locator('#connection').textContent()
    await context.close()

    const untrusting = await launch(env('UNTRUSTING_HOME'))
    try {
      const page = await open(await untrusting.newContext(), 'react-todos without the CA', log)
      const refused = page.waitForEvent('console', {
        predicate: (message) => /WebSocket connection to .* failed/.test(message.text()),
        timeout: 10_000,
      })
      await page.goto(url)
      const refusal = (await refused).text()
      return {
        shown,
        connection,
        sockets,
        without: {
          refusal,
          connection: await page.locator('#connection').textContent(),
          listStatus: await page.locator('#list-status').textContent(),
        },
      }
    } finally {
      await untrusting.close()
    }
  } finally {
    await fluxrt.close()
  }
}

const scenarios = {
  'live-users': liveUsers,
  chat,
  'react-todos': reactTodos,
  'react-todos-over-wss': reactTodosOverWss,
  status,
} as const

/** Headless Chromium; with `home` as its HOME, whose .pki/nssdb holds the certificate authorities it trusts. */
function launch(home?: string): Promise<Browser> {
  return chromium.launch({
    executablePath: env('CHROMIUM'),
    env: home === undefined ? process.env : { ...process.env, HOME: home },
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
}

async function main(): Promise<void> {
  const which = process.argv[2] as keyof typeof scenarios
  const scenario = scenarios[which]
  if (scenario === undefined) throw new Error(`usage: pages.js ${Object.keys(scenarios).join('|')}`)
  const browser = await launch()
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
