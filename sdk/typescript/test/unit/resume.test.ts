// Resume (docs/protocol.md "Resume"): the channel machine keeps the id of the last event per channel and sends it as
// `since` on a resubscribe; SUBSCRIBED says whether the server recovered. Then the same through the client, against
// a scripted server on a real socket.

import assert from 'node:assert/strict'
import type { AddressInfo } from 'node:net'
import { test } from 'node:test'
import { type ChannelStatus, createClient, type SubscribedInfo } from '@fluxbase/sdk'
import { WebSocket, WebSocketServer } from 'ws'
import { type ChannelEffect, ChannelMachine } from '../../dist/channelState.js'

function machine(kind: 'table' | 'presence' | 'broadcast' = 'table') {
  let n = 0
  const name = kind === 'table' ? 'table:public.users' : `${kind}:room`
  return new ChannelMachine(name, kind, {}, () => `r${++n}`)
}

/** The subscribe among `effects`: its ref and its since (undefined when it carried none). */
function subscribeOf(effects: ChannelEffect[]): { ref: string; since: string | undefined } {
  const sends = effects.flatMap((e) => (e.kind === 'send' && e.message.type === 'subscribe' ? [e.message] : []))
  assert.equal(sends.length, 1, `one subscribe in ${JSON.stringify(effects)}`)
  const [message] = sends
  return { ref: message!.ref, since: message!.since }
}

function subscribedWith(effects: ChannelEffect[]): boolean | undefined {
  const [status] = effects.flatMap((e) => (e.kind === 'status' && e.status === 'SUBSCRIBED' ? [e] : []))
  assert.ok(status, `SUBSCRIBED in ${JSON.stringify(effects)}`)
  return status.recovered
}

/** A joined machine (acked on an open connection). */
function joined(kind: 'table' | 'broadcast' = 'table') {
  const m = machine(kind)
  const { ref, since } = subscribeOf(m.subscribe(true))
  assert.equal(since, undefined, 'the first subscribe carries no since')
  assert.equal(subscribedWith(m.ack('subscribed', ref)), false, 'a first subscribe recovered nothing')
  return m
}

test('each channel keeps the id of the last event it delivered, only while subscribed', () => {
  const table = machine('table')
  const news = machine('broadcast')
  table.delivered('early')
  assert.equal(table.position, undefined, 'nothing is delivered before the ack')
  const t = subscribeOf(table.subscribe(true))
  const b = subscribeOf(news.subscribe(true))
  table.ack('subscribed', t.ref)
  news.ack('subscribed', b.ref)
  table.delivered('t1')
  table.delivered('t2')
  news.delivered('b1')
  table.delivered(undefined)
  news.delivered(42)
  assert.equal(table.position, 't2', 'an event without an id keeps the last one')
  assert.equal(news.position, 'b1', 'and an id that is not a string is not one')
})

test('since goes only with a resubscribe after a lost connection, with the last id', () => {
  const m = joined()
  m.delivered('7')
  assert.deepEqual(m.subscribe(true), [], 'subscribing a subscribed channel sends nothing')
  assert.deepEqual(m.socketClosed(), [])
  const { ref, since } = subscribeOf(m.socketOpened())
  assert.equal(since, '7')
  assert.equal(subscribedWith(m.ack('subscribed', ref, true)), true)
  assert.equal(m.position, '7')
})

test('a channel that lost its connection before any event resubscribes without since, and did not recover', () => {
  const m = joined('broadcast')
  m.socketClosed()
  const { ref, since } = subscribeOf(m.socketOpened())
  assert.equal(since, undefined)
  assert.equal(subscribedWith(m.ack('subscribed', ref, true)), false, 'recovered without a since is not believed')
})

test('recovered false, or missing (a server without resume), forgets the position', () => {
  for (const answer of [false, undefined]) {
    const m = joined()
    m.delivered('9')
    m.socketClosed()
    const { ref, since } = subscribeOf(m.socketOpened())
    assert.equal(since, '9')
    assert.equal(subscribedWith(m.ack('subscribed', ref, answer)), false, `recovered: ${answer}`)
    assert.equal(m.position, undefined, 'what it pointed after is not what the application holds')
    m.socketClosed()
    assert.equal(subscribeOf(m.socketOpened()).since, undefined)
  }
})

