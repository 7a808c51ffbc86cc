/**
 * etcd as a config store: the `etcd://` target syntax, the key layout, the client, and turning
 * stored values back into resources.
 *
 * Layout under a prefix (one key per resource, the value is the YAML or JSON of that resource):
 *
 *   <prefix>/<apiVersion group, or "core">/<Kind>/<namespace>/<name>
 *   <prefix>/.generation        an integer every push increments, in the same transaction
 *
 * A push writes every key and the generation in one transaction, so a watcher that applies
 * changes only at a revision that moved `.generation` never sees half a push.
 */
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import type { Etcd3, IOptions } from 'etcd3';
import { parseText } from '../config/load.js';
import type { Diagnostic } from '../config/diagnostics.js';
import { emptyResourceSet, type ResourceSet } from '../config/resource.js';

export const ETCD_SCHEME = 'etcd://';
export const DEFAULT_ETCD_PORT = 2379;

/** Where a set of resources lives: the endpoints and the key prefix (no trailing slash). */
export interface EtcdTarget {
  /** As given, for status and metric labels (it never carries credentials). */
  url: string;
  /** host:port, one per endpoint. */
  endpoints: string[];
  /** Starts with "/", never ends with one. */
  prefix: string;
}

/** How to reach etcd: TLS material and password auth (both optional). */
export interface EtcdConnectionOptions {
  /** PEM files: a client certificate and key for mTLS, and the CA that signs etcd's certificate. */
  certFile?: string;
  keyFile?: string;
  caFile?: string;
  user?: string;
  password?: string;
  /** Per-call deadline for unary calls (range, txn), default 5 s. */
  callTimeoutMs?: number;
}

export function isEtcdUrl(s: string): boolean {
  return s.startsWith(ETCD_SCHEME);
}

/**
 * Parses `etcd://host[:port][,host[:port]...]/prefix`. Throws an Error with a message for people
 * on anything else: a config store address is not worth guessing at.
 */
export function parseEtcdUrl(url: string): EtcdTarget {
  if (!isEtcdUrl(url)) throw new Error(`${url}: an etcd target starts with ${ETCD_SCHEME}`);
  const rest = url.slice(ETCD_SCHEME.length);
  const slash = rest.indexOf('/');
  const hostPart = slash < 0 ? rest : rest.slice(0, slash);
  const prefixPart = slash < 0 ? '' : rest.slice(slash);
  if (hostPart.includes('@')) throw new Error(`${url}: put etcd credentials in --etcd-user/--etcd-password, not in the URL`);
  const endpoints: string[] = [];
  for (const raw of hostPart.split(',')) {
    const h = raw.trim();
    if (!h) continue;
    const m = /^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+)(?::(\d{1,5}))?$/.exec(h);
    const port = m?.[2] !== undefined ? Number(m[2]) : DEFAULT_ETCD_PORT;
    if (!m || port < 1 || port > 65535) throw new Error(`${url}: "${h}" is not host[:port]`);
    endpoints.push(`${m[1]}:${port}`);
  }
  if (endpoints.length === 0) throw new Error(`${url}: no etcd endpoint (expected ${ETCD_SCHEME}host:2379/<prefix>)`);
  const prefix = '/' + prefixPart.split('/').filter((s) => s !== '').join('/');
  if (prefix === '/') throw new Error(`${url}: a key prefix is required (e.g. ${ETCD_SCHEME}${hostPart}/tlsgate/prod)`);
  if (/[\s\0]/.test(prefix)) throw new Error(`${url}: the prefix has whitespace or NUL characters`);
  return { url, endpoints, prefix };
}

export function generationKey(prefix: string): string {
  return `${prefix}/.generation`;
}

/** The range every key of a set lives in (the trailing slash keeps /a from matching /ab). */
export function rangePrefix(prefix: string): string {
  return `${prefix}/`;
}

/** The group part of an apiVersion, "core" for the core group (`v1`). */
export function groupSegment(apiVersion: string): string {
  const slash = apiVersion.indexOf('/');
  return slash < 0 ? 'core' : apiVersion.slice(0, slash);
}

export function resourceKey(prefix: string, r: { apiVersion: string; kind: string; namespace: string; name: string }): string {
  return `${prefix}/${groupSegment(r.apiVersion)}/${r.kind}/${r.namespace}/${r.name}`;
}

/** The "file" name diagnostics show for a stored key: etcd://<prefix>/<key below it>. */
export function keyFileName(key: string): string {
  return ETCD_SCHEME + key.replace(/^\/+/, '');
}

/** Keys below the prefix whose last-but-path segment starts with "." are bookkeeping, not resources. */
export function isBookkeepingKey(prefix: string, key: string): boolean {
  const rel = key.startsWith(rangePrefix(prefix)) ? key.slice(prefix.length + 1) : key;
  return rel.split('/').some((s) => s.startsWith('.'));
}

