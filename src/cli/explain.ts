/**
 * `tlsgate explain`: the path a connection would take, from the same buildSnapshotFrom the `run`
 * command serves. Certificates are loaded with CertStore so the output shows what would really be
 * served (or why it could not be). Exit 0 when a path exists, 1 when nothing matches, 2 on bad
 * arguments or a configuration that cannot be loaded.
 */
import { X509Certificate } from 'node:crypto';
import { isIP } from 'node:net';
import { formatDiagnostic } from '../config/diagnostics.js';
import type { EtcdConnectionOptions } from '../sources/etcd.js';
import { readSourcesOnce } from '../sources/etcd-sources.js';
import type { SecretSpec } from '../model/snapshot.js';
import { CertStore, isPkiError, type CertInfo } from '../runtime/pki/cert-store.js';
import { certInfo, splitPem } from '../runtime/pki/cert-info.js';
import { explain, renderExplanation, type CertFacts, type ExplainQuery, type SecretFacts } from '../explain/explain.js';
import { buildSnapshotFrom, mergeResourceSets, parseLabels } from './pipeline.js';

export interface ExplainCommandOptions {
  config: string[];
  namespace: string;
  labels?: string;
  json?: boolean;
  sni?: string;
  port?: number;
  alpn?: string;
  header: string[];
  method?: string;
  path?: string;
  address?: string;
  plaintext?: boolean;
  /** Explain as a sidecar (same meaning as for `run`). */
  sidecar?: boolean;
  outboundPort?: number;
  inboundPort?: number;
  appPort?: number;
  serviceAccount?: string;
  /** TLS and auth for `--config etcd://...` entries (read once, as `run` reads them). */
  etcd?: EtcdConnectionOptions;
}

type TargetOptions = Pick<ExplainCommandOptions, 'sni' | 'port' | 'alpn' | 'header' | 'method' | 'path' | 'address' | 'plaintext' | 'sidecar' | 'outboundPort' | 'inboundPort' | 'appPort'>;

/** A usage error: printed as is, exit 2. */
export class ExplainUsageError extends Error {}

function headerMap(list: string[]): Record<string, string> {
  const out: Record<string, string> = {};
  for (const h of list) {
    const i = h.search(/[=:]/);
    if (i <= 0) throw new ExplainUsageError(`invalid --header "${h}": expected name=value`);
    out[h.slice(0, i).trim().toLowerCase()] = h.slice(i + 1).trim();
  }
  return out;
}

function alpnList(s: string | undefined): string[] | undefined {
  return s === undefined ? undefined : s.split(',').map((x) => x.trim()).filter(Boolean);
}

/**
 * Turns the target and flags into what the client does.
 * @example parseTarget('https://a.example.com:8443/x?y=1', { header: [] }) // port 8443, SNI a.example.com, GET /x?y=1
 */
