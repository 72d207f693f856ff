// The one error type the SDK reports: a server error (its code and message as sent) or a client-side one.

import type { ErrorCode } from './protocol.js'

/**
 * `DISCONNECTED`: the connection closed before the server answered, or there is none to send on. `CLOSED`: the
 * client stopped for good (disconnect(), or a close that docs/protocol.md says not to retry).
 */
export type RealtimeErrorCode = ErrorCode | 'DISCONNECTED' | 'CLOSED'

export class RealtimeError extends Error {
  override name = 'RealtimeError'

  constructor(
    readonly code: RealtimeErrorCode,
    message: string,
    readonly channel?: string,
  ) {
    super(message)
  }
}
