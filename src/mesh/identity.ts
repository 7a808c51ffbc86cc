/**
 * A workload's mesh identity: its current certificate chain, key and trust bundle, renewed at
 * half-life.
 *
 * Two ways to get certificates: `fromCaDir` signs locally with the root key (the CA directory is
 * on this machine), `fromCaUrl` generates a key and CSR here and asks `tlsgate ca serve` over
 * HTTPS with a bootstrap token, so the root key never leaves the CA host. Either way the private
 * key of the workload certificate is made in this process and never leaves it.
 *
 * Renewal: a timer (unref'd) fires at half the certificate's remaining life; on failure it retries
 * with backoff and keeps serving the old certificate, which stays valid for the other half.
 * Listeners of 'rotated' (or `onRotate`) re-apply the snapshot so new handshakes use the new
 * certificate; open connections keep the one they started with.
 */
import { EventEmitter } from 'node:events';
import { X509Certificate, createPrivateKey } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import https from 'node:https';
import { createCsr } from '../pki/mint.js';
import { splitPem, parseSubjectAltNames } from '../runtime/pki/cert-info.js';
import type { SecretMaterial, SecretProvider } from '../runtime/pki/cert-store.js';
import { MeshCa } from './ca.js';
import type { SignResponseBody } from './ca-server.js';
import { identityError, spiffeId as makeSpiffeId } from './spiffe.js';
import { peekToken } from './token.js';

export interface IdentityMaterial {
  certChainPem: string;
  privateKeyPem: string;
}

export interface RotationEvent {
  spiffeId: string;
  serial: string;
  previousSerial?: string;
  notAfter: Date;
}

export interface RenewFailure {
  error: string;
  attempt: number;
  retryInMs: number;
  /** The certificate still served meanwhile. */
  notAfter: Date;
}

interface Issued extends IdentityMaterial {
  /** Trust bundle, one PEM block per root. */
  roots: string[];
}

type Issuer = () => Promise<Issued>;

export interface IdentityOptions {
  namespace: string;
  serviceAccount: string;
  /** Requested certificate lifetime (the CA may issue less). Default 24 h. */
  ttlMs?: number;
}

export interface CaUrlOptions extends IdentityOptions {
  token: string;
  /** Path of a PEM file with the root(s) that issued the CA server's certificate. */
  caRoot: string;
  /** Per-request timeout (default 10 s). */
  timeoutMs?: number;
}

/** Anything with CertStore's registerProvider. */
export interface ProviderRegistry {
  registerProvider(kind: 'workload' | 'mesh-roots', fn: SecretProvider): void;
}

const DEFAULT_TTL_MS = 24 * 3_600_000;
const MAX_RESPONSE_BYTES = 1024 * 1024;
const MAX_TIMER_MS = 2 ** 31 - 1;
const MIN_RENEW_DELAY_MS = 500;
const MAX_BACKOFF_MS = 30_000;

/** Checks that a chain belongs to our key, names exactly `id`, and chains to one of `roots`. */
function checkIssued(material: IdentityMaterial, roots: string[], id: string): X509Certificate {
  const chain = splitPem(material.certChainPem).map((p) => new X509Certificate(p));
  const leaf = chain[0];
  if (!leaf) throw new Error('the CA returned no certificate');
  if (!leaf.checkPrivateKey(createPrivateKey(material.privateKeyPem))) throw new Error('the CA returned a certificate for another key');
  const uris = parseSubjectAltNames(leaf.subjectAltName).uri;
  if (uris.length !== 1 || uris[0] !== id) throw new Error(`the CA returned a certificate for ${uris.join(', ') || 'no URI'}, expected ${id}`);
  const anchors = roots.map((p) => new X509Certificate(p));
  // Walk up the chain; the last certificate must be issued by (or be) a trusted root.
  for (let i = 0; i + 1 < chain.length; i++) {
    if (!chain[i]!.checkIssued(chain[i + 1]!) || !chain[i]!.verify(chain[i + 1]!.publicKey)) {
      throw new Error(`certificate #${i + 2} in the returned chain did not issue #${i + 1}`);
    }
  }
  const top = chain.at(-1)!;
  const trusted = anchors.some((r) => r.fingerprint256 === top.fingerprint256 || (top.checkIssued(r) && top.verify(r.publicKey)));
  if (!trusted) throw new Error('the returned certificate does not chain to a root in the trust bundle');
  return leaf;
}

