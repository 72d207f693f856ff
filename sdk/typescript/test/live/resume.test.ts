// Resume through the SDK (docs/protocol.md "Resume", issue 14): a client whose connection is cut in the middle of a
// stream reconnects by itself, resubscribes with `since` and hands the application every event once, in order; a
// restarted single node has no broadcast history, and the status callback says so with recovered: false.

import assert from 'node:assert/strict'
import { after, afterEach, before, test } from 'node:test'
import type {
  ChannelStatus,
  FluxbaseClient,
  InsertPayload,
  RealtimeError,
  Row,
  SubscribedInfo,
} from '@fluxbase/sdk'
import { client, disconnectAll, Fluxrt, Line, sleep, sql, states, token, waitFor, Writer } from '../support/fluxrt.js'

const server = new Fluxrt()
before(() => server.start())
afterEach(() => disconnectAll())
after(() => server.close())

type Status = [ChannelStatus, boolean | undefined]

/** A subscribe callback that keeps each status with its `recovered`; `then` runs inside it, e.g. to take a count. */
function statusLog(then: (status: ChannelStatus) => void = () => {}) {
  const log: Status[] = []
  const callback = (status: ChannelStatus, _error?: RealtimeError, info?: SubscribedInfo) => {
    log.push([status, info?.recovered])
    then(status)
  }
  return { log, callback }
}

/** How long the cut client stays away: long enough for a stream at 10 ms to go on without it. */
const AWAY_MS = 250

/**
 * Cut `one`'s connection for AWAY_MS and note how far a stream had got (`count()`) at the cut and when the next
 * connection opened. What was counted in between, but for the item in flight at the cut, went out while the client
 * had no connection: it can only arrive by replay.
 */
function cutAway(line: Line, one: FluxbaseClient, count: () => number): { atCut: number; atOpen: number } {
  const mark = { atCut: count(), atOpen: -1 }
  const stop = one.realtime.onStateChange((change) => {
    if (change.state !== 'OPEN') return
    mark.atOpen = count()
    stop()
  })
  line.cut(AWAY_MS)
  return mark
}

test('table: a connection cut in a stream of inserts; every row reaches the handler once, in order', async () => {
  const line = await Line.create()
  const alice = client(
    { token: token('alice') },
    { WebSocket: line.WebSocket, reconnect: { baseDelayMs: 50, maxDelayMs: 100 } },
  )
  const seen = states(alice)
  const rows: number[] = []
  let lastId: string | undefined
  let writer: Writer | undefined
  // The count of committed rows when the second subscription was acknowledged: every row after it could arrive live.
  let committedAtResubscribe = -1
  const status = statusLog((s) => {
    if (s === 'SUBSCRIBED' && status.log.length === 2) committedAtResubscribe = writer!.committed.length
  })
  const table = alice.realtime
    .channel('table:public.users')
    .on('INSERT', (change: InsertPayload) => {
      if (!String(change.record.name).startsWith('resume-')) return
      rows.push(change.record.id as number)
      lastId = change.id
    })
    .subscribe(status.callback)
  await table.subscribed()

  // The ack is a barrier: every row the writer commits from now on belongs to the subscription.
  writer = new Writer(10, 'resume-')
  try {
    await waitFor('30 rows before the cut', () => rows.length >= 30, 10_000)
    const beforeCut = seen.length
    const away = cutAway(line, alice, () => writer!.committed.length)
    await waitFor('the client back', () => away.atOpen >= 0 && status.log.length === 2, 10_000)
    await waitFor('30 rows after the resubscribe', () => writer!.committed.length >= committedAtResubscribe + 30)
    await writer.stop()
    await waitFor('the last row', () => rows.includes(writer!.committed.at(-1)!), 5000)

    const missed = away.atOpen - away.atCut - 1
    console.log(`table: ${writer.committed.length} rows committed, ${missed} while the client had no connection`)
    assert.ok(missed >= 1, `rows were committed while the client had no connection (${missed}): they came by replay`)
    const closes = seen.slice(beforeCut).filter((c) => c.state === 'CLOSED')
    assert.ok(
      closes.length >= 1 && closes.every((c) => c.code === 1006 && typeof c.reconnectInMs === 'number'),
      `the cut and the dropped attempts close without a close frame, and are retried: ${JSON.stringify(closes)}`,
    )
    const resubscribe = line.subscribes('table:public.users')
    assert.equal(resubscribe.length, 2)
    assert.equal(typeof resubscribe[1]!.since, 'string', 'the resubscribe carries since')
    assert.deepEqual(status.log, [['SUBSCRIBED', false], ['SUBSCRIBED', true]])
    assert.deepEqual(rows, writer.committed, 'every row once, in commit order, across the cut')
    assert.equal(table.position, lastId, 'the channel keeps the id of the last row it handed over')
  } finally {
    await writer.stop().catch(() => {})
    await sql("DELETE FROM public.users WHERE name LIKE 'resume-%'")
  }
})

