// The connection: one WebSocket per client, shared by all its channels. It routes frames to channels, keeps the
// connection alive (ping every 30 s), reconnects with backoff after the closes docs/protocol.md says to retry, and
// keeps the token fresh. The decisions themselves live in the pure modules (backoff, channelState, presence, token).

import { afterClose, backoffDelay, DEFAULT_RECONNECT, type ReconnectOptions } from './backoff.js'
import { type ChannelHost, RealtimeChannel } from './channel.js'
import type { TableOptions } from './channelState.js'
import { RealtimeError } from './errors.js'
import {
  channelKind,
  type ClientMessage,
  CloseCode,
  decodeServerMessage,
  ProtocolError,
  type Row,
  type ServerMessage,
} from './protocol.js'
import { refreshDelay, tokenExpiry } from './token.js'

/** The part of the WebSocket API the client uses: browsers' WebSocket and the `ws` package both have it. */
export interface WebSocketLike {
  readonly readyState: number
  send(data: string): void
  close(code?: number, reason?: string): void
  addEventListener(type: 'open' | 'message' | 'close' | 'error', listener: (event: any) => void): void
  /** `ws` only: drop the connection without a closing handshake. */
  terminate?(): void
}

export type WebSocketConstructor = new (url: string) => WebSocketLike

/** The reference's connection states. */
export type ConnectionState = 'CONNECTING' | 'OPEN' | 'CLOSING' | 'CLOSED'

export interface StateChange {
  state: ConnectionState
  /** The close code and reason, on the change to CLOSED that a close caused. */
  code?: number
  reason?: string
  /** Set when the client will reconnect by itself after this long. */
  reconnectInMs?: number
  /** Set after close 4001 without `auth.refresh`: setAuth(newToken) reconnects. */
  waitingForToken?: boolean
}

export interface AuthOptions {
  /** The JWT; without one the connection is anonymous. */
  token?: string
  /**
   * Returns a fresh token. Called ahead of the current token's `exp` (the new one is sent with an `auth` message on
   * the live connection) and after the server closed with 4001 (then the client reconnects with it).
   */
  refresh?: () => string | Promise<string>
  /** How long before `exp` to refresh (default 60 s; at most half the token's remaining life). */
  refreshMarginMs?: number
}

export interface RealtimeOptions {
  /** A WebSocket implementation, e.g. `WebSocket` from the `ws` package; default the global WebSocket. */
  WebSocket?: WebSocketConstructor
  /** The server's WebSocket path (fluxrt's `server.path`), default `/realtime`. */
  path?: string
  /** Send a ping this often (default 30 s); a ping unanswered by the next one drops the connection. */
  heartbeatIntervalMs?: number
  /** Give up on a connection attempt after this long (default 10 s). */
  connectTimeoutMs?: number
  /** Backoff between reconnect attempts, or `false` never to reconnect. */
  reconnect?: Partial<ReconnectOptions> | false
}

/** `http(s)://host:port` (or `ws(s)://`) plus the path, with `?token=` when there is one. */
export function realtimeUrl(base: string, path: string, token?: string): string {
  let url: URL
  try {
    url = new URL(base)
  } catch {
    throw new TypeError(`url ${JSON.stringify(base)} is not an absolute URL; expected e.g. http://localhost:8080`)
  }
  const schemes: Record<string, string> = { 'http:': 'ws:', 'https:': 'wss:', 'ws:': 'ws:', 'wss:': 'wss:' }
  const scheme = schemes[url.protocol]
  if (scheme === undefined) {
    throw new TypeError(`url ${JSON.stringify(base)}: expected an http, https, ws or wss URL`)
  }
  url.protocol = scheme
  if (!url.pathname.endsWith(path)) url.pathname = url.pathname.replace(/\/+$/, '') + path
  if (token) url.searchParams.set('token', token)
  return url.toString()
}

type Timer = ReturnType<typeof setTimeout>

