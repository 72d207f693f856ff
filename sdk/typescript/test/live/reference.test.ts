// The reference's code (realtime-api-reference.md) run as written against fluxrt: only the URL and the token,
// which the reference leaves as placeholders, come from the test. These use the global WebSocket, as in a browser
// (Node 20 has one with --experimental-websocket, which tests/test_sdk_typescript.py passes).

import assert from 'node:assert/strict'
import { after, before, test } from 'node:test'
import { createClient } from '@fluxbase/sdk'
import { client, disconnectAll, env, Fluxrt, Inbox, sql, token, waitFor } from '../support/fluxrt.js'

const server = new Fluxrt()
before(() => server.start())
after(async () => {
  await disconnectAll()
  await server.close()
})

const http = env.url
const YOUR_TOKEN = token('alice')

/** A second subscriber on the same table: proof that a change was delivered, whoever else missed it. */
async function witness() {
  const seen = new Inbox<string>()
  const channel = client({ token: token('witness') })
    .realtime.channel('table:public.users')
    .on('*', (payload) => seen.push(`${payload.type} ${JSON.stringify('record' in payload ? payload.record : null)}`))
    .subscribe()
  await channel.subscribed()
  return seen
}

test('TypeScript SDK: subscribe, log INSERT, UPDATE and DELETE, unsubscribe', async (t) => {
  const log = t.mock.method(console, 'log', () => {})
  const client = createClient({
    url: http,
    auth: { token: YOUR_TOKEN },
  })

  // Subscribe to table changes
  const channel = client.realtime
    .channel('table:public.users')
    .on('INSERT', (payload) => {
      console.log('New user:', payload.record)
    })
    .on('UPDATE', (payload) => {
      console.log('Updated:', payload.old_record, '→', payload.record)
    })
    .on('DELETE', (payload) => {
      console.log('Deleted:', payload.old_record)
    })
    .subscribe()

  await channel.subscribed()
  const { rows } = await sql("INSERT INTO public.users (name, email) VALUES ('John', 'john@example.com') RETURNING id")
  const id = rows[0].id as number
  await sql("UPDATE public.users SET name = 'John Doe' WHERE id = $1", [id])
  await sql('DELETE FROM public.users WHERE id = $1', [id])
  await waitFor('three lines logged', () => log.mock.callCount() >= 3)
  const john = { id, name: 'John', email: 'john@example.com' }
  const johnDoe = { ...john, name: 'John Doe' }
  assert.deepEqual(
    log.mock.calls.map((call) => call.arguments),
    [['New user:', john], ['Updated:', john, '→', johnDoe], ['Deleted:', johnDoe]],
  )

  // Unsubscribe
  await channel.unsubscribe()
  assert.equal(channel.state, 'closed')
  const seen = await witness()
  await sql("INSERT INTO public.users (name) VALUES ('after unsubscribe')")
  assert.match(await seen.next('the witness to see the insert'), /^INSERT .*after unsubscribe/)
  assert.equal(log.mock.callCount(), 3, 'nothing logged after unsubscribe')
  await client.realtime.disconnect()
})

test("TypeScript SDK: the issue's form, unsubscribe right after subscribe, runs without error", async (t) => {
  // The reference calls channel.unsubscribe() on a `channel` it never declares; the issue names the chain `channel`.
  const log = t.mock.method(console, 'log', () => {})
  const client = createClient({ url: http, auth: { token: YOUR_TOKEN } })
  const channel = client.realtime.channel('table:public.users')
    .on('INSERT', (payload) => console.log('New user:', payload.record))
    .on('UPDATE', (payload) => console.log('Updated:', payload.old_record, '->', payload.record))
    .on('DELETE', (payload) => console.log('Deleted:', payload.old_record))
    .subscribe()
  channel.unsubscribe()

  assert.equal(channel.state, 'closed')
  await waitFor('the connection to open', () => client.realtime.connectionState() === 'OPEN')
  const seen = await witness()
  await sql("INSERT INTO public.users (name) VALUES ('never logged')")
  assert.match(await seen.next('the witness to see the insert'), /never logged/)
  assert.equal(log.mock.callCount(), 0)
  await client.realtime.disconnect()
})

