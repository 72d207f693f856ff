// Over wss:// (tests/test_sdk_typescript.py, test_sdk_over_wss): fluxrt serves TLS with a certificate signed by a CA
// made at test time, and SDK_TEST_URL is https://127.0.0.1:PORT. Node trusts that CA only because NODE_EXTRA_CA_CERTS
// names it: verification stays on, and the last test shows that without the CA no connection opens.

import assert from 'node:assert/strict'
import { after, afterEach, before, test } from 'node:test'
import { rootCertificates } from 'node:tls'
import type { ChannelStatus, ChangePayload, RealtimeError, SubscribedInfo, WebSocketConstructor } from '@fluxbase/sdk'
import WebSocket from 'ws'
import { client, disconnectAll, env, Fluxrt, Inbox, Line, sql, states, token, waitFor } from '../support/fluxrt.js'

const server = new Fluxrt()
before(() => server.start())
afterEach(() => disconnectAll())
after(() => server.close())

test('over wss:// a table change and a broadcast arrive, and after a cut the table resumes', async () => {
  assert.match(env.url, /^https:\/\//)
  // Alice on the `ws` package, through a Line that can cut her connection.
  const line = await Line.create()
  const alice = client({ token: token('alice') }, { WebSocket: line.WebSocket })
  const statuses: [ChannelStatus, boolean | undefined][] = []
  const changes = new Inbox<ChangePayload>()
  const news = new Inbox<unknown>()
  const table = alice.realtime
    .channel('table:public.users')
    .on('INSERT', changes.push)
    .subscribe((status: ChannelStatus, _error?: RealtimeError, info?: SubscribedInfo) =>
      statuses.push([status, info?.recovered]),
    )
  const broadcast = alice.realtime.channel('broadcast:tls').on('broadcast', news.push).subscribe()
  await Promise.all([table.subscribed(), broadcast.subscribed()])

  // The sender on Node's own WebSocket (undici), which a Node 22 application gets by default: it trusts
  // NODE_EXTRA_CA_CERTS too.
  const bob = client({ token: token('bob') }, { WebSocket: globalThis.WebSocket as unknown as WebSocketConstructor })
  const sender = bob.realtime.channel('broadcast:tls')
  await sender.subscribe().subscribed()
  await sender.send({ over: 'wss' })
  assert.deepEqual(await news.next('the broadcast'), { over: 'wss' })
  await sql("INSERT INTO public.users (name) VALUES ('tls-before')")
  const before = await changes.next('the insert')
  assert.ok(before.type === 'INSERT' && before.record.name === 'tls-before')

  // A new TLS handshake on the reconnect; the row committed while the line was down comes by resume.
  line.cut(300)
  await sql("INSERT INTO public.users (name) VALUES ('tls-while-down')")
  await waitFor('the table subscribed again', () => statuses.length === 2, 5000)
  const missed = await changes.next('the insert made while the line was down')
  assert.ok(missed.type === 'INSERT' && missed.record.name === 'tls-while-down')
  assert.deepEqual(statuses, [
    ['SUBSCRIBED', false],
    ['SUBSCRIBED', true],
  ])
  assert.equal(line.subscribes('table:public.users').length, 2)
})

test('without the test CA the certificate is refused and no connection opens', async () => {
  const refusals: Error[] = []
  // Node's bundled roots, as a process without NODE_EXTRA_CA_CERTS has them: the test CA is not among them.
  class WithoutTheTestCA extends WebSocket {
    constructor(url: string) {
      super(url, { ca: [...rootCertificates] })
      this.on('error', (error) => refusals.push(error))
    }
  }
  const one = client({}, { WebSocket: WithoutTheTestCA })
  const seen = states(one)
  one.realtime.channel('broadcast:tls').subscribe()
  await waitFor('two refused attempts', () => refusals.length >= 2, 5000)
  assert.equal((refusals[0] as NodeJS.ErrnoException).code, 'UNABLE_TO_VERIFY_LEAF_SIGNATURE', String(refusals[0]))
  assert.ok(
    seen.every((change) => change.state !== 'OPEN'),
    `never open: ${JSON.stringify(seen)}`,
  )
})
