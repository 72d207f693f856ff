// Reading a JWT's expiry and deciding when to refresh it.

import assert from 'node:assert/strict'
import { test } from 'node:test'
import { refreshDelay, tokenExpiry } from '../../dist/token.js'

function jwt(claims: Record<string, unknown>): string {
  const part = (value: unknown) => Buffer.from(JSON.stringify(value)).toString('base64url')
  return `${part({ alg: 'HS256' })}.${part(claims)}.signature`
}

test('exp is read from the payload, in milliseconds', () => {
  assert.equal(tokenExpiry(jwt({ sub: 'alice', exp: 1_700_000_000 })), 1_700_000_000_000)
  // base64url characters and missing padding, as real tokens have them.
  assert.equal(tokenExpiry(jwt({ sub: '~~~>>>???', exp: 12 })), 12_000)
})

test('no expiry when the token is not a JWT or has no numeric exp', () => {
  assert.equal(tokenExpiry('opaque'), undefined)
  assert.equal(tokenExpiry('a.!!!.c'), undefined)
  assert.equal(tokenExpiry(jwt({ sub: 'alice' })), undefined)
  assert.equal(tokenExpiry(jwt({ exp: '1700000000' })), undefined)
})

test('refresh the margin ahead of exp, or halfway when the token is short-lived', () => {
  const now = 1_000_000
  const exp = (ms: number) => jwt({ exp: (now + ms) / 1000 })
  assert.equal(refreshDelay(exp(3_600_000), now, 60_000), 3_540_000)
  assert.equal(refreshDelay(exp(2_000), now, 60_000), 1_000)
  assert.equal(refreshDelay(exp(-5_000), now, 60_000), 0)
  assert.equal(refreshDelay('opaque', now, 60_000), undefined)
})
