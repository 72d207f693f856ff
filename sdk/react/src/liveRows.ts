// The rows of a live list and how a change moves them. Pure: a map in, a new map out, the input never modified (React
// compares state by identity).

import type { ChangePayload } from '@fluxbase/sdk'

/** How a row is identified: a column name (default `id`) or a function of the row. */
export type RowKey<R> = (keyof R & string) | ((row: R) => unknown)

export function keyFunction<R>(key: RowKey<R> | undefined): (row: R) => unknown {
  if (typeof key === 'function') return key
  const column = key ?? 'id'
  return (row) => (row as Record<string, unknown>)[column]
}

export function rowsByKey<R>(rows: readonly R[], keyOf: (row: R) => unknown): Map<unknown, R> {
  if (!Array.isArray(rows)) {
    throw new TypeError('useLiveRows: load() must resolve to an array of rows')
  }
  const map = new Map<unknown, R>()
  for (const row of rows) map.set(keyOf(row), row)
  return map
}

/**
 * The rows after `change`, or `undefined` when the change cannot be applied from what it carries (a TRUNCATE of one
 * partition: which rows were in it is not known here), so the rows must be loaded again.
 *
 * An INSERT or UPDATE puts the row under its key (a row loaded and also delivered is held once), a DELETE removes
 * its key (nothing happens when it is not there); an UPDATE that changed the key also removes the old one.
 */
export function applyChange<R>(
  rows: Map<unknown, R>,
  change: ChangePayload<R>,
  keyOf: (row: R) => unknown,
): Map<unknown, R> | undefined {
  switch (change.type) {
    case 'INSERT': {
      const next = new Map(rows)
      next.set(keyOf(change.record), change.record)
      return next
    }
    case 'UPDATE': {
      const next = new Map(rows)
      const key = keyOf(change.record)
      if (change.old_record !== undefined) {
        const old = keyOf(change.old_record)
        if (old !== key) next.delete(old)
      }
      next.set(key, change.record)
      return next
    }
    case 'DELETE': {
      const key = keyOf(change.old_record)
      if (!rows.has(key)) return rows
      const next = new Map(rows)
      next.delete(key)
      return next
    }
    case 'TRUNCATE':
      return change.partition === undefined ? new Map() : undefined
  }
}
