// The SDK against fluxrt: broadcast, presence, table options and payloads, per-channel errors, connection states,
// tokens (setAuth, refresh, 4001) and the heartbeat. Clients use the `ws` package (see support/fluxrt.ts).

import assert from 'node:assert/strict'
import { after, afterEach, before, test } from 'node:test'
import type { ChangePayload, ChannelStatus, PresenceJoin, PresenceLeave, RealtimeError } from '@fluxbase/sdk'
import WebSocket from 'ws'
import { client, disconnectAll, Fluxrt, Inbox, sleep, sql, states, token, waitFor } from '../support/fluxrt.js'

const server = new Fluxrt()
before(() => server.start())
afterEach(() => disconnectAll())
after(() => server.close())

function statusInbox() {
  const inbox = new Inbox<[ChannelStatus, RealtimeError | undefined]>()
  return { inbox, callback: (status: ChannelStatus, error?: RealtimeError) => inbox.push([status, error]) }
}

test('broadcast: one client sends, the other receives the payload; the sender hears nothing back', async () => {
  const aliceHears = new Inbox<unknown>()
  const bobHears = new Inbox<unknown>()
  const alice = client({ token: token('alice') }).realtime.channel('broadcast:room-1').on('broadcast', aliceHears.push)
  const bob = client({ token: token('bob') }).realtime.channel('broadcast:room-1').on('broadcast', bobHears.push)
  await Promise.all([alice.subscribe().subscribed(), bob.subscribe().subscribed()])

  await alice.send({ message: 'Hello World', user: 'alice' })
  assert.deepEqual(await bobHears.next(), { message: 'Hello World', user: 'alice' })
  await bob.send(['any', 'json', 1])
  // Alice's own message, had it come back, would have arrived before Bob's answer to it.
  assert.deepEqual(await aliceHears.next(), ['any', 'json', 1])
  assert.deepEqual(aliceHears.rest(), [])
})

test('presence: sync on subscribe, join and leave as others track, untrack and disconnect', async () => {
  const alice = client({ token: token('alice') }).realtime.channel('presence:lobby')
  const joins = new Inbox<PresenceJoin>()
  const leaves = new Inbox<PresenceLeave>()
  let syncs = 0
  alice
    .on('presence', { event: 'join' }, joins.push)
    .on('presence', { event: 'leave' }, leaves.push)
    .on('presence', { event: 'sync' }, () => syncs++)
    .subscribe()
  await alice.track({ name: 'Alice', status: 'online' })
  const own = await joins.next('alice to see herself join')
  assert.equal(own.key, 'alice')
  assert.deepEqual(own.newPresences.map((meta) => meta.state), [{ name: 'Alice', status: 'online' }])

  const bobClient = client({ token: token('bob') })
  const bobSyncs = new Inbox<Record<string, unknown>>()
  const bob = bobClient.realtime.channel('presence:lobby')
  bob.on('presence', { event: 'sync' }, () => bobSyncs.push(bob.presenceState())).subscribe()
  const first = await bobSyncs.next('the sync after subscribe')
  assert.deepEqual(Object.keys(first), ['alice'])
  assert.deepEqual(bob.presenceState().alice?.map((meta) => meta.state), [{ name: 'Alice', status: 'online' }])

  await bob.track({ name: 'Bob' })
  const bobJoin = await joins.next('the join of bob')
  assert.equal(bobJoin.key, 'bob')
  assert.deepEqual(bobJoin.currentPresences.map((meta) => meta.state), [{ name: 'Bob' }])
  assert.deepEqual(Object.keys(alice.presenceState()).sort(), ['alice', 'bob'])

  await bob.untrack()
  const bobLeave = await leaves.next('the leave of bob')
  assert.equal(bobLeave.key, 'bob')
  assert.deepEqual(bobLeave.currentPresences, [])
  assert.deepEqual(Object.keys(alice.presenceState()), ['alice'])

  await bob.track({ name: 'Bob', again: true })
  assert.equal((await joins.next('bob back')).key, 'bob')
  await bobClient.realtime.disconnect()
  assert.equal((await leaves.next('the leave when bob disconnects')).key, 'bob')
  assert.deepEqual(Object.keys(alice.presenceState()), ['alice'])
  assert.ok(syncs >= 5, `sync follows every change (${syncs})`)
})

test('presence: one user in two tabs is one key with two metas', async () => {
  const tab1 = client({ token: token('carol') }).realtime.channel('presence:tabs').subscribe()
  const tab2 = client({ token: token('carol') }).realtime.channel('presence:tabs').subscribe()
  await Promise.all([tab1.track({ tab: 1 }), tab2.track({ tab: 2 })])
  const metas = await waitFor('both tabs', () => (tab1.presenceState().carol?.length === 2 ? tab1.presenceState().carol : undefined))
  assert.deepEqual(metas.map((meta) => meta.state).sort((a, b) => Number(a.tab) - Number(b.tab)), [{ tab: 1 }, { tab: 2 }])
  assert.notEqual(metas[0]?.ref, metas[1]?.ref)
})

