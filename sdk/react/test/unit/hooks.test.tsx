// The hooks against a fake server (test/support/fake.ts), rendered with React Testing Library in StrictMode: the
// frames they make the SDK send, and what they show.

import '../support/dom.js'

import assert from 'node:assert/strict'
import { afterEach, test } from 'node:test'
import type { ChangePayload, FluxbaseClient } from '@fluxbase/sdk'
import {
  RealtimeProvider,
  useBroadcast,
  useChannel,
  useConnectionState,
  usePresence,
  useTableChanges,
} from '@fluxbase/react'
import { act, cleanup, render } from '@testing-library/react'
import { type ReactNode, StrictMode } from 'react'
import { FakeServer, settle } from '../support/fake.js'

const clients: FluxbaseClient[] = []

afterEach(async () => {
  cleanup()
  await Promise.all(clients.splice(0).map((client) => client.realtime.disconnect()))
})

function setup(user = 'alice') {
  const server = new FakeServer(user)
  const client = server.client()
  clients.push(client)
  const wrap = (node: ReactNode) => (
    <StrictMode>
      <RealtimeProvider client={client}>{node}</RealtimeProvider>
    </StrictMode>
  )
  return { server, client, wrap }
}

/** Run `fn` and let the client, the fake server and React settle. */
async function step(fn: () => void = () => {}): Promise<void> {
  await act(async () => {
    fn()
    await settle()
  })
}

function Changes(props: { filter?: string; onChange: (change: ChangePayload) => void; label?: string }) {
  const { status } = useTableChanges('todos', { filter: props.filter }, props.onChange)
  return <p data-testid="status">{status}</p>
}

test('StrictMode mounts once as far as the server can tell: one subscribe, and one unsubscribe on unmount', async () => {
  const { server, client, wrap } = setup()
  // Connected already, so that a subscribe or unsubscribe would go out at once.
  await step(() => client.realtime.connect())
  const view = render(wrap(<Changes onChange={() => {}} />))
  await step()
  assert.equal(view.getByTestId('status').textContent, 'subscribed')
  assert.equal(server.sent('subscribe').length, 1)
  assert.equal(server.sent('unsubscribe').length, 0)
  assert.equal(server.sockets.length, 1, 'one connection')
  view.unmount()
  await step()
  assert.deepEqual(
    server.frames.map((frame) => frame.type),
    ['subscribe', 'unsubscribe'],
  )
})

test('callbacks see the latest props without resubscribing', async () => {
  const { server, wrap } = setup()
  const heard: string[] = []
  const view = render(wrap(<Changes onChange={(change) => heard.push(`first ${change.type}`)} />))
  await step()
  await step(() => server.change('todos', 'INSERT', { record: { id: 1 } }))
  view.rerender(wrap(<Changes onChange={(change) => heard.push(`second ${change.type}`)} />))
  await step(() => server.change('todos', 'DELETE', { old_record: { id: 1 } }))
  assert.deepEqual(heard, ['first INSERT', 'second DELETE'])
  assert.equal(server.sent('subscribe').length, 1)
})

test('a changed filter unsubscribes and subscribes again exactly once, the new subscribe after the old one ended', async () => {
  const { server, wrap } = setup()
  const heard: unknown[] = []
  const view = render(wrap(<Changes filter="owner=eq.a" onChange={(change) => heard.push(change)} />))
  await step()
  view.rerender(wrap(<Changes filter="owner=eq.b" onChange={(change) => heard.push(change)} />))
  await step()
  assert.deepEqual(
    server.frames.map((frame) => [frame.type, frame.filter]),
    [
      ['subscribe', 'owner=eq.a'],
      ['unsubscribe', undefined],
      ['subscribe', 'owner=eq.b'],
    ],
  )
  assert.equal(view.getByTestId('status').textContent, 'subscribed')
  view.rerender(wrap(<Changes filter="owner=eq.b" onChange={(change) => heard.push(change)} />))
  await step()
  assert.equal(server.frames.length, 3, 'the same arguments again change nothing')
})

test('two hooks on one channel share one subscription, held until the last unmounts', async () => {
  const { server, wrap } = setup()
  const heard: string[] = []
  const view = render(
    wrap(
      <>
        <Changes onChange={() => heard.push('a')} />
        <Changes onChange={() => heard.push('b')} />
      </>,
    ),
  )
  await step()
  await step(() => server.change('todos', 'INSERT', { record: { id: 1 } }))
  assert.deepEqual(heard.sort(), ['a', 'b'])
  view.rerender(wrap(<Changes onChange={() => heard.push('a')} />))
  await step()
  assert.equal(server.sent('unsubscribe').length, 0)
  await step(() => server.change('todos', 'INSERT', { record: { id: 2 } }))
  assert.deepEqual(heard.sort(), ['a', 'a', 'b'])
  view.unmount()
  await step()
  assert.deepEqual(
    server.frames.map((frame) => frame.type),
    ['subscribe', 'unsubscribe'],
  )
})

