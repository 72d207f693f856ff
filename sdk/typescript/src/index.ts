// @fluxbase/sdk: the client of the realtime API reference, for fluxrt.
//
//   const client = createClient({ url: 'http://localhost:8080', auth: { token } })
//   const channel = client.realtime.channel('table:public.users').on('INSERT', (payload) => ...).subscribe()

import { type AuthOptions, RealtimeClient, type RealtimeOptions } from './realtime.js'

export interface ClientOptions {
  /** The server, e.g. `http://localhost:8080` (or `ws://...`); the WebSocket path is added. */
  url: string
  auth?: AuthOptions
  realtime?: RealtimeOptions
}

export class FluxbaseClient {
  readonly realtime: RealtimeClient

  constructor(readonly url: string, options: Omit<ClientOptions, 'url'> = {}) {
    this.realtime = new RealtimeClient(url, options.auth, options.realtime)
  }
}

export function createClient(options: ClientOptions): FluxbaseClient {
  if (typeof options?.url !== 'string') {
    throw new TypeError("createClient({ url }): url is required, e.g. createClient({ url: 'http://localhost:8080' })")
  }
  return new FluxbaseClient(options.url, options)
}

export { afterClose, backoffDelay, type CloseDecision, DEFAULT_RECONNECT, type ReconnectOptions } from './backoff.js'
export { RealtimeChannel, type SubscribeCallback } from './channel.js'
export type { ChannelPhase, ChannelStatus, SubscribedInfo, SubscribeOptions, TableOptions } from './channelState.js'
export { RealtimeError, type RealtimeErrorCode } from './errors.js'
export type { PresenceJoin, PresenceLeave } from './presence.js'
export * from './protocol.js'
export {
  type AuthOptions,
  type ConnectionState,
  RealtimeClient,
  type RealtimeOptions,
  realtimeUrl,
  type StateChange,
  type WebSocketConstructor,
  type WebSocketLike,
} from './realtime.js'