test('JavaScript example: connect, subscribe, receive, ping, with the JSON of the reference', async (t) => {
  const log = t.mock.method(console, 'log', () => {})
  const error = t.mock.method(console, 'error', () => {})
  const host = http.replace('http://', '')

  const ws = new WebSocket(`ws://${host}/realtime?token=${YOUR_TOKEN}`)

  ws.onopen = () => {
    console.log('Connected')
  }

  ws.onmessage = (event) => {
    const message = JSON.parse(event.data)
    console.log('Received:', message)
  }

  ws.onerror = (error) => {
    console.error('Error:', error)
  }

  ws.onclose = () => {
    console.log('Disconnected')
  }

  const received = () => log.mock.calls.filter((c) => c.arguments[0] === 'Received:').map((c) => c.arguments[1])
  await waitFor('Connected', () => log.mock.calls.some((c) => c.arguments[0] === 'Connected'))
  ws.send(JSON.stringify({ type: 'subscribe', channel: 'table:public.users' }))
  await waitFor('the ack', () => received().length === 1)
  assert.deepEqual(received()[0], { type: 'ack', channel: 'table:public.users', status: 'subscribed' })

  await sql("INSERT INTO public.users (id, name, email) VALUES (123, 'John Doe', 'john@example.com')")
  await waitFor('the change', () => received().length === 2)
  const { timestamp, id, ...payload } = received()[1].payload
  assert.equal(typeof timestamp, 'string')
  assert.equal(typeof id, 'string')
  assert.deepEqual({ ...received()[1], payload }, {
    type: 'broadcast',
    channel: 'table:public.users',
    payload: {
      type: 'INSERT',
      schema: 'public',
      table: 'users',
      record: { id: 123, name: 'John Doe', email: 'john@example.com' },
    },
  })
  await sql('DELETE FROM public.users WHERE id = 123')
  await waitFor('the delete', () => received().length === 3)

  ws.send(JSON.stringify({ type: 'ping' }))
  await waitFor('the pong', () => received().length === 4)
  assert.deepEqual(received()[3], { type: 'pong' })

  ws.send(JSON.stringify({ type: 'unsubscribe', channel: 'table:public.users' }))
  await waitFor('the unsubscribe ack', () => received().length === 5)
  assert.deepEqual(received()[4], { type: 'ack', channel: 'table:public.users', status: 'unsubscribed' })

  ws.close()
  await waitFor('Disconnected', () => log.mock.calls.some((c) => c.arguments[0] === 'Disconnected'))
  assert.equal(error.mock.callCount(), 0)
})

test('JavaScript example: a bad token gets the reference error, then close 4001', async () => {
  const ws = new WebSocket(`ws://${http.replace('http://', '')}/realtime?token=YOUR_TOKEN`)
  const messages: unknown[] = []
  ws.onmessage = (event) => messages.push(JSON.parse(event.data))
  const code = await new Promise<number>((resolve) => {
    ws.onclose = (event) => resolve(event.code)
  })
  assert.deepEqual(messages, [{ type: 'error', code: 'UNAUTHORIZED', message: 'Invalid or expired token' }])
  assert.equal(code, 4001)
})

test('Send Message (Broadcast): the reference JSON reaches another subscriber as sent', async () => {
  const inbox = new Inbox<unknown>()
  const listener = client({ token: token('bob') }).realtime.channel('broadcast:chat').on('broadcast', inbox.push).subscribe()
  await listener.subscribed()
  const ws = new WebSocket(`ws://${http.replace('http://', '')}/realtime?token=${YOUR_TOKEN}`)
  await new Promise((resolve) => {
    ws.onopen = resolve
  })
  ws.send(JSON.stringify({ type: 'broadcast', channel: 'broadcast:chat', payload: { message: 'Hello World', user: 'john' } }))
  assert.deepEqual(await inbox.next(), { message: 'Hello World', user: 'john' })
  ws.close()
})
