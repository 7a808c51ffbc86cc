/**
 * The mesh certificate authority: a CA directory on disk and the signing of workload CSRs.
 *
 * Layout of a CA directory (mode 0700):
 *   root-cert.pem    the signing root (0644)
 *   root-key.pem     its private key, PKCS#8 (0600)
 *   token-secret     HMAC key for bootstrap tokens (0600)
 *   ca.json          trust domain, creation time, root fingerprint
 *   roots-extra.pem  optional: more roots to trust (the previous root during a rotation)
 *
 * A workload certificate carries one identity, the SPIFFE URI SAN the caller was authorised for,
 * and nothing from the CSR but its public key: names in a CSR are requests, and a request for any
 * other name than the granted one is refused rather than silently dropped.
 */
import { X509Certificate, createHash, createPrivateKey, randomBytes, webcrypto } from 'node:crypto';
import { chmod, mkdir, readFile, rename, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type * as X509 from '@peculiar/x509';
import { createCa, type CertificateAuthority, type MintKeyType } from '../pki/mint.js';
import { splitPem } from '../runtime/pki/cert-info.js';
import { x509 } from '../runtime/pki/x509-lib.js';
import { spiffeId, isTrustDomain } from './spiffe.js';
import { signToken, verifyToken, type TokenCheck } from './token.js';

export const CA_FILES = {
  rootCert: 'root-cert.pem',
  rootKey: 'root-key.pem',
  tokenSecret: 'token-secret',
  meta: 'ca.json',
  rootsExtra: 'roots-extra.pem',
} as const;

export const DEFAULT_TRUST_DOMAIN = 'cluster.local';
export const DEFAULT_WORKLOAD_TTL_MS = 24 * 3_600_000;
/** Workload certificates are back-dated this much so a peer whose clock lags accepts them at once. */
const BACKDATE_MS = 60_000;
const ROOT_DAYS = 3650;

export interface CaMeta {
  trustDomain: string;
  created: string;
  rootFingerprintSha256: string;
}

export type SignErrorCode = 'bad-csr' | 'identity-mismatch';

/** A refusal to sign that is the caller's fault (400 / 403 on the wire). */
export class SignError extends Error {
  constructor(readonly code: SignErrorCode, message: string) {
    super(message);
    this.name = 'SignError';
  }
}

export interface WorkloadCert {
  spiffeId: string;
  /** Leaf then issuer (the root). */
  certChainPem: string;
  certPem: string;
  /** Hex, as X509Certificate.serialNumber prints it. */
  serial: string;
  notAfter: Date;
}

const fingerprint = (pem: string): string => new X509Certificate(pem).fingerprint256;

async function exists(path: string): Promise<boolean> {
  try {
    await stat(path);
    return true;
  } catch {
    return false;
  }
}

/** Writes via a temporary file and rename so a reader never sees half a key; sets the mode explicitly (umask). */
async function writeAtomic(path: string, data: string | Buffer, mode: number): Promise<void> {
  const tmp = `${path}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`;
  await writeFile(tmp, data, { mode, flag: 'wx' });
  await chmod(tmp, mode);
  await rename(tmp, path);
}

async function newRoot(trustDomain: string): Promise<CertificateAuthority> {
  // The date tells roots apart by name during a rotation (chains are matched by key identifier anyway).
  const stamp = new Date().toISOString().slice(0, 19) + 'Z';
  return createCa({ commonName: `tlsgate mesh root ${stamp}`, organization: trustDomain, days: ROOT_DAYS, keyType: 'EC' });
}

async function writeRoot(dir: string, root: CertificateAuthority): Promise<void> {
  // Key first: a directory with a root certificate but no key is a broken CA; the reverse is not visible.
  await writeAtomic(join(dir, CA_FILES.rootKey), root.keyPem, 0o600);
  await writeAtomic(join(dir, CA_FILES.rootCert), root.certPem, 0o644);
}

/**
 * Creates a CA in `dir` (made 0700). Refuses when a CA is already there unless `force`, which
 * replaces root, key and token secret (every token and certificate issued before stops working).
 */
export async function initCaDir(dir: string, opts: { trustDomain?: string; force?: boolean } = {}): Promise<CaMeta> {
  const trustDomain = opts.trustDomain ?? DEFAULT_TRUST_DOMAIN;
  if (!isTrustDomain(trustDomain)) throw new Error(`trust domain ${JSON.stringify(trustDomain)} is not valid (lowercase letters, digits, '.', '-', '_')`);
  await mkdir(dir, { recursive: true, mode: 0o700 });
  await chmod(dir, 0o700);
  if (!opts.force) {
    for (const f of [CA_FILES.rootKey, CA_FILES.rootCert, CA_FILES.meta, CA_FILES.tokenSecret]) {
      if (await exists(join(dir, f))) throw new Error(`${join(dir, f)} already exists: ${dir} holds a CA (use --force to replace it)`);
    }
  }
  const root = await newRoot(trustDomain);
  await writeRoot(dir, root);
  await writeAtomic(join(dir, CA_FILES.tokenSecret), randomBytes(32).toString('base64url') + '\n', 0o600);
  const meta: CaMeta = { trustDomain, created: new Date().toISOString(), rootFingerprintSha256: fingerprint(root.certPem) };
  await writeAtomic(join(dir, CA_FILES.meta), JSON.stringify(meta, null, 2) + '\n', 0o644);
  return meta;
}

/**
 * Replaces the signing root and keeps trusting the old one: the old root-cert.pem is appended to
 * roots-extra.pem, so workloads holding certificates from either root keep talking while they
 * renew. Trust domain and token secret stay. Returns both fingerprints.
 */
export async function rotateRoot(dir: string): Promise<{ previous: string; current: string }> {
  const ca = await MeshCa.load(dir);
  const extraPath = join(dir, CA_FILES.rootsExtra);
  const extra = (await exists(extraPath)) ? await readFile(extraPath, 'utf8') : '';
  const known = new Set(splitPem(extra).map(fingerprint));
  const previous = fingerprint(ca.root.certPem);
  if (!known.has(previous)) await writeAtomic(extraPath, extra + (extra && !extra.endsWith('\n') ? '\n' : '') + ca.root.certPem, 0o644);
  const root = await newRoot(ca.trustDomain);
  await writeRoot(dir, root);
  const meta: CaMeta = { ...ca.meta, rootFingerprintSha256: fingerprint(root.certPem) };
  await writeAtomic(join(dir, CA_FILES.meta), JSON.stringify(meta, null, 2) + '\n', 0o644);
  return { previous, current: meta.rootFingerprintSha256 };
}

/** Every root in `root-cert.pem` plus `roots-extra.pem`, deduplicated, each as one PEM block. */
export async function readTrustBundle(dir: string): Promise<string[]> {
  const texts = [await readFile(join(dir, CA_FILES.rootCert), 'utf8')];
  const extra = join(dir, CA_FILES.rootsExtra);
  if (await exists(extra)) texts.push(await readFile(extra, 'utf8'));
  const seen = new Set<string>();
  const out: string[] = [];
  for (const pem of texts.flatMap((t) => splitPem(t))) {
    const fp = fingerprint(pem);
    if (!seen.has(fp)) {
      seen.add(fp);
      out.push(pem);
    }
  }
  if (out.length === 0) throw new Error(`${join(dir, CA_FILES.rootCert)} contains no certificate`);
  return out;
}

async function importRoot(certPem: string, keyPem: string): Promise<CertificateAuthority> {
  const cert = new x509.X509Certificate(certPem);
  const alg = cert.publicKey.algorithm as EcKeyAlgorithm | RsaHashedKeyAlgorithm;
  const keyType: MintKeyType = alg.name.startsWith('RSA') ? 'RSA' : 'EC';
  const importAlg = keyType === 'RSA'
    ? { name: 'RSASSA-PKCS1-v1_5', hash: 'SHA-256' }
    : { name: 'ECDSA', namedCurve: (alg as EcKeyAlgorithm).namedCurve };
  const der = x509.PemConverter.decodeFirst(keyPem);
  const privateKey = await webcrypto.subtle.importKey('pkcs8', der, importAlg, false, ['sign']);
  const publicKey = await cert.publicKey.export(importAlg, ['verify'], webcrypto as unknown as Crypto);
  const pem = cert.toString('pem') + '\n';
  if (!new X509Certificate(pem).checkPrivateKey(createPrivateKey(keyPem))) {
    throw new Error('root-key.pem does not match root-cert.pem');
  }
  return { certPem: pem, keyPem, chainPem: pem, keyType, cert, keys: { privateKey, publicKey } };
}

/** The names a CSR asks for in its subjectAltName extension request. */
function requestedNames(csr: X509.Pkcs10CertificateRequest): { type: string; value: string }[] {
  const ext = csr.extensions.find((e) => e.type === '2.5.29.17');
  if (!ext) return [];
  const san = new x509.SubjectAlternativeNameExtension(ext.rawData);
  return san.names.items.map((n) => ({ type: n.type, value: n.value }));
}

function checkCsrKey(pk: X509.PublicKey): void {
  const alg = pk.algorithm as EcKeyAlgorithm & RsaHashedKeyAlgorithm;
  if (alg.name === 'ECDSA' || alg.name === 'ECDH') {
    if (alg.namedCurve !== 'P-256' && alg.namedCurve !== 'P-384') throw new SignError('bad-csr', `CSR key curve ${alg.namedCurve} is not accepted (P-256 or P-384)`);
    return;
  }
  if (alg.name.startsWith('RSA')) {
    if (!(alg.modulusLength >= 2048)) throw new SignError('bad-csr', `CSR RSA key of ${alg.modulusLength} bits is too short (2048 or more)`);
    return;
  }
  throw new SignError('bad-csr', `CSR key algorithm ${alg.name} is not accepted (EC P-256/P-384 or RSA)`);
}

function randomSerial(): string {
  const b = randomBytes(16);
  b[0] = (b[0]! & 0x7f) | 0x40; // positive, no leading zero octet
  return b.toString('hex');
}

/** A loaded CA directory, able to sign workload CSRs and mint or check bootstrap tokens. */
export class MeshCa {
  private constructor(
    readonly dir: string,
    readonly meta: CaMeta,
    readonly root: CertificateAuthority,
    private readonly tokenSecret: Buffer,
  ) {}

  get trustDomain(): string {
    return this.meta.trustDomain;
  }

  static async load(dir: string): Promise<MeshCa> {
    const read = async (f: string): Promise<string> => {
      try {
        return await readFile(join(dir, f), 'utf8');
      } catch (e) {
        const code = (e as { code?: string }).code;
        throw new Error(`cannot read ${join(dir, f)}: ${code === 'ENOENT' ? 'not found (run `tlsgate ca init --dir ' + dir + '` first)' : (e as Error).message}`);
      }
    };
    let meta: CaMeta;
    try {
      meta = JSON.parse(await read(CA_FILES.meta)) as CaMeta;
    } catch (e) {
      throw new Error(e instanceof SyntaxError ? `${join(dir, CA_FILES.meta)} is not JSON` : (e as Error).message);
    }
    if (typeof meta.trustDomain !== 'string' || !isTrustDomain(meta.trustDomain)) throw new Error(`${join(dir, CA_FILES.meta)} has no valid trustDomain`);
    const root = await importRoot(splitPem(await read(CA_FILES.rootCert))[0] ?? '', await read(CA_FILES.rootKey));
    const secret = Buffer.from((await read(CA_FILES.tokenSecret)).trim(), 'base64url');
    if (secret.length < 16) throw new Error(`${join(dir, CA_FILES.tokenSecret)} is shorter than 16 bytes`);
    return new MeshCa(dir, meta, root, secret);
  }

  /** A bootstrap token for exactly this identity, valid for `ttlMs`. */
  mintToken(namespace: string, serviceAccount: string, ttlMs: number, nowMs = Date.now()): string {
    return signToken(this.tokenSecret, {
      ns: namespace,
      sa: serviceAccount,
      td: this.trustDomain,
      iat: Math.floor(nowMs / 1000),
      exp: Math.floor((nowMs + ttlMs) / 1000),
    });
  }

  checkToken(token: unknown, nowMs?: number): TokenCheck {
    return verifyToken(this.tokenSecret, token, { trustDomain: this.trustDomain, nowMs });
  }

  trustBundle(): Promise<string[]> {
    return readTrustBundle(this.dir);
  }

  /**
   * Signs a workload CSR for `namespace/serviceAccount`. Throws SignError('bad-csr') when the CSR
   * does not parse, verify or carry an acceptable key, and SignError('identity-mismatch') when it
   * asks for any name other than the granted SPIFFE ID.
   */
  async signWorkload(csrPem: string, identity: { namespace: string; serviceAccount: string }, ttlMs: number): Promise<WorkloadCert> {
    const id = spiffeId(this.trustDomain, identity.namespace, identity.serviceAccount);
    if (!(ttlMs >= 1000)) throw new Error('workload certificate TTL must be at least 1 s');
    let csr: X509.Pkcs10CertificateRequest;
    try {
      csr = new x509.Pkcs10CertificateRequest(csrPem);
    } catch (e) {
      throw new SignError('bad-csr', `CSR does not parse: ${(e as Error).message}`);
    }
    let verified = false;
    try {
      verified = await csr.verify();
    } catch {
      verified = false;
    }
    if (!verified) throw new SignError('bad-csr', 'CSR signature does not verify');
    checkCsrKey(csr.publicKey);
    let names: { type: string; value: string }[];
    try {
      names = requestedNames(csr);
    } catch (e) {
      throw new SignError('bad-csr', `CSR subjectAltName does not parse: ${(e as Error).message}`);
    }
    const other = names.filter((n) => !(n.type === 'url' && n.value === id));
    if (other.length) {
      const shown = other.slice(0, 3).map((n) => `${n.type === 'url' ? 'URI' : n.type.toUpperCase()}:${n.value}`).join(', ');
      throw new SignError('identity-mismatch', `CSR asks for ${shown}, but the token grants only ${id}`);
    }
    const publicKey = csr.publicKey;
    const now = Date.now();
    const aki = this.root.cert.getExtension(x509.SubjectKeyIdentifierExtension)?.keyId;
    const extensions: X509.Extension[] = [
      new x509.BasicConstraintsExtension(false, undefined, true),
      // keyEncipherment too, as Istio's workload certificates carry it, whatever the key type.
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.digitalSignature | x509.KeyUsageFlags.keyEncipherment, true),
      new x509.ExtendedKeyUsageExtension([x509.ExtendedKeyUsage.serverAuth, x509.ExtendedKeyUsage.clientAuth], false),
      await x509.SubjectKeyIdentifierExtension.create(publicKey),
      // RFC 5280 §4.2.1.6: with an empty subject the SAN extension is critical.
      new x509.SubjectAlternativeNameExtension([{ type: 'url', value: id }], true),
    ];
    if (aki) extensions.push(new x509.AuthorityKeyIdentifierExtension(aki));
    const cert = await x509.X509CertificateGenerator.create({
      serialNumber: randomSerial(),
      subject: [],
      issuer: this.root.cert.subjectName,
      notBefore: new Date(now - BACKDATE_MS),
      notAfter: new Date(now + ttlMs),
      publicKey,
      signingKey: this.root.keys.privateKey,
      signingAlgorithm: this.root.keyType === 'RSA'
        ? { name: 'RSASSA-PKCS1-v1_5', hash: 'SHA-256' }
        : { name: 'ECDSA', hash: 'SHA-256' } as EcdsaParams,
      extensions,
    });
    const certPem = cert.toString('pem') + '\n';
    const node = new X509Certificate(certPem);
    return { spiffeId: id, certPem, certChainPem: certPem + this.root.certPem, serial: node.serialNumber, notAfter: new Date(node.validTo) };
  }
}

/** SHA-256 of a secret's bytes, short: enough to tell two apart in a log, useless to an attacker. */
export function shortFingerprint(data: string | Buffer): string {
  return createHash('sha256').update(data).digest('hex').slice(0, 16);
}
