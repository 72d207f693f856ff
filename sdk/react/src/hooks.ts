// The hooks. Each holds a handle on the client's ChannelRegistry from an effect (so nothing happens while rendering,
// on a server or in a browser), keeps its callbacks in a ref updated at every commit (so they see the latest props
// without resubscribing), and keys its state by the channel it describes (so changing arguments never shows the
// previous channel's state).

import type {
  ChangePayload,
  ChannelStatus,
  ConnectionState,
  PresenceMeta,
  PresenceState,
  RealtimeChannel,
  RealtimeClient,
  Row,
  SubscribedInfo,
  TableEvent,
} from '@fluxbase/sdk'
import { useCallback, useEffect, useInsertionEffect, useMemo, useRef, useState, useSyncExternalStore } from 'react'

import { applyChange, keyFunction, type RowKey, rowsByKey } from './liveRows.js'
import { useRealtimeClient } from './provider.js'
import { type ChannelHandle, type ChannelListener, registryFor } from './registry.js'

/**
 * A ref holding `value` as of the last commit, updated before any effect of the commit runs (an insertion effect:
 * unlike a layout effect, React does not warn about it when rendering on a server, where it never runs).
 */
function useLatest<T>(value: T): { readonly current: T } {
  const ref = useRef(value)
  useInsertionEffect(() => {
    ref.current = value
  })
  return ref
}

/**
 * `idle`: no client yet (server rendering, the provider's first render) or no channel asked for; `joining`: the
 * subscribe is on its way (or waits for a connection); `subscribed`; `error`: the server refused or ended the
 * channel (see `error`); `closed`: the client was disconnected.
 */
export type ChannelHookStatus = 'idle' | 'joining' | 'subscribed' | 'error' | 'closed'

export interface ChannelOptions {
  /** Table channels: only this kind of change (default every kind). */
  event?: TableEvent | '*'
  /** Table channels: `column=op.value`, e.g. `owner=eq.alice`. */
  filter?: string
  /** Table channels: every change delivered. */
  onChange?: (payload: ChangePayload<any>) => void
  /** Broadcast channels: every message's payload. */
  onBroadcast?: (payload: any) => void
  /** Presence channels: the room's whole state, after every change. */
  onPresence?: (state: PresenceState<any>) => void
  /** The SDK's subscribe callback: SUBSCRIBED (with `{ recovered }`), CHANNEL_ERROR, CLOSED. */
  onStatus?: (status: ChannelStatus, error: Error | undefined, info: SubscribedInfo | undefined) => void
  /** The connection was lost; the channel is subscribed again (and resumed) when it is back. */
  onInterrupted?: () => void
}

export interface ChannelResult {
  status: ChannelHookStatus
  error: Error | undefined
  /** The SDK channel while the hook holds it (for `position`, `presenceState()`...); do not call on() on it. */
  channel: RealtimeChannel<any, any, any> | undefined
}

interface Keyed<T> {
  key: string
  value: T
}

/** State that belongs to one subscription: read as `initial` as soon as `key` changes. */
function useKeyedState<T>(key: string, initial: T): [T, (key: string, update: (value: T) => T) => void] {
  const [state, setState] = useState<Keyed<T>>({ key, value: initial })
  const set = useCallback((forKey: string, update: (value: T) => T) => {
    setState((current) => {
      const base = current.key === forKey ? current.value : initial
      return { key: forKey, value: update(base) }
    })
    // `initial` is the same constant on every render of the hook that calls this.
  }, [])
  return [state.key === key ? state.value : initial, set]
}

/** ChannelOptions whose callbacks also hear which subscription (the hook's key) they come from. */
interface KeyedOptions {
  event?: TableEvent | '*'
  filter?: string
  onChange?: (payload: ChangePayload<any>, key: string) => void
  onBroadcast?: (payload: any, key: string) => void
  onPresence?: (state: PresenceState<any>, key: string) => void
  onStatus?: (status: ChannelStatus, error: Error | undefined, info: SubscribedInfo | undefined, key: string) => void
  onInterrupted?: (key: string) => void
}

interface Subscription {
  status: ChannelHookStatus
  error: Error | undefined
  channel: RealtimeChannel<any, any, any> | undefined
}

const IDLE: Subscription = { status: 'idle', error: undefined, channel: undefined }

/**
 * The machinery under every hook: while mounted (and `name` is not null) hold `name` on the provider's client, call
 * `options`' latest callbacks, and report the channel's status. Returns the status and a ref to the handle.
 */
