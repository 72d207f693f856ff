// A fake fluxrt behind the SDK's `realtime.WebSocket` option: it records every frame the client sends and answers
// them as docs/protocol.md says (acks with the refs, presence syncs and diffs), and lets a test deliver changes,
// drop the connection and decide whether a resume is recovered. Everything happens on Node's event loop, so a test
// awaits settle() (inside act()) after each step.

import { createClient, type FluxbaseClient, type WebSocketConstructor, type WebSocketLike } from '@fluxbase/sdk'

export type Frame = Record<string, any>

type Listener = (event: any) => void

export class FakeSocket implements WebSocketLike {
  readyState = 0
  private readonly listeners: Record<string, Listener[]> = {}

  constructor(
    readonly url: string,
    private readonly server: FakeServer,
  ) {}

  addEventListener(type: string, listener: Listener): void {
    ;(this.listeners[type] ??= []).push(listener)
  }

  emit(type: string, event: unknown): void {
    for (const listener of this.listeners[type] ?? []) listener(event)
  }

  send(data: string): void {
    if (this.readyState !== 1) throw new Error('send on a socket that is not open')
    this.server.received(this, JSON.parse(data) as Frame)
  }

  close(code = 1000, reason = ''): void {
    if (this.readyState >= 2) return
    this.readyState = 2
    setTimeout(() => this.server.closed(this, code, reason), 0)
  }

  /** The server sends `frame`. */
  push(frame: Frame): void {
    if (this.readyState === 1) this.emit('message', { data: JSON.stringify(frame) })
  }
}

export class FakeServer {
  /** Every frame the client sent, across its connections. */
  readonly frames: Frame[] = []
  readonly sockets: FakeSocket[] = []
  /** What a subscribe with `since` is answered: recovered or not. */
  recovered = true
  /** Answer subscribes (set false to hold the acks back; ackSubscribes() sends them). */
  autoAck = true
  /** Open new connections (set false to leave them connecting until accept()). */
  accepting = true
  /** Refuse every subscribe with this error instead of acking it. */
  refuse: { code: string; message: string } | undefined
  /** Presence as the server holds it, per room: { key: [{ ref, state }] }. */
  readonly presence = new Map<string, Record<string, { ref: string; state: unknown }[]>>()
  private readonly held: { socket: FakeSocket; frame: Frame }[] = []
  private nextId = 0
  readonly WebSocket: WebSocketConstructor

  constructor(readonly user = 'alice') {
    const server = this
    this.WebSocket = class extends FakeSocket {
      constructor(url: string) {
        super(url, server)
        server.sockets.push(this)
        if (server.accepting) setTimeout(() => server.accept(), 0)
      }
    } as unknown as WebSocketConstructor
  }

  /** A client on this server with reconnects after 1 ms. */
  client(): FluxbaseClient {
    return createClient({
      url: 'http://fluxrt.test',
      realtime: {
        WebSocket: this.WebSocket,
        reconnect: { baseDelayMs: 1, maxDelayMs: 1, rateLimitedDelayMs: 1 },
        heartbeatIntervalMs: 3_600_000,
      },
    })
  }

  get socket(): FakeSocket {
    const socket = this.sockets[this.sockets.length - 1]
    if (socket === undefined) throw new Error('the client opened no connection')
    return socket
  }

  /** The frames of `type` (and on `channel`) the client sent. */
  sent(type: string, channel?: string): Frame[] {
    return this.frames.filter((frame) => frame.type === type && (channel === undefined || frame.channel === channel))
  }

