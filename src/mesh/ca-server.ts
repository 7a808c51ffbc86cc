/**
 * The CA's signing endpoint over HTTPS: `POST /v1/sign` with `{csr, token[, ttlSeconds]}` returns
 * `{certChain, rootCerts}`. Only this process reads the root key; proxies on other machines hold
 * a bootstrap token and their own freshly generated key, never the root's.
 *
 * Status codes: 400 malformed request or CSR, 401 bad token, 403 CSR asks for another identity
 * than the token grants, 404/405 wrong path or method, 413 body over 64 KiB, 500 our fault.
 * Nothing a client sends can crash the server: every body is bounded and every error answered.
 */
import https from 'node:https';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { isIP } from 'node:net';
import { hostname } from 'node:os';
import type { AddressInfo } from 'node:net';
import { issueCert } from '../pki/mint.js';
import { DEFAULT_WORKLOAD_TTL_MS, MeshCa, SignError } from './ca.js';

export const MAX_SIGN_BODY_BYTES = 64 * 1024;
/** The serving certificate lives this long and is replaced at half-life. */
const SERVING_CERT_MS = 30 * 86_400_000;

/** The subset of a pino logger the server writes to. */
export interface CaLogger {
  info(obj: object, msg: string): void;
  warn(obj: object, msg: string): void;
  error(obj: object, msg: string): void;
}

const silent: CaLogger = { info() {}, warn() {}, error() {} };

export interface CaServerOptions {
  ca: MeshCa;
  port: number;
  /** Listen address (default 127.0.0.1). */
  address?: string;
  /** Longest workload certificate this server issues (default 24 h). */
  workloadCertTtlMs?: number;
  /** More names for the serving certificate (DNS names or IPs), for clients on other hosts. */
  extraSans?: string[];
  logger?: CaLogger;
}

export interface SignRequestBody {
  csr: string;
  token: string;
  /** Requested lifetime; the server issues min(requested, its configured TTL). */
  ttlSeconds?: number;
}

export interface SignResponseBody {
  certChain: string;
  rootCerts: string[];
}

/** The names the serving certificate answers to: loopback, the listen address, Istio's CA name. */
function servingNames(address: string, extra: string[]): { dnsNames: string[]; ips: string[] } {
  const dns = new Set(['localhost', 'istiod.istio-system.svc']);
  const ips = new Set(['127.0.0.1', '::1']);
  for (const n of [address, ...extra]) {
    if (!n || n === '0.0.0.0' || n === '::') continue;
    if (isIP(n)) ips.add(n);
    else dns.add(n.toLowerCase());
  }
  if (address === '0.0.0.0' || address === '::') dns.add(hostname().toLowerCase());
  return { dnsNames: [...dns], ips: [...ips] };
}

function send(res: ServerResponse, status: number, body: object): void {
  if (res.headersSent || res.destroyed) return;
  const text = JSON.stringify(body) + '\n';
  res.writeHead(status, {
    'content-type': 'application/json',
    'content-length': Buffer.byteLength(text),
    'cache-control': 'no-store',
  });
  res.end(text);
}

/** Reads the body up to `cap` bytes; undefined when it was larger (the caller answers 413). */
function readBody(req: IncomingMessage, cap: number): Promise<Buffer | undefined | Error> {
  return new Promise((resolve) => {
    const declared = Number(req.headers['content-length'] ?? NaN);
    if (declared > cap) {
      resolve(undefined);
      return;
    }
    const chunks: Buffer[] = [];
    let size = 0;
    let done = false;
    const finish = (v: Buffer | undefined | Error): void => {
      if (!done) {
        done = true;
        resolve(v);
      }
    };
    req.on('data', (c: Buffer) => {
      if (done) return;
      size += c.length;
      if (size > cap) {
        finish(undefined);
        req.pause();
        return;
      }
      chunks.push(c);
    });
    req.on('end', () => finish(Buffer.concat(chunks)));
    req.on('error', (e) => finish(e));
    req.on('aborted', () => finish(new Error('request aborted')));
  });
}

export class CaServer {
  private server: https.Server | undefined;
  private renewTimer: NodeJS.Timeout | undefined;
  private readonly ttlMs: number;
  private readonly log: CaLogger;
  private readonly address: string;

  constructor(private readonly opts: CaServerOptions) {
    this.ttlMs = opts.workloadCertTtlMs ?? DEFAULT_WORKLOAD_TTL_MS;
    if (!(this.ttlMs >= 1000)) throw new Error('--workload-cert-ttl must be at least 1s');
    this.log = opts.logger ?? silent;
    this.address = opts.address ?? '127.0.0.1';
  }

  /** The bound port (after start). */
  get port(): number {
    return (this.server?.address() as AddressInfo | null)?.port ?? 0;
  }

  get url(): string {
    const host = this.address === '0.0.0.0' || this.address === '::' ? '127.0.0.1' : this.address;
    return `https://${isIP(host) === 6 ? `[${host}]` : host}:${this.port}`;
  }

  private async servingCredentials(): Promise<{ cert: string; key: string }> {
    const names = servingNames(this.address, this.opts.extraSans ?? []);
    const leaf = await issueCert(this.opts.ca.root, {
      ...names,
      server: true,
      notAfterMs: Date.now() + SERVING_CERT_MS,
    });
    return { cert: leaf.chainPem, key: leaf.keyPem };
  }

