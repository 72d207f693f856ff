// When to ask for a fresh token: read the JWT's `exp` (without verifying it: only the server can) and refresh ahead
// of it, so the server never closes the connection with 4001 for an expired token. Pure.

/** The token's `exp` in milliseconds since the epoch, or undefined when it is not a JWT with a numeric `exp`. */
export function tokenExpiry(token: string): number | undefined {
  const part = token.split('.')[1]
  if (part === undefined) return undefined
  try {
    const base64 = part.replace(/-/g, '+').replace(/_/g, '/')
    const claims: unknown = JSON.parse(atob(base64.padEnd(base64.length + ((4 - (base64.length % 4)) % 4), '=')))
    const exp = (claims as { exp?: unknown } | null)?.exp
    return typeof exp === 'number' && Number.isFinite(exp) ? exp * 1000 : undefined
  } catch {
    return undefined
  }
}

/**
 * How long from `now` until the refresh should run: `marginMs` before expiry, or halfway there when the token has
 * less than twice the margin left. Undefined when the token has no readable expiry (then nothing is scheduled).
 */
export function refreshDelay(token: string, now: number, marginMs: number): number | undefined {
  const expiry = tokenExpiry(token)
  if (expiry === undefined) return undefined
  const left = Math.max(0, expiry - now)
  return Math.max(0, left - Math.min(marginMs, left / 2))
}