test('the position survives several reconnects, answered or not, and moves on with later events', () => {
  const m = joined()
  m.delivered('3')
  m.socketClosed()
  assert.equal(subscribeOf(m.socketOpened()).since, '3')
  m.socketClosed() // before the ack
  const again = subscribeOf(m.socketOpened())
  assert.equal(again.since, '3')
  assert.deepEqual(m.ack('subscribed', 'r2', true), [], "the lost connection's ack matches nothing")
  assert.equal(subscribedWith(m.ack('subscribed', again.ref, true)), true)
  m.socketClosed()
  const third = subscribeOf(m.socketOpened())
  assert.equal(third.since, '3', 'no event since: the same position')
  m.ack('subscribed', third.ref, true)
  m.delivered('4')
  m.socketClosed()
  assert.equal(subscribeOf(m.socketOpened()).since, '4')
})

test('waiting for a new token (close 4001) keeps the position for the connection that follows', () => {
  const m = joined()
  m.delivered('5')
  m.socketClosed()
  m.interrupted({ code: 'UNAUTHORIZED' } as never)
  assert.equal(m.position, '5')
  assert.equal(subscribeOf(m.socketOpened()).since, '5')
})

test('an explicit since goes with the first subscribe, also when it waits for the connection', () => {
  const m = machine('broadcast')
  assert.deepEqual(m.subscribe(false, 'kept'), [])
  assert.equal(m.position, 'kept')
  const { ref, since } = subscribeOf(m.socketOpened())
  assert.equal(since, 'kept')
  assert.equal(subscribedWith(m.ack('subscribed', ref, true)), true)
  assert.deepEqual(m.subscribe(true, 'other'), [], 'ignored while subscribed')
  assert.equal(m.position, 'kept')
})

test('the position is forgotten when the subscription ends: unsubscribe, a refusal, the client stopping', () => {
  const left = joined()
  left.delivered('1')
  const [unsubscribe] = left.unsubscribe(true)
  assert.equal(left.position, undefined)
  left.ack('unsubscribed', unsubscribe!.kind === 'send' ? unsubscribe!.message.ref : '')
  assert.equal(subscribeOf(left.subscribe(true)).since, undefined, 'a new subscription starts afresh')

  const ended = joined()
  ended.delivered('1')
  ended.error({ type: 'error', code: 'FORBIDDEN', message: 'no', channel: 'table:public.users' })
  assert.equal(ended.position, undefined)

  const missed = joined()
  missed.delivered('1')
  missed.error({ type: 'error', code: 'CHANGES_MISSED', message: 'refetch', channel: 'table:public.users' })
  assert.equal(missed.position, '1', 'CHANGES_MISSED keeps the subscription, and its position')

  const stopped = joined()
  stopped.delivered('1')
  stopped.terminated()
  assert.equal(stopped.position, undefined)
})

// ---- through the client, against a scripted server -------------------------------------------------------------

type Frame = Record<string, any>

/** A WebSocket server on a free loopback port that records what clients send and answers as `script` says. */
class ScriptedServer {
  readonly connections: { socket: WebSocket; received: Frame[] }[] = []
  private readonly server: WebSocketServer

  constructor(script: (frame: Frame, socket: WebSocket, connection: number) => void) {
    this.server = new WebSocketServer({ host: '127.0.0.1', port: 0 })
    this.server.on('connection', (socket) => {
      const connection = { socket, received: [] as Frame[] }
      const index = this.connections.push(connection) - 1
      socket.on('message', (data) => {
        const frame = JSON.parse(String(data)) as Frame
        connection.received.push(frame)
        script(frame, socket, index)
      })
    })
  }

  async url(): Promise<string> {
    if (!this.server.address()) await new Promise((resolve) => this.server.once('listening', resolve))
    return `http://127.0.0.1:${(this.server.address() as AddressInfo).port}`
  }

  subscribes(connection: number): Frame[] {
    return (this.connections[connection]?.received ?? []).filter((frame) => frame.type === 'subscribe')
  }

  close(): Promise<void> {
    for (const { socket } of this.connections) socket.terminate()
    return new Promise((resolve) => this.server.close(() => resolve()))
  }
}

async function until<T>(what: string, check: () => T | undefined | false, timeoutMs = 5000): Promise<T> {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    const value = check()
    if (value !== undefined && value !== false) return value
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await new Promise((resolve) => setTimeout(resolve, 5))
  }
}

const send = (socket: WebSocket, frame: Frame) => socket.send(JSON.stringify(frame))
const change = (id: string) => ({ type: 'INSERT', schema: 'public', table: 'users', record: { id }, id })

