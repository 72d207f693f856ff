// The channels that a client's hooks share. The SDK keeps one channel per name and connection (the server keeps one
// subscription per channel and connection), and a handler given to channel.on() stays for the channel's life; so the
// hooks never touch channels directly: each hook holds a handle here, one SDK channel serves every handle on its
// name, it is subscribed while at least one handle holds it and unsubscribed once none does.
//
// Releasing waits for a microtask: React's StrictMode mounts, unmounts and mounts an effect again in one go, and a
// component that changes its arguments releases one handle and acquires another in the same commit. Both come back
// before the microtask runs, so the channel is neither unsubscribed nor subscribed again.

import {
  type ChangePayload,
  type ChannelStatus,
  type PresenceState,
  type RealtimeChannel,
  type RealtimeClient,
  RealtimeError,
  type SubscribedInfo,
  type TableOptions,
} from '@fluxbase/sdk'

/** What a hook hears from its channel; every method is optional. */
export interface ChannelListener {
  /** The SDK's subscribe callback; a handle acquired on a subscribed channel hears SUBSCRIBED (not recovered). */
  status?(status: ChannelStatus, error: Error | undefined, info: SubscribedInfo | undefined): void
  /** The connection closed: the channel is subscribed again (and resumed) once it is back. */
  interrupted?(): void
  change?(payload: ChangePayload<any>): void
  broadcast?(payload: unknown): void
  /** The room's whole state, after every sync and diff. */
  presence?(state: PresenceState<any>): void
}

/** One hook's hold on a channel. */
export interface ChannelHandle {
  /** The SDK channel, once it is made (after an earlier channel of the same name has finished unsubscribing). */
  readonly channel: RealtimeChannel<any, any, any> | undefined
  /** Share `state` in the presence room while this handle holds it (the latest state of any handle wins). */
  track(state: Record<string, unknown>): void
  /** Stop sharing this handle's state; the room is untracked when no handle tracks. */
  untrack(): void
  send(payload: unknown): Promise<void>
  release(): void
}

class Entry {
  readonly listeners = new Set<ChannelListener>()
  /** Handles that track, in the order they last tracked. */
  readonly trackers = new Map<object, Record<string, unknown>>()
  channel: RealtimeChannel<any, any, any> | undefined
  /** The state last sent with track, as JSON: the same state is not tracked twice. */
  tracked: string | undefined
  lastError: Error | undefined
  ended = false

  constructor(
    readonly name: string,
    readonly options: TableOptions,
    readonly key: string,
  ) {}
}

function optionsKey(options: TableOptions): string {
  return JSON.stringify([options.event ?? '*', options.filter ?? null])
}

function each(entry: Entry, call: (listener: ChannelListener) => void): void {
  for (const listener of [...entry.listeners]) {
    try {
      call(listener)
    } catch (error) {
      const report = (globalThis as { reportError?: (error: unknown) => void }).reportError
      if (report !== undefined) report(error)
      else console.error('@fluxbase/react: a channel listener threw', error)
    }
  }
}

export class ChannelRegistry {
  private readonly entries = new Map<string, Entry>()
  /** Channels released and still unsubscribing, by name: a new channel of that name waits for it. */
  private readonly closing = new Map<string, Promise<void>>()

  constructor(private readonly client: RealtimeClient) {
    client.onStateChange((change) => {
      // Only a close the client comes back from: after disconnect() or a close for good the channels report CLOSED.
      if (change.state !== 'CLOSED' || (change.reconnectInMs === undefined && !change.waitingForToken)) return
      for (const entry of this.entries.values()) each(entry, (listener) => listener.interrupted?.())
    })
  }

  /**
   * Hold the channel `name` with `options` (table channels) and hear it through `listener` until release().
   * A channel of that name held by another handle with other options is a conflict (one subscription per channel
   * and connection): the listener hears CHANNEL_ERROR saying so, and the handle holds nothing.
   */
  acquire(name: string, options: TableOptions, listener: ChannelListener): ChannelHandle {
    const key = optionsKey(options)
    let entry = this.entries.get(name)
    if (entry !== undefined && entry.key !== key && entry.listeners.size > 0) {
      return this.conflict(name, options, entry, listener)
    }
    // Released in this same tick (StrictMode, changed arguments): reused, unless it is for other options or the
    // server refused or ended it, when a new mount deserves a new try.
    if (entry !== undefined && entry.listeners.size === 0 && (entry.key !== key || entry.channel?.state === 'errored')) {
      this.end(entry)
      entry = undefined
    }
    if (entry === undefined) {
      entry = new Entry(name, { ...options }, key)
      this.entries.set(name, entry)
      this.start(entry)
    }
    entry.listeners.add(listener)
    this.catchUp(entry, listener)
    return this.handle(entry, listener)
  }