export class RealtimeClient {
  private readonly WebSocketImpl: WebSocketConstructor
  private readonly path: string
  private readonly heartbeatIntervalMs: number
  private readonly connectTimeoutMs: number
  private readonly reconnect: ReconnectOptions | false
  private readonly channels = new Map<string, RealtimeChannel<any, any, any>>()
  private readonly pending = new Map<string, { resolve(): void; reject(error: unknown): void }>()
  private readonly stateListeners = new Set<(change: StateChange) => void>()
  private readonly errorListeners = new Set<(error: Error) => void>()
  private closeWaiters: (() => void)[] = []
  private socket: WebSocketLike | undefined
  private token: string | undefined
  /** The token the server accepted last on the current socket: in its URL, or acknowledged after `auth`. */
  private socketToken: string | undefined
  private state: ConnectionState = 'CLOSED'
  /** The user wants a connection: connect() or a subscribe, until disconnect() or a close not to retry. */
  private active = false
  private waitingForToken = false
  private attempt = 0
  private refs = 0
  private awaitingPong = false
  private reconnectTimer: Timer | undefined
  private connectTimer: Timer | undefined
  private heartbeatTimer: ReturnType<typeof setInterval> | undefined
  private refreshTimer: Timer | undefined
  private closeTimer: Timer | undefined
  private readonly host: ChannelHost

  constructor(
    private readonly url: string,
    private readonly auth: AuthOptions = {},
    options: RealtimeOptions = {},
  ) {
    const implementation =
      options.WebSocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket ?? undefined
    if (implementation === undefined) {
      throw new TypeError(
        'no WebSocket implementation: this runtime has no global WebSocket (Node.js before 22). ' +
          "Install ws (npm install ws) and pass it: import WebSocket from 'ws'; " +
          'createClient({ url, auth, realtime: { WebSocket } })',
      )
    }
    this.WebSocketImpl = implementation
    this.path = options.path ?? '/realtime'
    this.heartbeatIntervalMs = options.heartbeatIntervalMs ?? 30_000
    this.connectTimeoutMs = options.connectTimeoutMs ?? 10_000
    this.reconnect = options.reconnect === false ? false : { ...DEFAULT_RECONNECT, ...options.reconnect }
    this.token = auth.token
    // A malformed url fails here, not at the first subscribe.
    realtimeUrl(url, this.path)
    this.host = {
      isOpen: () => this.state === 'OPEN' && this.socket !== undefined,
      nextRef: () => String(++this.refs),
      request: (message) => this.request(message),
      ensureConnected: () => this.connect(),
      forget: (channel) => {
        if (this.channels.get(channel.name) === channel) this.channels.delete(channel.name)
      },
    }
  }

  /**
   * The channel named `name` (`table:public.users`, `presence:lobby`, `broadcast:chat`). Asking again before it
   * ended (unsubscribed) returns the same object; table channels take `{ event, filter }`.
   */
  channel<R = Row, B = unknown, S = Record<string, unknown>>(
    name: string,
    options: TableOptions = {},
  ): RealtimeChannel<R, B, S> {
    const kind = channelKind(name)
    if (kind !== 'table' && (options.event !== undefined || options.filter !== undefined)) {
      throw new TypeError(`channel(${JSON.stringify(name)}, options): event and filter apply to table: channels only`)
    }
    const existing = this.channels.get(name)
    if (existing !== undefined) {
      if (existing.options.event !== options.event || existing.options.filter !== options.filter) {
        throw new TypeError(
          `${name} is already open on this client with other options; the server keeps one subscription per ` +
            'channel and connection: unsubscribe it first, or use a second client',
        )
      }
      return existing as RealtimeChannel<R, B, S>
    }
    const channel = new RealtimeChannel<R, B, S>(name, kind, { ...options }, this.host)
    this.channels.set(name, channel)
    return channel
  }

  /** The channels made and not yet ended. */
  getChannels(): RealtimeChannel<any, any, any>[] {
    return [...this.channels.values()]
  }

  /** Unsubscribe `channel` and forget it. */
  async removeChannel(channel: RealtimeChannel<any, any, any>): Promise<void> {
    try {
      await channel.unsubscribe()
    } finally {
      this.host.forget(channel)
    }
  }

  connectionState(): ConnectionState {
    return this.state
  }

  /** Calls `listener` on every change of connection state; returns a function that stops it. */
  onStateChange(listener: (change: StateChange) => void): () => void {
    this.stateListeners.add(listener)
    return () => this.stateListeners.delete(listener)
  }

  /** Errors that concern the connection rather than one channel (a refused token, a close not to retry, ...). */
  onError(listener: (error: Error) => void): () => void {
    this.errorListeners.add(listener)
    return () => this.errorListeners.delete(listener)
  }

