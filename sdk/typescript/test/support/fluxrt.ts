// What the live tests share: a real fluxrt started as a child process (so a test can stop and restart it), SQL on
// the scratch database through `pg`, tokens signed with the server's secret, and waiting with deadlines.
//
// tests/test_sdk_typescript.py prepares everything and passes it in the environment:
//   SDK_TEST_FLUXRT   the command that runs fluxrt, as a JSON array (e.g. [".venv/bin/python", "-m", "fluxrt_trio"])
//   SDK_TEST_CONFIG   a fluxrt.yaml with a free server.port, auth.jwt_secret, database.dsn, a short poll interval
//   SDK_TEST_URL      http://127.0.0.1:PORT, the server that config describes
//   SDK_TEST_DSN      the scratch database (public.users exists and is realtime-enabled)
//   SDK_TEST_SECRET   auth.jwt_secret
//   SDK_TEST_LOG      a file to append fluxrt's output to (printed by pytest when node fails)

import { type ChildProcess, spawn } from 'node:child_process'
import { createHmac } from 'node:crypto'
import { createWriteStream, type WriteStream } from 'node:fs'
import { once } from 'node:events'
import { createServer } from 'node:net'
import type { AddressInfo } from 'node:net'
import {
  type AuthOptions,
  createClient,
  type FluxbaseClient,
  type RealtimeOptions,
  type StateChange,
  type WebSocketConstructor,
} from '@fluxbase/sdk'
import pg from 'pg'
import WebSocket from 'ws'

function required(name: string): string {
  const value = process.env[name]
  if (!value) {
    throw new Error(
      `${name} is not set: the live tests run from pytest (tests/test_sdk_typescript.py), which starts PostgreSQL ` +
        'and describes fluxrt in SDK_TEST_* variables; run `.venv/bin/pytest tests/test_sdk_typescript.py`',
    )
  }
  return value
}

export const env = {
  get url(): string {
    return required('SDK_TEST_URL')
  },
  get dsn(): string {
    return required('SDK_TEST_DSN')
  },
  get secret(): string {
    return required('SDK_TEST_SECRET')
  },
}

// ---- tokens ---------------------------------------------------------------------------------------------------

function base64url(data: string | Buffer): string {
  return Buffer.from(data).toString('base64url')
}

/** An HS256 token as fluxrt's `fluxrt token` makes them; `ttl` in seconds (negative: already expired). */
export function token(sub: string, { ttl = 3600, role }: { ttl?: number; role?: string } = {}): string {
  const now = Math.floor(Date.now() / 1000)
  const claims: Record<string, unknown> = { sub, iat: now, exp: now + ttl }
  if (role !== undefined) claims.role = role
  const signed = `${base64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' }))}.${base64url(JSON.stringify(claims))}`
  return `${signed}.${createHmac('sha256', env.secret).update(signed).digest('base64url')}`
}

// ---- SQL ------------------------------------------------------------------------------------------------------

export async function sql(text: string, params: unknown[] = []): Promise<pg.QueryResult> {
  const client = new pg.Client({ connectionString: env.dsn })
  await client.connect()
  try {
    return await client.query(text, params)
  } finally {
    await client.end()
  }
}

// ---- waiting --------------------------------------------------------------------------------------------------

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms))
}