function useChannelHandle(
  name: string | null,
  options: KeyedOptions,
): [Subscription, { readonly current: ChannelHandle | undefined }, RealtimeClient | null, string] {
  const client = useRealtimeClient()
  const callbacks = useLatest(options)
  const handle = useRef<ChannelHandle | undefined>(undefined)
  const { event, filter } = options
  const key = JSON.stringify([name, event ?? null, filter ?? null])
  const active = client !== null && name !== null
  const [subscription, setSubscription] = useKeyedState<Subscription>(key, IDLE)
  useEffect(() => {
    if (client === null || name === null) return
    const set = (next: Partial<Subscription>) => setSubscription(key, (current) => ({ ...current, ...next }))
    let held: ChannelHandle | undefined
    const listener: ChannelListener = {
      status(status, error, info) {
        if (status === 'SUBSCRIBED') set({ status: 'subscribed', error: undefined, channel: held?.channel })
        else if (status === 'CHANNEL_ERROR') {
          // Errors that keep the subscription (CHANGES_MISSED, a refused broadcast) leave the status as it was.
          set(held?.channel?.state === 'joined' ? { error } : { status: 'error', error })
        } else set({ status: 'closed', error })
        callbacks.current.onStatus?.(status, error, info, key)
      },
      interrupted() {
        set({ status: 'joining' })
        callbacks.current.onInterrupted?.(key)
      },
      change: (payload) => callbacks.current.onChange?.(payload, key),
      broadcast: (payload) => callbacks.current.onBroadcast?.(payload, key),
      presence: (state) => callbacks.current.onPresence?.(state, key),
    }
    const acquired = registryFor(client).acquire(name, { event, filter }, listener)
    held = acquired
    handle.current = acquired
    return () => {
      handle.current = undefined
      acquired.release()
    }
  }, [client, key])
  const shown = active && subscription.status === 'idle' ? { ...subscription, status: 'joining' as const } : subscription
  return [shown, handle, client, key]
}

/**
 * Subscribe to `name` (`table:public.todos`, `broadcast:chat`, `presence:lobby`) while mounted, with the handlers in
 * `options` (always the latest ones: a new callback does not resubscribe). A change of `name`, `event` or `filter`
 * unsubscribes and subscribes again; `null` holds nothing.
 */
export function useChannel(name: string | null, options: ChannelOptions = {}): ChannelResult {
  const [subscription] = useChannelHandle(name, options)
  return subscription
}

/** `todos` is `table:public.todos`, `app.todos` is `table:app.todos`, `table:...` stays. */
export function tableChannel(table: string): string {
  if (table.startsWith('table:')) return table
  return `table:${table.includes('.') ? table : `public.${table}`}`
}

export interface TableChangesOptions {
  event?: TableEvent | '*'
  filter?: string
}

/** Call `callback` with every change to `table` (as row-level security lets this user see it) while mounted. */
export function useTableChanges<R = Row>(
  table: string,
  options: TableChangesOptions,
  callback: (payload: ChangePayload<R>) => void,
): { status: ChannelHookStatus; error: Error | undefined } {
  const { status, error } = useChannel(tableChannel(table), {
    event: options.event,
    filter: options.filter,
    onChange: callback,
  })
  return { status, error }
}

export interface BroadcastOptions<P> {
  /** How many of the last messages to keep (default 50). */
  limit?: number
  /** Every message as it arrives. */
  onMessage?: (payload: P) => void
}

export interface BroadcastResult<P> {
  /** The payloads received, oldest first (the server does not send a message back to its sender). */
  messages: P[]
  /** Send `payload` to the topic's other subscribers; rejects with the server's error or DISCONNECTED. */
  send: (payload: P) => Promise<void>
  status: ChannelHookStatus
  error: Error | undefined
}

const NO_MESSAGES: never[] = []

/** Subscribe to `broadcast:{topic}` while mounted: the last messages and a `send`. */
export function useBroadcast<P = unknown>(topic: string, options: BroadcastOptions<P> = {}): BroadcastResult<P> {
  const name = topic.startsWith('broadcast:') ? topic : `broadcast:${topic}`
  const limit = Math.max(1, options.limit ?? 50)
  const latest = useLatest({ limit, onMessage: options.onMessage })
  const key = JSON.stringify([name, null, null])
  const [messages, setMessages] = useKeyedState<P[]>(key, NO_MESSAGES)
  const [{ status, error }, handle] = useChannelHandle(name, {
    onBroadcast: (payload: P, from) => {
      setMessages(from, (current) => [...current, payload].slice(-latest.current.limit))
      latest.current.onMessage?.(payload)
    },
  })
  const send = useCallback(
    (payload: P) => {
      const held = handle.current
      if (held === undefined) {
        return Promise.reject(new Error(`cannot send on ${name}: the hook is not mounted or has no client yet`))
      }
      return held.send(payload)
    },
    [handle, name],
  )
  return { messages, send, status, error }
}

