// A presence room on the client: sync replaces it, diffs change it, both report joins and leaves.

import assert from 'node:assert/strict'
import { test } from 'node:test'
import { applyDiff, syncState } from '../../dist/presence.js'

const alice1 = { ref: 'c1', state: { name: 'alice' } }
const alice2 = { ref: 'c2', state: { name: 'alice', tab: 2 } }
const bob = { ref: 'c3', state: { name: 'bob' } }

test('the first sync joins everyone in it', () => {
  const change = syncState({}, { alice: [alice1, alice2], bob: [bob] })
  assert.deepEqual(change.state, { alice: [alice1, alice2], bob: [bob] })
  assert.deepEqual(change.leaves, [])
  assert.deepEqual(change.joins, [
    { key: 'alice', newPresences: [alice1, alice2], currentPresences: [alice1, alice2] },
    { key: 'bob', newPresences: [bob], currentPresences: [bob] },
  ])
})

test('a later sync (after a reconnect) reports only what changed meanwhile', () => {
  const moved = { ref: 'c3', state: { name: 'bob', status: 'away' } }
  const change = syncState({ alice: [alice1, alice2], bob: [bob] }, { alice: [alice2], bob: [moved] })
  assert.deepEqual(change.state, { alice: [alice2], bob: [moved] })
  assert.deepEqual(change.leaves, [
    { key: 'alice', leftPresences: [alice1], currentPresences: [alice2] },
    { key: 'bob', leftPresences: [bob], currentPresences: [moved] },
  ])
  assert.deepEqual(change.joins, [{ key: 'bob', newPresences: [moved], currentPresences: [moved] }])
})

test('a diff adds joins and removes leaves; a key with no metas left is gone', () => {
  const joined = applyDiff({ alice: [alice1] }, { joins: { alice: [alice2], bob: [bob] }, leaves: {} })
  assert.deepEqual(joined.state, { alice: [alice1, alice2], bob: [bob] })
  assert.deepEqual(joined.joins, [
    { key: 'alice', newPresences: [alice2], currentPresences: [alice1, alice2] },
    { key: 'bob', newPresences: [bob], currentPresences: [bob] },
  ])
  const left = applyDiff(joined.state, { joins: {}, leaves: { bob: [bob], alice: [alice1] } })
  assert.deepEqual(left.state, { alice: [alice2] })
  assert.deepEqual(left.leaves, [
    { key: 'bob', leftPresences: [bob], currentPresences: [] },
    { key: 'alice', leftPresences: [alice1], currentPresences: [alice2] },
  ])
})

test('a re-track (old meta left, new meta joined, same ref) keeps the new state', () => {
  const updated = { ref: 'c1', state: { name: 'alice', status: 'away' } }
  const change = applyDiff({ alice: [alice1] }, { joins: { alice: [updated] }, leaves: { alice: [alice1] } })
  assert.deepEqual(change.state, { alice: [updated] })
  assert.equal(change.leaves.length, 1)
  assert.equal(change.joins.length, 1)
})

test('inputs are never modified', () => {
  const current = { alice: [alice1] }
  const diff = { joins: { bob: [bob] }, leaves: { alice: [alice1] } }
  const frozen = JSON.stringify([current, diff])
  applyDiff(current, diff)
  syncState(current, { bob: [bob] })
  assert.equal(JSON.stringify([current, diff]), frozen)
})