export function parseTarget(target: string | undefined, o: TargetOptions): ExplainQuery {
  if (o.sidecar) return sidecarTarget(target, o);
  const headers = headerMap(o.header ?? []);
  const method = (o.method ?? 'GET').toUpperCase();
  const alpn = alpnList(o.alpn);
  let q: ExplainQuery;
  if (target !== undefined) {
    const m = /^([a-z][a-z0-9+.-]*):\/\//i.exec(target);
    if (!m) throw new ExplainUsageError(`target "${target}" is not a URL: use https://host[:port]/path, http://host[:port]/path, tcp://host:port or tls://host:port (or --sni and --port)`);
    const { scheme, url, host } = urlTarget(target, `unsupported scheme "${m[1]!.toLowerCase()}": use https, http, tcp or tls`);
    // Clients send no SNI for an IP address (RFC 6066).
    const sni = o.sni ?? (isIP(host) ? undefined : host);
    const defaults: Record<string, number> = { https: 443, http: 80 };
    const port = o.port ?? (url.port ? Number(url.port) : defaults[scheme]);
    if (port === undefined) throw new ExplainUsageError(`target "${target}" needs a port (${scheme}://host:port)`);
    switch (scheme) {
      case 'https':
      case 'http': {
        const tls = scheme === 'https';
        q = {
          target, port, transport: tls ? 'tls' : 'raw_buffer', alpn: tls ? alpn ?? ['h2', 'http/1.1'] : [],
          http: { authority: url.host, path: o.path ?? `${url.pathname || '/'}${url.search}`, method, headers },
        };
        if (tls && sni !== undefined) q.sni = sni;
        break;
      }
      case 'tcp':
        q = { target, port, transport: 'raw_buffer', alpn: [] };
        break;
      case 'tls':
        q = { target, port, transport: 'tls', alpn: alpn ?? [] };
        if (sni !== undefined) q.sni = sni;
        break;
      default:
        throw new ExplainUsageError(`unsupported scheme "${scheme}": use https, http, tcp or tls`);
    }
  } else {
    if (o.port === undefined) throw new ExplainUsageError('give a target (https://host/path, tcp://host:port, ...) or --port (with --sni for TLS)');
    const tls = !o.plaintext;
    const parts = [tls ? `tls` : 'tcp', o.sni ? `sni=${o.sni}` : '', `port=${o.port}`].filter(Boolean);
    q = { target: parts.join(' '), port: o.port, transport: tls ? 'tls' : 'raw_buffer', alpn: tls ? alpn ?? [] : [] };
    if (tls && o.sni !== undefined) q.sni = o.sni.toLowerCase();
    if (o.path !== undefined || o.method !== undefined || Object.keys(headers).length > 0) {
      q.http = { authority: headers['host'] ?? o.sni ?? '', path: o.path ?? '/', method, headers };
    }
  }
  if (o.address !== undefined) q.address = o.address;
  return q;
}

/**
 * `--sidecar`: a URL is what the app asks its outbound proxy (http:// = an absolute-form request
 * through HTTP_PROXY; https:// and tls:// = a CONNECT tunnel through HTTPS_PROXY with the app's
 * own ClientHello inside; tcp:// = a CONNECT tunnel with raw bytes). No target = a peer at the
 * inbound port (--port, default --inbound-port), mTLS by default, --plaintext, or --alpn.
 * @example sidecarTarget('https://edition.cnn.com/', { sidecar: true, header: [] }) // CONNECT edition.cnn.com:443 on 15001, SNI edition.cnn.com
 */
