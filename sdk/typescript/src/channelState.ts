// One channel's subscription as a state machine: inputs are what the user asks and what the connection reports,
// outputs are messages to send and statuses to report. Pure: refs come from the caller, nothing is sent from here.
//
//   closed --subscribe--> joining --ack subscribed--> joined
//   joining/joined --socket closed--> joining (resubscribed on the next connection, presence re-tracked)
//   joining --error for the subscribe--> errored;  joined --FORBIDDEN/SUBSCRIPTION_FAILED from the server--> errored
//   joining/joined --unsubscribe--> leaving --ack unsubscribed--> closed
//
// Resume: the machine keeps the id of the last event delivered while joined (its position). A subscribe sent with a
// position carries it as `since`; there is one only after a lost connection (events were delivered, then the socket
// closed) or when the application passed `since`, since the position is forgotten whenever the subscription ends
// (unsubscribe, refusal, client stopped) and when the server could not resume from it.

import { RealtimeError } from './errors.js'
import type { ChannelKind, ClientMessage, ErrorMessage, TableEvent } from './protocol.js'

export type ChannelPhase = 'closed' | 'joining' | 'joined' | 'leaving' | 'errored'

/** What a channel's subscribe callback hears. */
export type ChannelStatus = 'SUBSCRIBED' | 'CHANNEL_ERROR' | 'CLOSED'

/** What a SUBSCRIBED status says about the events before it. */
export interface SubscribedInfo {
  /**
   * true: the channel resumed from its position and every event it missed follows, then the live stream. false:
   * nothing was replayed, so events from before this SUBSCRIBED may be missing: load or refetch what you show. It is
   * false on a first subscribe too (there was nothing to recover), and from a server that does not resume.
   */
  recovered: boolean
}

export interface SubscribeOptions {
  /**
   * Table and broadcast channels: resume after this position, an id this channel delivered before (`position`),
   * for example one kept across a page reload. Applies when the channel is not already subscribed or subscribing.
   */
  since?: string
}

export interface TableOptions {
  /** Only this kind of change (default `*`, every kind). */
  event?: TableEvent | '*'
  /** `column=op.value`, e.g. `user_id=eq.42` or `status=in.(open,late)`. */
  filter?: string
}

export type ChannelEffect =
  | { kind: 'send'; message: ClientMessage & { ref: string } }
  | { kind: 'status'; status: ChannelStatus; error?: RealtimeError; recovered?: boolean }

// Errors the server sends about a channel without dropping its subscription.
const KEEPS_SUBSCRIPTION = new Set<string>(['CHANGES_MISSED', 'RATE_LIMITED', 'INVALID_MESSAGE', 'INTERNAL_ERROR'])

export class ChannelMachine {
  phase: ChannelPhase = 'closed'
  /** The ref of the subscribe sent on the current connection, until it is answered or the connection ends. */
  private joinRef: string | undefined
  private leaveRef: string | undefined
  /** The presence state this connection tracks, tracked again after every subscribe. */
  private tracked: Record<string, unknown> | undefined
  /** The id of the last event delivered on this subscription: the `since` of the next subscribe. */
  private lastId: string | undefined
  /** The `since` that the subscribe awaiting its ack (joinRef) carried. */
  private joinSince: string | undefined

  constructor(
    readonly name: string,
    readonly kind: ChannelKind,
    readonly options: TableOptions,
    private readonly nextRef: () => string,
  ) {}

  get tracking(): boolean {
    return this.tracked !== undefined
  }

  /** The id of the last event delivered on this subscription, if any. */
  get position(): string | undefined {
    return this.lastId
  }

  subscribe(open: boolean, since?: string): ChannelEffect[] {
    if (this.phase === 'joining' || this.phase === 'joined') return []
    this.lastId = since
    this.phase = 'joining'
    return open ? [this.sendSubscribe()] : []
  }

  unsubscribe(open: boolean): ChannelEffect[] {
    this.tracked = undefined
    this.lastId = undefined
    if (this.phase === 'closed' || this.phase === 'leaving') return []
    const sent = this.phase === 'joined' || (this.phase === 'joining' && this.joinRef !== undefined)
    this.joinRef = undefined
    if (open && sent) {
      this.phase = 'leaving'
      this.leaveRef = this.nextRef()
      return [{ kind: 'send', message: { type: 'unsubscribe', channel: this.name, ref: this.leaveRef } }]
    }
    this.phase = 'closed'
    return [{ kind: 'status', status: 'CLOSED' }]
  }

