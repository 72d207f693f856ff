// Channel names, decoding of server frames, and the WebSocket URL built from the reference's `url`.

import assert from 'node:assert/strict'
import { test } from 'node:test'
import { channelKind, decodeServerMessage, isChangePayload, ProtocolError, realtimeUrl } from '@fluxbase/sdk'

test('channel kinds follow PROTOCOL.md', () => {
  assert.equal(channelKind('table:public.users'), 'table')
  assert.equal(channelKind('table:App.Orders$2'), 'table')
  assert.equal(channelKind('presence:chat-room-1'), 'presence')
  assert.equal(channelKind('broadcast:notifications'), 'broadcast')
  assert.equal(channelKind(`broadcast:${'x'.repeat(255)}`), 'broadcast')
})

test('malformed channels are refused with the expected formats', () => {
  for (const name of [
    'users',
    'table:users',
    'table:a.b.c',
    'table:1x.users',
    'presence:',
    'presence:two words',
    'broadcast:tab\there',
    `broadcast:${'x'.repeat(256)}`,
    'chat:lobby',
  ]) {
    assert.throws(() => channelKind(name), /expected table:\{schema\}\.\{table\} \(e\.g\. table:public\.users\)/, name)
  }
})

test('server frames decode to their types', () => {
  assert.deepEqual(decodeServerMessage('{"type":"ack","channel":"table:public.users","status":"subscribed"}'), {
    type: 'ack',
    channel: 'table:public.users',
    status: 'subscribed',
  })
  assert.deepEqual(decodeServerMessage('{"type":"ack","status":"authorized","ref":"7"}'), {
    type: 'ack',
    status: 'authorized',
    ref: '7',
  })
  assert.equal(decodeServerMessage('{"type":"pong"}').type, 'pong')
  const error = decodeServerMessage('{"type":"error","code":"CHANGES_MISSED","message":"refetch","channel":"table:a.b"}')
  assert.deepEqual(error, { type: 'error', code: 'CHANGES_MISSED', message: 'refetch', channel: 'table:a.b' })
  const diff = decodeServerMessage(
    '{"type":"presence","channel":"presence:r","event":"diff","payload":{"joins":{"k":[{"ref":"1","state":{}}]},"leaves":{}}}',
  )
  assert.equal(diff.type === 'presence' && diff.event, 'diff')
  assert.equal(decodeServerMessage('{"type":"broadcast","channel":"broadcast:b","payload":null}').type, 'broadcast')
})

test('frames that break the protocol are ProtocolErrors that quote them', () => {
  for (const text of [
    'not json',
    '[1]',
    '{"type":"nope"}',
    '{"type":"ack","status":"maybe"}',
    '{"type":"error","code":"TEAPOT","message":"x"}',
    '{"type":"error","code":"FORBIDDEN"}',
    '{"type":"broadcast","channel":"broadcast:b"}',
    '{"type":"presence","channel":"presence:r","event":"sync","payload":{"k":"not metas"}}',
    '{"type":"presence","channel":"presence:r","event":"diff","payload":{"joins":{}}}',
    '{"type":"pong","ref":5}',
  ]) {
    assert.throws(() => decodeServerMessage(text), (error: unknown) => {
      assert.ok(error instanceof ProtocolError, text)
      assert.ok(error.message.includes(text.slice(0, 20)), error.message)
      return true
    })
  }
})

test('change payloads of the reference are recognised, others are not', () => {
  const base = { schema: 'public', table: 'users' }
  assert.ok(isChangePayload({ ...base, type: 'INSERT', record: { id: 1 } }))
  assert.ok(isChangePayload({ ...base, type: 'UPDATE', record: { id: 1 }, old_record: { id: 1 } }))
  assert.ok(isChangePayload({ ...base, type: 'UPDATE', record: { id: 1 } }))
  assert.ok(isChangePayload({ ...base, type: 'DELETE', old_record: { id: 1 } }))
  assert.ok(isChangePayload({ ...base, type: 'TRUNCATE' }))
  assert.ok(!isChangePayload({ ...base, type: 'INSERT' }))
  assert.ok(!isChangePayload({ type: 'DELETE', old_record: {} }))
  assert.ok(!isChangePayload({ message: 'Hello World' }))
})

test("the reference's http URL becomes the WebSocket endpoint, with the token in the query", () => {
  assert.equal(realtimeUrl('http://localhost:8080', '/realtime'), 'ws://localhost:8080/realtime')
  assert.equal(realtimeUrl('https://rt.example/', '/realtime', 'a.b.c'), 'wss://rt.example/realtime?token=a.b.c')
  assert.equal(realtimeUrl('ws://h:1/realtime', '/realtime'), 'ws://h:1/realtime')
  assert.equal(realtimeUrl('http://h/api', '/rt'), 'ws://h/api/rt')
  assert.throws(() => realtimeUrl('/realtime', '/realtime'), /absolute URL; expected e\.g\. http:\/\/localhost:8080/)
  assert.throws(() => realtimeUrl('localhost:8080', '/realtime'), /expected an http, https, ws or wss URL/)
  assert.throws(() => realtimeUrl('ftp://h', '/realtime'), /expected an http, https, ws or wss URL/)
})