  /** Open the connection (subscribing does it by itself). */
  connect(): void {
    if (this.active) return
    this.active = true
    this.attempt = 0
    this.scheduleRefresh()
    this.open()
  }

  /** Close the connection for good: every channel reports CLOSED. Resolves once the socket is closed. */
  disconnect(code: number = CloseCode.NORMAL, reason = 'client disconnect'): Promise<void> {
    this.active = false
    this.waitingForToken = false
    clearTimeout(this.reconnectTimer)
    clearTimeout(this.refreshTimer)
    const error = new RealtimeError('CLOSED', 'the client was disconnected (disconnect())')
    for (const channel of this.channels.values()) channel._terminated()
    const socket = this.socket
    if (socket === undefined) {
      if (this.state !== 'CLOSED') this.setState({ state: 'CLOSED' })
      this.rejectPending(error)
      return Promise.resolve()
    }
    const closed = new Promise<void>((resolve) => this.closeWaiters.push(resolve))
    this.setState({ state: 'CLOSING' })
    // A dead peer never answers the closing handshake: give up on it after a while.
    this.closeTimer = setTimeout(() => this.closed(socket, CloseCode.ABNORMAL, 'no close handshake'), 2000)
    try {
      socket.close(code, reason)
    } catch {
      this.closed(socket, CloseCode.ABNORMAL, 'close failed')
    }
    return closed
  }

  /**
   * Use `token` from now on. On a live connection it is sent with an `auth` message and the promise settles with
   * the server's answer; otherwise the next connection uses it (and a client waiting after 4001 reconnects now).
   */
  setAuth(token: string): Promise<void> {
    this.token = token
    this.scheduleRefresh()
    if (this.waitingForToken) {
      this.waitingForToken = false
      this.attempt = 0
      if (this.active) this.open()
      return Promise.resolve()
    }
    if (this.host.isOpen()) return this.sendAuth()
    return Promise.resolve()
  }

  // ---- the socket ------------------------------------------------------------------------------------------------

  private open(): void {
    clearTimeout(this.reconnectTimer)
    this.reconnectTimer = undefined
    if (!this.active || this.socket !== undefined) return
    let socket: WebSocketLike
    try {
      socket = new this.WebSocketImpl(realtimeUrl(this.url, this.path, this.token))
    } catch (error) {
      this.active = false
      this.setState({ state: 'CLOSED' })
      this.emitError(new RealtimeError('CLOSED', `cannot open a WebSocket to ${this.url}: ${String(error)}`))
      return
    }
    this.socket = socket
    this.socketToken = this.token
    this.setState({ state: 'CONNECTING' })
    socket.addEventListener('open', () => this.opened(socket))
    socket.addEventListener('message', (event: { data: unknown }) => this.received(socket, event.data))
    socket.addEventListener('close', (event: { code?: number; reason?: string }) =>
      this.closed(socket, event.code ?? CloseCode.ABNORMAL, event.reason ?? ''),
    )
    // Every error is followed by a close event, which is where it is handled.
    socket.addEventListener('error', () => {})
    this.connectTimer = setTimeout(
      () => this.abandon(socket, `no connection within ${this.connectTimeoutMs} ms (realtime.connectTimeoutMs)`),
      this.connectTimeoutMs,
    )
  }

  private opened(socket: WebSocketLike): void {
    if (socket !== this.socket) return
    clearTimeout(this.connectTimer)
    this.setState({ state: 'OPEN' })
    this.awaitingPong = false
    this.heartbeatTimer = setInterval(() => this.heartbeat(socket), this.heartbeatIntervalMs)
    // A token set while this connection was being made: the server must hear it before anything else.
    if (this.token !== undefined && this.token !== this.socketToken) {
      this.sendAuth().catch((error: RealtimeError) => {
        // A lost connection speaks for itself (the state change); a refused token is worth telling.
        if (error.code !== 'DISCONNECTED') this.emitError(error)
      })
    }
    for (const channel of [...this.channels.values()]) channel._socketOpened()
  }

  private heartbeat(socket: WebSocketLike): void {
    if (socket !== this.socket) return
    if (this.awaitingPong) {
      this.abandon(socket, `no answer to a ping within ${this.heartbeatIntervalMs} ms`)
      return
    }
    this.awaitingPong = true
    this.sendNow({ type: 'ping' })
  }

