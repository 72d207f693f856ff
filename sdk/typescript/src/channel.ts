// One channel of a RealtimeClient: the user's handlers, the subscription (through ChannelMachine) and the presence
// state of the room. The client hands it the frames that name it.

import {
  type ChannelEffect,
  ChannelMachine,
  type ChannelPhase,
  type ChannelStatus,
  type SubscribedInfo,
  type SubscribeOptions,
  type TableOptions,
} from './channelState.js'
import { RealtimeError } from './errors.js'
import { applyDiff, type PresenceChange, type PresenceJoin, type PresenceLeave, syncState } from './presence.js'
import {
  type BroadcastEvent,
  type ChangePayload,
  type ChannelKind,
  type ClientMessage,
  type DeletePayload,
  type ErrorMessage,
  type InsertPayload,
  isChangePayload,
  type PresenceDiffEvent,
  type PresenceState,
  type PresenceSyncEvent,
  type Row,
  type TruncatePayload,
  type UpdatePayload,
} from './protocol.js'

/** `info` comes with SUBSCRIBED only: `info.recovered` says whether the events the channel missed follow. */
export type SubscribeCallback = (status: ChannelStatus, error?: RealtimeError, info?: SubscribedInfo) => void

/** What a channel needs from its client. */
export interface ChannelHost {
  isOpen(): boolean
  nextRef(): string
  /** Send now; the returned promise settles with the server's ack or error for `message.ref`. */
  request(message: ClientMessage & { ref: string }): Promise<void>
  ensureConnected(): void
  /** The channel ended (CLOSED): a later channel(name) makes a new one. */
  forget(channel: RealtimeChannel<any, any, any>): void
}

interface Deferred<T> {
  resolve(value: T): void
  reject(error: unknown): void
}

/** A promise that never counts as unhandled: callers may await it or ignore it. */
function deferred<T>(): { promise: Promise<T> } & Deferred<T> {
  let resolve!: (value: T) => void
  let reject!: (error: unknown) => void
  const promise = new Promise<T>((res, rej) => {
    resolve = res
    reject = rej
  })
  promise.catch(() => {})
  return { promise, resolve, reject }
}

/** Call a user's handler; one that throws is reported and does not stop the others. */
function invoke<A extends unknown[]>(handler: (...args: A) => void, ...args: A): void {
  try {
    handler(...args)
  } catch (error) {
    const report = (globalThis as { reportError?: (error: unknown) => void }).reportError
    if (report !== undefined) report(error)
    else console.error('@fluxbase/sdk: a channel handler threw', error)
  }
}

type PresenceEvent = 'sync' | 'join' | 'leave'
const TABLE_EVENTS = new Set(['INSERT', 'UPDATE', 'DELETE', 'TRUNCATE', '*'])

/**
 * A subscription to `table:{schema}.{table}`, `presence:{room}` or `broadcast:{topic}`. `R` is the row type of a
 * table channel, `B` the payload of a broadcast channel, `S` the state tracked on a presence channel.
 */
export class RealtimeChannel<R = Row, B = unknown, S = Record<string, unknown>> {
  readonly kind: ChannelKind
  private readonly machine: ChannelMachine
  private readonly statusCallbacks: SubscribeCallback[] = []
  private readonly changeHandlers = new Map<string, ((payload: never) => void)[]>()
  private readonly broadcastHandlers: ((payload: B) => void)[] = []
  private readonly presenceHandlers: Record<PresenceEvent, ((payload: never) => void)[]> = {
    sync: [],
    join: [],
    leave: [],
  }
  private presence: PresenceState<S> = {}
  private waiting: Deferred<this>[] = []
  private trackWaiting: Deferred<void>[] = []
  private lastError: RealtimeError | undefined

  constructor(
    readonly name: string,
    kind: ChannelKind,
    readonly options: TableOptions,
    private readonly host: ChannelHost,
  ) {
    this.kind = kind
    this.machine = new ChannelMachine(name, kind, options, () => host.nextRef())
  }