  private handle(entry: Entry, listener: ChannelListener): ChannelHandle {
    const registry = this
    let released = false
    const handle: ChannelHandle = {
      get channel() {
        return entry.channel
      },
      track(state) {
        if (released) return
        entry.trackers.delete(handle)
        entry.trackers.set(handle, state)
        registry.syncTracking(entry)
      },
      untrack() {
        if (entry.trackers.delete(handle)) queueMicrotask(() => registry.syncTracking(entry))
      },
      send(payload) {
        const channel = entry.channel
        if (channel === undefined || entry.ended) {
          const error = new RealtimeError('DISCONNECTED', `cannot send on ${entry.name}: the channel is not open yet`, entry.name)
          return Promise.reject(error)
        }
        return channel.send(payload)
      },
      release() {
        if (released) return
        released = true
        handle.untrack()
        entry.listeners.delete(listener)
        if (entry.listeners.size === 0) {
          queueMicrotask(() => {
            if (entry.listeners.size === 0) registry.end(entry)
          })
        }
      },
    }
    return handle
  }

  private conflict(name: string, options: TableOptions, entry: Entry, listener: ChannelListener): ChannelHandle {
    const error = new Error(
      `${name} is already subscribed on this client with ${describe(entry.options)}, and a hook asks for it with ` +
        `${describe(options)}; the server keeps one subscription per channel and connection: give both hooks the ` +
        'same event and filter, or put one under a RealtimeProvider of its own client',
    )
    queueMicrotask(() => listener.status?.('CHANNEL_ERROR', error, undefined))
    return {
      channel: undefined,
      track() {},
      untrack() {},
      send: () => Promise.reject(error),
      release() {},
    }
  }

  /** A listener that joins a channel already under way hears where it stands (once acquire() has returned). */
  private catchUp(entry: Entry, listener: ChannelListener): void {
    const channel = entry.channel
    if (channel === undefined) return
    queueMicrotask(() => {
      if (entry.listeners.has(listener) && !entry.ended) this.tell(channel, entry, listener)
    })
  }

  private tell(channel: RealtimeChannel<any, any, any>, entry: Entry, listener: ChannelListener): void {
    if (channel.state === 'joined') {
      listener.status?.('SUBSCRIBED', undefined, { recovered: false })
      if (channel.kind === 'presence') listener.presence?.(channel.presenceState())
    } else if (channel.state === 'errored') {
      listener.status?.('CHANNEL_ERROR', entry.lastError, undefined)
    }
  }

  private start(entry: Entry): void {
    const previous = this.closing.get(entry.name)
    if (previous === undefined) {
      this.open(entry)
      return
    }
    void previous.then(() => {
      if (!entry.ended) this.open(entry)
    })
  }

  private open(entry: Entry): void {
    let channel: RealtimeChannel<any, any, any>
    try {
      channel = this.client.channel(entry.name, entry.options)
    } catch (error) {
      entry.lastError = error as Error
      queueMicrotask(() => each(entry, (listener) => listener.status?.('CHANNEL_ERROR', error as Error, undefined)))
      return
    }
    if (channel.kind === 'table') {
      channel.on('*', (payload) => each(entry, (listener) => listener.change?.(payload)))
    } else if (channel.kind === 'broadcast') {
      channel.on('broadcast', (payload) => each(entry, (listener) => listener.broadcast?.(payload)))
    } else {
      channel.on('presence', { event: 'sync' }, () => {
        const state = channel.presenceState()
        each(entry, (listener) => listener.presence?.(state))
      })
    }
    entry.channel = channel
    channel.subscribe((status, error, info) => {
      if (entry.ended) return
      if (status === 'CHANNEL_ERROR') entry.lastError = error
      each(entry, (listener) => listener.status?.(status, error, info))
    })
    this.syncTracking(entry)
  }

  /** Track the latest state of the handles that track, or untrack when none does. */
  private syncTracking(entry: Entry): void {
    const channel = entry.channel
    if (channel === undefined || entry.ended || channel.kind !== 'presence') return
    const states = [...entry.trackers.values()]
    const latest = states[states.length - 1]
    const json = latest === undefined ? undefined : JSON.stringify(latest)
    if (json === entry.tracked) return
    entry.tracked = json
    if (latest === undefined) channel.untrack().catch(() => {})
    else channel.track(latest).catch(() => {})
  }

  /** Unsubscribe and forget the channel (its unsubscribe from the server; presence goes with it). */
  private end(entry: Entry): void {
    if (entry.ended) return
    entry.ended = true
    if (this.entries.get(entry.name) === entry) this.entries.delete(entry.name)
    const channel = entry.channel
    if (channel === undefined) return
    const closed = this.client.removeChannel(channel).catch(() => {})
    this.closing.set(entry.name, closed)
    void closed.then(() => {
      if (this.closing.get(entry.name) === closed) this.closing.delete(entry.name)
    })
  }
}

function describe(options: TableOptions): string {
  return `event ${options.event ?? '*'} and ${options.filter === undefined ? 'no filter' : `filter ${options.filter}`}`
}

const registries = new WeakMap<RealtimeClient, ChannelRegistry>()

/** The registry of `client`, made on first use. */
export function registryFor(client: RealtimeClient): ChannelRegistry {
  let registry = registries.get(client)
  if (registry === undefined) {
    registry = new ChannelRegistry(client)
    registries.set(client, registry)
  }
  return registry
}
