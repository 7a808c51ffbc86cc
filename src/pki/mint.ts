/**
 * Certificate minting: a CA, server/client leaves, CSR signing (for the mesh CA), and PEM files.
 *
 * Everything is done in-process with WebCrypto and @peculiar/x509, never by shelling out to
 * openssl, so tests and `tlsgate ca` work wherever Node runs. The certificates follow the profile
 * that Node and OpenSSL verify without complaint: CAs carry critical basicConstraints(CA) and
 * keyCertSign; leaves carry basicConstraints(not CA), digitalSignature (+keyEncipherment for RSA),
 * extendedKeyUsage, SANs, and subject/authority key identifiers linking them to the issuer.
 */
import { randomBytes, webcrypto } from 'node:crypto';
import { mkdir, writeFile, chmod } from 'node:fs/promises';
import { isIP } from 'node:net';
import { join } from 'node:path';
import type * as X509 from '@peculiar/x509';
import { x509 } from '../runtime/pki/x509-lib.js';

export type MintKeyType = 'EC' | 'RSA';

/** A certificate authority able to sign: its certificate, key pair and PEM forms. */
export interface CertificateAuthority {
  certPem: string;
  /** PKCS#8 PEM. */
  keyPem: string;
  /** This CA's certificate followed by its issuers' (up to the root). */
  chainPem: string;
  keyType: MintKeyType;
  cert: X509.X509Certificate;
  keys: CryptoKeyPair;
}

export interface IssuedCert {
  certPem: string;
  /** PKCS#8 PEM of the new key. */
  keyPem: string;
  /** The leaf followed by the issuing CA chain. */
  chainPem: string;
}

export interface CreateCaOptions {
  commonName: string;
  organization?: string;
  /** Validity in days (default 3650). */
  days?: number;
  keyType?: MintKeyType;
  /** Sign with this CA to make an intermediate instead of a self-signed root. */
  parent?: CertificateAuthority;
  /** Absolute validity window in ms since the epoch; overrides `days`. */
  notBeforeMs?: number;
  notAfterMs?: number;
}

export interface IssueOptions {
  commonName?: string;
  organization?: string;
  dnsNames?: string[];
  uris?: string[];
  ips?: string[];
  emails?: string[];
  /** Validity in days (default 365), or an absolute window in ms since the epoch. */
  days?: number;
  notBeforeMs?: number;
  notAfterMs?: number;
  /** Extended key usages; when neither is given the certificate gets both. */
  client?: boolean;
  server?: boolean;
  keyType?: MintKeyType;
}

const EC_ALG: EcKeyGenParams & EcdsaParams = { name: 'ECDSA', namedCurve: 'P-256', hash: 'SHA-256' };
const RSA_ALG: RsaHashedKeyGenParams = {
  name: 'RSASSA-PKCS1-v1_5',
  modulusLength: 2048,
  publicExponent: new Uint8Array([1, 0, 1]),
  hash: 'SHA-256',
};
const DAY_MS = 86_400_000;
/** Leaves are back-dated a little so a peer whose clock lags can still use them at once. */
const SKEW_MS = 5 * 60_000;

function algFor(keyType: MintKeyType): RsaHashedKeyGenParams | (EcKeyGenParams & EcdsaParams) {
  return keyType === 'RSA' ? RSA_ALG : EC_ALG;
}

async function generateKeys(keyType: MintKeyType): Promise<CryptoKeyPair> {
  return (await webcrypto.subtle.generateKey(algFor(keyType), true, ['sign', 'verify'])) as CryptoKeyPair;
}

async function pkcs8Pem(key: CryptoKey): Promise<string> {
  const der = await webcrypto.subtle.exportKey('pkcs8', key);
  return x509.PemConverter.encode(der, 'PRIVATE KEY') + '\n';
}

/** Positive, non-zero-leading 128-bit serial, as RFC 5280 asks (at most 20 octets, positive). */
function randomSerial(): string {
  const b = randomBytes(16);
  b[0] = (b[0]! & 0x7f) | 0x40;
  return b.toString('hex');
}

function subjectName(commonName?: string, organization?: string): X509.JsonName {
  const name: X509.JsonName = [];
  if (organization) name.push({ O: [organization] });
  if (commonName) name.push({ CN: [commonName] });
  return name;
}

function validity(opts: { days?: number; notBeforeMs?: number; notAfterMs?: number }, defaultDays: number): { notBefore: Date; notAfter: Date } {
  const now = Date.now();
  const notBefore = new Date(opts.notBeforeMs ?? now - SKEW_MS);
  const notAfter = new Date(opts.notAfterMs ?? now + (opts.days ?? defaultDays) * DAY_MS);
  if (notAfter.getTime() <= notBefore.getTime()) throw new Error('certificate notAfter must be later than notBefore');
  return { notBefore, notAfter };
}

function skiHex(cert: X509.X509Certificate): string | undefined {
  return cert.getExtension(x509.SubjectKeyIdentifierExtension)?.keyId;
}