  received(socket: FakeSocket, frame: Frame): void {
    this.frames.push(frame)
    const { channel, ref } = frame
    switch (frame.type) {
      case 'subscribe':
        if (this.autoAck) this.ackSubscribe(socket, frame)
        else this.held.push({ socket, frame })
        break
      case 'unsubscribe':
        this.leave(channel, socket)
        socket.push({ type: 'ack', channel, status: 'unsubscribed', ref })
        break
      case 'presence': {
        socket.push({ type: 'ack', channel, status: frame.event === 'track' ? 'tracked' : 'untracked', ref })
        const room = this.presence.get(channel) ?? {}
        const left = room[this.user] ?? []
        const joined = frame.event === 'track' ? [{ ref: 'conn-1', state: frame.payload }] : []
        if (joined.length > 0) room[this.user] = joined
        else delete room[this.user]
        this.presence.set(channel, room)
        const diff = { joins: joined.length ? { [this.user]: joined } : {}, leaves: left.length ? { [this.user]: left } : {} }
        socket.push({ type: 'presence', channel, event: 'diff', payload: diff })
        break
      }
      case 'broadcast':
        socket.push({ type: 'ack', channel, status: 'sent', ref })
        break
      case 'ping':
        socket.push({ type: 'pong', ref })
        break
    }
  }

  /** Open the connections that are still connecting, and go on accepting. */
  accept(): void {
    this.accepting = true
    for (const socket of this.sockets) {
      if (socket.readyState !== 0) continue
      socket.readyState = 1
      socket.emit('open', {})
    }
  }

  /** Answer the subscribes held back while autoAck was off. */
  ackSubscribes(): void {
    for (const { socket, frame } of this.held.splice(0)) this.ackSubscribe(socket, frame)
  }

  private ackSubscribe(socket: FakeSocket, frame: Frame): void {
    if (this.refuse !== undefined) {
      socket.push({ type: 'error', ...this.refuse, channel: frame.channel, ref: frame.ref })
      return
    }
    const ack: Frame = { type: 'ack', channel: frame.channel, status: 'subscribed', ref: frame.ref }
    if (frame.since !== undefined) ack.recovered = this.recovered
    socket.push(ack)
    if (String(frame.channel).startsWith('presence:')) {
      socket.push({ type: 'presence', channel: frame.channel, event: 'sync', payload: this.presence.get(frame.channel) ?? {} })
    }
  }

  private leave(channel: string, _socket: FakeSocket): void {
    const room = this.presence.get(channel)
    if (room !== undefined) delete room[this.user]
  }

  /** A table change on `table:public.{table}`, with a fresh position. */
  change(table: string, type: 'INSERT' | 'UPDATE' | 'DELETE' | 'TRUNCATE', rows: { record?: unknown; old_record?: unknown } = {}): void {
    const payload = { type, schema: 'public', table, id: `p${++this.nextId}`, ...rows }
    this.socket.push({ type: 'broadcast', channel: `table:public.${table}`, payload })
  }

  /** Another connection's user `key` enters or leaves a room. */
  others(channel: string, key: string, state: unknown | undefined): void {
    const room = this.presence.get(channel) ?? {}
    const left = room[key] ?? []
    const joined = state === undefined ? [] : [{ ref: `conn-${key}`, state }]
    if (joined.length > 0) room[key] = joined
    else delete room[key]
    this.presence.set(channel, room)
    const diff = { joins: joined.length ? { [key]: joined } : {}, leaves: left.length ? { [key]: left } : {} }
    // Before the client connected, the sync after its subscribe carries it.
    if (this.sockets.length > 0) this.socket.push({ type: 'presence', channel, event: 'diff', payload: diff })
  }

  /** The connection drops (1006); the client reconnects after 1 ms. */
  drop(): void {
    const socket = this.socket
    socket.readyState = 3
    socket.emit('close', { code: 1006, reason: '' })
  }

  closed(socket: FakeSocket, code: number, reason: string): void {
    socket.readyState = 3
    socket.emit('close', { code, reason })
  }
}

/** Let the event loop run until timers of up to a few ms and their microtasks are done. */
export async function settle(rounds = 5): Promise<void> {
  for (let i = 0; i < rounds; i += 1) await new Promise((resolve) => setTimeout(resolve, 2))
}