  /** `closed`, `joining` (subscribe sent or waiting for a connection), `joined`, `leaving` or `errored`. */
  get state(): ChannelPhase {
    return this.machine.phase
  }

  /**
   * The `id` of the last event handed to this channel's handlers (a table change's `payload.id`, a broadcast
   * message's `id`), already set while they run: after a reconnect the channel resubscribes from it. Undefined
   * before the first event, once the server could not resume from it (until the next event), and after the
   * subscription ended. Keep it to resume later with `subscribe(callback, { since })`.
   */
  get position(): string | undefined {
    return this.machine.position
  }

  on(event: 'INSERT', callback: (payload: InsertPayload<R>) => void): this
  on(event: 'UPDATE', callback: (payload: UpdatePayload<R>) => void): this
  on(event: 'DELETE', callback: (payload: DeletePayload<R>) => void): this
  on(event: 'TRUNCATE', callback: (payload: TruncatePayload) => void): this
  on(event: '*', callback: (payload: ChangePayload<R>) => void): this
  on(event: 'broadcast', callback: (payload: B) => void): this
  on(event: 'presence', filter: { event: 'sync' }, callback: () => void): this
  on(event: 'presence', filter: { event: 'join' }, callback: (join: PresenceJoin<S>) => void): this
  on(event: 'presence', filter: { event: 'leave' }, callback: (leave: PresenceLeave<S>) => void): this
  on(event: string, filterOrCallback: unknown, maybeCallback?: unknown): this {
    if (event === 'presence') {
      const filter = filterOrCallback as { event?: unknown } | undefined
      const which = filter?.event
      if (which !== 'sync' && which !== 'join' && which !== 'leave') {
        throw new TypeError("on('presence', { event }, callback): event must be 'sync', 'join' or 'leave'")
      }
      this.expectKind('presence', `on('presence', { event: '${which}' })`)
      this.presenceHandlers[which].push(this.callback(maybeCallback, event))
    } else if (event === 'broadcast') {
      this.expectKind('broadcast', "on('broadcast')")
      this.broadcastHandlers.push(this.callback(filterOrCallback, event) as (payload: B) => void)
    } else if (TABLE_EVENTS.has(event)) {
      this.expectKind('table', `on('${event}')`)
      const list = this.changeHandlers.get(event) ?? []
      list.push(this.callback(filterOrCallback, event))
      this.changeHandlers.set(event, list)
    } else {
      throw new TypeError(
        `on(${JSON.stringify(event)}): unknown event; expected INSERT, UPDATE, DELETE, TRUNCATE or * (table ` +
          "channels), 'broadcast' (broadcast channels) or 'presence' with { event: 'sync' | 'join' | 'leave' }",
      )
    }
    return this
  }

  /**
   * Ask the server for this channel and return the channel at once (so calls chain). `callback` hears
   * `SUBSCRIBED` when the server acknowledges (again after every reconnect), `CHANNEL_ERROR` with the error when
   * the server refuses the channel or reports an error on it, and `CLOSED` when the subscription ends.
   *
   * With SUBSCRIBED comes `{ recovered }`: after a reconnect the channel resubscribes from its `position`, and
   * `recovered: true` means that every event it missed follows; `false` (also on the first subscribe) means that
   * nothing was replayed: load or refetch what you show. `options.since` resumes from a position kept earlier.
   * Throws a TypeError for `since` on a presence channel (presence has no history) or a `since` that is not a string.
   */
  subscribe(callback?: SubscribeCallback, options: SubscribeOptions = {}): this {
    const since = options.since
    if (since !== undefined) {
      if (typeof since !== 'string') {
        throw new TypeError('subscribe(callback, { since }): since must be a string, an id this channel delivered')
      }
      if (this.kind === 'presence') {
        throw new TypeError(
          `subscribe(callback, { since }): ${this.name} is a presence channel, which has no history: ` +
            'the sync after each subscribe is the whole state',
        )
      }
    }
    if (callback !== undefined) this.statusCallbacks.push(callback)
    this.lastError = undefined
    this.run(this.machine.subscribe(this.host.isOpen(), since))
    this.host.ensureConnected()
    return this
  }