function sanExtension(o: { dnsNames?: string[]; uris?: string[]; ips?: string[]; emails?: string[] }, critical: boolean) {
  const names: X509.JsonGeneralNames = [];
  for (const d of o.dnsNames ?? []) names.push({ type: 'dns', value: d });
  for (const u of o.uris ?? []) names.push({ type: 'url', value: u });
  for (const ip of o.ips ?? []) {
    if (!isIP(ip)) throw new Error(`not an IP address: ${JSON.stringify(ip)}`);
    names.push({ type: 'ip', value: ip });
  }
  for (const e of o.emails ?? []) names.push({ type: 'email', value: e });
  return names.length ? new x509.SubjectAlternativeNameExtension(names, critical) : undefined;
}

/** Creates a root CA (self-signed) or, with `parent`, an intermediate CA. */
export async function createCa(opts: CreateCaOptions): Promise<CertificateAuthority> {
  const keyType = opts.keyType ?? 'EC';
  const keys = await generateKeys(keyType);
  const { notBefore, notAfter } = validity(opts, 3650);
  const name = subjectName(opts.commonName, opts.organization);
  const extensions: X509.Extension[] = [
    new x509.BasicConstraintsExtension(true, undefined, true),
    new x509.KeyUsagesExtension(x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign | x509.KeyUsageFlags.digitalSignature, true),
    await x509.SubjectKeyIdentifierExtension.create(keys.publicKey),
  ];
  let cert: X509.X509Certificate;
  if (opts.parent) {
    const aki = skiHex(opts.parent.cert);
    if (aki) extensions.push(new x509.AuthorityKeyIdentifierExtension(aki));
    cert = await x509.X509CertificateGenerator.create({
      serialNumber: randomSerial(),
      subject: name,
      issuer: opts.parent.cert.subjectName,
      notBefore,
      notAfter,
      publicKey: keys.publicKey,
      signingKey: opts.parent.keys.privateKey,
      signingAlgorithm: algFor(opts.parent.keyType),
      extensions,
    });
  } else {
    cert = await x509.X509CertificateGenerator.createSelfSigned({
      serialNumber: randomSerial(),
      name,
      notBefore,
      notAfter,
      keys,
      signingAlgorithm: algFor(keyType),
      extensions,
    });
  }
  const certPem = cert.toString('pem') + '\n';
  return {
    certPem,
    keyPem: await pkcs8Pem(keys.privateKey),
    chainPem: certPem + (opts.parent?.chainPem ?? ''),
    keyType,
    cert,
    keys,
  };
}

async function signLeaf(
  ca: CertificateAuthority,
  publicKey: X509.PublicKeyType,
  opts: IssueOptions,
  defaultDays: number,
): Promise<{ certPem: string; chainPem: string }> {
  const { notBefore, notAfter } = validity(opts, defaultDays);
  const keyType = opts.keyType ?? 'EC';
  const subject = subjectName(opts.commonName, opts.organization);
  let usage = x509.KeyUsageFlags.digitalSignature;
  if (keyType === 'RSA') usage |= x509.KeyUsageFlags.keyEncipherment;
  const both = opts.client === undefined && opts.server === undefined;
  const eku: string[] = [];
  if (both || opts.server) eku.push(x509.ExtendedKeyUsage.serverAuth);
  if (both || opts.client) eku.push(x509.ExtendedKeyUsage.clientAuth);
  const extensions: X509.Extension[] = [
    new x509.BasicConstraintsExtension(false, undefined, true),
    new x509.KeyUsagesExtension(usage, true),
    new x509.ExtendedKeyUsageExtension(eku, false),
    await x509.SubjectKeyIdentifierExtension.create(publicKey),
  ];
  const aki = skiHex(ca.cert);
  if (aki) extensions.push(new x509.AuthorityKeyIdentifierExtension(aki));
  // RFC 5280: with an empty subject the SAN extension must be critical.
  const san = sanExtension(opts, subject.length === 0);
  if (san) extensions.push(san);
  const cert = await x509.X509CertificateGenerator.create({
    serialNumber: randomSerial(),
    subject,
    issuer: ca.cert.subjectName,
    notBefore,
    notAfter,
    publicKey,
    signingKey: ca.keys.privateKey,
    signingAlgorithm: algFor(ca.keyType),
    extensions,
  });
  const certPem = cert.toString('pem') + '\n';
  return { certPem, chainPem: certPem + ca.chainPem };
}

/**
 * Issues a leaf certificate with a new key. With `csrPem`, the CSR's (verified) public key is
 * used instead and no key is returned; the names still come from `opts`, never from the CSR.
 */
