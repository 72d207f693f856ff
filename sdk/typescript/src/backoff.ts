// What to do after the socket closed, by close code (docs/protocol.md, "Close codes"), and how long to wait before the
// next attempt: exponential backoff with full jitter. Pure: the caller owns the timers and the random source.

import { CloseCode } from './protocol.js'

export interface ReconnectOptions {
  /** The first retry waits up to this long; each failed attempt doubles the bound. */
  baseDelayMs: number
  /** The bound stops doubling here. */
  maxDelayMs: number
  /** After close 4029 (rate limited) the server asked to back off: wait at least this long, plus the backoff. */
  rateLimitedDelayMs: number
}

export const DEFAULT_RECONNECT: ReconnectOptions = { baseDelayMs: 1000, maxDelayMs: 30_000, rateLimitedDelayMs: 5000 }

export type CloseDecision =
  /** Do not reconnect: reconnecting would fail the same way, or the close was asked for. */
  | { action: 'stop'; reason: string }
  /** The token was refused or expired (4001): reconnect only with a new one. */
  | { action: 'reauth'; reason: string }
  | { action: 'retry'; delayMs: number }

// Closes that mean the client itself is at fault: the same client would be closed again.
const CLIENT_FAULTS: Record<number, string> = {
  1002: 'the server saw a WebSocket protocol error (1002)',
  1003: 'the server refused a frame type (1003)',
  1007: 'the server received text that was not UTF-8 (1007)',
  1008: 'the server refused a message by policy (1008)',
  [CloseCode.MESSAGE_TOO_BIG]:
    'a message was larger than the server accepts (1009, realtime.max_message_size): send smaller messages',
}

/** Full jitter: a uniformly random wait between 0 and min(max, base * 2^attempt). */
export function backoffDelay(attempt: number, options: ReconnectOptions, random: () => number = Math.random): number {
  const bound = Math.min(options.maxDelayMs, options.baseDelayMs * 2 ** Math.min(attempt, 30))
  return Math.floor(random() * bound)
}

/**
 * The decision after a close with `code`, when `attempt` reconnects have failed in a row since the last connection
 * that worked. Codes docs/protocol.md does not list (1005, 1006 for a dropped connection, 1012, 1013, ...) are retried.
 */
export function afterClose(
  code: number,
  attempt: number,
  options: ReconnectOptions,
  random: () => number = Math.random,
): CloseDecision {
  if (code === CloseCode.NORMAL) return { action: 'stop', reason: 'the server closed the connection (1000)' }
  if (code === CloseCode.UNAUTHORIZED) {
    return { action: 'reauth', reason: 'the token was refused or has expired (4001): a new token is needed' }
  }
  const fault = CLIENT_FAULTS[code]
  if (fault !== undefined) return { action: 'stop', reason: fault }
  const delayMs = backoffDelay(attempt, options, random)
  if (code === CloseCode.RATE_LIMITED) return { action: 'retry', delayMs: options.rateLimitedDelayMs + delayMs }
  return { action: 'retry', delayMs }
}
