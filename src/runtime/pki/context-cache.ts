/**
 * SecureContextCache: builds each tls.SecureContext once and reuses it.
 *
 * A context is keyed by a hash of what goes into it (the secrets' content hashes and the TLS
 * options), so a rotated certificate gets a fresh context while unchanged inputs reuse the old
 * one. Building a context parses keys and certificates in OpenSSL and is far too slow to do per
 * connection.
 *
 * Per-connection settings that OpenSSL keeps on the connection rather than the context (asking for
 * a client certificate, ALPN, SNI to send) come from serverSocketOptions / clientConnectOptions.
 */
import { createHash, randomBytes } from 'node:crypto';
import { isIP } from 'node:net';
import {
  DEFAULT_CIPHERS,
  createSecureContext,
  getCiphers,
  type ConnectionOptions,
  type SecureContext,
  type SecureContextOptions,
  type TLSSocketOptions,
} from 'node:tls';
import type { DownstreamTlsContext, TlsVersion, UpstreamTlsContext } from '../../model/snapshot.js';
import type { LoadedSecret } from './cert-store.js';
import { upstreamCheckServerIdentity } from './verify.js';

export type SecretLookup = (name: string) => LoadedSecret | undefined;
export type ContextResult = SecureContext | { error: string };

export interface SecureContextCacheOptions {
  /** 48 bytes of session ticket keys shared by every context (default: random per process). */
  ticketKeys?: Buffer;
  /** Contexts kept; the least recently used go first (default 1000). */
  maxEntries?: number;
}

const KNOWN_CIPHERS = new Set(getCiphers());
/** TLS 1.3 suites from Node's defaults: Istio's cipherSuites never restrict TLS 1.3. */
const TLS13_DEFAULT_SUITES = DEFAULT_CIPHERS.split(':').filter((c) => c.startsWith('TLS_'));
const VERSION_ORDER: TlsVersion[] = ['TLSv1', 'TLSv1.1', 'TLSv1.2', 'TLSv1.3'];

/**
 * Keeps the OpenSSL cipher names Node knows (Istio uses OpenSSL names for TLS <= 1.2), drops
 * duplicates and reports the rest as unknown, so translate can warn and the runtime skips them.
 */
export function filterCipherSuites(names: readonly string[]): { ciphers: string[]; unknown: string[] } {
  const ciphers: string[] = [];
  const unknown: string[] = [];
  for (const raw of names) {
    const n = raw.trim();
    if (!n) continue;
    if (KNOWN_CIPHERS.has(n.toLowerCase()) && !n.toUpperCase().startsWith('TLS_')) {
      if (!ciphers.includes(n)) ciphers.push(n);
    } else {
      unknown.push(n);
    }
  }
  return { ciphers, unknown };
}

const curveOk = new Map<string, boolean>();
/** Keeps the ECDH curve (group) names OpenSSL accepts; each name is tried once and remembered. */
export function filterEcdhCurves(names: readonly string[]): { curves: string[]; unknown: string[] } {
  const curves: string[] = [];
  const unknown: string[] = [];
  for (const raw of names) {
    const n = raw.trim();
    if (!n) continue;
    let ok = curveOk.get(n);
    if (ok === undefined) {
      try {
        createSecureContext({ ecdhCurve: n });
        ok = true;
      } catch {
        ok = false;
      }
      if (curveOk.size < 256) curveOk.set(n, ok);
    }
    if (ok && !curves.includes(n)) curves.push(n);
    else if (!ok) unknown.push(n);
  }
  return { curves, unknown };
}

/** The `ciphers` string for Node: the allowed TLS 1.2 ciphers plus Node's TLS 1.3 defaults. */
function cipherString(names: readonly string[], minVersion: TlsVersion): string | undefined {
  const { ciphers } = filterCipherSuites(names);
  // OpenSSL 3 refuses TLS 1.0/1.1 at its default security level; asking for them means asking
  // for the lower level too (Istio likewise needs explicit ciphers below TLS 1.2).
  const legacy = VERSION_ORDER.indexOf(minVersion) < VERSION_ORDER.indexOf('TLSv1.2');
  if (ciphers.length === 0) return legacy ? `${DEFAULT_CIPHERS}:@SECLEVEL=0` : undefined;
  // Without any TLS_ suite Node would switch TLS 1.3 off; keep its defaults.
  return [...TLS13_DEFAULT_SUITES, ...ciphers].join(':') + (legacy ? ':@SECLEVEL=0' : '');
}

