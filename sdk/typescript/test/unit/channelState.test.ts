// One channel's subscription as a state machine: values in, messages and statuses out.

import assert from 'node:assert/strict'
import { test } from 'node:test'
import { type ChannelEffect, ChannelMachine } from '../../dist/channelState.js'

function machine(kind: 'table' | 'presence' | 'broadcast' = 'table', options = {}) {
  let n = 0
  const name = kind === 'table' ? 'table:public.users' : `${kind}:room`
  return new ChannelMachine(name, kind, options, () => `r${++n}`)
}

function sent(effects: ChannelEffect[]) {
  return effects.filter((e) => e.kind === 'send').map((e) => (e.kind === 'send' ? e.message : undefined))
}

function statuses(effects: ChannelEffect[]) {
  return effects.flatMap((e) => (e.kind === 'status' ? [[e.status, e.error?.code]] : []))
}

test('subscribe sends at once on an open connection, SUBSCRIBED comes with the ack of that ref', () => {
  const m = machine('table', { event: 'UPDATE', filter: 'id=eq.1' })
  assert.deepEqual(sent(m.subscribe(true)), [
    { type: 'subscribe', channel: 'table:public.users', ref: 'r1', event: 'UPDATE', filter: 'id=eq.1' },
  ])
  assert.equal(m.phase, 'joining')
  assert.deepEqual(m.subscribe(true), [], 'a second subscribe while joining sends nothing')
  assert.deepEqual(m.ack('subscribed', 'other'), [], 'an ack for another ref is not ours')
  assert.deepEqual(statuses(m.ack('subscribed', 'r1')), [['SUBSCRIBED', undefined]])
  assert.equal(m.phase, 'joined')
})

test('before the connection opens, subscribe waits; the open sends it', () => {
  const m = machine()
  assert.deepEqual(m.subscribe(false), [])
  assert.deepEqual(sent(m.socketOpened()), [{ type: 'subscribe', channel: 'table:public.users', ref: 'r1' }])
})

test('unsubscribe before anything was sent closes at once (the reference snippet)', () => {
  const m = machine()
  m.subscribe(false)
  assert.deepEqual(statuses(m.unsubscribe(false)), [['CLOSED', undefined]])
  assert.equal(m.phase, 'closed')
  assert.deepEqual(m.socketOpened(), [], 'nothing is sent when the connection opens later')
})

test('unsubscribe after the subscribe was sent waits for the ack of the unsubscribe', () => {
  const m = machine()
  m.subscribe(true)
  assert.deepEqual(sent(m.unsubscribe(true)), [{ type: 'unsubscribe', channel: 'table:public.users', ref: 'r2' }])
  assert.equal(m.phase, 'leaving')
  assert.deepEqual(m.ack('subscribed', 'r1'), [], 'the late subscribe ack does not revive it')
  assert.deepEqual(statuses(m.ack('unsubscribed', 'r2')), [['CLOSED', undefined]])
})

test('a refused subscribe is CHANNEL_ERROR with the server code, and is not retried on reconnect', () => {
  const m = machine()
  m.subscribe(true)
  const effects = m.error({ type: 'error', code: 'FORBIDDEN', message: 'GRANT SELECT', channel: 'table:public.users', ref: 'r1' })
  assert.deepEqual(statuses(effects), [['CHANNEL_ERROR', 'FORBIDDEN']])
  assert.equal(m.phase, 'errored')
  assert.deepEqual(m.socketClosed(), [])
  assert.deepEqual(m.socketOpened(), [])
  assert.deepEqual(sent(m.subscribe(true)), [{ type: 'subscribe', channel: 'table:public.users', ref: 'r2' }])
})

test('CHANGES_MISSED is reported and the subscription stays; FORBIDDEN after a token change ends it', () => {
  const m = machine()
  m.subscribe(true)
  m.ack('subscribed', 'r1')
  const missed = m.error({ type: 'error', code: 'CHANGES_MISSED', message: 'refetch', channel: 'table:public.users' })
  assert.deepEqual(statuses(missed), [['CHANNEL_ERROR', 'CHANGES_MISSED']])
  assert.equal(m.phase, 'joined')
  const forbidden = m.error({ type: 'error', code: 'FORBIDDEN', message: 'no', channel: 'table:public.users' })
  assert.deepEqual(statuses(forbidden), [['CHANNEL_ERROR', 'FORBIDDEN']])
  assert.equal(m.phase, 'errored')
})

test("an error answering another request (a broadcast) is reported without touching the subscription", () => {
  const m = machine('broadcast')
  m.subscribe(true)
  m.ack('subscribed', 'r1')
  const effects = m.error({ type: 'error', code: 'RATE_LIMITED', message: 'slow down', channel: 'broadcast:room', ref: 'r9' })
  assert.deepEqual(statuses(effects), [['CHANNEL_ERROR', 'RATE_LIMITED']])
  assert.equal(m.phase, 'joined')
})

test('a lost connection resubscribes on the next one, and presence is tracked again after its ack', () => {
  const m = machine('presence')
  m.subscribe(true)
  m.ack('subscribed', 'r1')
  assert.deepEqual(sent(m.track({ name: 'alice' }, true)), [
    { type: 'presence', channel: 'presence:room', event: 'track', payload: { name: 'alice' }, ref: 'r2' },
  ])
  assert.deepEqual(m.socketClosed(), [])
  assert.equal(m.phase, 'joining')
  assert.deepEqual(sent(m.socketOpened()), [{ type: 'subscribe', channel: 'presence:room', ref: 'r3' }])
  const effects = m.ack('subscribed', 'r3')
  assert.deepEqual(statuses(effects), [['SUBSCRIBED', undefined]])
  assert.deepEqual(sent(effects), [
    { type: 'presence', channel: 'presence:room', event: 'track', payload: { name: 'alice' }, ref: 'r4' },
  ])
})

test('track before the subscription is acked waits for the ack; untrack forgets it', () => {
  const m = machine('presence')
  m.subscribe(true)
  assert.deepEqual(m.track({ name: 'alice' }, true), [])
  assert.ok(m.tracking)
  assert.deepEqual(m.untrack(true), [], 'nothing was tracked on the server yet')
  assert.ok(!m.tracking)
  assert.deepEqual(sent(m.ack('subscribed', 'r1')), [], 'so nothing is tracked after the ack')
  assert.deepEqual(sent(m.untrack(true)), [{ type: 'presence', channel: 'presence:room', event: 'untrack', ref: 'r2' }])
})

test('an unsubscribe lost with the connection completes; a stopped client closes every channel', () => {
  const m = machine()
  m.subscribe(true)
  m.ack('subscribed', 'r1')
  m.unsubscribe(true)
  assert.deepEqual(statuses(m.socketClosed()), [['CLOSED', undefined]])
  const other = machine()
  other.subscribe(false)
  assert.deepEqual(statuses(other.terminated()), [['CLOSED', undefined]])
  assert.deepEqual(other.terminated(), [], 'only once')
})

test('a client waiting for a new token tells channels that wait to subscribe, and only those', () => {
  const waiting = machine()
  waiting.subscribe(false)
  const error = { code: 'UNAUTHORIZED' } as never
  assert.deepEqual(statuses(waiting.interrupted(error)), [['CHANNEL_ERROR', 'UNAUTHORIZED']])
  assert.deepEqual(machine().interrupted(error), [])
})