/** One user in a presence room: one key (the token's `sub`), one presence per tracking connection. */
export interface PresenceMember<S> {
  key: string
  /** The state of the presence that tracked last. */
  state: S
  presences: PresenceMeta<S>[]
}

export interface PresenceResult<S> {
  /** Everyone in the room, ordered by key. */
  members: PresenceMember<S>[]
  status: ChannelHookStatus
  error: Error | undefined
}

const NO_MEMBERS: never[] = []

function membersOf<S>(state: PresenceState<S>): PresenceMember<S>[] {
  return Object.keys(state)
    .sort()
    .flatMap((key) => {
      const presences = state[key] ?? []
      const last = presences[presences.length - 1]
      return last === undefined ? [] : [{ key, state: last.state, presences }]
    })
}

/**
 * Subscribe to `presence:{room}` while mounted and share `state` there (a JSON object; omit it to only watch).
 * A changed state (compared as JSON) is tracked again; unmounting untracks and unsubscribes.
 */
export function usePresence<S extends Record<string, unknown> = Record<string, unknown>>(
  room: string,
  state?: S,
): PresenceResult<S> {
  const name = room.startsWith('presence:') ? room : `presence:${room}`
  const key = JSON.stringify([name, null, null])
  const [members, setMembers] = useKeyedState<PresenceMember<S>[]>(key, NO_MEMBERS)
  const [{ status, error }, handle, client] = useChannelHandle(name, {
    onPresence: (presence, from) => setMembers(from, () => membersOf(presence as PresenceState<S>)),
  })
  const json = state === undefined ? undefined : JSON.stringify(state)
  useEffect(() => {
    const held = handle.current
    if (held === undefined || json === undefined) return
    held.track(JSON.parse(json) as Record<string, unknown>)
    return () => held.untrack()
  }, [handle, client, key, json])
  return { members, status, error }
}

const NO_CLIENT = (): (() => void) => () => {}

/** The connection's state (`CONNECTING`, `OPEN`, `CLOSING`, `CLOSED`), re-rendering on every change. */
export function useConnectionState(): ConnectionState {
  const client = useRealtimeClient()
  const subscribe = useMemo(
    () =>
      client === null
        ? NO_CLIENT
        : (notify: () => void) => {
            const stop = client.onStateChange(notify)
            return () => {
              stop()
            }
          },
    [client],
  )
  return useSyncExternalStore(
    subscribe,
    () => client?.connectionState() ?? 'CLOSED',
    () => 'CLOSED',
  )
}

/**
 * `connecting`: waiting for the subscription; `loading`: load() is running (changes that arrive meanwhile are kept
 * and applied after it); `live`; `reconnecting`: the connection was lost, the rows are as they were; `error`: load()
 * failed or the server refused or ended the channel (see `error`).
 */
export type LiveRowsStatus = 'connecting' | 'loading' | 'live' | 'reconnecting' | 'error'

export interface LiveRowsOptions<R> {
  /** The rows as they are now, e.g. from the application's API; called again whenever changes may have been missed. */
  load: (context: { signal: AbortSignal }) => Promise<readonly R[]> | readonly R[]
  /** How a row is identified: a column (default `id`) or a function of the row. */
  key?: RowKey<R>
  /** Only rows that match, `column=op.value` (the load should ask for the same rows). */
  filter?: string
}

export interface LiveRowsResult<R> {
  /** In load order, rows inserted later at the end. */
  rows: R[]
  status: LiveRowsStatus
  error: Error | undefined
  /** Call load() again now. */
  reload: () => void
}

interface LiveRowsState<R> {
  map: Map<unknown, R>
  rows: R[]
  status: LiveRowsStatus
  error: Error | undefined
}

/**
 * A list of `table`'s rows that stays right: load() gives the first rows, then every INSERT, UPDATE and DELETE
 * delivered is applied by key. Changes that arrive while load() runs are kept and applied after its rows, so none is
 * lost between the load and the subscription (one already in the loaded rows is applied again, which changes
 * nothing, as it puts the same row under its key). After a reconnect the list carries on if the server recovered the
 * channel (the missed changes are delivered); otherwise, and on CHANGES_MISSED or a TRUNCATE of one partition, load()
 * runs again. Row-level security decides which changes arrive: a row that an UPDATE moves out of this user's view is
 * not removed (the server sends nothing about it).
 */
