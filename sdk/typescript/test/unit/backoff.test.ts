// The reconnect policy of docs/protocol.md's close-code table, and full-jitter exponential backoff.

import assert from 'node:assert/strict'
import { test } from 'node:test'
import { afterClose, backoffDelay, DEFAULT_RECONNECT } from '../../dist/backoff.js'

const options = { baseDelayMs: 100, maxDelayMs: 1000, rateLimitedDelayMs: 5000 }
const top = () => 0.999999
const bottom = () => 0

test('the bound doubles from the base delay and stops at the maximum', () => {
  assert.deepEqual(
    [0, 1, 2, 3, 4, 5].map((attempt) => backoffDelay(attempt, options, top)),
    [99, 199, 399, 799, 999, 999],
  )
  assert.equal(backoffDelay(1e6, options, top), 999)
})

test('full jitter: the wait is anywhere between 0 and the bound', () => {
  assert.equal(backoffDelay(3, options, bottom), 0)
  assert.equal(backoffDelay(3, options, () => 0.5), 400)
})

test('1000 and client faults stop; 4001 wants a new token', () => {
  for (const code of [1000, 1002, 1003, 1007, 1008, 1009]) {
    assert.equal(afterClose(code, 0, options).action, 'stop', `close ${code}`)
  }
  assert.match((afterClose(1009, 0, options) as { reason: string }).reason, /max_message_size/)
  assert.equal(afterClose(4001, 0, options).action, 'reauth')
  assert.equal(afterClose(4001, 7, options).action, 'reauth')
})

test('server going away, internal errors, timeouts, slow consumers and dropped connections retry with backoff', () => {
  for (const code of [1001, 1005, 1006, 1011, 1012, 1013, 4008, 4009, 4999]) {
    assert.deepEqual(afterClose(code, 2, options, top), { action: 'retry', delayMs: 399 }, `close ${code}`)
  }
})

test('4029 backs off at least rateLimitedDelayMs before the jittered part', () => {
  assert.deepEqual(afterClose(4029, 0, options, bottom), { action: 'retry', delayMs: 5000 })
  assert.deepEqual(afterClose(4029, 1, options, top), { action: 'retry', delayMs: 5199 })
})

test('defaults: one second doubling to thirty', () => {
  assert.deepEqual(DEFAULT_RECONNECT, { baseDelayMs: 1000, maxDelayMs: 30_000, rateLimitedDelayMs: 5000 })
})