function readPem(file: string, what: string): Buffer {
  try {
    return readFileSync(file);
  } catch (e) {
    throw new Error(`cannot read ${what} ${file}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
  }
}

/** Cockatiel-shaped policy that runs the call once: reconnects are ours, not a circuit breaker's. */
const passThrough = {
  execute: <T>(fn: (ctx: { signal: AbortSignal }) => T | Promise<T>) => Promise.resolve().then(() => fn({ signal: new AbortController().signal })),
};

/** A bounded exponential backoff (250 ms doubling to 4 s, with jitter) in cockatiel's IBackoff shape. */
export function watchBackoff(attempt = 0): { duration: number; next(): ReturnType<typeof watchBackoff> } {
  const base = Math.min(250 * 2 ** attempt, 4000);
  return { duration: Math.round(base * (0.8 + Math.random() * 0.4)), next: () => watchBackoff(Math.min(attempt + 1, 5)) };
}

/** TLS is used when a CA or a client certificate is given; plaintext otherwise. */
export function usesTls(conn: EtcdConnectionOptions): boolean {
  return conn.caFile !== undefined || conn.certFile !== undefined;
}

export function createEtcdClient(target: EtcdTarget, conn: EtcdConnectionOptions = {}): Etcd3 {
  if ((conn.certFile === undefined) !== (conn.keyFile === undefined)) {
    throw new Error('--etcd-cert and --etcd-key go together');
  }
  if ((conn.user === undefined) !== (conn.password === undefined)) {
    throw new Error('--etcd-user and --etcd-password go together');
  }
  const tls = usesTls(conn);
  const options: IOptions = {
    hosts: target.endpoints.map((e) => `${tls ? 'https' : 'http'}://${e}`),
    dialTimeout: 3000,
    grpcOptions: {
      // Reconnect quickly after an etcd restart (gRPC's default backoff grows to two minutes),
      // and notice a silent peer through keepalive.
      'grpc.initial_reconnect_backoff_ms': 250,
      'grpc.max_reconnect_backoff_ms': 4000,
      'grpc.keepalive_time_ms': 10_000,
      'grpc.keepalive_timeout_ms': 5000,
      'grpc.keepalive_permit_without_calls': 1,
    },
    faultHandling: {
      host: () => passThrough as never,
      global: passThrough as never,
      watchBackoff: watchBackoff() as never,
    },
    defaultCallOptions: (ctx) => (ctx.isStream ? {} : { deadline: Date.now() + (conn.callTimeoutMs ?? 5000) }),
  };
  if (tls) {
    options.credentials = {
      rootCertificate: conn.caFile !== undefined ? readPem(conn.caFile, 'etcd CA') : Buffer.alloc(0),
      ...(conn.certFile !== undefined ? { certChain: readPem(conn.certFile, 'etcd client certificate') } : {}),
      ...(conn.keyFile !== undefined ? { privateKey: readPem(conn.keyFile, 'etcd client key') } : {}),
    };
  }
  if (conn.user !== undefined && conn.password !== undefined) options.auth = { username: conn.user, password: conn.password };
  // Loaded on first use: gRPC costs startup time that commands without etcd should not pay.
  const { Etcd3: Client } = createRequire(import.meta.url)('etcd3') as typeof import('etcd3');
  return new Client(options);
}

/** Counts the resources in a set. */
export function resourceCount(rs: ResourceSet): number {
  return Object.values(rs).reduce((n, list: unknown[]) => n + list.length, 0);
}

/**
 * Parses stored values (key -> text) into one resource set. Diagnostics point at the key
 * (`etcd://<prefix>/<group>/<Kind>/<ns>/<name>:line:col`). A value whose resource does not match
 * its key, or that holds more than one resource, is reported and left out: the key is the
 * identity a push and a diff rely on.
 */
export function parseStored(prefix: string, entries: ReadonlyMap<string, string>): { resources: ResourceSet; diagnostics: Diagnostic[] } {
  const out = emptyResourceSet();
  const diagnostics: Diagnostic[] = [];
  const keys = [...entries.keys()].filter((k) => !isBookkeepingKey(prefix, k)).sort();
  for (const key of keys) {
    const file = keyFileName(key);
    const parsed = parseText(entries.get(key)!, file);
    diagnostics.push(...parsed.diagnostics);
    const count = resourceCount(parsed.resources);
    if (count === 0) continue;
    const all = Object.values(parsed.resources).flat() as { apiVersion: string; kind: string; metadata: { namespace: string; name: string } }[];
    const r = all[0]!;
    const expected = resourceKey(prefix, { apiVersion: r.apiVersion, kind: r.kind, namespace: r.metadata.namespace, name: r.metadata.name });
    if (count > 1 || expected !== key) {
      diagnostics.push({
        code: 'TG1007', severity: 'error', location: { file, line: 1, column: 1 },
        resource: { kind: r.kind, namespace: r.metadata.namespace, name: r.metadata.name },
        message: count > 1 ? `the key holds ${count} resources: one resource per key` : `the key does not match the resource it holds (expected ${expected})`,
        hint: 'write the store with `tlsgate config push`, which keys every resource by group/Kind/namespace/name',
      });
      continue;
    }
    for (const [field, list] of Object.entries(parsed.resources) as [keyof ResourceSet, unknown[]][]) {
      (out[field] as unknown[]).push(...list);
    }
  }
  return { resources: out, diagnostics };
}