export function sidecarTarget(target: string | undefined, o: TargetOptions): ExplainQuery {
  const headers = headerMap(o.header ?? []);
  const method = (o.method ?? 'GET').toUpperCase();
  const alpn = alpnList(o.alpn);
  let q: ExplainQuery;
  if (target === undefined) {
    if (o.appPort === undefined) throw new ExplainUsageError('--sidecar with no target explains the inbound side: give --app-port (and --port, default the --inbound-port 15006), or a target URL for the outbound side');
    const port = o.port ?? o.inboundPort ?? 15006;
    const tls = !o.plaintext;
    // A peer sidecar offers Istio's mTLS ALPN; --alpn says otherwise (e.g. an app's own TLS).
    const offered = tls ? alpn ?? ['istio-peer-exchange', 'istio'] : [];
    const parts = ['inbound', tls ? `tls alpn=${offered.join(',') || '(none)'}` : 'plaintext', o.sni ? `sni=${o.sni}` : '', `port=${port}`, `app-port=${o.appPort}`].filter(Boolean);
    q = { target: parts.join(' '), port, transport: tls ? 'tls' : 'raw_buffer', alpn: offered, sidecar: { role: 'inbound', appPort: o.appPort } };
    if (tls && o.sni !== undefined) q.sni = o.sni.toLowerCase();
    if (o.path !== undefined || o.method !== undefined || Object.keys(headers).length > 0) {
      q.http = { authority: headers['host'] ?? `127.0.0.1:${o.appPort}`, path: o.path ?? '/', method, headers };
    }
  } else {
    const { scheme, url, host } = urlTarget(target, `target "${target}" is not a URL the app would send: use http://host[:port]/path (HTTP_PROXY), https://host[:port]/ or tls://host:port (HTTPS_PROXY, CONNECT), tcp://host:port`);
    const proxyPort = o.outboundPort ?? 15001;
    if (scheme === 'http') {
      q = { target, port: proxyPort, transport: 'raw_buffer', alpn: [], http: { authority: url.host, path: o.path ?? `${url.pathname || '/'}${url.search}`, method, headers }, sidecar: { role: 'outbound' } };
    } else {
      const port = url.port ? Number(url.port) : scheme === 'https' ? 443 : undefined;
      if (port === undefined) throw new ExplainUsageError(`target "${target}" needs a port (${scheme}://host:port)`);
      const authority = `${host.includes(':') ? `[${host}]` : host}:${port}`;
      q = { target, port: proxyPort, transport: 'raw_buffer', alpn: [], http: { authority, path: '', method: 'CONNECT', headers: {} }, sidecar: { role: 'outbound', connect: { host, port } } };
      if (scheme !== 'tcp') {
        // The tunnel starts with the app's own ClientHello (no SNI for an IP address).
        const sni = o.sni ?? (isIP(host) ? undefined : host);
        if (sni !== undefined) q.sni = sni.toLowerCase();
        q.alpn = alpn ?? (scheme === 'https' ? ['h2', 'http/1.1'] : []);
      }
    }
  }
  if (o.address !== undefined) q.address = o.address;
  return q;
}

function facts(c: CertInfo): CertFacts {
  return {
    subject: c.subject,
    issuer: c.issuer,
    sans: [...c.sans.dns.map((x) => `DNS:${x}`), ...c.sans.ip.map((x) => `IP:${x}`), ...c.sans.uri.map((x) => `URI:${x}`), ...c.sans.email.map((x) => `email:${x}`)],
    notAfter: c.notAfter.toISOString().slice(0, 10),
    fingerprintSha256: c.fingerprintSha256,
  };
}

function parseAll(pem: string | undefined): CertInfo[] {
  if (!pem) return [];
  const out: CertInfo[] = [];
  for (const b of splitPem(pem)) {
    try {
      out.push(certInfo(new X509Certificate(b)));
    } catch {
      // unparsable: the load error already says so
    }
  }
  return out;
}

/** Loads every file/inline secret of the snapshot; failures keep whatever facts could be read. */
async function loadSecretFacts(secrets: Record<string, SecretSpec>): Promise<Map<string, SecretFacts>> {
  const store = new CertStore();
  const out = new Map<string, SecretFacts>();
  for (const [name, spec] of Object.entries(secrets)) {
    if (spec.source.kind !== 'file' && spec.source.kind !== 'inline') continue;
    const r = await store.load(spec.name === name ? spec : { ...spec, name });
    if (!isPkiError(r)) {
      const f: SecretFacts = {};
      if (r.leaf) f.leaf = facts(r.leaf);
      if (r.caCerts.length) f.ca = r.caCerts.map(facts);
      out.set(name, f);
      continue;
    }
    // Show the certificate anyway when it parses (an expired one, a key that does not match).
    const f: SecretFacts = { error: r.error };
    const m = await store.read(spec, []);
    if (!isPkiError(m)) {
      const leaf = parseAll(m.certChainPem)[0];
      if (leaf) f.leaf = facts(leaf);
      const ca = parseAll(m.caPem);
      if (ca.length) f.ca = ca.map(facts);
    }
    out.set(name, f);
  }
  return out;
}

