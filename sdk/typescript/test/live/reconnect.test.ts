// Reconnecting: fluxrt restarts (SIGTERM closes with 1001, then a new process on the same port) under connected
// clients, and a server that stops answering (SIGSTOP) is given up on and reconnected to.

import assert from 'node:assert/strict'
import { after, afterEach, before, test } from 'node:test'
import type { ChangePayload, ChannelStatus } from '@fluxbase/sdk'
import { client, disconnectAll, Fluxrt, Inbox, sql, states, token, waitFor } from '../support/fluxrt.js'

const server = new Fluxrt()
before(() => server.start())
afterEach(() => disconnectAll())
after(() => server.close())

test('after a server restart every channel is subscribed again and presence is tracked again', async () => {
  const alice = client({ token: token('alice') }, { reconnect: { baseDelayMs: 100, maxDelayMs: 400 } })
  const aliceStates = states(alice)
  const statuses = new Inbox<string>()
  const status = (name: string) => (s: ChannelStatus) => statuses.push(`${name} ${s}`)
  const changes = new Inbox<ChangePayload>()
  const news = new Inbox<unknown>()
  const table = alice.realtime.channel('table:public.users').on('INSERT', changes.push).subscribe(status('table'))
  const lobby = alice.realtime.channel('presence:lobby').subscribe(status('lobby'))
  const broadcast = alice.realtime.channel('broadcast:news').on('broadcast', news.push).subscribe(status('news'))
  await lobby.track({ name: 'Alice' })
  await Promise.all([table.subscribed(), broadcast.subscribed()])
  assert.deepEqual(statuses.items.slice().sort(), ['lobby SUBSCRIBED', 'news SUBSCRIBED', 'table SUBSCRIBED'])

  const bob = client({ token: token('bob') }, { reconnect: { baseDelayMs: 100, maxDelayMs: 400 } })
  const bobLobby = bob.realtime.channel('presence:lobby').subscribe()
  await waitFor('bob to see alice', () => bobLobby.presenceState().alice)

  await server.stop()
  const going = await waitFor('the close', () => aliceStates.find((change) => change.code !== undefined))
  assert.equal(going.code, 1001, 'the server going away closes with 1001')
  assert.equal(typeof going.reconnectInMs, 'number')
  await server.start()

  await waitFor('three channels subscribed again', () => statuses.items.length === 6, 10_000)
  assert.deepEqual(statuses.items.slice(3).sort(), ['lobby SUBSCRIBED', 'news SUBSCRIBED', 'table SUBSCRIBED'])
  assert.equal(alice.realtime.connectionState(), 'OPEN')

  await sql("INSERT INTO public.users (name) VALUES ('after restart')")
  const change = await changes.next('the insert after the restart')
  assert.ok(change.type === 'INSERT' && change.record.name === 'after restart')
  const alicePresence = await waitFor('alice tracked again', () => bobLobby.presenceState().alice, 10_000)
  assert.deepEqual(alicePresence.map((meta) => meta.state), [{ name: 'Alice' }])
  const sender = client().realtime.channel('broadcast:news')
  await sender.subscribe().subscribed()
  await sender.send({ headline: 'back' })
  assert.deepEqual(await news.next(), { headline: 'back' })
})

test('a server that stops answering pings is given up on; the client reconnects when it answers again', async () => {
  const one = client({}, { heartbeatIntervalMs: 150, connectTimeoutMs: 300, reconnect: { baseDelayMs: 50, maxDelayMs: 200 } })
  const seen = states(one)
  const statuses = new Inbox<ChannelStatus>()
  await one.realtime.channel('broadcast:stalled').subscribe(statuses.push).subscribed()
  server.signal('SIGSTOP')
  try {
    const dropped = await waitFor('the client to give up', () => seen.find((change) => change.state === 'CLOSED'), 3000)
    assert.match(dropped.reason ?? '', /no answer to a ping within 150 ms/)
    // Attempts while the server is stopped connect (the kernel accepts) but never open.
    await waitFor('a failed attempt', () => seen.filter((change) => change.state === 'CONNECTING').length >= 3, 3000)
  } finally {
    server.signal('SIGCONT')
  }
  await waitFor('subscribed again', () => statuses.items.length === 2, 5000)
  assert.deepEqual(statuses.items, ['SUBSCRIBED', 'SUBSCRIBED'])
})
