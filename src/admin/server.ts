/**
 * The admin server (privileged: binds 127.0.0.1 by default). Endpoints:
 *   GET /ready              200 once every listener is bound, 503 before and while draining
 *   GET /config_dump        the running snapshot as JSON; secrets as fingerprints only
 *   GET /certs              every certificate in use: subject, SANs, issuer, validity, fingerprint
 *   GET /stats/prometheus   metrics
 *   GET /  /api/*  /events  the live dashboard (src/admin/dashboard/, docs/dashboard.md)
 */
import * as http from 'node:http';
import type { Cluster, Snapshot, SecretSpec } from '../model/snapshot.js';
import type { Diagnostic } from '../config/diagnostics.js';
import type { DataPlane } from '../runtime/lifecycle.js';
import type { PromTelemetry } from './telemetry.js';
import { handleDashboard, registerProxy } from './dashboard/routes.js';

export { setProxyLabel } from './dashboard/routes.js';

export interface AdminState {
  dataPlane: DataPlane;
  telemetry: PromTelemetry;
  /** Diagnostics of the last load (shown even when the last edit was refused). */
  diagnostics(): Diagnostic[];
  /** The last apply attempt (start, file change, SIGHUP), successful or not. */
  lastApply(): unknown;
  draining(): boolean;
  configSources(): string[];
  /** Each config source with its state (files; etcd: endpoints, prefix, revision, generation, connected). */
  sourceStatus?(): Record<string, unknown>[];
}

export function startAdminServer(state: AdminState, address: string, port: number): Promise<http.Server> {
  const server = http.createServer((req, res) => {
    void handle(state, server, req, res).catch((e: Error) => {
      if (!res.headersSent) res.writeHead(500, { 'content-type': 'text/plain' });
      res.end(`internal error: ${e.message}\n`);
    });
  });
  server.on('clientError', (_e, s) => s.destroy());
  registerProxy(state, server);
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, address, () => {
      server.off('error', reject);
      resolve(server);
    });
  });
}

async function handle(state: AdminState, server: http.Server, req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
  const url = new URL(req.url ?? '/', 'http://admin');
  if (req.method !== 'GET' && req.method !== 'HEAD') {
    res.writeHead(405, { allow: 'GET' }).end();
    return;
  }
  if (await handleDashboard(server, req, res, url)) return;
  switch (url.pathname) {
    case '/ready': {
      const ok = state.dataPlane.ready && !state.draining();
      res.writeHead(ok ? 200 : 503, { 'content-type': 'text/plain' }).end(ok ? 'LIVE\n' : state.draining() ? 'DRAINING\n' : 'PRE_INITIALIZING\n');
      return;
    }
    case '/config_dump':
      json(res, configDump(state));
      return;
    case '/certs':
      json(res, certsDump(state));
      return;
    case '/stats/prometheus':
    case '/metrics': {
      const body = await state.telemetry.registry.metrics();
      res.writeHead(200, { 'content-type': state.telemetry.registry.contentType }).end(body);
      return;
    }
    default:
      res.writeHead(404, { 'content-type': 'text/plain' }).end('not found: try / (dashboard) /ready /config_dump /certs /stats/prometheus\n');
  }
}

function json(res: http.ServerResponse, v: unknown): void {
  res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify(v, null, 2) + '\n');
}

/** A secret as shown to people: where it comes from and the certificate's fingerprint; never key material. */
function secretView(state: AdminState, spec: SecretSpec): Record<string, unknown> {
  const loaded = state.dataPlane.certStore.get(spec.name);
  const v: Record<string, unknown> = { name: spec.name, source: spec.source.kind };
  if (spec.source.kind === 'file') {
    const { certChainPath, privateKeyPath, caPath, crlPath } = spec.source;
    Object.assign(v, { certChainPath, privateKeyPath, caPath, crlPath });
  }
  if (loaded) {
    if (loaded.leaf) v['certificate'] = { subject: loaded.leaf.subject, fingerprintSha256: loaded.leaf.fingerprintSha256, notAfter: loaded.leaf.notAfter };
    if (loaded.privateKeyPem) v['privateKey'] = '[redacted]';
    if (loaded.caCerts.length && !loaded.systemRoots) v['ca'] = loaded.caCerts.map((c) => ({ subject: c.subject, fingerprintSha256: c.fingerprintSha256 }));
    if (loaded.systemRoots) v['ca'] = 'system roots';
    if (loaded.crlPem) v['crl'] = 'present';
  }
  return v;
}

/** A cluster with its effective upstream TLS spelled out: mode, SNI, CA (fingerprints), SANs. */
function clusterView(state: AdminState, c: Cluster): Record<string, unknown> {
  if (!c.tls) return { ...c, upstreamTls: 'plaintext' };
  const ca = state.dataPlane.certStore.get(c.tls.validationCa);
  const client = c.tls.clientCertificate ? state.dataPlane.certStore.get(c.tls.clientCertificate) : undefined;
  return {
    ...c,
    upstreamTls: {
      mode: c.tls.mode,
      sni: c.tls.sni ?? null,
      verify: c.tls.insecureSkipVerify ? 'off (insecureSkipVerify)' : c.tls.subjectAltNames.length ? { subjectAltNames: c.tls.subjectAltNames } : c.tls.autoSanValidation ? 'certificate must match the SNI' : 'chain only',
      ca: ca?.systemRoots ? 'system roots' : ca ? ca.caCerts.map((x) => ({ subject: x.subject, fingerprintSha256: x.fingerprintSha256 })) : c.tls.validationCa,
      clientCertificate: client?.leaf ? { subject: client.leaf.subject, uriSans: client.leaf.sans.uri, fingerprintSha256: client.leaf.fingerprintSha256 } : (c.tls.clientCertificate ?? null),
      alpn: c.tls.alpn,
    },
  };
}

export function configDump(state: AdminState): Record<string, unknown> {
  const snap: Snapshot | undefined = state.dataPlane.snapshot;
  return {
    generation: snap?.generation ?? 0,
    ready: state.dataPlane.ready,
    lastApply: state.lastApply(),
    sources: state.sourceStatus?.() ?? state.configSources().map((path) => ({ kind: 'file', path })),
    boundPorts: state.dataPlane.boundPorts(),
    listeners: snap?.listeners ?? [],
    clusters: snap ? Object.values(snap.clusters).map((c) => clusterView(state, c)) : [],
    secrets: snap ? Object.values(snap.secrets).map((s) => secretView(state, s)) : [],
    statuses: snap?.statuses ?? [],
    diagnostics: state.diagnostics(),
  };
}

function certsDump(state: AdminState): unknown[] {
  const snap = state.dataPlane.snapshot;
  if (!snap) return [];
  const out: unknown[] = [];
  for (const spec of Object.values(snap.secrets)) {
    const s = state.dataPlane.certStore.get(spec.name);
    if (!s || s.systemRoots) continue;
    for (const c of [...s.chain, ...s.caCerts]) {
      out.push({
        secret: spec.name,
        role: s.chain.includes(c) ? (c === s.leaf ? 'leaf' : 'chain') : 'ca',
        subject: c.subject,
        issuer: c.issuer,
        sans: c.sans,
        notBefore: c.notBefore,
        notAfter: c.notAfter,
        serialNumber: c.serialNumber,
        fingerprintSha256: c.fingerprintSha256,
        daysLeft: Math.floor((new Date(c.notAfter).getTime() - Date.now()) / 86_400_000),
      });
    }
  }
  return out;
}
