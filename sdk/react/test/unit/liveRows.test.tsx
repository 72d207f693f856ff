// useLiveRows against the fake server: the first load after the subscription, changes kept while load() runs,
// resume without a reload when the server recovered the channel and with one when it did not, CHANGES_MISSED, and
// rendering on a server without a WebSocket.

import '../support/dom.js'

import assert from 'node:assert/strict'
import { afterEach, test } from 'node:test'
import type { FluxbaseClient } from '@fluxbase/sdk'
import { RealtimeProvider, useConnectionState, useLiveRows, usePresence } from '@fluxbase/react'
import { act, cleanup, render } from '@testing-library/react'
import { type ReactNode, StrictMode } from 'react'
import { renderToString } from 'react-dom/server'
import { FakeServer, settle } from '../support/fake.js'

interface Todo {
  id: number
  title: string
}

const clients: FluxbaseClient[] = []

afterEach(async () => {
  cleanup()
  await Promise.all(clients.splice(0).map((client) => client.realtime.disconnect()))
})

/** load() calls the test answers one by one. */
class Loads {
  readonly calls: { resolve(rows: Todo[]): void; reject(error: Error): void; signal: AbortSignal }[] = []

  load = ({ signal }: { signal: AbortSignal }): Promise<Todo[]> =>
    new Promise((resolve, reject) => this.calls.push({ resolve, reject, signal }))

  last() {
    const call = this.calls[this.calls.length - 1]
    assert.ok(call, 'load() was called')
    return call
  }
}

function setup() {
  const server = new FakeServer()
  const client = server.client()
  clients.push(client)
  const loads = new Loads()
  const wrap = (node: ReactNode) => (
    <StrictMode>
      <RealtimeProvider client={client}>{node}</RealtimeProvider>
    </StrictMode>
  )
  return { server, client, wrap, loads }
}

async function step(fn: () => void = () => {}): Promise<void> {
  await act(async () => {
    fn()
    await settle()
  })
}

function List(props: { load: Loads['load']; filter?: string }) {
  const { rows, status, error, reload } = useLiveRows<Todo>('todos', { load: props.load, filter: props.filter })
  return (
    <div>
      <p data-testid="status">{error ? `${status}: ${error.message}` : status}</p>
      <p data-testid="rows">{rows.map((row) => `${row.id}:${row.title}`).join(' ')}</p>
      <button type="button" onClick={reload}>
        reload
      </button>
    </div>
  )
}

function shown(view: ReturnType<typeof render>): [string, string] {
  return [view.getByTestId('status').textContent ?? '', view.getByTestId('rows').textContent ?? '']
}

test('load() runs once the channel is subscribed; changes that arrive meanwhile are applied after its rows, each once', async () => {
  const { server, client, wrap, loads } = setup()
  server.autoAck = false
  await step(() => client.realtime.connect())
  const view = render(wrap(<List load={loads.load} />))
  await step()
  assert.deepEqual(shown(view), ['connecting', ''])
  assert.equal(loads.calls.length, 0, 'no load before the subscription: changes in between would be lost')
  await step(() => server.ackSubscribes())
  assert.equal(loads.calls.length, 1, 'StrictMode loads once too')
  assert.equal(shown(view)[0], 'loading')
  await step(() => {
    server.change('todos', 'INSERT', { record: { id: 2, title: 'b' } }) // committed before the load read: in its rows
    server.change('todos', 'UPDATE', { record: { id: 1, title: 'a2' }, old_record: { id: 1, title: 'a' } })
    server.change('todos', 'INSERT', { record: { id: 3, title: 'c' } })
    server.change('todos', 'DELETE', { old_record: { id: 3 } })
  })
  assert.equal(shown(view)[1], '', 'nothing shows before the load')
  await step(() =>
    loads.last().resolve([
      { id: 1, title: 'a' },
      { id: 2, title: 'b' },
    ]),
  )
  assert.deepEqual(shown(view), ['live', '1:a2 2:b'])
  await step(() => server.change('todos', 'INSERT', { record: { id: 4, title: 'd' } }))
  await step(() => server.change('todos', 'UPDATE', { record: { id: 2, title: 'b2' } }))
  await step(() => server.change('todos', 'DELETE', { old_record: { id: 1 } }))
  assert.deepEqual(shown(view), ['live', '2:b2 4:d'])
  assert.equal(server.sent('subscribe').length, 1)
  assert.equal(loads.calls.length, 1)
})

