// The wire protocol of fluxrt (fluxrt's docs/protocol.md): every message and payload as a type, channel names,
// and decoding of what the server sends. Pure: no sockets, no timers.

export type ErrorCode =
  | 'UNAUTHORIZED'
  | 'FORBIDDEN'
  | 'INVALID_CHANNEL'
  | 'SUBSCRIPTION_FAILED'
  | 'RATE_LIMITED'
  | 'INVALID_MESSAGE'
  | 'INTERNAL_ERROR'
  | 'CHANGES_MISSED'

export const CloseCode = {
  NORMAL: 1000,
  GOING_AWAY: 1001,
  ABNORMAL: 1006,
  MESSAGE_TOO_BIG: 1009,
  INTERNAL_ERROR: 1011,
  UNAUTHORIZED: 4001,
  TIMEOUT: 4008,
  SLOW_CONSUMER: 4009,
  RATE_LIMITED: 4029,
} as const

// ---- channels -------------------------------------------------------------------------------------------------

export type ChannelKind = 'table' | 'presence' | 'broadcast'

const IDENTIFIER = /^[A-Za-z_][A-Za-z0-9_$]{0,62}$/
// A room or topic: 1-255 characters, none of them whitespace or control characters.
const ROOM = /^[^\s\p{Cc}]{1,255}$/u

/** The kind of a channel name, or throws a TypeError that shows the formats the server accepts. */
export function channelKind(name: string): ChannelKind {
  const colon = typeof name === 'string' ? name.indexOf(':') : -1
  const prefix = colon > 0 ? name.slice(0, colon) : ''
  const rest = colon > 0 ? name.slice(colon + 1) : ''
  if (prefix === 'table') {
    const parts = rest.split('.')
    if (parts.length === 2 && parts.every((part) => IDENTIFIER.test(part))) return 'table'
  } else if ((prefix === 'presence' || prefix === 'broadcast') && ROOM.test(rest)) {
    return prefix
  }
  throw new TypeError(
    `invalid channel ${JSON.stringify(name)}: expected table:{schema}.{table} (e.g. table:public.users), ` +
      'presence:{room} (e.g. presence:lobby) or broadcast:{topic} (e.g. broadcast:chat); ' +
      'rooms and topics are 1-255 characters without spaces',
  )
}

// ---- client -> server -----------------------------------------------------------------------------------------

export type TableEvent = 'INSERT' | 'UPDATE' | 'DELETE' | 'TRUNCATE'

export interface SubscribeMessage {
  type: 'subscribe'
  channel: string
  /** Table channels only: the one kind of change wanted (default every kind, `*`). */
  event?: TableEvent | '*'
  /** Table channels only: `column=op.value`, op one of eq neq lt lte gt gte in is (`status=in.(open,late)`). */
  filter?: string
  /**
   * Table and broadcast channels: the `id` of the last event the client processed on this channel, to be sent what
   * followed it (see Resume in docs/protocol.md). Opaque: sent back exactly as received.
   */
  since?: string
  ref?: string
}

export interface UnsubscribeMessage {
  type: 'unsubscribe'
  channel: string
  ref?: string
}

export interface BroadcastMessage<P = unknown> {
  type: 'broadcast'
  channel: string
  payload: P
  ref?: string
}

export interface PresenceMessage<S = Record<string, unknown>> {
  type: 'presence'
  channel: string
  event: 'track' | 'untrack'
  payload?: S
  ref?: string
}

export interface PingMessage {
  type: 'ping'
  ref?: string
}

export interface AuthMessage {
  type: 'auth'
  token: string
  ref?: string
}

export type ClientMessage =
  | SubscribeMessage
  | UnsubscribeMessage
  | BroadcastMessage
  | PresenceMessage
  | PingMessage
  | AuthMessage

// ---- server -> client -----------------------------------------------------------------------------------------

export type AckStatus = 'subscribed' | 'unsubscribed' | 'sent' | 'tracked' | 'untracked' | 'authorized'

export interface AckMessage {
  type: 'ack'
  /** Absent on the ack of `auth`. */
  channel?: string
  status: AckStatus
  /**
   * On the ack of a subscribe that carried `since`: true when every event after that position follows (then live),
   * false when nothing could be replayed. Absent otherwise (also from a server without resume: read it as false).
   */
  recovered?: boolean
  ref?: string
}

export interface ErrorMessage {
  type: 'error'
  code: ErrorCode
  message: string
  channel?: string
  ref?: string
}

export interface PongMessage {
  type: 'pong'
  ref?: string
}

/** A database change (on a `table:` channel) or a relayed broadcast (on a `broadcast:` channel). */
export interface BroadcastEvent<P = unknown> {
  type: 'broadcast'
  channel: string
  payload: P
  /** On `broadcast:` channels, the message's position (table changes carry theirs as `payload.id`). */
  id?: string
}

export interface PresenceSyncEvent<S = Record<string, unknown>> {
  type: 'presence'
  channel: string
  event: 'sync'
  payload: PresenceState<S>
}

export interface PresenceDiffEvent<S = Record<string, unknown>> {
  type: 'presence'
  channel: string
  event: 'diff'
  payload: PresenceDiff<S>
}

export type ServerMessage = AckMessage | ErrorMessage | PongMessage | BroadcastEvent | PresenceSyncEvent | PresenceDiffEvent

// ---- payloads -------------------------------------------------------------------------------------------------

export type Row = Record<string, unknown>