function postJson(url: URL, body: object, ca: string, timeoutMs: number): Promise<{ status: number; json: unknown }> {
  return new Promise((resolve, reject) => {
    const text = JSON.stringify(body);
    const req = https.request(url, {
      method: 'POST',
      ca,
      agent: false,
      timeout: timeoutMs,
      minVersion: 'TLSv1.2',
      headers: { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) },
    }, (res) => {
      const chunks: Buffer[] = [];
      let size = 0;
      res.on('data', (c: Buffer) => {
        size += c.length;
        if (size > MAX_RESPONSE_BYTES) req.destroy(new Error(`CA response is larger than ${MAX_RESPONSE_BYTES} bytes`));
        else chunks.push(c);
      });
      res.on('error', reject);
      res.on('end', () => {
        const raw = Buffer.concat(chunks).toString('utf8');
        let json: unknown;
        try {
          json = JSON.parse(raw);
        } catch {
          json = undefined;
        }
        resolve({ status: res.statusCode ?? 0, json });
      });
    });
    req.on('timeout', () => req.destroy(new Error(`CA request timed out after ${timeoutMs} ms`)));
    req.on('error', reject);
    req.end(text);
  });
}

export class WorkloadIdentity extends EventEmitter {
  private current: Issued | undefined;
  private leaf: X509Certificate | undefined;
  private timer: NodeJS.Timeout | undefined;
  private closed = false;
  private renewing: Promise<void> | undefined;

  private constructor(readonly spiffeId: string, private readonly issue: Issuer) {
    super();
  }

  /** Signs locally with the root key in `dir` (re-read at each renewal, so a rotated root is picked up). */
  static async fromCaDir(dir: string, opts: IdentityOptions): Promise<WorkloadIdentity> {
    const ca = await MeshCa.load(dir);
    const id = makeSpiffeId(ca.trustDomain, opts.namespace, opts.serviceAccount);
    const ttlMs = opts.ttlMs ?? DEFAULT_TTL_MS;
    const issuer: Issuer = async () => {
      const fresh = await MeshCa.load(dir);
      const { csrPem, keyPem } = await createCsr();
      const cert = await fresh.signWorkload(csrPem, opts, ttlMs);
      return { certChainPem: cert.certChainPem, privateKeyPem: keyPem, roots: await fresh.trustBundle() };
    };
    const identity = new WorkloadIdentity(id, issuer);
    await identity.renewNow();
    return identity;
  }

  /** Asks a `tlsgate ca serve` at `url` with a bootstrap token; the CA server is verified with `caRoot`. */
  static async fromCaUrl(url: string, opts: CaUrlOptions): Promise<WorkloadIdentity> {
    const claims = peekToken(opts.token);
    if (!claims) throw new Error('--ca-token is not a tlsgate bootstrap token');
    if (claims.ns !== opts.namespace || claims.sa !== opts.serviceAccount) {
      throw new Error(`the token grants ${claims.ns}/${claims.sa}, but this proxy is ${opts.namespace}/${opts.serviceAccount}`);
    }
    const bad = identityError(claims.td, opts.namespace, opts.serviceAccount);
    if (bad) throw new Error(bad);
    const id = makeSpiffeId(claims.td, opts.namespace, opts.serviceAccount);
    const endpoint = new URL('/v1/sign', url);
    if (endpoint.protocol !== 'https:') throw new Error(`--ca-url must be https:// (got ${endpoint.protocol})`);
    let learnedRoots: string[] = [];
    const issuer: Issuer = async () => {
      // The file is re-read each time so an operator can add a new root during a rotation.
      const fileRoots = await readFile(opts.caRoot, 'utf8');
      const { csrPem, keyPem } = await createCsr();
      const body: Record<string, unknown> = { csr: csrPem, token: opts.token };
      if (opts.ttlMs !== undefined) body['ttlSeconds'] = Math.max(1, Math.ceil(opts.ttlMs / 1000));
      const res = await postJson(endpoint, body, [fileRoots, ...learnedRoots].join('\n'), opts.timeoutMs ?? 10_000);
      const r = res.json as Partial<SignResponseBody & { error: string }> | undefined;
      if (res.status !== 200) throw new Error(`CA at ${endpoint.origin} answered ${res.status}: ${typeof r?.error === 'string' ? r.error : 'no reason given'}`);
      if (!r || typeof r.certChain !== 'string' || !Array.isArray(r.rootCerts) || !r.rootCerts.every((x) => typeof x === 'string')) {
        throw new Error(`CA at ${endpoint.origin} sent a malformed response`);
      }
      const roots = r.rootCerts.flatMap((p) => splitPem(p));
      if (roots.length === 0) throw new Error(`CA at ${endpoint.origin} sent no root certificates`);
      learnedRoots = roots;
      return { certChainPem: r.certChain, privateKeyPem: keyPem, roots };
    };
    const identity = new WorkloadIdentity(id, issuer);
    await identity.renewNow();
    return identity;
  }