test("table: '*' sees INSERT, UPDATE, DELETE and TRUNCATE in order; TRUNCATE has its own event", async () => {
  const all = new Inbox<ChangePayload>()
  const truncates = new Inbox<string>()
  const channel = client({ token: token('alice') })
    .realtime.channel('table:public.users')
    .on('*', all.push)
    .on('TRUNCATE', (payload) => truncates.push(`${payload.schema}.${payload.table}`))
  await channel.subscribe().subscribed()
  const { rows } = await sql("INSERT INTO public.users (name) VALUES ('star') RETURNING id")
  await sql("UPDATE public.users SET name = 'star 2' WHERE id = $1", [rows[0].id])
  await sql('DELETE FROM public.users WHERE id = $1', [rows[0].id])
  await sql('TRUNCATE public.users')
  const seen = [await all.next(), await all.next(), await all.next(), await all.next()]
  assert.deepEqual(seen.map((payload) => payload.type), ['INSERT', 'UPDATE', 'DELETE', 'TRUNCATE'])
  const update = seen[1]
  assert.ok(update?.type === 'UPDATE')
  assert.equal(update.old_record?.name, 'star')
  assert.equal(update.record.name, 'star 2')
  assert.equal(await truncates.next(), 'public.users')
})

test('table options: event and filter narrow what arrives', async () => {
  const updates = new Inbox<ChangePayload>()
  const channel = client({ token: token('alice') })
    .realtime.channel('table:public.users', { event: 'UPDATE', filter: 'name=in.(target,target 2)' })
    .on('*', updates.push)
  await channel.subscribe().subscribed()
  const { rows } = await sql("INSERT INTO public.users (name) VALUES ('target'), ('other') RETURNING id, name")
  const [target, other] = rows as { id: number; name: string }[]
  await sql("UPDATE public.users SET email = 'other@example.com' WHERE id = $1", [other?.id])
  await sql("UPDATE public.users SET name = 'target 2' WHERE id = $1", [target?.id])
  await sql('DELETE FROM public.users WHERE id = $1', [target?.id])
  await sql("UPDATE public.users SET name = 'last' WHERE id = $1", [other?.id])
  const first = await updates.next()
  assert.equal(first.type, 'UPDATE')
  assert.ok(first.type === 'UPDATE' && first.record.name === 'target 2')
  // The last update is not for the filter; a witness proves it was delivered to those who asked.
  const witness = new Inbox<ChangePayload>()
  await client().realtime.channel('table:public.users').on('UPDATE', witness.push).subscribe().subscribed()
  await sql("UPDATE public.users SET name = 'really last' WHERE id = $1", [other?.id])
  await witness.next('the witness')
  assert.deepEqual(updates.rest(), [])
})

test('a refused subscribe reaches the callback and the promise with the server error', async () => {
  const { inbox, callback } = statusInbox()
  const channel = client().realtime.channel('table:public.missing').subscribe(callback)
  await assert.rejects(channel.subscribed(), (error: RealtimeError) => {
    assert.equal(error.code, 'SUBSCRIPTION_FAILED')
    assert.match(error.message, /does not exist/)
    assert.equal(error.channel, 'table:public.missing')
    return true
  })
  const [status, error] = await inbox.next()
  assert.equal(status, 'CHANNEL_ERROR')
  assert.equal(error?.code, 'SUBSCRIPTION_FAILED')
  assert.equal(channel.state, 'errored')
  assert.throws(() => client().realtime.channel('users'), /expected table:\{schema\}\.\{table\}/)
})

test('FORBIDDEN after a token change reaches the channel; setAuth resolves with the ack', async () => {
  await sql(
    'CREATE TABLE IF NOT EXISTS public.members (id int PRIMARY KEY);' +
      'GRANT SELECT ON public.members TO authenticated;' +
      "SELECT enable_realtime('public.members')",
  )
  const { inbox, callback } = statusInbox()
  const one = client({ token: token('alice') })
  const channel = one.realtime.channel('table:public.members').subscribe(callback)
  assert.deepEqual(await inbox.next(), ['SUBSCRIBED', undefined])
  await one.realtime.setAuth(token('alice', { role: 'anon' }))
  const [status, error] = await inbox.next('the FORBIDDEN')
  assert.equal(status, 'CHANNEL_ERROR')
  assert.equal(error?.code, 'FORBIDDEN')
  assert.equal(channel.state, 'errored')
  await assert.rejects(one.realtime.setAuth('not-a-token'), { code: 'UNAUTHORIZED' })
})

test('connection states: CONNECTING, OPEN, then CLOSING and CLOSED on disconnect', async () => {
  const one = client()
  const seen = states(one)
  assert.equal(one.realtime.connectionState(), 'CLOSED')
  await one.realtime.channel('broadcast:states').subscribe().subscribed()
  assert.equal(one.realtime.connectionState(), 'OPEN')
  await one.realtime.disconnect()
  assert.deepEqual(seen.map((change) => change.state), ['CONNECTING', 'OPEN', 'CLOSING', 'CLOSED'])
  assert.equal(seen.at(-1)?.code, 1000)
  assert.equal(one.realtime.connectionState(), 'CLOSED')
})

