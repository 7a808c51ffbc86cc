/**
 * CertStore: turns the Snapshot's SecretSpecs into loaded, validated certificate material.
 *
 * Material is checked before anyone may use it (certificates and key parse, the key matches the
 * leaf, nothing is expired or not yet valid, bundles and CRLs parse), and the last good material
 * per name is kept: a reload that reads something broken reports the error and keeps serving the
 * old certificate. Errors name the secret and the file, never key material.
 */
import { X509Certificate, createHash, createPrivateKey, type KeyObject } from 'node:crypto';
import { readFile, stat } from 'node:fs/promises';
import { rootCertificates } from 'node:tls';
import type { SecretSpec } from '../../model/snapshot.js';
import { certInfo, splitPem, type CertInfo } from './cert-info.js';
import { x509 } from './x509-lib.js';

export type { CertInfo } from './cert-info.js';

/** PEM texts of one secret, as read from files, inline text or a provider. */
export interface SecretMaterial {
  certChainPem?: string;
  privateKeyPem?: string;
  caPem?: string;
  crlPem?: string;
}

export interface LoadedSecret extends SecretMaterial {
  name: string;
  /** The first certificate of certChainPem. */
  leaf?: CertInfo;
  /** Every certificate of certChainPem, leaf first. */
  chain: CertInfo[];
  /** Every certificate of caPem. */
  caCerts: CertInfo[];
  /** SHA-256 over all PEM texts: equal hashes mean nothing changed. */
  contentHash: string;
  /** Things that work but deserve a look (world-readable key, expired CA in a bundle, ...). */
  warnings: string[];
  /** caPem is Node's bundled roots: client contexts may leave `ca` unset to use the default store. */
  systemRoots?: boolean;
  loadedAt: Date;
}

export type SecretKind = SecretSpec['source']['kind'];

/** Supplies material for kinds that do not come from files (the mesh identity and roots). */
export type SecretProvider = (spec: SecretSpec) => Promise<SecretMaterial | { error: string }>;

export type LoadResult = LoadedSecret | { error: string };

export type ReloadResult = { changed: boolean; secret: LoadedSecret } | { error: string };

export interface CertStoreOptions {
  /** Clock for validity checks (ms since the epoch); tests move it. */
  now?: () => number;
}

/** Files larger than this are refused: no certificate bundle is this big, and reads stay bounded. */
const MAX_FILE_BYTES = 4 * 1024 * 1024;

const isError = (r: unknown): r is { error: string } =>
  typeof r === 'object' && r !== null && typeof (r as { error?: unknown }).error === 'string';

function hashMaterial(m: SecretMaterial): string {
  const h = createHash('sha256');
  for (const part of [m.certChainPem, m.privateKeyPem, m.caPem, m.crlPem]) {
    // A length prefix keeps ("ab","") and ("a","b") apart.
    const s = part ?? '';
    h.update(`${part === undefined ? -1 : Buffer.byteLength(s)}:`).update(s);
  }
  return h.digest('hex');
}

let systemRootInfo: CertInfo[] | undefined;
function systemRoots(): { caPem: string; caCerts: CertInfo[] } {
  systemRootInfo ??= rootCertificates.flatMap((pem) => {
    try {
      return [certInfo(new X509Certificate(pem))];
    } catch {
      return [];
    }
  });
  return { caPem: rootCertificates.join('\n'), caCerts: systemRootInfo };
}

const iso = (d: Date): string => d.toISOString();

function parseCerts(name: string, what: string, pem: string): X509Certificate[] | { error: string } {
  const blocks = splitPem(pem);
  if (blocks.length === 0) return { error: `secret "${name}": ${what} contains no PEM certificate` };
  const out: X509Certificate[] = [];
  for (let i = 0; i < blocks.length; i++) {
    try {
      out.push(new X509Certificate(blocks[i]!));
    } catch (e) {
      return { error: `secret "${name}": ${what} certificate #${i + 1} does not parse (${(e as Error).message})` };
    }
  }
  return out;
}