export async function explainCommand(
  target: string | undefined, opts: ExplainCommandOptions,
  out: NodeJS.WritableStream = process.stdout, err: NodeJS.WritableStream = process.stderr,
): Promise<number> {
  let query: ExplainQuery;
  let labels: Record<string, string> | undefined;
  try {
    query = parseTarget(target, opts);
    labels = parseLabels(opts.labels);
  } catch (e) {
    err.write(`tlsgate explain: ${(e as Error).message}\n`);
    return 2;
  }
  if (opts.config.length === 0) {
    err.write('tlsgate explain: --config is required\n');
    return 2;
  }
  // As `run` builds it: a sidecar serves the mesh on loopback, with its SPIFFE identity.
  const bindAddress = opts.address ?? '127.0.0.1';
  const sidecar = opts.sidecar ? {
    outboundAddress: bindAddress,
    outboundPort: opts.outboundPort ?? 15001,
    ...(opts.appPort !== undefined ? { inbound: { address: bindAddress, port: opts.inboundPort ?? 15006, appPort: opts.appPort } } : {}),
  } : undefined;
  const translateOptions = {
    proxyNamespace: opts.namespace,
    ...(labels ? { labels } : {}),
    ...(sidecar ? { sidecar, bindAddress } : {}),
    ...(sidecar && opts.serviceAccount ? { identity: `spiffe://cluster.local/ns/${opts.namespace}/sa/${opts.serviceAccount}` } : {}),
  };
  // Loaded once (files and etcd prefixes): the snapshot is translated from it, and the
  // near-miss hints read its resources.
  let read;
  try {
    read = await readSourcesOnce(opts.config, opts.etcd ?? {});
  } catch (e) {
    err.write(`tlsgate explain: cannot read the configuration: ${(e as Error).message}\n`);
    return 2;
  }
  const loaded = mergeResourceSets(read.parts);
  const built = await buildSnapshotFrom(loaded, translateOptions);
  // A configuration that cannot be read at all (no file, empty etcd prefixes) cannot be explained.
  const fatal = built.diagnostics.filter((d) => d.severity === 'error' && d.code.startsWith('TG1'));
  const empty = built.files.length === 0 && !read.etcd.some((e) => e.keys > 0);
  if (fatal.length > 0 || empty) {
    for (const d of built.diagnostics.filter((x) => x.severity !== 'info')) err.write(formatDiagnostic(d) + '\n');
    err.write('tlsgate explain: the configuration cannot be loaded\n');
    return 2;
  }
  const errors = built.diagnostics.filter((d) => d.severity === 'error').length;
  if (errors > 0) err.write(`tlsgate explain: note: the configuration has ${errors} error(s) (see \`tlsgate validate\`); \`tlsgate run\` refuses to start with it. Explaining what it would translate to.\n`);
  const { resources } = loaded;
  const secretFacts = await loadSecretFacts(built.snapshot.secrets);
  const e = explain(built.snapshot, query, {
    secrets: (n) => secretFacts.get(n),
    resources,
    diagnostics: built.diagnostics,
    ...(labels ? { labels } : {}),
    baseDir: process.cwd(),
  });
  out.write(opts.json ? JSON.stringify(e, null, 2) + '\n' : renderExplanation(e));
  return e.matched ? 0 : 1;
}

/** A https/http/tcp/tls URL target: its scheme, URL and bare lower-case host; `usage` when the scheme is not one of those. */
function urlTarget(target: string, usage: string): { scheme: string; url: URL; host: string } {
  const scheme = /^([a-z][a-z0-9+.-]*):\/\//i.exec(target)?.[1]?.toLowerCase();
  if (!scheme || !['https', 'http', 'tcp', 'tls'].includes(scheme)) throw new ExplainUsageError(usage);
  let url: URL;
  try {
    url = new URL(target);
  } catch {
    throw new ExplainUsageError(`target "${target}" is not a valid URL`);
  }
  return { scheme, url, host: url.hostname.replace(/^\[|\]$/g, '').toLowerCase() };
}