function keyOf(parts: unknown): string {
  return createHash('sha256').update(JSON.stringify(parts)).digest('hex');
}

export class SecureContextCache {
  private readonly entries = new Map<string, SecureContext>();
  private readonly ticketKeys: Buffer;
  private readonly maxEntries: number;
  private builds = 0;

  constructor(opts: SecureContextCacheOptions = {}) {
    if (opts.ticketKeys && opts.ticketKeys.length !== 48) throw new Error('ticketKeys must be 48 bytes');
    this.ticketKeys = opts.ticketKeys ?? randomBytes(48);
    this.maxEntries = opts.maxEntries ?? 1000;
  }

  /** Contexts built so far (a reused context does not count): lets tests and metrics see reuse. */
  get buildCount(): number {
    return this.builds;
  }

  get size(): number {
    return this.entries.size;
  }

  clear(): void {
    this.entries.clear();
  }

  /** The server-side context for a terminating filter chain. */
  getServerContext(tls: DownstreamTlsContext, secrets: SecretLookup): ContextResult {
    if (tls.certificates.length === 0) return { error: `${tls.mode} TLS context has no certificate` };
    if (tls.certificates.length > 2) return { error: `at most two certificates (one RSA, one ECDSA) are supported, got ${tls.certificates.length}` };
    const pairs: LoadedSecret[] = [];
    for (const name of tls.certificates) {
      const s = secrets(name);
      if (!s) return { error: `secret "${name}" is not loaded` };
      if (!s.certChainPem || !s.privateKeyPem || !s.leaf) return { error: `secret "${name}" has no certificate and key` };
      pairs.push(s);
    }
    if (pairs.length === 2 && pairs[0]!.leaf!.keyType === pairs[1]!.leaf!.keyType) {
      return { error: `secrets "${tls.certificates[0]}" and "${tls.certificates[1]}" both hold ${pairs[0]!.leaf!.keyType} keys; two certificates must differ in key type` };
    }
    const wantsCa = tls.requestClientCertificate;
    let ca: LoadedSecret | undefined;
    if (wantsCa) {
      if (!tls.validationCa) return { error: `${tls.mode} TLS context has no CA for client certificates` };
      ca = secrets(tls.validationCa);
      if (!ca?.caPem) return { error: `secret "${tls.validationCa}" holds no CA bundle` };
    }
    let crl: LoadedSecret | undefined;
    if (tls.crl) {
      crl = secrets(tls.crl);
      if (!crl?.crlPem) return { error: `secret "${tls.crl}" holds no CRL` };
    }
    const ciphers = cipherString(tls.cipherSuites, tls.minVersion);
    const { curves } = filterEcdhCurves(tls.ecdhCurves);
    const key = keyOf([
      'server',
      pairs.map((p) => p.contentHash),
      ca?.contentHash ?? null,
      crl?.contentHash ?? null,
      tls.minVersion,
      tls.maxVersion,
      ciphers ?? null,
      curves,
      // The verify policy goes into the session id context so a session made under a weaker
      // policy is never resumed under a stricter one.
      tls.mode,
      tls.requestClientCertificate,
      tls.requireClientCertificate,
      tls.allowInvalidClientCertificate,
    ]);
    return this.build(key, {
      cert: pairs.map((p) => p.certChainPem!),
      key: pairs.map((p) => p.privateKeyPem!),
      ca: ca?.caPem,
      crl: crl?.crlPem,
      minVersion: tls.minVersion,
      maxVersion: tls.maxVersion,
      ciphers,
      ecdhCurve: curves.length ? curves.join(':') : undefined,
      honorCipherOrder: ciphers !== undefined,
      // Must be at most 32 bytes; without it OpenSSL refuses to resume when it verifies peers.
      sessionIdContext: key.slice(0, 32),
      ticketKeys: this.ticketKeys,
    });
  }