test('after a drop each channel resubscribes from its last id, and SUBSCRIBED says whether it recovered', async () => {
  // Connection 0 serves events; later ones resume the table (recovered, with a replayed event) and answer the
  // broadcast channel as a server without resume does (no `recovered`).
  const server = new ScriptedServer((frame, socket, connection) => {
    if (frame.type === 'auth') send(socket, { type: 'ack', status: 'authorized', ref: frame.ref })
    if (frame.type !== 'subscribe') return
    const ack: Frame = { type: 'ack', channel: frame.channel, status: 'subscribed', ref: frame.ref }
    if (frame.channel === 'table:public.users' && frame.since !== undefined) ack.recovered = true
    send(socket, ack)
    if (connection === 0 && frame.channel === 'table:public.users') {
      for (const id of ['t1', 't2']) send(socket, { type: 'broadcast', channel: frame.channel, payload: change(id) })
    } else if (connection === 0) {
      send(socket, { type: 'broadcast', channel: frame.channel, payload: { n: 1 }, id: 'b1' })
    } else if (connection === 1 && frame.channel === 'table:public.users') {
      send(socket, { type: 'broadcast', channel: frame.channel, payload: change('t3') })
    }
  })
  const client = createClient({
    url: await server.url(),
    auth: { token: 'first' },
    realtime: { WebSocket: WebSocket as never, reconnect: { baseDelayMs: 10, maxDelayMs: 20 } },
  })
  try {
    const rows: unknown[] = []
    const news: unknown[] = []
    const tableStatuses: [ChannelStatus, SubscribedInfo | undefined][] = []
    const newsStatuses: ChannelStatus[] = []
    const users = client.realtime
      .channel('table:public.users')
      .on('INSERT', (payload) => rows.push(payload.record.id))
      .subscribe((status, _error, info) => tableStatuses.push([status, info]))
    const chat = client.realtime
      .channel('broadcast:chat')
      .on('broadcast', (payload) => news.push(payload))
      // The callback as applications wrote it before resume: one argument.
      .subscribe((status) => newsStatuses.push(status))
    await until('the first events', () => rows.length === 2 && news.length === 1)
    assert.equal(users.position, 't2')
    assert.equal(chat.position, 'b1')

    server.connections[0]!.socket.terminate()
    await until('both channels subscribed again', () => tableStatuses.length === 2 && newsStatuses.length === 2)
    const resubscribes = server.subscribes(1).map(({ channel, since }) => ({ channel, since }))
    assert.deepEqual(
      resubscribes.sort((a, b) => a.channel.localeCompare(b.channel)),
      [
        { channel: 'broadcast:chat', since: 'b1' },
        { channel: 'table:public.users', since: 't2' },
      ],
    )
    assert.deepEqual(tableStatuses, [
      ['SUBSCRIBED', { recovered: false }],
      ['SUBSCRIBED', { recovered: true }],
    ])
    assert.deepEqual(newsStatuses, ['SUBSCRIBED', 'SUBSCRIBED'])
    await until('the replayed event', () => rows.length === 3)
    assert.deepEqual(rows, ['t1', 't2', 't3'], 'every event once')
    assert.equal(users.position, 't3')
    assert.equal(chat.position, undefined, 'no recovered on its ack: the position is gone')

    // A token change on the live connection keeps the positions for the next one.
    await client.realtime.setAuth('second')
    server.connections[1]!.socket.terminate()
    await until('the third connection', () => server.subscribes(2).length === 2 && tableStatuses.length === 3)
    const third = Object.fromEntries(server.subscribes(2).map((frame) => [frame.channel, frame.since]))
    assert.deepEqual(third, { 'table:public.users': 't3', 'broadcast:chat': undefined })
  } finally {
    await client.realtime.disconnect()
    await server.close()
  }
})

test('subscribe(callback, { since }) resumes from a kept position on the first subscribe', async () => {
  const server = new ScriptedServer((frame, socket) => {
    if (frame.type === 'subscribe') {
      send(socket, { type: 'ack', channel: frame.channel, status: 'subscribed', recovered: false, ref: frame.ref })
    }
  })
  const client = createClient({ url: await server.url(), realtime: { WebSocket: WebSocket as never } })
  try {
    const infos: (SubscribedInfo | undefined)[] = []
    client.realtime.channel('broadcast:chat').subscribe((_status, _error, info) => infos.push(info), { since: 'old' })
    await until('the ack', () => infos.length === 1)
    assert.deepEqual(server.subscribes(0).map((frame) => frame.since), ['old'])
    assert.deepEqual(infos, [{ recovered: false }])
    assert.throws(
      () => client.realtime.channel('presence:lobby').subscribe(undefined, { since: 'x' }),
      /presence channel, which has no history/,
    )
  } finally {
    await client.realtime.disconnect()
    await server.close()
  }
})