function parseKey(name: string, pem: string): KeyObject | { error: string } {
  try {
    return createPrivateKey({ key: pem, format: 'pem' });
  } catch (e) {
    const code = (e as { code?: string }).code;
    if (code === 'ERR_MISSING_PASSPHRASE') return { error: `secret "${name}": private key is encrypted; only unencrypted keys are supported` };
    // node's message describes the decoder failure, not the key bytes.
    return { error: `secret "${name}": private key does not parse (${(e as Error).message})` };
  }
}

/**
 * Validates PEM material and computes its facts. Pure apart from the clock: no I/O, so providers
 * and tests can use it directly.
 */
export function validateMaterial(name: string, m: SecretMaterial, now: number, warnings: string[] = []): LoadResult {
  const hasCert = !!m.certChainPem?.trim();
  const hasKey = !!m.privateKeyPem?.trim();
  if (!hasCert && !hasKey && !m.caPem?.trim() && !m.crlPem?.trim()) {
    return { error: `secret "${name}": no certificate, key, CA bundle or CRL in it` };
  }
  if (hasCert && !hasKey) return { error: `secret "${name}": has a certificate chain but no private key` };
  if (hasKey && !hasCert) return { error: `secret "${name}": has a private key but no certificate chain` };

  let chain: CertInfo[] = [];
  if (hasCert) {
    const certs = parseCerts(name, 'certificate chain', m.certChainPem!);
    if (isError(certs)) return certs;
    const key = parseKey(name, m.privateKeyPem!);
    if (isError(key)) return key;
    const leaf = certs[0]!;
    if (!leaf.checkPrivateKey(key)) {
      return {
        error: `secret "${name}": private key does not match the certificate (leaf SHA-256 ${certInfo(leaf).fingerprintSha256})`,
      };
    }
    chain = certs.map(certInfo);
    for (const [i, c] of chain.entries()) {
      const which = i === 0 ? 'certificate' : `chain certificate #${i + 1} (${c.subject})`;
      if (now < c.notBefore.getTime()) {
        return { error: `secret "${name}": ${which} is not valid yet: notBefore ${iso(c.notBefore)}, now ${iso(new Date(now))}` };
      }
      if (now > c.notAfter.getTime()) {
        return { error: `secret "${name}": ${which} expired: notAfter ${iso(c.notAfter)}, now ${iso(new Date(now))}` };
      }
    }
    if (chain[0]!.isCa) warnings.push(`secret "${name}": the leaf certificate is a CA certificate`);
    for (let i = 0; i + 1 < certs.length; i++) {
      if (!certs[i]!.checkIssued(certs[i + 1]!)) {
        warnings.push(`secret "${name}": chain certificate #${i + 2} did not issue #${i + 1}; the chain may be out of order`);
        break;
      }
    }
  }

  let caCerts: CertInfo[] = [];
  if (m.caPem?.trim()) {
    const cas = parseCerts(name, 'CA bundle', m.caPem);
    if (isError(cas)) return cas;
    caCerts = cas.map(certInfo);
    const live = caCerts.filter((c) => now >= c.notBefore.getTime() && now <= c.notAfter.getTime());
    if (live.length === 0) return { error: `secret "${name}": every certificate in the CA bundle is expired or not yet valid` };
    const stale = caCerts.length - live.length;
    if (stale) warnings.push(`secret "${name}": ${stale} CA bundle certificate(s) expired or not yet valid`);
  }

  if (m.crlPem?.trim()) {
    const blocks = splitPem(m.crlPem, 'X509 CRL');
    if (blocks.length === 0) return { error: `secret "${name}": CRL contains no PEM "X509 CRL" block` };
    for (const [i, b] of blocks.entries()) {
      try {
        const crl = new x509.X509Crl(b);
        if (crl.nextUpdate && crl.nextUpdate.getTime() < now) {
          warnings.push(`secret "${name}": CRL #${i + 1} is past its nextUpdate ${iso(crl.nextUpdate)}`);
        }
      } catch (e) {
        return { error: `secret "${name}": CRL #${i + 1} does not parse (${(e as Error).message})` };
      }
    }
  }

  return {
    name,
    ...m,
    leaf: chain[0],
    chain,
    caCerts,
    contentHash: hashMaterial(m),
    warnings,
    loadedAt: new Date(now),
  };
}