  /** Drop a connection that stopped answering, and carry on as if it had closed abnormally. */
  private abandon(socket: WebSocketLike, reason: string): void {
    if (socket !== this.socket) return
    this.closed(socket, CloseCode.ABNORMAL, reason)
    try {
      if (socket.terminate !== undefined) socket.terminate()
      else socket.close(4000, reason)
    } catch {
      // Already closed: nothing to release.
    }
  }

  private received(socket: WebSocketLike, data: unknown): void {
    if (socket !== this.socket) return
    this.awaitingPong = false
    let message: ServerMessage
    try {
      message = decodeServerMessage(typeof data === 'string' ? data : new TextDecoder().decode(data as ArrayBuffer))
    } catch (error) {
      this.emitError(error instanceof ProtocolError ? error : new ProtocolError(String(error)))
      return
    }
    // Anything but an error means this connection works: the next failure starts the backoff afresh.
    if (message.type !== 'error') this.attempt = 0
    switch (message.type) {
      case 'ack': {
        this.settle(message.ref, undefined)
        if (message.channel !== undefined) {
          this.channels.get(message.channel)?._ack(message.status, message.ref, message.recovered)
        }
        break
      }
      case 'error': {
        const error = new RealtimeError(message.code, message.message, message.channel)
        const answered = this.settle(message.ref, error)
        const channel = message.channel === undefined ? undefined : this.channels.get(message.channel)
        if (channel !== undefined) channel._error(message)
        else if (!answered) this.emitError(error)
        break
      }
      case 'pong':
        break
      default:
        this.channels.get(message.channel)?._receive(message)
    }
  }

  private closed(socket: WebSocketLike, code: number, reason: string): void {
    if (socket !== this.socket) return
    this.socket = undefined
    clearTimeout(this.connectTimer)
    clearTimeout(this.closeTimer)
    clearInterval(this.heartbeatTimer)
    this.rejectPending(
      new RealtimeError('DISCONNECTED', `the connection closed (${code}${reason ? `: ${reason}` : ''}) before the server answered`),
    )
    for (const channel of [...this.channels.values()]) channel._socketClosed()
    if (!this.active) {
      this.setState({ state: 'CLOSED', code, reason })
      for (const resolve of this.closeWaiters.splice(0)) resolve()
      return
    }
    const decision = this.reconnect === false ? undefined : afterClose(code, this.attempt, this.reconnect)
    if (decision === undefined || decision.action === 'stop') {
      this.active = false
      clearTimeout(this.refreshTimer)
      const why = decision === undefined ? 'reconnect is off (realtime.reconnect: false)' : decision.reason
      const error = new RealtimeError('CLOSED', `the connection closed for good: ${why}`)
      for (const channel of this.channels.values()) channel._terminated(error)
      this.setState({ state: 'CLOSED', code, reason })
      this.emitError(error)
      return
    }
    if (decision.action === 'reauth') {
      this.reauthenticate(code, reason, this.reconnect as ReconnectOptions)
      return
    }
    this.attempt += 1
    this.setState({ state: 'CLOSED', code, reason, reconnectInMs: decision.delayMs })
    this.reconnectTimer = setTimeout(() => this.open(), decision.delayMs)
  }