export function useLiveRows<R = Row>(table: string, options: LiveRowsOptions<R>): LiveRowsResult<R> {
  const name = tableChannel(table)
  const key = JSON.stringify([name, null, options.filter ?? null])
  const latest = useLatest({ load: options.load, keyOf: keyFunction(options.key) })
  const [state, setState] = useKeyedState<LiveRowsState<R>>(key, INITIAL_ROWS as unknown as LiveRowsState<R>)
  // What belongs to the current subscription and is never rendered: kept out of React state so that a change is
  // buffered or applied exactly when it arrives, not when React gets round to an update. Every callback names the
  // subscription it comes from, and one that is not the current one is ignored.
  const session = useRef<Session<R>>(newSession(key))
  if (session.current.key !== key) {
    session.current.loading?.abort()
    session.current = newSession(key)
  }

  const publish = useCallback(
    (current: Session<R>, status: LiveRowsStatus, error?: Error) => {
      if (session.current !== current) return
      const map = current.map
      setState(current.key, (previous) => ({
        map,
        rows: previous.map === map ? previous.rows : [...map.values()],
        status,
        error,
      }))
    },
    [setState],
  )

  const reload = useCallback(
    (current: Session<R>) => {
      if (session.current !== current) return
      current.loading?.abort()
      const controller = new AbortController()
      current.loading = controller
      current.buffer = []
      publish(current, 'loading')
      Promise.resolve()
        .then(() => latest.current.load({ signal: controller.signal }))
        .then(
          (rows) => {
            if (current.loading !== controller || session.current !== current) return
            const keyOf = latest.current.keyOf
            let map = rowsByKey(rows, keyOf)
            const buffered = current.buffer ?? []
            current.buffer = current.loading = undefined
            for (const change of buffered) {
              const next = applyChange(map, change, keyOf)
              if (next === undefined) {
                current.map = map
                reload(current)
                return
              }
              map = next
            }
            current.map = map
            publish(current, 'live')
          },
          (error: unknown) => {
            if (current.loading !== controller || session.current !== current) return
            current.buffer = current.loading = undefined
            publish(current, 'error', error instanceof Error ? error : new Error(String(error)))
          },
        )
    },
    [latest, publish],
  )

  /** The session of subscription `from`, if it is still the current one. */
  const sessionOf = (from: string): Session<R> | undefined =>
    session.current.key === from ? session.current : undefined

  const [, channel] = useChannelHandle(name, {
    filter: options.filter,
    onChange(change, from) {
      const current = sessionOf(from)
      if (current === undefined) return
      if (current.buffer !== undefined) {
        current.buffer.push(change as ChangePayload<R>)
        return
      }
      const next = applyChange(current.map, change as ChangePayload<R>, latest.current.keyOf)
      if (next === undefined) reload(current)
      else if (next !== current.map) {
        current.map = next
        publish(current, 'live')
      }
    },
    onStatus(status, error, info, from) {
      const current = sessionOf(from)
      if (current === undefined) return
      if (status === 'SUBSCRIBED') {
        // Recovered: every change missed follows; a load that runs goes on buffering them.
        if (!info?.recovered) reload(current)
        else if (current.buffer === undefined) publish(current, 'live')
      } else if (status === 'CHANNEL_ERROR' && (error as { code?: string } | undefined)?.code === 'CHANGES_MISSED') {
        reload(current)
      } else if (status === 'CHANNEL_ERROR' && channel.current?.channel?.state === 'joined') {
        // An error that keeps the subscription (a refused message): the rows are still right.
      } else {
        current.loading?.abort()
        current.buffer = current.loading = undefined
        publish(current, 'error', error ?? new Error(`${name} was closed: the client was disconnected`))
      }
    },
    onInterrupted(from) {
      const current = sessionOf(from)
      if (current !== undefined && current.buffer === undefined) publish(current, 'reconnecting')
    },
  })

  useEffect(() => {
    const current = session.current
    return () => current.loading?.abort()
  }, [key])

  const manualReload = useCallback(() => reload(session.current), [reload])
  return { rows: state.rows, status: state.status, error: state.error, reload: manualReload }
}

interface Session<R> {
  key: string
  map: Map<unknown, R>
  /** Changes that arrived while load() runs; undefined when no load runs. */
  buffer: ChangePayload<R>[] | undefined
  loading: AbortController | undefined
}

function newSession<R>(key: string): Session<R> {
  return { key, map: new Map(), buffer: undefined, loading: undefined }
}

const INITIAL_ROWS: LiveRowsState<unknown> = { map: new Map(), rows: [], status: 'connecting', error: undefined }