test('two hooks asking one channel with different filters: the second says why it cannot', async () => {
  const { server, wrap } = setup()
  const view = render(
    wrap(
      <>
        <Changes filter="owner=eq.a" onChange={() => {}} />
        <Errors />
      </>,
    ),
  )
  await step()
  assert.equal(server.sent('subscribe').length, 1)
  assert.match(view.getByTestId('error').textContent ?? '', /already subscribed on this client with event \* and filter owner=eq.a/)
})

function Errors() {
  const { status, error } = useChannel('table:public.todos', { filter: 'owner=eq.b' })
  return <p data-testid="error">{`${status}: ${error?.message}`}</p>
}

function Online(props: { state?: Record<string, unknown> }) {
  const { members } = usePresence('lobby', props.state)
  return <p data-testid="online">{members.map((member) => `${member.key}=${JSON.stringify(member.state)}`).join(' ')}</p>
}

test('usePresence tracks while mounted: once in StrictMode, again on a new state, untracked and unsubscribed on unmount', async () => {
  const { server, client, wrap } = setup('alice')
  await step(() => client.realtime.connect())
  const view = render(wrap(<Online state={{ status: 'online' }} />))
  await step()
  await step(() => server.others('presence:lobby', 'bob', { status: 'away' }))
  assert.equal(view.getByTestId('online').textContent, 'alice={"status":"online"} bob={"status":"away"}')
  assert.deepEqual(
    server.frames.map((frame) => [frame.type, frame.event ?? '']),
    [
      ['subscribe', ''],
      ['presence', 'track'],
    ],
  )
  view.rerender(wrap(<Online state={{ status: 'online' }} />))
  await step()
  assert.equal(server.sent('presence').length, 1, 'an equal state is not tracked again')
  view.rerender(wrap(<Online state={{ status: 'typing' }} />))
  await step()
  assert.deepEqual(server.sent('presence').map((frame) => frame.payload), [{ status: 'online' }, { status: 'typing' }])
  assert.equal(view.getByTestId('online').textContent, 'alice={"status":"typing"} bob={"status":"away"}')
  await step(() => server.others('presence:lobby', 'bob', undefined))
  assert.equal(view.getByTestId('online').textContent, 'alice={"status":"typing"}')
  view.unmount()
  await step()
  assert.deepEqual(
    server.frames.slice(3).map((frame) => [frame.type, frame.event ?? '']),
    [
      ['presence', 'untrack'],
      ['unsubscribe', ''],
    ],
  )
})

test('usePresence without a state only watches', async () => {
  const { server, wrap } = setup('alice')
  server.others('presence:lobby', 'bob', { status: 'away' })
  const view = render(wrap(<Online />))
  await step()
  assert.equal(view.getByTestId('online').textContent, 'bob={"status":"away"}')
  assert.equal(server.sent('presence').length, 0)
})

function Chat(props: { limit?: number }) {
  const { messages, send, status } = useBroadcast<{ text: string }>('chat', { limit: props.limit })
  return (
    <div>
      <p data-testid="status">{status}</p>
      <p data-testid="messages">{messages.map((message) => message.text).join(',')}</p>
      <button type="button" onClick={() => void send({ text: 'hi' })}>
        send
      </button>
    </div>
  )
}

test('useBroadcast keeps the last messages and sends', async () => {
  const { server, wrap } = setup()
  const view = render(wrap(<Chat limit={2} />))
  await step()
  for (const text of ['a', 'b', 'c']) {
    await step(() => server.socket.push({ type: 'broadcast', channel: 'broadcast:chat', payload: { text }, id: text }))
  }
  assert.equal(view.getByTestId('messages').textContent, 'b,c')
  await step(() => view.getByText('send').click())
  assert.deepEqual(server.sent('broadcast'), [
    { type: 'broadcast', channel: 'broadcast:chat', payload: { text: 'hi' }, ref: server.sent('broadcast')[0]?.ref },
  ])
})

function Connection() {
  return <p data-testid="state">{useConnectionState()}</p>
}

test('useConnectionState follows the connection', async () => {
  const { server, wrap } = setup()
  const view = render(
    wrap(
      <>
        <Connection />
        <Changes onChange={() => {}} />
      </>,
    ),
  )
  await step()
  assert.equal(view.getByTestId('state').textContent, 'OPEN')
  server.accepting = false
  await step(() => server.drop())
  assert.equal(view.getByTestId('state').textContent, 'CONNECTING', 'a new connection is on its way')
  await step(() => server.accept())
  assert.equal(view.getByTestId('state').textContent, 'OPEN')
  assert.equal(server.sockets.length, 2)
})

test('a hook outside a provider says what is missing', () => {
  const original = console.error
  console.error = () => {}
  try {
    assert.throws(() => render(<Connection />), /needs a <RealtimeProvider/)
  } finally {
    console.error = original
  }
})
