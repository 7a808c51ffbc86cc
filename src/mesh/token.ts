/**
 * Bootstrap tokens: what a proxy shows the CA server to prove which identity it may have.
 *
 * Compact form: base64url(JSON claims) "." base64url(HMAC-SHA256(secret, first part)). The CA
 * keeps the secret next to its root key; whoever holds a token gets certificates for exactly the
 * namespace/service account in it, until it expires. Tokens are bearer secrets: never logged.
 */
import { createHmac, timingSafeEqual } from 'node:crypto';
import { identityError } from './spiffe.js';

export interface TokenClaims {
  /** Namespace. */
  ns: string;
  /** Service account. */
  sa: string;
  /** Trust domain. */
  td: string;
  /** Expiry, seconds since the epoch. */
  exp: number;
  /** Issued at, seconds since the epoch. */
  iat?: number;
}

export type TokenCheck = { ok: true; claims: TokenClaims } | { ok: false; reason: string };

/** Longer than any token we mint; bounds the work done on hostile input. */
export const MAX_TOKEN_CHARS = 4096;
const B64URL = /^[A-Za-z0-9_-]+$/;

function mac(secret: Buffer, payload: string): Buffer {
  return createHmac('sha256', secret).update(payload).digest();
}

export function signToken(secret: Buffer, claims: TokenClaims): string {
  const err = identityError(claims.td, claims.ns, claims.sa);
  if (err) throw new Error(err);
  if (!Number.isFinite(claims.exp)) throw new Error('token expiry must be a number of seconds');
  const payload = Buffer.from(JSON.stringify(claims)).toString('base64url');
  return `${payload}.${mac(secret, payload).toString('base64url')}`;
}

/**
 * Checks signature first (nothing in an unsigned payload is looked at), then shape, expiry and
 * trust domain. `nowMs` is the clock (tests move it).
 */
export function verifyToken(secret: Buffer, token: unknown, opts: { trustDomain: string; nowMs?: number }): TokenCheck {
  if (typeof token !== 'string' || token.length === 0) return { ok: false, reason: 'no token' };
  if (token.length > MAX_TOKEN_CHARS) return { ok: false, reason: 'token is too long' };
  const dot = token.indexOf('.');
  if (dot <= 0 || dot !== token.lastIndexOf('.')) return { ok: false, reason: 'token is not in the form payload.signature' };
  const payload = token.slice(0, dot);
  const sig = token.slice(dot + 1);
  if (!B64URL.test(payload) || !B64URL.test(sig)) return { ok: false, reason: 'token is not base64url' };
  const want = mac(secret, payload);
  const got = Buffer.from(sig, 'base64url');
  if (got.length !== want.length || !timingSafeEqual(got, want)) return { ok: false, reason: 'token signature does not verify' };
  let claims: unknown;
  try {
    claims = JSON.parse(Buffer.from(payload, 'base64url').toString('utf8'));
  } catch {
    return { ok: false, reason: 'token payload is not JSON' };
  }
  const c = claims as Partial<TokenClaims> | null;
  if (!c || typeof c !== 'object' || typeof c.ns !== 'string' || typeof c.sa !== 'string' || typeof c.td !== 'string' || typeof c.exp !== 'number') {
    return { ok: false, reason: 'token payload lacks ns, sa, td or exp' };
  }
  const bad = identityError(c.td, c.ns, c.sa);
  if (bad) return { ok: false, reason: `token identity is not valid: ${bad}` };
  const now = opts.nowMs ?? Date.now();
  if (c.exp * 1000 <= now) return { ok: false, reason: `token expired at ${new Date(c.exp * 1000).toISOString()}` };
  if (c.td !== opts.trustDomain) return { ok: false, reason: `token is for trust domain "${c.td}", this CA serves "${opts.trustDomain}"` };
  return { ok: true, claims: { ns: c.ns, sa: c.sa, td: c.td, exp: c.exp, ...(typeof c.iat === 'number' ? { iat: c.iat } : {}) } };
}

/** Reads the claims without checking the signature: for a client that wants to know its own identity. */
export function peekToken(token: string): TokenClaims | undefined {
  const payload = token.split('.')[0] ?? '';
  try {
    const c = JSON.parse(Buffer.from(payload, 'base64url').toString('utf8')) as TokenClaims;
    return typeof c.ns === 'string' && typeof c.sa === 'string' && typeof c.td === 'string' ? c : undefined;
  } catch {
    return undefined;
  }
}
