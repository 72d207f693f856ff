// Reconnecting: fluxrt restarts (SIGTERM closes with 1001, then a new process on the same port) under connected
// clients, a server that stops answering (SIGSTOP) is given up on and reconnected to, and a server SIGKILLed under
// load (no close frames) is reconnected to once it runs again, the table channel resuming where it left off.

import assert from 'node:assert/strict'
import { after, afterEach, before, test } from 'node:test'
import type { ChangePayload, ChannelStatus, InsertPayload, RealtimeError, Row, SubscribedInfo } from '@fluxbase/sdk'
import { client, disconnectAll, Fluxrt, Inbox, sleep, sql, states, token, waitFor, Writer } from '../support/fluxrt.js'

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

test('a server SIGKILLed under load: the client reconnects, tracks again, and the table resumes: every row once', async () => {
  // A short heartbeat, so that a dead peer the kernel does not report is noticed too (see the assertion below).
  const alice = client(
    { token: token('alice') },
    { heartbeatIntervalMs: 300, connectTimeoutMs: 1000, reconnect: { baseDelayMs: 50, maxDelayMs: 300 } },
  )
  const aliceStates = states(alice)
  // Each status with its `recovered` (SUBSCRIBED only).
  const statuses: Record<string, [ChannelStatus, boolean | undefined][]> = { table: [], room: [], news: [] }
  const status = (name: string) => (s: ChannelStatus, _error?: RealtimeError, info?: SubscribedInfo) =>
    statuses[name]!.push([s, info?.recovered])
  const rows: number[] = []
  const news = new Inbox<{ n: number }>()
  const table = alice.realtime
    .channel('table:public.users')
    .on('INSERT', (change: InsertPayload) => {
      if (String(change.record.name).startsWith('kill-')) rows.push(change.record.id as number)
    })
    .subscribe(status('table'))
  const room = alice.realtime.channel('presence:killed-room').subscribe(status('room'))
  const broadcast = alice.realtime
    .channel<Row, { n: number }>('broadcast:killed-news')
    .on('broadcast', news.push).subscribe(status('news'))
  await room.track({ name: 'Alice' })
  await Promise.all([table.subscribed(), broadcast.subscribed()])

  // The load: a row every 15 ms and a broadcast every 10 ms from a second client, before, during and after the kill.
  const writer = new Writer(15, 'kill-')
  const bob = client({ token: token('bob') })
  await bob.realtime.channel('presence:killed-room').subscribe().subscribed()
  const sender = bob.realtime.channel<Row, { n: number }>('broadcast:killed-news')
  let sent = 0
  let sending = true
  const broadcasting = (async () => {
    while (sending) {
      // Refused with DISCONNECTED while fluxrt is down and until bob is connected again: the loop goes on.
      await sender.send({ n: ++sent }).catch(() => {})
      await sleep(10)
    }
  })()
  try {
    await waitFor('rows and broadcasts before the kill', () => rows.length >= 50 && news.items.length >= 50, 10_000)
    const beforeKill = aliceStates.length
    await server.kill()
    const rowsAtKill = rows.length
    const committedAtKill = writer.committed.length
    const lost = await waitFor('alice to report the lost connection', () =>
      aliceStates.slice(beforeKill).find((change) => change.state === 'CLOSED'),
    )
    await server.start()
    await waitFor(
      'every channel subscribed again',
      () => Object.values(statuses).every((list) => list.length >= 2),
      10_000,
    )
    const committedAtResubscribe = writer.committed.length
    const sentAtResubscribe = sent

    // A client that connects now sees alice's presence as the new server knows it (bob's copy may predate the kill).
    const carol = client({ token: token('carol') })
    const carolRoom = carol.realtime.channel('presence:killed-room').subscribe()
    const tracked = await waitFor('alice tracked again', () => carolRoom.presenceState().alice, 5000)
    assert.deepEqual(tracked.map((meta) => meta.state), [{ name: 'Alice' }])
    await waitFor('a broadcast sent after the resubscribe', () => news.items.some((m) => m.n > sentAtResubscribe), 5000)
    await waitFor(
      '100 rows committed after the resubscribe',
      () => writer.committed.length >= committedAtResubscribe + 100,
      10_000,
    )
    sending = false
    await Promise.all([writer.stop(), broadcasting])
    // The change log is in the database, which outlives fluxrt: rows committed while it was down are replayed.
    await waitFor('every row committed', () => rows.includes(writer.committed.at(-1)!), 5000)

    console.log(
      `SIGKILL: ${rowsAtKill} rows before the kill, ${rows.length - rowsAtKill} after, ${writer.committed.length} ` +
        `committed, ${committedAtResubscribe - committedAtKill} of them between the kill and the resubscribe; ` +
        `alice reported ${JSON.stringify(lost)}; ` +
        `${aliceStates.slice(beforeKill).filter((c) => c.state === 'CONNECTING').length} connection attempts`,
    )
    // No close frame comes from a killed process, so the close is 1006; on one machine the kernel resets the dead
    // process's sockets and it comes at once (no reason), elsewhere the heartbeat gives up (the SIGSTOP test).
    assert.equal(lost.code, 1006)
    assert.match(lost.reason ?? '', /^$|no answer to a ping/)
    assert.equal(typeof lost.reconnectInMs, 'number', 'the client says it will reconnect')
    assert.ok(
      aliceStates.slice(beforeKill).every((c) => c.state !== 'CLOSED' || typeof c.reconnectInMs === 'number'),
      `the client never gives up while the server is down: ${JSON.stringify(aliceStates.slice(beforeKill))}`,
    )
    assert.deepEqual(aliceStates.slice(0, beforeKill).map((c) => c.state), ['CONNECTING', 'OPEN'], 'no drop before the kill')
    assert.equal(alice.realtime.connectionState(), 'OPEN')
    // The channels hear nothing of the drop (the connection state says it) and SUBSCRIBED once more after it: the
    // table recovered what it missed; the broadcast history was in the killed process's memory, and presence has
    // none (its sync is the whole state), so those two say recovered: false.
    assert.deepEqual(statuses, {
      table: [['SUBSCRIBED', false], ['SUBSCRIBED', true]],
      room: [['SUBSCRIBED', false], ['SUBSCRIBED', false]],
      news: [['SUBSCRIBED', false], ['SUBSCRIBED', false]],
    })
    assert.ok(committedAtResubscribe > committedAtKill, 'rows were committed while fluxrt was down')
    // Every row the writer committed arrives once and in commit order, across the kill too: the writer started
    // after the subscribe was acknowledged, and rows committed while fluxrt was down came by replay.
    assert.deepEqual(rows, writer.committed)
  } finally {
    sending = false
    await Promise.allSettled([writer.stop(), broadcasting])
    // reference.test.ts inserts id 123 itself: leave no row of this load behind.
    await sql("DELETE FROM public.users WHERE name LIKE 'kill-%'")
  }
})