  /** Resolves with the channel once the server has acknowledged the subscription; rejects if it refuses it. */
  subscribed(): Promise<this> {
    const wait = deferred<this>()
    const phase = this.machine.phase
    if (phase === 'joined') wait.resolve(this)
    else if (phase === 'joining') this.waiting.push(wait)
    else {
      wait.reject(
        this.lastError ?? new RealtimeError('CLOSED', `${this.name} is not subscribed: call subscribe() first`, this.name),
      )
    }
    return wait.promise
  }

  /** End the subscription (and this connection's presence in the room). Resolves when the server confirms. */
  unsubscribe(): Promise<void> {
    const [reply] = this.run(this.machine.unsubscribe(this.host.isOpen()))
    return reply ?? Promise.resolve()
  }

  /**
   * Send `payload` to every other subscriber of this broadcast channel (subscribing is not required to send).
   * Resolves when the server accepted it; rejects with the server's error (e.g. RATE_LIMITED) or DISCONNECTED.
   */
  send(payload: B): Promise<void> {
    this.expectKind('broadcast', 'send()')
    if (payload === undefined) throw new TypeError('send(payload): payload is required (any JSON value)')
    if (!this.host.isOpen()) {
      return this.disconnected('send a broadcast')
    }
    return this.host.request({ type: 'broadcast', channel: this.name, payload, ref: this.host.nextRef() })
  }

  /**
   * Share `state` (a JSON object) in this presence room, now or as soon as the channel is subscribed, and again
   * after every reconnect. Resolves when the server has accepted it.
   */
  track(state: S): Promise<void> {
    this.expectKind('presence', 'track()')
    if (typeof state !== 'object' || state === null || Array.isArray(state)) {
      throw new TypeError('track(state): state must be a JSON object, e.g. { status: "online" }')
    }
    const done = deferred<void>()
    this.trackWaiting.push(done)
    this.run(this.machine.track(state as Record<string, unknown>, this.host.isOpen()))
    return done.promise
  }

  /** Stop sharing presence in this room (the subscription stays). */
  untrack(): Promise<void> {
    this.expectKind('presence', 'untrack()')
    for (const waiter of this.trackWaiting.splice(0)) {
      waiter.reject(new RealtimeError('CLOSED', `untrack() on ${this.name} before the track was sent`, this.name))
    }
    const [reply] = this.run(this.machine.untrack(this.host.isOpen()))
    return reply ?? Promise.resolve()
  }

  /** Everyone in the room as the server last reported: `{ key: [{ ref, state }, ...] }`. */
  presenceState(): PresenceState<S> {
    const copy: PresenceState<S> = {}
    for (const [key, metas] of Object.entries(this.presence)) copy[key] = [...metas]
    return copy
  }

  // ---- called by the client ----------------------------------------------------------------------------------

  /** @internal */
  _socketOpened(): void {
    this.run(this.machine.socketOpened())
  }

  /** @internal */
  _socketClosed(): void {
    this.run(this.machine.socketClosed())
  }

  /** @internal */
  _interrupted(error: RealtimeError): void {
    this.run(this.machine.interrupted(error))
    this.settle(error)
  }

  /** @internal */
  _terminated(error?: RealtimeError): void {
    this.run(this.machine.terminated(error))
  }

  /** @internal */
  _ack(status: string, ref: string | undefined, recovered?: boolean): void {
    this.run(this.machine.ack(status, ref, recovered))
  }

  /** @internal */
  _error(message: ErrorMessage): void {
    this.run(this.machine.error(message))
  }

