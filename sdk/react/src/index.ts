// @fluxbase/react: React hooks for fluxrt on @fluxbase/sdk.
//
//   <RealtimeProvider url="http://localhost:8080" auth={{ token }}>
//     const { rows, status } = useLiveRows<Todo>('todos', { load: fetchTodos })

export {
  type BroadcastOptions,
  type BroadcastResult,
  type ChannelHookStatus,
  type ChannelOptions,
  type ChannelResult,
  type LiveRowsOptions,
  type LiveRowsResult,
  type LiveRowsStatus,
  type PresenceMember,
  type PresenceResult,
  tableChannel,
  type TableChangesOptions,
  useBroadcast,
  useChannel,
  useConnectionState,
  useLiveRows,
  usePresence,
  useTableChanges,
} from './hooks.js'
export { applyChange, type RowKey } from './liveRows.js'
export { RealtimeProvider, type RealtimeProviderProps, useRealtimeClient } from './provider.js'