/** Poll `check` until it returns something other than undefined/false; fail naming `what` after `timeoutMs`. */
export async function waitFor<T>(what: string, check: () => T | undefined | false, timeoutMs = 5000): Promise<T> {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    const value = check()
    if (value !== undefined && value !== false) return value
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`)
    await sleep(10)
  }
}

/** Events as they arrive, to be awaited one at a time. */
export class Inbox<T> {
  readonly items: T[] = []
  private taken = 0

  push = (item: T): void => {
    this.items.push(item)
  }

  /** The next item not yet taken, waiting for it up to `timeoutMs`. */
  async next(what = 'the next event', timeoutMs = 5000): Promise<T> {
    const item = await waitFor(what, () => (this.items.length > this.taken ? [this.items[this.taken]] : undefined), timeoutMs)
    this.taken += 1
    return item[0] as T
  }

  /** Items that arrived and were not taken. */
  rest(): T[] {
    return this.items.slice(this.taken)
  }
}

/** Inserts into public.users on one connection, one row every `everyMs`, until stopped; keeps the committed ids. */
export class Writer {
  readonly committed: number[] = []
  private running = true
  private readonly done: Promise<void>

  /** Every row is named `prefix` followed by its commit time, so that a test picks out its own rows. */
  constructor(everyMs: number, prefix: string) {
    this.done = this.run(everyMs, prefix)
    this.done.catch(() => {})
  }

  private async run(everyMs: number, prefix: string): Promise<void> {
    const db = new pg.Client({ connectionString: env.dsn })
    await db.connect()
    try {
      while (this.running) {
        const result = await db.query<{ id: number }>(
          'INSERT INTO public.users (name) VALUES ($1 || clock_timestamp()) RETURNING id',
          [prefix],
        )
        this.committed.push(result.rows[0]!.id)
        await sleep(everyMs)
      }
    } finally {
      await db.end()
    }
  }

  /** Stop after the insert in flight; rejects if an insert failed. */
  stop(): Promise<void> {
    this.running = false
    return this.done
  }
}

// ---- the server -----------------------------------------------------------------------------------------------

export class Fluxrt {
  private child: ChildProcess | undefined
  private log: WriteStream | undefined
  private exited: Promise<unknown> | undefined

  async start(): Promise<void> {
    const command = JSON.parse(required('SDK_TEST_FLUXRT')) as string[]
    const [program, ...args] = command
    if (program === undefined) throw new Error('SDK_TEST_FLUXRT is an empty command')
    this.log ??= createWriteStream(required('SDK_TEST_LOG'), { flags: 'a' })
    this.log.write(`--- starting ${command.join(' ')} --config ${required('SDK_TEST_CONFIG')}\n`)
    const child = spawn(program, [...args, '--config', required('SDK_TEST_CONFIG')], {
      stdio: ['ignore', 'pipe', 'pipe'],
    })
    this.child = child
    child.stdout?.pipe(this.log, { end: false })
    child.stderr?.pipe(this.log, { end: false })
    this.exited = once(child, 'exit')
    const early = this.exited.then(() => {
      throw new Error(`fluxrt exited during start-up with status ${child.exitCode}; its output is in SDK_TEST_LOG`)
    })
    await Promise.race([early, this.ready()])
    early.catch(() => {})
  }

  /** Until /health says the database is ready (the server then serves table channels). */
  private async ready(): Promise<void> {
    const deadline = Date.now() + 30_000
    for (;;) {
      try {
        const response = await fetch(`${env.url}/health`)
        const body = (await response.json()) as { database?: unknown }
        if (response.ok && body.database === 'ok') return
      } catch {
        // Not listening yet.
      }
      if (Date.now() > deadline) throw new Error('fluxrt did not report a ready database on /health within 30 s')
      await sleep(50)
    }
  }

  /** SIGTERM, as an operator would: connections are closed with 1001 and the process exits. */
  async stop(): Promise<void> {
    const child = this.child
    if (child === undefined || child.exitCode !== null || child.signalCode !== null) return
    child.kill('SIGTERM')
    const killed = setTimeout(() => child.kill('SIGKILL'), 15_000)
    await this.exited
    clearTimeout(killed)
    this.child = undefined
  }

  /**
   * SIGKILL, as `kill -9` or the OOM killer would: no close frames, no goodbye to the database. Resolves once the
   * process has exited; start() then runs a new one on the same port.
   */
  async kill(): Promise<void> {
    const child = this.child
    if (child === undefined || child.exitCode !== null || child.signalCode !== null) return
    child.kill('SIGKILL')
    await this.exited
    this.child = undefined
  }

  /** Pause or resume the process, so that it answers nothing while the sockets stay open. */
  signal(signal: 'SIGSTOP' | 'SIGCONT'): void {
    this.child?.kill(signal)
  }

  async close(): Promise<void> {
    await this.stop()
    this.log?.end()
  }
}

// ---- clients --------------------------------------------------------------------------------------------------

const made: FluxbaseClient[] = []

/** A client on the `ws` package with fast reconnects, disconnected by `disconnectAll()`. */
export function client(
  auth: AuthOptions = {},
  realtime: RealtimeOptions = {},
): FluxbaseClient {
  const one = createClient({
    url: env.url,
    auth,
    realtime: { WebSocket, reconnect: { baseDelayMs: 50, maxDelayMs: 400, rateLimitedDelayMs: 200 }, ...realtime },
  })
  made.push(one)
  return one
}

export async function disconnectAll(): Promise<void> {
  await Promise.all(made.splice(0).map((one) => one.realtime.disconnect()))
}

/** Where a Line's connection attempts go while it is down: a port that accepts TCP connections and drops them. */
let dropping: Promise<number> | undefined

function droppingPort(): Promise<number> {
  dropping ??= new Promise((resolve, reject) => {
    const server = createServer((socket) => socket.destroy())
    server.once('error', reject)
    server.listen(0, '127.0.0.1', () => resolve((server.address() as AddressInfo).port))
    // It lives as long as the test file and must not keep the process alive.
    server.unref()
  })
  return dropping
}

/**
 * A client's network, passed as `realtime.WebSocket`: the `ws` sockets it opens, the frames it sent on them, and a
 * way to cut the current connection as a failing network does, without a closing handshake. Through the public
 * WebSocket option, because the client keeps its socket to itself.
 */
export class Line {
  /** Every frame the client sent, parsed, across all its connections. */
  readonly sent: Record<string, unknown>[] = []
  readonly WebSocket: WebSocketConstructor
  private current: WebSocket | undefined
  private downUntil = 0

  private constructor(dropPort: number) {
    const line = this
    this.WebSocket = class extends WebSocket {
      constructor(url: string) {
        let target = url
        if (Date.now() < line.downUntil) {
          const moved = new URL(url)
          moved.host = `127.0.0.1:${dropPort}`
          target = moved.toString()
        }
        super(target)
        line.current = this
        const send = this.send.bind(this)
        this.send = ((data: string) => {
          line.sent.push(JSON.parse(data) as Record<string, unknown>)
          send(data)
        }) as typeof this.send
      }
    }
  }

  static async create(): Promise<Line> {
    return new Line(await droppingPort())
  }

  /**
   * Destroy the current connection's TCP socket: the client sees close 1006 and the server a connection that ended
   * without a close frame; frames in flight are lost. For `downForMs` after, every connection attempt is dropped
   * before the WebSocket handshake, so the client is away at least that long.
   */
  cut(downForMs = 0): void {
    this.downUntil = Date.now() + downForMs
    this.current?.terminate()
  }

  /** The subscribe frames sent for `channel`, in order. */
  subscribes(channel: string): Record<string, unknown>[] {
    return this.sent.filter((frame) => frame.type === 'subscribe' && frame.channel === channel)
  }
}

/** Every connection state a client goes through, from now on. */
export function states(one: FluxbaseClient): StateChange[] {
  const seen: StateChange[] = []
  one.realtime.onStateChange((change) => seen.push(change))
  return seen
}
