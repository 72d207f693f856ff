// One realtime client for a tree of components.

import {
  type AuthOptions,
  createClient,
  type FluxbaseClient,
  RealtimeClient,
  type RealtimeOptions,
} from '@fluxbase/sdk'
import { createContext, type ReactNode, useContext, useEffect, useRef, useState } from 'react'

/** undefined: no provider above; null: a provider whose client is not made yet (server rendering, first render). */
const ClientContext = createContext<RealtimeClient | null | undefined>(undefined)

export type RealtimeProviderProps = {
  children?: ReactNode
} & (
  | {
      /** A client made by the application, which stays its owner: the provider never disconnects it. */
      client: FluxbaseClient | RealtimeClient
      url?: never
      auth?: never
      realtime?: never
    }
  | {
      client?: never
      /** The server, e.g. `http://localhost:8080`: the provider makes the client in the browser and disconnects it on unmount. */
      url: string
      /** A new `auth.token` is handed to the live client (setAuth); `auth.refresh` is called as it is when needed. */
      auth?: AuthOptions
      realtime?: RealtimeOptions
    }
)

/**
 * Makes one realtime client available to the hooks below it. Either pass `client` (made with `createClient`), or
 * `url` (and `auth`, `realtime`): then the client is made in an effect, so server rendering never touches WebSocket,
 * made again only when `url` changes, and disconnected when the provider unmounts.
 */
export function RealtimeProvider(props: RealtimeProviderProps): ReactNode {
  const given = props.client === undefined ? undefined : toRealtime(props.client)
  const made = useOwnClient(given === undefined ? props.url : undefined, props.auth, props.realtime)
  return <ClientContext.Provider value={given ?? made}>{props.children}</ClientContext.Provider>
}

function toRealtime(client: FluxbaseClient | RealtimeClient): RealtimeClient {
  return client instanceof RealtimeClient ? client : client.realtime
}

function useOwnClient(
  url: string | undefined,
  auth: AuthOptions | undefined,
  realtime: RealtimeOptions | undefined,
): RealtimeClient | null {
  const [client, setClient] = useState<RealtimeClient | null>(null)
  // The latest auth and options, read when the client is made; a new token goes to the live client below.
  const latest = useRef({ auth, realtime })
  latest.current = { auth, realtime }
  const token = auth?.token
  useEffect(() => {
    if (url === undefined) return
    const { auth: first, realtime: options } = latest.current
    const refresh = first?.refresh
    const made = createClient({
      url,
      auth: {
        ...first,
        // Always the refresh of the latest props, without making a new client.
        refresh: refresh === undefined ? undefined : () => (latest.current.auth?.refresh ?? refresh)(),
      },
      realtime: options,
    }).realtime
    setClient(made)
    return () => {
      setClient(null)
      void made.disconnect()
    }
  }, [url])
  const sentToken = useRef(token)
  useEffect(() => {
    if (client === null || token === undefined || token === sentToken.current) return
    sentToken.current = token
    client.setAuth(token).catch(() => {})
  }, [client, token])
  return client
}

/**
 * The client of the nearest RealtimeProvider; null until it is made (always null while rendering on a server).
 * Throws when there is no provider.
 */
export function useRealtimeClient(): RealtimeClient | null {
  const client = useContext(ClientContext)
  if (client === undefined) {
    throw new Error(
      '@fluxbase/react: this hook needs a <RealtimeProvider client={client}> (or url=...) above the component',
    )
  }
  return client
}
