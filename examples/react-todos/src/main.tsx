// A todo list that stays right (useLiveRows) and who is online (usePresence), on @fluxbase/react. The rows come from
// serve.py's /api/todos, read under the table's row-level security with the same token the WebSocket uses; fluxrt
// then delivers each change this user may see. Open /?token=JWT&server=http://localhost:8080 from serve.py.

import { RealtimeProvider, useConnectionState, useLiveRows, usePresence } from '@fluxbase/react'
import { type FormEvent, StrictMode, useMemo, useState } from 'react'
import { createRoot } from 'react-dom/client'

interface Todo {
  id: number
  owner: string
  title: string
  done: boolean
  shared: boolean
}

const params = new URLSearchParams(location.search)
const token = params.get('token') ?? ''
const server = params.get('server') ?? 'http://localhost:8080'

/** The token's subject, read for display (the server verifies the token; this page only shows who it is for). */
function subject(jwt: string): string {
  try {
    const part = jwt.split('.')[1] ?? ''
    return String(JSON.parse(atob(part.replace(/-/g, '+').replace(/_/g, '/'))).sub ?? '?')
  } catch {
    return '?'
  }
}

const me = subject(token)

async function api(path: string, init: RequestInit = {}): Promise<unknown> {
  const response = await fetch(`api/${path}`, {
    ...init,
    headers: { Authorization: `Bearer ${token}`, 'Content-Type': 'application/json' },
  })
  if (!response.ok) throw new Error(`${init.method ?? 'GET'} /api/${path}: HTTP ${response.status} ${await response.text()}`)
  return response.status === 204 ? undefined : response.json()
}

function Todos() {
  // load() is called once the channel is subscribed, and again only when changes may have been missed.
  const { rows, status, error } = useLiveRows<Todo>('todos', {
    load: ({ signal }) => api('todos', { signal }) as Promise<Todo[]>,
  })
  const sorted = useMemo(() => [...rows].sort((a, b) => a.id - b.id), [rows])
  const [title, setTitle] = useState('')
  const [failure, setFailure] = useState<string>()

  const act = (work: Promise<unknown>) => work.then(() => setFailure(undefined), (e: Error) => setFailure(e.message))
  const add = (event: FormEvent) => {
    event.preventDefault()
    void act(api('todos', { method: 'POST', body: JSON.stringify({ title }) }).then(() => setTitle('')))
  }

  return (
    <main>
      <h2>Todos</h2>
      <p id="list-status" className={status === 'error' ? 'error' : undefined}>
        {status}
        {error ? `: ${error.message}` : ''}
      </p>
      <ul id="todos">
        {sorted.map((todo) => (
          <li key={todo.id} data-id={todo.id} data-owner={todo.owner} className={todo.done ? 'done' : undefined}>
            <label>
              <input
                type="checkbox"
                checked={todo.done}
                disabled={todo.owner !== me}
                onChange={() => void act(api(`todos/${todo.id}`, { method: 'PATCH', body: JSON.stringify({ done: !todo.done }) }))}
              />{' '}
              <span className="title">{todo.title}</span>
            </label>
            <span className="owner">{todo.owner === me ? (todo.shared ? 'shared' : '') : todo.owner}</span>
          </li>
        ))}
      </ul>
      <form onSubmit={add}>
        <input value={title} onChange={(event) => setTitle(event.target.value)} placeholder="Something to do" required />
        <button>Add</button>
      </form>
      {failure && <p className="error">{failure}</p>}
    </main>
  )
}

function Online() {
  const [since] = useState(() => new Date().toISOString())
  const { members } = usePresence('todos', { since })
  return (
    <aside>
      <h2>Online</h2>
      <ul id="online">
        {members.map((member) => (
          <li key={member.key}>{member.key}</li>
        ))}
      </ul>
    </aside>
  )
}

function Connection() {
  return (
    <p id="connection">
      {me} on {server}: {useConnectionState()}
    </p>
  )
}

function App() {
  return (
    <RealtimeProvider url={server} auth={{ token }}>
      <header>
        <h1>Todos</h1>
        <Connection />
      </header>
      <Todos />
      <Online />
    </RealtimeProvider>
  )
}

createRoot(document.getElementById('root') as HTMLElement).render(
  <StrictMode>
    <App />
  </StrictMode>,
)