test('after a reconnect the server recovered, the missed changes apply and load() is not called again', async () => {
  const { server, wrap, loads } = setup()
  const view = render(wrap(<List load={loads.load} />))
  await step()
  await step(() => loads.last().resolve([{ id: 1, title: 'a' }]))
  await step(() => server.change('todos', 'INSERT', { record: { id: 2, title: 'b' } }))
  server.recovered = true
  server.autoAck = false
  await step(() => server.drop())
  assert.deepEqual(shown(view), ['reconnecting', '1:a 2:b'])
  const resubscribe = server.sent('subscribe')[1]
  assert.equal(resubscribe?.since, 'p1', 'the channel resumes from the last change it delivered')
  await step(() => {
    server.ackSubscribes()
    server.change('todos', 'DELETE', { old_record: { id: 1 } })
  })
  assert.deepEqual(shown(view), ['live', '2:b'])
  assert.equal(loads.calls.length, 1)
})

test('after a reconnect the server could not recover, load() runs again and its rows replace the old ones', async () => {
  const { server, wrap, loads } = setup()
  const view = render(wrap(<List load={loads.load} />))
  await step()
  await step(() => loads.last().resolve([{ id: 1, title: 'a' }]))
  await step(() => server.change('todos', 'INSERT', { record: { id: 2, title: 'b' } }))
  server.recovered = false
  await step(() => server.drop())
  assert.equal(loads.calls.length, 2)
  assert.deepEqual(shown(view), ['loading', '1:a 2:b'], 'the old rows stay while loading')
  await step(() => server.change('todos', 'INSERT', { record: { id: 5, title: 'e' } }))
  await step(() => loads.last().resolve([{ id: 3, title: 'c' }]))
  assert.deepEqual(shown(view), ['live', '3:c 5:e'])
})

test('CHANGES_MISSED loads again; a TRUNCATE empties the list, one of a partition loads again', async () => {
  const { server, wrap, loads } = setup()
  const view = render(wrap(<List load={loads.load} />))
  await step()
  await step(() => loads.last().resolve([{ id: 1, title: 'a' }]))
  await step(() =>
    server.socket.push({ type: 'error', code: 'CHANGES_MISSED', message: 'refetch', channel: 'table:public.todos' }),
  )
  assert.equal(loads.calls.length, 2)
  await step(() => loads.last().resolve([{ id: 2, title: 'b' }]))
  assert.deepEqual(shown(view), ['live', '2:b'])
  await step(() => server.change('todos', 'TRUNCATE', {}))
  assert.deepEqual(shown(view), ['live', ''])
  assert.equal(loads.calls.length, 2)
  await step(() => server.change('todos', 'TRUNCATE', { partition: 'public.todos_2026' } as never))
  assert.equal(loads.calls.length, 3)
})

test('a failed load is shown, and reload() tries again', async () => {
  const { wrap, loads } = setup()
  const view = render(wrap(<List load={loads.load} />))
  await step()
  await step(() => loads.last().reject(new Error('HTTP 500')))
  assert.deepEqual(shown(view), ['error: HTTP 500', ''])
  await step(() => view.getByText('reload').click())
  await step(() => loads.last().resolve([{ id: 1, title: 'a' }]))
  assert.deepEqual(shown(view), ['live', '1:a'])
})