  /** After 4001: reconnect with a token from `auth.refresh`, or wait for setAuth(). Never with the same token. */
  private reauthenticate(code: number, reason: string, backoff: ReconnectOptions): void {
    const refresh = this.auth.refresh
    const wait = (): void => {
      this.waitingForToken = true
      const error = new RealtimeError(
        'UNAUTHORIZED',
        'the server refused the token or it expired (close 4001): call setAuth(newToken) to reconnect, ' +
          'or give createClient an auth.refresh callback',
      )
      for (const channel of [...this.channels.values()]) channel._interrupted(error)
      this.setState({ state: 'CLOSED', code, reason, waitingForToken: true })
    }
    // The token the server refused is the one this connection was made with (or last sent with `auth`).
    const refused = this.socketToken
    const replaced = this.token !== undefined && this.token !== refused
    if (refresh === undefined && !replaced) {
      wait()
      return
    }
    const delayMs = backoffDelay(this.attempt, backoff)
    this.attempt += 1
    this.setState({ state: 'CLOSED', code, reason, reconnectInMs: delayMs })
    if (replaced || refresh === undefined) {
      // A new token arrived meanwhile (setAuth, or the refresh ahead of expiry): reconnect with it.
      this.reconnectTimer = setTimeout(() => this.open(), delayMs)
      return
    }
    Promise.resolve()
      .then(refresh)
      .then(
        (token) => {
          if (!this.active) return
          if (typeof token !== 'string' || token === refused) {
            throw new TypeError('auth.refresh returned no new token')
          }
          this.token = token
          this.scheduleRefresh()
          this.reconnectTimer = setTimeout(() => this.open(), delayMs)
        },
      )
      .catch((error: unknown) => {
        if (!this.active) return
        this.emitError(new RealtimeError('UNAUTHORIZED', `auth.refresh failed after close 4001: ${String(error)}`))
        wait()
      })
  }

  // ---- requests ------------------------------------------------------------------------------------------------

  private request(message: ClientMessage & { ref: string }): Promise<void> {
    const promise = new Promise<void>((resolve, reject) => {
      if (!this.host.isOpen()) {
        reject(new RealtimeError('DISCONNECTED', `cannot send ${message.type}: not connected`))
        return
      }
      this.pending.set(message.ref, { resolve, reject })
      this.sendNow(message)
    })
    promise.catch(() => {})
    return promise
  }

  private sendNow(message: ClientMessage): void {
    this.socket?.send(JSON.stringify(message))
  }

  private sendAuth(): Promise<void> {
    const token = this.token as string
    const accepted = this.request({ type: 'auth', token, ref: this.host.nextRef() }).then(() => {
      this.socketToken = token
    })
    accepted.catch(() => {})
    return accepted
  }

  /** Settle the request `ref` if one waits; returns whether one did. */
  private settle(ref: string | undefined, error: RealtimeError | undefined): boolean {
    const waiter = ref === undefined ? undefined : this.pending.get(ref)
    if (waiter === undefined || ref === undefined) return false
    this.pending.delete(ref)
    if (error === undefined) waiter.resolve()
    else waiter.reject(error)
    return true
  }

  private rejectPending(error: RealtimeError): void {
    const waiters = [...this.pending.values()]
    this.pending.clear()
    for (const waiter of waiters) waiter.reject(error)
  }

  // ---- token refresh -------------------------------------------------------------------------------------------

  private scheduleRefresh(): void {
    clearTimeout(this.refreshTimer)
    const refresh = this.auth.refresh
    const token = this.token
    if (refresh === undefined || token === undefined || !this.active) return
    const delay = refreshDelay(token, Date.now(), this.auth.refreshMarginMs ?? 60_000)
    if (delay === undefined) return
    // setTimeout holds at most 2^31-1 ms (24.8 days); a longer wait is taken in steps.
    const step = Math.min(delay, 2 ** 31 - 1)
    this.refreshTimer = setTimeout(() => {
      if (step < delay) this.scheduleRefresh()
      else void this.refreshNow(token, refresh)
    }, step)
  }

  private async refreshNow(old: string, refresh: () => string | Promise<string>): Promise<void> {
    try {
      const token = await refresh()
      if (!this.active || this.token !== old) return
      if (typeof token !== 'string' || (tokenExpiry(token) ?? Infinity) <= (tokenExpiry(old) ?? -Infinity)) {
        throw new TypeError('auth.refresh returned a token that expires no later than the current one')
      }
      await this.setAuth(token)
    } catch (error) {
      this.emitError(new RealtimeError('UNAUTHORIZED', `token refresh failed: ${String(error)}`))
    }
  }

  // ---- listeners ------------------------------------------------------------------------------------------------

  private setState(change: StateChange): void {
    this.state = change.state
    for (const listener of [...this.stateListeners]) {
      try {
        listener(change)
      } catch (error) {
        console.error('@fluxbase/sdk: an onStateChange listener threw', error)
      }
    }
  }

  private emitError(error: Error): void {
    for (const listener of [...this.errorListeners]) {
      try {
        listener(error)
      } catch (thrown) {
        console.error('@fluxbase/sdk: an onError listener threw', thrown)
      }
    }
  }
}