test('close 4001 is not retried with the same token; setAuth reconnects and resubscribes', async () => {
  const one = client({ token: token('alice', { ttl: -60 }) })
  const seen = states(one)
  const errors = new Inbox<Error>()
  one.realtime.onError(errors.push)
  const { inbox, callback } = statusInbox()
  const channel = one.realtime.channel('broadcast:auth').subscribe(callback)
  const [status, error] = await inbox.next('the channel to hear of the refused token')
  assert.equal(status, 'CHANNEL_ERROR')
  assert.equal(error?.code, 'UNAUTHORIZED')
  assert.match(error?.message ?? '', /call setAuth\(newToken\)/)
  assert.equal((await errors.next()).message, 'Invalid or expired token')
  const closed = seen.at(-1)
  assert.deepEqual([closed?.state, closed?.code, closed?.waitingForToken], ['CLOSED', 4001, true])
  // Backoff here is 50-400 ms: a retry would have happened many times over.
  await sleep(600)
  assert.equal(seen.filter((change) => change.state === 'CONNECTING').length, 1)

  await one.realtime.setAuth(token('alice'))
  assert.deepEqual(await inbox.next('SUBSCRIBED after setAuth'), ['SUBSCRIBED', undefined])
  assert.equal(channel.state, 'joined')
})

test('auth.refresh: a token refused with 4001 is replaced and the client reconnects', async () => {
  // Valid for an hour by its claims, so nothing refreshes it ahead of time, but signed with another secret.
  const forged = `${token('alice').split('.').slice(0, 2).join('.')}.c2lnbmVkIGVsc2V3aGVyZQ`
  let calls = 0
  const one = client({
    token: forged,
    refresh: async () => {
      calls += 1
      return token('alice')
    },
  })
  await one.realtime.channel('broadcast:refresh').subscribe().subscribed()
  assert.equal(calls, 1)
})

test('auth.refresh runs before the token expires and sends it on the live connection', async () => {
  // Tokens with 2 s to live; fluxrt closes an expired one (plus 1 s of leeway) with 4001.
  const short = () => token('alice', { ttl: 2 })
  let calls = 0
  const fresh = client({ token: short(), refresh: () => (calls++, token('alice')) })
  const freshStates = states(fresh)
  const stale = client({ token: short() })
  const staleStates = states(stale)
  const heard = new Inbox<unknown>()
  await fresh.realtime.channel('broadcast:expiry').on('broadcast', heard.push).subscribe().subscribed()
  await stale.realtime.channel('broadcast:expiry').subscribe().subscribed()

  await waitFor('the stale client to be closed 4001', () => staleStates.some((change) => change.code === 4001), 6000)
  assert.equal(calls, 1)
  assert.deepEqual(freshStates.map((change) => change.state), ['CONNECTING', 'OPEN'])
  const sender = client().realtime.channel('broadcast:expiry')
  await sender.subscribe().subscribed()
  await sender.send('still here')
  assert.equal(await heard.next(), 'still here')
})

test('a ping goes out every heartbeat interval and the connection stays up', async () => {
  const sent: string[] = []
  class Recording extends WebSocket {
    override send(data: string): void {
      sent.push(data)
      super.send(data)
    }
  }
  const one = client({}, { WebSocket: Recording, heartbeatIntervalMs: 100 })
  const seen = states(one)
  one.realtime.connect()
  await waitFor('three pings', () => sent.filter((data) => data === '{"type":"ping"}').length >= 3, 3000)
  assert.deepEqual(seen.map((change) => change.state), ['CONNECTING', 'OPEN'])
})

test('close 1009 (message too large) is not retried; the client says why', async () => {
  const one = client()
  const seen = states(one)
  const errors = new Inbox<Error>()
  one.realtime.onError(errors.push)
  const { inbox, callback } = statusInbox()
  const channel = one.realtime.channel('broadcast:big').subscribe(callback)
  await channel.subscribed()
  await assert.rejects(channel.send('x'.repeat(70 * 1024)), { code: 'DISCONNECTED' })
  assert.match((await errors.next()).message, /closed for good: .*max_message_size/)
  await inbox.next() // SUBSCRIBED
  assert.equal((await inbox.next())[0], 'CLOSED')
  await sleep(600)
  assert.deepEqual(seen.map((change) => [change.state, change.code]), [
    ['CONNECTING', undefined],
    ['OPEN', undefined],
    ['CLOSED', 1009],
  ])
})

test('the same channel name gives the same channel; other options are refused', () => {
  const realtime = client().realtime
  const first = realtime.channel('table:public.users', { event: 'INSERT' })
  assert.equal(realtime.channel('table:public.users', { event: 'INSERT' }), first)
  assert.throws(() => realtime.channel('table:public.users'), /already open on this client with other options/)
  assert.throws(() => realtime.channel('broadcast:x').on('INSERT', () => {}), /needs a table: channel/)
})