export async function issueCert(ca: CertificateAuthority, opts: IssueOptions & { csrPem: string }): Promise<{ certPem: string; chainPem: string }>;
export async function issueCert(ca: CertificateAuthority, opts?: IssueOptions): Promise<IssuedCert>;
export async function issueCert(
  ca: CertificateAuthority,
  opts: IssueOptions & { csrPem?: string } = {},
): Promise<IssuedCert | { certPem: string; chainPem: string }> {
  if (opts.csrPem !== undefined) {
    const publicKey = await verifiedCsrKey(opts.csrPem);
    return signLeaf(ca, publicKey, { ...opts, keyType: csrKeyType(publicKey) }, 365);
  }
  const keyType = opts.keyType ?? 'EC';
  const keys = await generateKeys(keyType);
  const signed = await signLeaf(ca, keys.publicKey, { ...opts, keyType }, 365);
  return { ...signed, keyPem: await pkcs8Pem(keys.privateKey) };
}

async function verifiedCsrKey(csrPem: string): Promise<X509.PublicKey> {
  let csr: X509.Pkcs10CertificateRequest;
  try {
    csr = new x509.Pkcs10CertificateRequest(csrPem);
  } catch (e) {
    throw new Error(`CSR does not parse: ${(e as Error).message}`);
  }
  if (!(await csr.verify())) throw new Error('CSR signature does not verify');
  return csr.publicKey;
}

/** The key type of a CSR's public key, for the keyEncipherment decision. */
function csrKeyType(pk: X509.PublicKey): MintKeyType {
  return pk.algorithm.name.startsWith('RSA') ? 'RSA' : 'EC';
}

/**
 * Signs a workload CSR for the mesh CA: the identity is `uris` (SPIFFE IDs) with an empty subject,
 * usable for both client and server auth, valid for `ttlMs` from now (back-dated by a few minutes).
 */
export async function signCsr(
  ca: CertificateAuthority,
  csrPem: string,
  opts: { uris: string[]; dnsNames?: string[]; ttlMs: number },
): Promise<{ certPem: string; chainPem: string }> {
  if (!opts.uris.length && !opts.dnsNames?.length) throw new Error('signCsr needs at least one URI or DNS name');
  if (!(opts.ttlMs > 0)) throw new Error('signCsr ttlMs must be positive');
  const publicKey = await verifiedCsrKey(csrPem);
  const now = Date.now();
  return signLeaf(
    ca,
    publicKey,
    { uris: opts.uris, dnsNames: opts.dnsNames, notBeforeMs: now - SKEW_MS, notAfterMs: now + opts.ttlMs, keyType: csrKeyType(publicKey) },
    1,
  );
}

/** Makes a key and a CSR for it (the workload side of signCsr; also handy in tests). */
export async function createCsr(opts: { commonName?: string; keyType?: MintKeyType } = {}): Promise<{ csrPem: string; keyPem: string }> {
  const keyType = opts.keyType ?? 'EC';
  const keys = await generateKeys(keyType);
  const csr = await x509.Pkcs10CertificateRequestGenerator.create({
    name: subjectName(opts.commonName),
    keys,
    signingAlgorithm: algFor(keyType),
  });
  return { csrPem: csr.toString('pem') + '\n', keyPem: await pkcs8Pem(keys.privateKey) };
}

/** A CRL signed by `ca` revoking the given serial numbers (hex, as X509Certificate.serialNumber). */
export async function createCrl(ca: CertificateAuthority, revokedSerials: string[], opts: { nextUpdateMs?: number } = {}): Promise<string> {
  const now = Date.now();
  const crl = await x509.X509CrlGenerator.create({
    issuer: ca.cert.subjectName,
    thisUpdate: new Date(now - SKEW_MS),
    nextUpdate: new Date(opts.nextUpdateMs ?? now + 7 * DAY_MS),
    signingKey: ca.keys.privateKey,
    signingAlgorithm: algFor(ca.keyType),
    entries: revokedSerials.map((s) => ({
      serialNumber: s.toLowerCase(),
      revocationDate: new Date(now - SKEW_MS),
    })),
    extensions: skiHex(ca.cert) ? [new x509.AuthorityKeyIdentifierExtension(skiHex(ca.cert)!)] : [],
  });
  // OpenSSL only reads the RFC 7468 label "X509 CRL".
  return x509.PemConverter.encode(crl.rawData, 'X509 CRL') + '\n';
}

/**
 * Writes `<name>.crt` (chain when given, else cert) and `<name>.key` (mode 0600, or `keyMode`)
 * into `dir`, creating it. Returns the paths.
 */
export async function writePemFiles(
  dir: string,
  name: string,
  pem: { certPem: string; keyPem?: string; chainPem?: string },
  opts: { keyMode?: number; writeChain?: boolean } = {},
): Promise<{ certPath: string; keyPath?: string }> {
  await mkdir(dir, { recursive: true });
  const certPath = join(dir, `${name}.crt`);
  await writeFile(certPath, opts.writeChain && pem.chainPem ? pem.chainPem : pem.certPem, { mode: 0o644 });
  if (pem.keyPem === undefined) return { certPath };
  const keyPath = join(dir, `${name}.key`);
  const keyMode = opts.keyMode ?? 0o600;
  await writeFile(keyPath, pem.keyPem, { mode: keyMode });
  // writeFile's mode is masked by umask and ignored for an existing file; set it explicitly.
  await chmod(keyPath, keyMode);
  return { certPath, keyPath };
}