  async start(): Promise<void> {
    const creds = await this.servingCredentials();
    const server = https.createServer({
      ...creds,
      minVersion: 'TLSv1.2',
      requestTimeout: 15_000,
      headersTimeout: 10_000,
      keepAliveTimeout: 5_000,
      maxHeaderSize: 16 * 1024,
    }, (req, res) => {
      this.handle(req, res).catch((e: unknown) => {
        this.log.error({ err: (e as Error).message }, 'sign request failed');
        send(res, 500, { error: 'internal error' });
      });
    });
    server.maxHeadersCount = 64;
    server.maxConnections = 1024; // a flood of idle clients cannot exhaust file descriptors
    server.on('tlsClientError', () => {}); // a client that cannot finish a handshake is its own problem
    server.on('clientError', (_e, socket) => {
      if (!socket.destroyed) socket.end('HTTP/1.1 400 Bad Request\r\nconnection: close\r\n\r\n');
    });
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(this.opts.port, this.address, () => {
        server.off('error', reject);
        resolve();
      });
    });
    server.on('error', (e) => this.log.error({ err: e.message }, 'CA server error'));
    this.server = server;
    this.scheduleServingRenewal();
  }

  private scheduleServingRenewal(): void {
    this.renewTimer = setTimeout(() => {
      this.servingCredentials()
        .then((c) => this.server?.setSecureContext({ ...c, minVersion: 'TLSv1.2' }))
        .catch((e: unknown) => this.log.error({ err: (e as Error).message }, 'serving certificate renewal failed'))
        .finally(() => {
          if (this.server) this.scheduleServingRenewal();
        });
    }, SERVING_CERT_MS / 2);
    this.renewTimer.unref();
  }

  async close(): Promise<void> {
    if (this.renewTimer) clearTimeout(this.renewTimer);
    const server = this.server;
    this.server = undefined;
    if (!server) return;
    await new Promise<void>((resolve) => {
      server.close(() => resolve());
      server.closeAllConnections();
    });
  }

  private async handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    req.on('error', () => {});
    res.on('error', () => {});
    const path = (req.url ?? '').split('?')[0];
    if (path === '/ready' && (req.method === 'GET' || req.method === 'HEAD')) {
      send(res, 200, { ready: true, trustDomain: this.opts.ca.trustDomain });
      return;
    }
    if (path !== '/v1/sign') {
      send(res, 404, { error: 'not found: POST /v1/sign is the only endpoint' });
      return;
    }
    if (req.method !== 'POST') {
      res.setHeader('allow', 'POST');
      send(res, 405, { error: 'use POST' });
      return;
    }
    const remote = req.socket.remoteAddress;
    const body = await readBody(req, MAX_SIGN_BODY_BYTES);
    if (body === undefined) {
      send(res, 413, { error: `request body is larger than ${MAX_SIGN_BODY_BYTES} bytes` });
      req.socket.destroySoon();
      return;
    }
    if (body instanceof Error) return; // the client went away
    let parsed: unknown;
    try {
      parsed = JSON.parse(body.toString('utf8'));
    } catch {
      this.refuse(res, 400, 'request body is not JSON', remote);
      return;
    }
    const r = parsed as Partial<SignRequestBody> | null;
    if (!r || typeof r !== 'object' || Array.isArray(r) || typeof r.csr !== 'string' || typeof r.token !== 'string') {
      this.refuse(res, 400, 'request body must be a JSON object with string fields "csr" and "token"', remote);
      return;
    }
    if (r.ttlSeconds !== undefined && !(typeof r.ttlSeconds === 'number' && Number.isFinite(r.ttlSeconds) && r.ttlSeconds >= 1)) {
      this.refuse(res, 400, '"ttlSeconds" must be a number of seconds, at least 1', remote);
      return;
    }
    const token = this.opts.ca.checkToken(r.token);
    if (!token.ok) {
      this.refuse(res, 401, `bootstrap token refused: ${token.reason}`, remote);
      return;
    }
    const { ns, sa } = token.claims;
    const ttlMs = Math.min(this.ttlMs, r.ttlSeconds !== undefined ? Math.floor(r.ttlSeconds * 1000) : Infinity);
    try {
      const cert = await this.opts.ca.signWorkload(r.csr, { namespace: ns, serviceAccount: sa }, ttlMs);
      const rootCerts = await this.opts.ca.trustBundle();
      this.log.info({ identity: cert.spiffeId, serial: cert.serial, notAfter: cert.notAfter.toISOString(), remote }, 'issued workload certificate');
      send(res, 200, { certChain: cert.certChainPem, rootCerts } satisfies SignResponseBody);
    } catch (e) {
      if (e instanceof SignError) {
        this.refuse(res, e.code === 'identity-mismatch' ? 403 : 400, e.message, remote);
        return;
      }
      throw e;
    }
  }

  private refuse(res: ServerResponse, status: number, error: string, remote: string | undefined): void {
    this.log.warn({ status, reason: error, remote }, 'sign request refused');
    send(res, status, { error });
  }
}

export async function startCaServer(opts: CaServerOptions): Promise<CaServer> {
  const s = new CaServer(opts);
  await s.start();
  return s;
}