  track(state: Record<string, unknown>, open: boolean): ChannelEffect[] {
    this.tracked = state
    return this.phase === 'joined' && open ? [this.sendTrack()] : []
  }

  untrack(open: boolean): ChannelEffect[] {
    this.tracked = undefined
    if (this.phase !== 'joined' || !open) return []
    return [{ kind: 'send', message: { type: 'presence', channel: this.name, event: 'untrack', ref: this.nextRef() } }]
  }

  /** A new connection is open: subscribe again if the channel wants to be subscribed. */
  socketOpened(): ChannelEffect[] {
    if (this.phase === 'joining') return [this.sendSubscribe()]
    if (this.phase === 'leaving') return this.close()
    return []
  }

  /** An event with position `id` (table: `payload.id`, broadcast: the message's `id`) is handed to the application. */
  delivered(id: unknown): void {
    if (this.phase === 'joined' && typeof id === 'string') this.lastId = id
  }

  /** The connection is gone, and with it every subscription the server held for it. */
  socketClosed(): ChannelEffect[] {
    this.joinRef = this.joinSince = undefined
    if (this.phase === 'joined') this.phase = 'joining'
    if (this.phase === 'leaving') return this.close()
    return []
  }

  /** The connection cannot come back without help (a new token): a channel waiting to subscribe hears why. */
  interrupted(error: RealtimeError): ChannelEffect[] {
    return this.phase === 'joining' ? [{ kind: 'status', status: 'CHANNEL_ERROR', error }] : []
  }

  /** The client stopped for good. */
  terminated(error?: RealtimeError): ChannelEffect[] {
    this.tracked = this.lastId = undefined
    if (this.phase === 'closed') return []
    this.phase = 'closed'
    this.joinRef = this.joinSince = this.leaveRef = undefined
    return [{ kind: 'status', status: 'CLOSED', error }]
  }

  /** An ack; `recovered` is the ack's field (absent from a server without resume, and then read as false). */
  ack(status: string, ref: string | undefined, recovered?: boolean): ChannelEffect[] {
    if (status === 'subscribed' && ref !== undefined && ref === this.joinRef && this.phase === 'joining') {
      this.phase = 'joined'
      const resumed = this.joinSince !== undefined
      const replayed = resumed && recovered === true
      // Nothing was replayed after that position: it no longer describes what the application holds.
      if (resumed && !replayed) this.lastId = undefined
      this.joinRef = this.joinSince = undefined
      const effects: ChannelEffect[] = [{ kind: 'status', status: 'SUBSCRIBED', recovered: replayed }]
      if (this.tracked !== undefined) effects.push(this.sendTrack())
      return effects
    }
    if (status === 'unsubscribed' && ref !== undefined && ref === this.leaveRef && this.phase === 'leaving') {
      return this.close()
    }
    return []
  }

  error(message: ErrorMessage): ChannelEffect[] {
    const error = new RealtimeError(message.code, message.message, this.name)
    const report: ChannelEffect = { kind: 'status', status: 'CHANNEL_ERROR', error }
    if (message.ref !== undefined && message.ref === this.joinRef && this.phase === 'joining') {
      this.phase = 'errored'
      this.joinRef = this.joinSince = this.lastId = undefined
      return [report]
    }
    if (message.ref !== undefined && message.ref === this.leaveRef && this.phase === 'leaving') {
      return [report, ...this.close()]
    }
    if (message.ref !== undefined) return [report]
    if (this.phase !== 'joined') return []
    if (!KEEPS_SUBSCRIPTION.has(message.code)) {
      this.phase = 'errored'
      this.lastId = undefined
    }
    return [report]
  }

  private close(): ChannelEffect[] {
    this.phase = 'closed'
    this.leaveRef = this.lastId = undefined
    return [{ kind: 'status', status: 'CLOSED' }]
  }

  private sendSubscribe(): ChannelEffect {
    this.joinRef = this.nextRef()
    const message: ClientMessage & { ref: string } = { type: 'subscribe', channel: this.name, ref: this.joinRef }
    if (this.kind === 'table') {
      if (this.options.event !== undefined) message.event = this.options.event
      if (this.options.filter !== undefined) message.filter = this.options.filter
    }
    this.joinSince = this.lastId
    if (this.lastId !== undefined) message.since = this.lastId
    return { kind: 'send', message }
  }

  private sendTrack(): ChannelEffect {
    return {
      kind: 'send',
      message: { type: 'presence', channel: this.name, event: 'track', payload: this.tracked, ref: this.nextRef() },
    }
  }
}
