// A presence room as the client sees it: a `sync` replaces it, a `diff` changes it, and each yields the joins and
// leaves to report. Pure: states in, new state and events out; the inputs are never modified.

import type { PresenceDiff, PresenceMeta, PresenceState } from './protocol.js'

export interface PresenceJoin<S = Record<string, unknown>> {
  key: string
  /** The metas that arrived with this join. */
  newPresences: PresenceMeta<S>[]
  /** Every meta of the key after the change. */
  currentPresences: PresenceMeta<S>[]
}

export interface PresenceLeave<S = Record<string, unknown>> {
  key: string
  /** The metas that left. */
  leftPresences: PresenceMeta<S>[]
  /** Every meta of the key after the change (empty when the key has left entirely). */
  currentPresences: PresenceMeta<S>[]
}

export interface PresenceChange<S = Record<string, unknown>> {
  state: PresenceState<S>
  joins: PresenceJoin<S>[]
  leaves: PresenceLeave<S>[]
}

function copy<S>(state: PresenceState<S>): PresenceState<S> {
  const out: PresenceState<S> = {}
  for (const [key, metas] of Object.entries(state)) out[key] = [...metas]
  return out
}

function sameMeta<S>(a: PresenceMeta<S>, b: PresenceMeta<S>): boolean {
  return a.ref === b.ref && JSON.stringify(a.state) === JSON.stringify(b.state)
}

/**
 * Replace `current` with the server's whole room. Metas that are new or whose state changed are joins, metas that
 * are gone or whose state changed are leaves: after a reconnect this reports what changed while the client was away.
 */
export function syncState<S>(current: PresenceState<S>, incoming: PresenceState<S>): PresenceChange<S> {
  const state = copy(incoming)
  const joins: PresenceJoin<S>[] = []
  const leaves: PresenceLeave<S>[] = []
  for (const [key, metas] of Object.entries(current)) {
    const now = state[key] ?? []
    const left = metas.filter((meta) => !now.some((other) => sameMeta(meta, other)))
    if (left.length > 0) leaves.push({ key, leftPresences: left, currentPresences: [...now] })
  }
  for (const [key, metas] of Object.entries(state)) {
    const before = current[key] ?? []
    const joined = metas.filter((meta) => !before.some((other) => sameMeta(meta, other)))
    if (joined.length > 0) joins.push({ key, newPresences: joined, currentPresences: [...metas] })
  }
  return { state, joins, leaves }
}

/**
 * Apply one diff. Leaves are applied before joins, so a re-track (the old meta under `leaves`, the new one under
 * `joins`, with the same ref) ends with the new state present.
 */
export function applyDiff<S>(current: PresenceState<S>, diff: PresenceDiff<S>): PresenceChange<S> {
  const state = copy(current)
  for (const [key, metas] of Object.entries(diff.leaves)) {
    const refs = new Set(metas.map((meta) => meta.ref))
    const remaining = (state[key] ?? []).filter((meta) => !refs.has(meta.ref))
    if (remaining.length > 0) state[key] = remaining
    else delete state[key]
  }
  for (const [key, metas] of Object.entries(diff.joins)) {
    const refs = new Set(metas.map((meta) => meta.ref))
    state[key] = [...(state[key] ?? []).filter((meta) => !refs.has(meta.ref)), ...metas]
  }
  const leaves = Object.entries(diff.leaves)
    .filter(([, metas]) => metas.length > 0)
    .map(([key, metas]) => ({ key, leftPresences: [...metas], currentPresences: [...(state[key] ?? [])] }))
  const joins = Object.entries(diff.joins)
    .filter(([, metas]) => metas.length > 0)
    .map(([key, metas]) => ({ key, newPresences: [...metas], currentPresences: [...(state[key] ?? [])] }))
  return { state, joins, leaves }
}