test('broadcast: a connection cut in a numbered stream; every message reaches the handler once, in order', async () => {
  const line = await Line.create()
  const alice = client(
    { token: token('alice') },
    { WebSocket: line.WebSocket, reconnect: { baseDelayMs: 50, maxDelayMs: 100 } },
  )
  const heard: number[] = []
  let sent = 0
  // How many had been sent when the second subscription was acknowledged.
  let sentAtResubscribe = -1
  const status = statusLog((s) => {
    if (s === 'SUBSCRIBED' && status.log.length === 2) sentAtResubscribe = sent
  })
  const news = alice.realtime
    .channel<Row, { n: number }>('broadcast:resume-news')
    .on('broadcast', (message) => heard.push(message.n))
    .subscribe(status.callback)
  const sender = client({ token: token('bob') }).realtime.channel<Row, { n: number }>('broadcast:resume-news')
  await Promise.all([news.subscribed(), sender.subscribe().subscribed()])

  let sending = true
  const broadcasting = (async () => {
    while (sending) {
      // Bob's connection is not cut: every send is accepted (a refusal fails the test).
      await sender.send({ n: sent + 1 })
      sent += 1
      await sleep(10)
    }
  })()
  try {
    await waitFor('30 messages before the cut', () => heard.length >= 30, 10_000)
    const away = cutAway(line, alice, () => sent)
    await waitFor('the client back', () => away.atOpen >= 0 && status.log.length === 2, 10_000)
    await waitFor('30 messages after the resubscribe', () => sent >= sentAtResubscribe + 30)
    sending = false
    await broadcasting
    await waitFor('the last message', () => heard.includes(sent), 5000)

    const missed = away.atOpen - away.atCut - 1
    console.log(`broadcast: ${sent} messages sent, ${missed} while the client had no connection`)
    assert.ok(missed >= 1, `messages were sent while the client had no connection (${missed}): they came by replay`)
    // The server keeps 100 messages per channel (realtime.history_size): a longer gap would not be recoverable.
    assert.ok(sentAtResubscribe - away.atCut < 100, `the gap (${sentAtResubscribe - away.atCut}) fits the history`)
    assert.equal(typeof line.subscribes('broadcast:resume-news')[1]?.since, 'string', 'the resubscribe carries since')
    assert.deepEqual(status.log, [['SUBSCRIBED', false], ['SUBSCRIBED', true]])
    const numbers = Array.from({ length: sent }, (_, i) => i + 1)
    assert.deepEqual(heard, numbers, 'every message once, in order, across the cut')
  } finally {
    sending = false
    await broadcasting.catch(() => {})
  }
})

test('a restarted server: broadcast history is gone (recovered: false, no replay); the table resumes', async () => {
  const line = await Line.create()
  const alice = client({ token: token('alice') }, { WebSocket: line.WebSocket })
  const news: number[] = []
  const rows: string[] = []
  const newsStatus = statusLog()
  const tableStatus = statusLog()
  const broadcast = alice.realtime
    .channel<Row, { n: number }>('broadcast:restart-news')
    .on('broadcast', (message) => news.push(message.n))
    .subscribe(newsStatus.callback)
  const table = alice.realtime
    .channel('table:public.users')
    .on('INSERT', (change: InsertPayload) => {
      if (String(change.record.name).startsWith('restart-')) rows.push(String(change.record.name))
    })
    .subscribe(tableStatus.callback)
  const bobStatus = statusLog()
  const sender = client({ token: token('bob') })
    .realtime.channel<Row, { n: number }>('broadcast:restart-news')
    .subscribe(bobStatus.callback)
  await Promise.all([broadcast.subscribed(), table.subscribed(), sender.subscribed()])

  try {
    for (const n of [1, 2, 3]) await sender.send({ n })
    await sql("INSERT INTO public.users (name) VALUES ('restart-before')")
    await waitFor('the messages and the row before the restart', () => news.length === 3 && rows.length === 1)
    const kept = broadcast.position
    assert.equal(typeof kept, 'string', 'the channel keeps the id of the last message')

    await server.stop()
    await sql("INSERT INTO public.users (name) VALUES ('restart-while-down')")
    await server.start()
    await waitFor(
      'every channel subscribed again',
      () => [newsStatus, tableStatus, bobStatus].every((s) => s.log.length === 2),
      10_000,
    )

    assert.equal(line.subscribes('broadcast:restart-news')[1]?.since, kept, 'the resubscribe asked for what followed')
    // The new process has no history: it says so rather than replaying nothing as if nothing was missed.
    assert.deepEqual(newsStatus.log, [['SUBSCRIBED', false], ['SUBSCRIBED', false]])
    assert.equal(broadcast.position, undefined, 'a position the server could not resume from is forgotten')
    // The change log is in the database: the table resumes across the restart.
    assert.deepEqual(tableStatus.log, [['SUBSCRIBED', false], ['SUBSCRIBED', true]])
    await waitFor('the row committed while the server was down', () => rows.length === 2)

    await sender.send({ n: 4 })
    await waitFor('a message after the restart', () => news.length === 4)
    assert.deepEqual(news, [1, 2, 3, 4], 'nothing from before the restart is delivered again')
    assert.equal(typeof broadcast.position, 'string', 'the next message gives the channel a position again')
    assert.deepEqual(rows, ['restart-before', 'restart-while-down'])
  } finally {
    await sql("DELETE FROM public.users WHERE name LIKE 'restart-%'")
  }
})