async function readPemFile(name: string, what: string, path: string, warnings: string[], isKey: boolean): Promise<string | { error: string }> {
  try {
    const st = await stat(path);
    if (!st.isFile()) return { error: `secret "${name}": ${what} ${path} is not a regular file` };
    if (st.size > MAX_FILE_BYTES) return { error: `secret "${name}": ${what} ${path} is larger than ${MAX_FILE_BYTES} bytes` };
    if (isKey && (st.mode & 0o004)) {
      warnings.push(`secret "${name}": private key file ${path} is world-readable (mode ${(st.mode & 0o777).toString(8)}); use 0600`);
    }
    return await readFile(path, 'utf8');
  } catch (e) {
    const code = (e as { code?: string }).code;
    const why = code === 'ENOENT' ? 'not found' : code === 'EACCES' ? 'permission denied' : (e as Error).message;
    return { error: `secret "${name}": cannot read ${what} ${path}: ${why}` };
  }
}

export class CertStore {
  private readonly now: () => number;
  private readonly loaded = new Map<string, LoadedSecret>();
  private readonly specs = new Map<string, SecretSpec>();
  private readonly providers = new Map<SecretKind, SecretProvider>();
  /** Per-name sequence so a slow read that finishes late cannot replace a newer result. */
  private readonly seq = new Map<string, number>();
  private pollTimer: NodeJS.Timeout | undefined;

  constructor(opts: CertStoreOptions = {}) {
    this.now = opts.now ?? Date.now;
  }

  /** Lets another part (the mesh CA client) supply 'workload' or 'mesh-roots' material. */
  registerProvider(kind: 'workload' | 'mesh-roots', fn: SecretProvider): void {
    this.providers.set(kind, fn);
  }

  /** Reads the material a spec points at, without validating or storing it. */
  async read(spec: SecretSpec, warnings: string[]): Promise<(SecretMaterial & { systemRoots?: boolean }) | { error: string }> {
    const { name, source } = spec;
    switch (source.kind) {
      case 'inline':
        return { certChainPem: source.certChain, privateKeyPem: source.privateKey, caPem: source.ca, crlPem: source.crl };
      case 'file': {
        const m: SecretMaterial = {};
        const parts: [keyof SecretMaterial, string, string | undefined][] = [
          ['certChainPem', 'certificate file', source.certChainPath],
          ['privateKeyPem', 'private key file', source.privateKeyPath],
          ['caPem', 'CA file', source.caPath],
          ['crlPem', 'CRL file', source.crlPath],
        ];
        for (const [field, what, path] of parts) {
          if (!path) continue;
          const text = await readPemFile(name, what, path, warnings, field === 'privateKeyPem');
          if (isError(text)) return text;
          m[field] = text;
        }
        return m;
      }
      case 'system-roots':
        return { caPem: systemRoots().caPem, systemRoots: true };
      case 'workload':
      case 'mesh-roots': {
        const p = this.providers.get(source.kind);
        if (!p) return { error: `secret "${name}": ${source.kind} certificates are not available yet` };
        try {
          const r = await p(spec);
          return isError(r) ? { error: `secret "${name}": ${r.error}` } : r;
        } catch (e) {
          return { error: `secret "${name}": ${source.kind} provider failed: ${(e as Error).message}` };
        }
      }
    }
  }