  /** @internal */
  _receive(message: BroadcastEvent | PresenceSyncEvent | PresenceDiffEvent): void {
    if (this.machine.phase !== 'joined') return
    if (message.type === 'broadcast') {
      if (this.kind === 'broadcast') {
        this.machine.delivered(message.id)
        for (const handler of this.broadcastHandlers) invoke(handler, message.payload as B)
      } else if (this.kind === 'table' && isChangePayload(message.payload)) {
        const payload = message.payload as ChangePayload<R>
        this.machine.delivered(payload.id)
        for (const handler of [...(this.changeHandlers.get(payload.type) ?? []), ...(this.changeHandlers.get('*') ?? [])]) {
          invoke(handler as (payload: ChangePayload<R>) => void, payload)
        }
      }
      return
    }
    if (this.kind !== 'presence') return
    const change =
      message.event === 'sync'
        ? syncState(this.presence, message.payload as PresenceState<S>)
        : applyDiff(this.presence, (message as PresenceDiffEvent<S>).payload)
    this.presence = change.state
    this.emitPresence(change)
  }

  // ---- internals -----------------------------------------------------------------------------------------------

  private emitPresence(change: PresenceChange<S>): void {
    for (const leave of change.leaves) {
      for (const handler of this.presenceHandlers.leave) invoke(handler as (leave: PresenceLeave<S>) => void, leave)
    }
    for (const join of change.joins) {
      for (const handler of this.presenceHandlers.join) invoke(handler as (join: PresenceJoin<S>) => void, join)
    }
    for (const handler of this.presenceHandlers.sync) invoke(handler as () => void)
  }

  /** Carry out the machine's effects; returns the replies to what was sent, in order. */
  private run(effects: ChannelEffect[]): Promise<void>[] {
    const replies: Promise<void>[] = []
    for (const effect of effects) {
      if (effect.kind === 'send') {
        const { message } = effect
        // The client also hands every reply to the machine (_ack, _error), whoever waits for it here.
        const reply = this.host.request(message)
        replies.push(reply)
        if (message.type === 'presence' && message.event === 'track') {
          for (const waiter of this.trackWaiting.splice(0)) reply.then(waiter.resolve, waiter.reject)
        }
        continue
      }
      if (effect.status === 'SUBSCRIBED') {
        for (const waiter of this.waiting.splice(0)) waiter.resolve(this)
      } else if (effect.error !== undefined) {
        this.lastError = effect.error
      }
      if (effect.status === 'CLOSED' || this.machine.phase === 'errored') {
        this.settle(effect.error ?? new RealtimeError('CLOSED', `${this.name} was unsubscribed`, this.name))
      }
      if (effect.status === 'CLOSED') this.host.forget(this)
      const info = effect.status === 'SUBSCRIBED' ? { recovered: effect.recovered === true } : undefined
      for (const callback of this.statusCallbacks) invoke(callback, effect.status, effect.error, info)
    }
    return replies
  }

  /** Reject whoever waits for a subscription or a track that will not come on its own. */
  private settle(error: RealtimeError): void {
    for (const waiter of this.waiting.splice(0)) waiter.reject(error)
    if (this.machine.phase === 'closed') {
      for (const waiter of this.trackWaiting.splice(0)) waiter.reject(error)
    }
  }

  private disconnected(what: string): Promise<void> {
    const error = new RealtimeError(
      'DISCONNECTED',
      `cannot ${what} on ${this.name}: not connected; retry once the channel reports SUBSCRIBED ` +
        '(the client reconnects by itself)',
      this.name,
    )
    const failed = Promise.reject(error)
    failed.catch(() => {})
    return failed
  }

  private expectKind(kind: ChannelKind, what: string): void {
    if (this.kind !== kind) {
      const suggestions: Record<ChannelKind, string> = {
        table: "on('INSERT' | 'UPDATE' | 'DELETE' | 'TRUNCATE' | '*', callback)",
        broadcast: "on('broadcast', callback) and send(payload)",
        presence: "on('presence', { event }, callback), track(state) and untrack()",
      }
      throw new TypeError(
        `${what} needs a ${kind}: channel, but ${this.name} is a ${this.kind} channel; it offers ${suggestions[this.kind]}`,
      )
    }
  }

  private callback(value: unknown, event: string): (payload: never) => void {
    if (typeof value !== 'function') throw new TypeError(`on('${event}', ...): the callback must be a function`)
    return value as (payload: never) => void
  }
}