  /** The client-side context for TLS origination to a cluster. */
  getClientContext(up: UpstreamTlsContext, secrets: SecretLookup): ContextResult {
    let ca: LoadedSecret | undefined;
    if (up.validationCa && !up.insecureSkipVerify) {
      ca = secrets(up.validationCa);
      if (!ca?.caPem) return { error: `secret "${up.validationCa}" holds no CA bundle` };
    }
    let client: LoadedSecret | undefined;
    if (up.clientCertificate) {
      client = secrets(up.clientCertificate);
      if (!client?.certChainPem || !client.privateKeyPem) return { error: `secret "${up.clientCertificate}" has no certificate and key` };
    } else if (up.mode !== 'SIMPLE') {
      return { error: `${up.mode} origination needs a client certificate` };
    }
    let crl: LoadedSecret | undefined;
    if (up.crl) {
      crl = secrets(up.crl);
      if (!crl?.crlPem) return { error: `secret "${up.crl}" holds no CRL` };
    }
    const key = keyOf([
      'client',
      ca?.contentHash ?? null,
      client?.contentHash ?? null,
      crl?.contentHash ?? null,
      up.minVersion,
      up.maxVersion,
    ]);
    return this.build(key, {
      // Node's bundled roots (plus NODE_EXTRA_CA_CERTS) are the default store: leave `ca` unset.
      ca: ca && !ca.systemRoots ? ca.caPem : undefined,
      cert: client?.certChainPem,
      key: client?.privateKeyPem,
      crl: crl?.crlPem,
      minVersion: up.minVersion,
      maxVersion: up.maxVersion,
      ciphers: cipherString([], up.minVersion),
    });
  }

  private build(key: string, options: SecureContextOptions): ContextResult {
    const hit = this.entries.get(key);
    if (hit) {
      // Refresh the entry's place in the LRU order.
      this.entries.delete(key);
      this.entries.set(key, hit);
      return hit;
    }
    let ctx: SecureContext;
    try {
      ctx = createSecureContext(options);
    } catch (e) {
      // OpenSSL's reason text names the failing step, never the key bytes.
      return { error: `cannot build TLS context: ${(e as Error).message}` };
    }
    this.builds++;
    this.entries.set(key, ctx);
    while (this.entries.size > this.maxEntries) {
      const oldest = this.entries.keys().next().value as string;
      this.entries.delete(oldest);
    }
    return ctx;
  }
}

/**
 * Options for `new tls.TLSSocket(socket, …)` on a terminating chain. Asking for a client
 * certificate is a per-connection setting in OpenSSL, so it cannot live in the context.
 * MUTUAL refuses a missing or unverifiable certificate in the handshake (a missing one gets the
 * certificate_required alert); OPTIONAL_MUTUAL asks but lets checkPeerCertificate decide.
 */
export function serverSocketOptions(tls: DownstreamTlsContext, secureContext: SecureContext): TLSSocketOptions {
  return {
    isServer: true,
    secureContext,
    requestCert: tls.requestClientCertificate,
    rejectUnauthorized: tls.requestClientCertificate && tls.requireClientCertificate,
    ALPNProtocols: tls.alpn.length ? [...tls.alpn] : undefined,
  };
}

/**
 * Options for `tls.connect` when originating TLS. `host` is the request's authority (HTTP) used
 * for SNI when `autoSni` is set and as the name to verify under auto SAN validation.
 */
export function clientConnectOptions(up: UpstreamTlsContext, secureContext: SecureContext, host?: string): ConnectionOptions {
  const sniName = up.sni ?? (up.autoSni ? host : undefined);
  const verifyName = up.subjectAltNames.length === 0 && up.autoSanValidation ? (sniName ?? host) : undefined;
  return {
    secureContext,
    // SNI carries host names only (RFC 6066); an IP literal is verified but not sent.
    servername: sniName && !isIP(sniName) ? sniName : undefined,
    ALPNProtocols: up.alpn.length ? [...up.alpn] : undefined,
    rejectUnauthorized: !up.insecureSkipVerify,
    checkServerIdentity: up.insecureSkipVerify
      ? () => undefined
      : upstreamCheckServerIdentity({ subjectAltNames: up.subjectAltNames, verifyName }),
    minVersion: up.minVersion,
    maxVersion: up.maxVersion,
  };
}