  /**
   * Loads and validates a spec and, when valid, makes it the current material for its name.
   * When invalid, the previous material (if any) stays current and the error is returned.
   */
  async load(spec: SecretSpec): Promise<LoadResult> {
    const mySeq = (this.seq.get(spec.name) ?? 0) + 1;
    this.seq.set(spec.name, mySeq);
    this.specs.set(spec.name, spec);
    const warnings: string[] = [];
    const m = await this.read(spec, warnings);
    if (isError(m)) return m;
    let result: LoadResult;
    if (m.systemRoots) {
      result = {
        name: spec.name,
        caPem: m.caPem,
        chain: [],
        caCerts: systemRoots().caCerts,
        contentHash: 'system-roots',
        warnings,
        systemRoots: true,
        loadedAt: new Date(this.now()),
      };
    } else {
      const prev = this.loaded.get(spec.name);
      if (prev && prev.contentHash === hashMaterial(m)) return prev;
      result = validateMaterial(spec.name, m, this.now(), warnings);
    }
    if (!isError(result) && this.seq.get(spec.name) === mySeq) this.loaded.set(spec.name, result);
    return result;
  }

  /** The current (last good) material for a name. */
  get(name: string): LoadedSecret | undefined {
    return this.loaded.get(name);
  }

  /** A getter bound to this store, the shape SecureContextCache wants. */
  readonly lookup = (name: string): LoadedSecret | undefined => this.loaded.get(name);

  names(): string[] {
    return [...this.specs.keys()];
  }

  /**
   * Re-reads a name's source. Unchanged content (same hash) is a no-op; changed and valid content
   * replaces the old; changed and invalid content is reported and the old stays.
   */
  async reload(name: string): Promise<ReloadResult> {
    const spec = this.specs.get(name);
    if (!spec) return { error: `secret "${name}": unknown secret` };
    const before = this.loaded.get(name);
    const r = await this.load(spec);
    if (isError(r)) return r;
    return { changed: before?.contentHash !== r.contentHash, secret: r };
  }

  /**
   * Makes the store match a snapshot's secrets: loads new and changed specs, forgets names no
   * longer listed. Returns the errors by secret name (empty when everything loaded).
   */
  async sync(secrets: Record<string, SecretSpec>): Promise<Record<string, string>> {
    const errors: Record<string, string> = {};
    for (const name of [...this.specs.keys()]) {
      if (!(name in secrets)) this.forget(name);
    }
    await Promise.all(
      Object.entries(secrets).map(async ([name, spec]) => {
        const r = await this.load(spec.name === name ? spec : { ...spec, name });
        if (isError(r)) errors[name] = r.error;
      }),
    );
    return errors;
  }

  forget(name: string): void {
    this.specs.delete(name);
    this.loaded.delete(name);
    this.seq.delete(name);
  }

  /**
   * Polls file-backed (and provider-backed) secrets every `intervalMs` and calls `onChange` when a
   * name got new material or failed to reload. Polling (rather than fs.watch) survives the
   * symlink swaps Kubernetes uses for mounted secrets; a poll costs a few small reads and a hash.
   */
  startPolling(intervalMs: number, onChange: (name: string, result: ReloadResult) => void): void {
    this.stopPolling();
    const lastError = new Map<string, string>();
    let running = false;
    this.pollTimer = setInterval(() => {
      if (running) return; // never stack polls when the disk is slow
      running = true;
      const names = [...this.specs.entries()].filter(([, s]) => s.source.kind !== 'inline' && s.source.kind !== 'system-roots').map(([n]) => n);
      void Promise.all(
        names.map(async (name) => {
          const r = await this.reload(name);
          if (isError(r)) {
            if (lastError.get(name) !== r.error) onChange(name, r); // report each distinct error once
            lastError.set(name, r.error);
          } else {
            lastError.delete(name);
            if (r.changed) onChange(name, r);
          }
        }),
      ).finally(() => {
        running = false;
      });
    }, intervalMs);
    this.pollTimer.unref();
  }

  stopPolling(): void {
    if (this.pollTimer) clearInterval(this.pollTimer);
    this.pollTimer = undefined;
  }
}

export { isError as isPkiError };