test('a new filter subscribes again and loads again; what the old subscription loads late is dropped', async () => {
  const { server, wrap, loads } = setup()
  const view = render(wrap(<List load={loads.load} filter="owner=eq.a" />))
  await step()
  const first = loads.last()
  view.rerender(wrap(<List load={loads.load} filter="owner=eq.b" />))
  await step()
  assert.ok(first.signal.aborted, 'the old load is aborted')
  assert.deepEqual(
    server.frames.map((frame) => [frame.type, frame.filter]),
    [
      ['subscribe', 'owner=eq.a'],
      ['unsubscribe', undefined],
      ['subscribe', 'owner=eq.b'],
    ],
  )
  assert.equal(loads.calls.length, 2)
  await step(() => first.resolve([{ id: 1, title: 'from a' }]))
  assert.deepEqual(shown(view), ['loading', ''])
  await step(() => loads.last().resolve([{ id: 2, title: 'from b' }]))
  assert.deepEqual(shown(view), ['live', '2:from b'])
})

test('a refused subscription and a disconnected client show as errors; an error that keeps the channel does not', async () => {
  const { server, client, wrap, loads } = setup()
  server.refuse = { code: 'FORBIDDEN', message: 'role anon may not read public.todos' }
  const view = render(wrap(<List load={loads.load} />))
  await step()
  assert.deepEqual(shown(view), ['error: role anon may not read public.todos', ''])
  assert.equal(loads.calls.length, 0)
  cleanup()

  server.refuse = undefined
  const again = render(wrap(<List load={loads.load} />))
  await step()
  await step(() => loads.last().resolve([{ id: 1, title: 'a' }]))
  await step(() =>
    server.socket.push({ type: 'error', code: 'RATE_LIMITED', message: 'slow down', channel: 'table:public.todos' }),
  )
  assert.deepEqual(shown(again), ['live', '1:a'])
  await step(() => void client.realtime.disconnect())
  assert.deepEqual(shown(again), ['error: table:public.todos was closed: the client was disconnected', '1:a'])
})

function Page() {
  const { rows, status } = useLiveRows<Todo>('todos', { load: async () => [{ id: 1, title: 'a' }] })
  const { members } = usePresence('lobby', { status: 'online' })
  return <p>{`${status} ${rows.length} ${members.length} ${useConnectionState()}`}</p>
}

test('server rendering makes no WebSocket: with a url, or with a client', () => {
  const global = globalThis as { WebSocket?: unknown }
  const saved = global.WebSocket
  delete global.WebSocket
  try {
    const html = renderToString(
      <RealtimeProvider url="http://fluxrt.test" auth={{ token: 't' }}>
        <Page />
      </RealtimeProvider>,
    )
    assert.equal(html, '<p>connecting 0 0 CLOSED</p>')
  } finally {
    global.WebSocket = saved
  }
  const server = new FakeServer()
  const client = server.client()
  const html = renderToString(
    <RealtimeProvider client={client}>
      <Page />
    </RealtimeProvider>,
  )
  assert.equal(html, '<p>connecting 0 0 CLOSED</p>')
  assert.equal(server.sockets.length, 0)
  assert.equal(server.frames.length, 0)
})

test('a provider given a url makes one client in the browser, and disconnects it on unmount', async () => {
  const server = new FakeServer()
  const view = render(
    <StrictMode>
      <RealtimeProvider url="http://fluxrt.test" realtime={{ WebSocket: server.WebSocket }}>
        <Page />
      </RealtimeProvider>
    </StrictMode>,
  )
  await step()
  assert.equal(view.container.textContent, 'live 1 1 OPEN')
  assert.equal(server.sockets.length, 1)
  assert.deepEqual(
    server.frames.map((frame) => frame.type).sort(),
    ['presence', 'subscribe', 'subscribe'],
  )
  view.unmount()
  await step()
  assert.equal(server.socket.readyState, 3)
})