interface ChangeBase {
  schema: string
  table: string
  /** When the change was written, ISO 8601 UTC (an extension of the reference). */
  timestamp?: string
  /** An opaque position in the change log (an extension of the reference). */
  id?: string
}

export interface InsertPayload<R = Row> extends ChangeBase {
  type: 'INSERT'
  record: R
}

export interface UpdatePayload<R = Row> extends ChangeBase {
  type: 'UPDATE'
  record: R
  /** Absent when the subscriber could not see the row before the update (row-level security). */
  old_record?: R
}

export interface DeletePayload<R = Row> extends ChangeBase {
  type: 'DELETE'
  old_record: R
}

export interface TruncatePayload extends ChangeBase {
  type: 'TRUNCATE'
  /** Set when one partition of a partitioned table was truncated (`schema.name`): only its rows are gone. */
  partition?: string
}

export type ChangePayload<R = Row> = InsertPayload<R> | UpdatePayload<R> | DeletePayload<R> | TruncatePayload

/** One tracking connection's presence: `ref` is unique per connection, `state` what it tracked. */
export interface PresenceMeta<S = Record<string, unknown>> {
  ref: string
  state: S
}

/** Who is in a room: one key per user (the token's `sub`, or `anon:...`), one meta per tracking connection. */
export type PresenceState<S = Record<string, unknown>> = Record<string, PresenceMeta<S>[]>

export interface PresenceDiff<S = Record<string, unknown>> {
  joins: PresenceState<S>
  leaves: PresenceState<S>
}

// ---- decoding -------------------------------------------------------------------------------------------------

const ERROR_CODES = new Set<string>([
  'UNAUTHORIZED',
  'FORBIDDEN',
  'INVALID_CHANNEL',
  'SUBSCRIPTION_FAILED',
  'RATE_LIMITED',
  'INVALID_MESSAGE',
  'INTERNAL_ERROR',
  'CHANGES_MISSED',
])
const ACK_STATUSES = new Set<string>(['subscribed', 'unsubscribed', 'sent', 'tracked', 'untracked', 'authorized'])

/** A frame from the server that does not match docs/protocol.md. */
export class ProtocolError extends Error {
  override name = 'ProtocolError'
}

type Json = Record<string, unknown>

function isObject(value: unknown): value is Json {
  return typeof value === 'object' && value !== null && !Array.isArray(value)
}

function optionalString(message: Json, field: string): boolean {
  return message[field] === undefined || typeof message[field] === 'string'
}

function isPresenceState(value: unknown): value is PresenceState {
  return (
    isObject(value) &&
    Object.values(value).every(
      (metas) => Array.isArray(metas) && metas.every((meta) => isObject(meta) && typeof meta.ref === 'string'),
    )
  )
}

/** Parse one text frame from the server; throws ProtocolError naming what is wrong with it. */
export function decodeServerMessage(text: string): ServerMessage {
  let message: unknown
  try {
    message = JSON.parse(text)
  } catch {
    throw new ProtocolError(`the server sent a frame that is not JSON: ${text.slice(0, 100)}`)
  }
  const fail = (why: string): never => {
    throw new ProtocolError(`the server sent ${why}: ${text.slice(0, 200)}`)
  }
  if (!isObject(message)) return fail('a frame that is not a JSON object')
  if (!optionalString(message, 'ref')) return fail('a ref that is not a string')
  switch (message.type) {
    case 'ack':
      if (typeof message.status !== 'string' || !ACK_STATUSES.has(message.status)) return fail('an ack of unknown status')
      if (!optionalString(message, 'channel')) return fail('an ack whose channel is not a string')
      return message as unknown as AckMessage
    case 'error':
      if (typeof message.code !== 'string' || !ERROR_CODES.has(message.code)) return fail('an error of unknown code')
      if (typeof message.message !== 'string') return fail('an error without a message')
      if (!optionalString(message, 'channel')) return fail('an error whose channel is not a string')
      return message as unknown as ErrorMessage
    case 'pong':
      return message as unknown as PongMessage
    case 'broadcast':
      if (typeof message.channel !== 'string' || !('payload' in message)) return fail('a broadcast without channel or payload')
      return message as unknown as BroadcastEvent
    case 'presence':
      if (typeof message.channel !== 'string') return fail('a presence event without a channel')
      if (message.event === 'sync') {
        if (!isPresenceState(message.payload)) return fail('a presence sync whose payload is not {key: [meta, ...]}')
        return message as unknown as PresenceSyncEvent
      }
      if (message.event === 'diff') {
        const diff = message.payload
        if (!isObject(diff) || !isPresenceState(diff.joins) || !isPresenceState(diff.leaves)) {
          return fail('a presence diff whose payload is not {joins, leaves}')
        }
        return message as unknown as PresenceDiffEvent
      }
      return fail('a presence event that is neither sync nor diff')
    default:
      return fail('a message of unknown type')
  }
}

/** True when a table change payload has the reference's shape (type, schema, table, and its records). */
export function isChangePayload(payload: unknown): payload is ChangePayload {
  if (!isObject(payload) || typeof payload.schema !== 'string' || typeof payload.table !== 'string') return false
  switch (payload.type) {
    case 'INSERT':
      return isObject(payload.record)
    case 'UPDATE':
      return isObject(payload.record) && (payload.old_record === undefined || isObject(payload.old_record))
    case 'DELETE':
      return isObject(payload.old_record)
    case 'TRUNCATE':
      return true
    default:
      return false
  }
}