  /**
   * The identity from `tlsgate run` flags: `--ca-dir` signs locally; `--ca-url` with `--ca-token`
   * and `--ca-root` asks a CA server. Exactly one of caDir / caUrl.
   */
  static async fromFlags(o: IdentityOptions & { caDir?: string; caUrl?: string; caToken?: string; caRoot?: string }): Promise<WorkloadIdentity> {
    if (o.caDir && o.caUrl) throw new Error('give either --ca-dir or --ca-url, not both');
    if (o.caDir) return WorkloadIdentity.fromCaDir(o.caDir, o);
    if (!o.caUrl) throw new Error('a mesh identity needs --ca-dir <dir> or --ca-url <url> (with --ca-token and --ca-root)');
    if (!o.caToken) throw new Error('--ca-url needs --ca-token (from `tlsgate ca token`)');
    if (!o.caRoot) throw new Error('--ca-url needs --ca-root <file> to verify the CA server');
    return WorkloadIdentity.fromCaUrl(o.caUrl, { ...o, token: o.caToken, caRoot: o.caRoot });
  }

  /** The current certificate chain (leaf first) and its private key. */
  material(): IdentityMaterial {
    if (!this.current) throw new Error(`no certificate for ${this.spiffeId} yet`);
    return { certChainPem: this.current.certChainPem, privateKeyPem: this.current.privateKeyPem };
  }

  /** The trust bundle: every root the CA currently trusts (old and new during a root rotation). */
  roots(): string {
    if (!this.current) throw new Error(`no trust bundle for ${this.spiffeId} yet`);
    return this.current.roots.join('');
  }

  /** Serial (hex) and validity of the current certificate. */
  certificate(): { serial: string; notBefore: Date; notAfter: Date; fingerprint256: string } {
    if (!this.leaf) throw new Error(`no certificate for ${this.spiffeId} yet`);
    return { serial: this.leaf.serialNumber, notBefore: new Date(this.leaf.validFrom), notAfter: new Date(this.leaf.validTo), fingerprint256: this.leaf.fingerprint256 };
  }

  /** Makes SecretSpecs of kind 'workload' and 'mesh-roots' resolve to this identity. */
  registerWith(store: ProviderRegistry): void {
    store.registerProvider('workload', async (): Promise<SecretMaterial | { error: string }> => {
      if (!this.current || !this.leaf) return { error: `no certificate for ${this.spiffeId} yet` };
      if (Date.now() > Date.parse(this.leaf.validTo)) return { error: `the certificate for ${this.spiffeId} expired at ${this.leaf.validTo} and renewal has not succeeded` };
      return this.material();
    });
    store.registerProvider('mesh-roots', async (): Promise<SecretMaterial | { error: string }> => {
      if (!this.current) return { error: `no trust bundle for ${this.spiffeId} yet` };
      return { caPem: this.roots() };
    });
  }

  /** Calls `cb` after each rotation; returns a function that unsubscribes. */
  onRotate(cb: (e: RotationEvent) => void): () => void {
    this.on('rotated', cb);
    return () => this.off('rotated', cb);
  }

  /** Gets a new certificate now (concurrent calls share one request); rejects when it fails. */
  renewNow(): Promise<void> {
    this.renewing ??= this.renewOnce().finally(() => {
      this.renewing = undefined;
    });
    return this.renewing;
  }

  /** Stops renewing. */
  close(): void {
    this.closed = true;
    if (this.timer) clearTimeout(this.timer);
    this.timer = undefined;
  }

  private async renewOnce(): Promise<void> {
    const issued = await this.issue();
    const leaf = checkIssued(issued, issued.roots, this.spiffeId);
    const previousSerial = this.leaf?.serialNumber;
    this.current = issued;
    this.leaf = leaf;
    this.schedule(this.renewDelay(Date.now()), 0);
    if (previousSerial !== undefined) {
      this.emit('rotated', { spiffeId: this.spiffeId, serial: leaf.serialNumber, previousSerial, notAfter: new Date(leaf.validTo) } satisfies RotationEvent);
    }
  }

  /** Half of what is left of the current certificate's life, measured from `now`. */
  private renewDelay(now: number): number {
    const notAfter = Date.parse(this.leaf!.validTo);
    return Math.max(MIN_RENEW_DELAY_MS, Math.floor((notAfter - now) / 2));
  }

  private schedule(delayMs: number, attempt: number): void {
    if (this.closed) return;
    if (this.timer) clearTimeout(this.timer);
    const capped = Math.min(delayMs, MAX_TIMER_MS);
    this.timer = setTimeout(() => {
      this.timer = undefined;
      if (capped < delayMs) {
        this.schedule(delayMs - capped, attempt);
        return;
      }
      this.renewNow().catch((e: unknown) => {
        const retryInMs = Math.min(MAX_BACKOFF_MS, 1000 * 2 ** Math.min(attempt, 5));
        const failure: RenewFailure = { error: (e as Error).message, attempt: attempt + 1, retryInMs, notAfter: new Date(this.leaf!.validTo) };
        this.emit('renewFailed', failure);
        this.schedule(retryInMs, attempt + 1);
      });
    }, capped);
    this.timer.unref();
  }
}
