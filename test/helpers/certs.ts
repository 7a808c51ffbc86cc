// Certificates minted per test run with the openssl CLI, following the commands of Istio's
// "Secure Gateways" task (self-signed CA with -subj '/O=…/CN=…', CSR + `openssl x509 -req
// -set_serial`). RSA-2048 by default, EC P-256 on request.
import { createHash, X509Certificate } from 'node:crypto';
import { mkdir, mkdtemp, readFile, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { run } from './exec.js';

export interface KeyPair {
  /** Path of the PEM certificate. */
  cert: string;
  /** Path of the PEM private key (PKCS#8). */
  key: string;
  certPem: string;
  keyPem: string;
}

export interface Ca extends KeyPair {
  name: string;
  subj: string;
}

export interface LeafOptions {
  cn: string;
  o?: string;
  /** Typed entries: 'DNS:httpbin.example.com', 'URI:spiffe://cluster.local/ns/default/sa/sleep', 'IP:127.0.0.1'. */
  sans?: readonly string[];
  serial: number;
  /** EC P-256 key instead of RSA-2048. */
  ec?: boolean;
  /** Validity in days from now (default 365). */
  days?: number;
  /** Shorthand for a certificate whose validity ended yesterday. */
  expired?: boolean;
  /** Explicit validity window (openssl `ca -startdate/-enddate` is used for these). */
  notBefore?: Date;
  notAfter?: Date;
  /** extendedKeyUsage, e.g. ['serverAuth'], ['clientAuth'] or both; omitted means none (as in the Istio task). */
  extendedKeyUsage?: readonly ('serverAuth' | 'clientAuth')[];
}

/** A fresh temp directory for a test's certificates. */
export function certDir(prefix = 'tlsgate-certs-'): Promise<string> {
  return mkdtemp(path.join(os.tmpdir(), prefix));
}

async function openssl(args: readonly string[], cwd: string): Promise<void> {
  const res = await run('openssl', args, { cwd, timeoutMs: 30_000 });
  if (res.code !== 0) throw new Error(`openssl ${args.slice(0, 2).join(' ')} failed (${res.code}): ${res.stderr}`);
}

function newKeyArgs(ec: boolean | undefined): string[] {
  return ec === true ? ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256'] : ['-newkey', 'rsa:2048'];
}

async function readPair(cert: string, key: string): Promise<KeyPair> {
  return { cert, key, certPem: await readFile(cert, 'utf8'), keyPem: await readFile(key, 'utf8') };
}

/**
 * Self-signed root CA (`openssl req -x509 -sha256 -nodes -days 365 -newkey rsa:2048 -subj …`),
 * files `<dir>/<name>.crt` and `<dir>/<name>.key`. With `parent`, an intermediate CA signed by it.
 */
export async function makeCa(
  dir: string,
  name: string,
  subj: string,
  opts: { ec?: boolean; days?: number; parent?: Ca; serial?: number } = {},
): Promise<Ca> {
  await mkdir(dir, { recursive: true });
  const cert = path.join(dir, `${name}.crt`);
  const key = path.join(dir, `${name}.key`);
  const days = String(opts.days ?? 365);
  if (opts.parent === undefined) {
    await openssl(['req', '-x509', '-sha256', '-nodes', '-days', days, ...newKeyArgs(opts.ec), '-subj', subj,
      '-keyout', key, '-out', cert], dir);
  } else {
    const csr = path.join(dir, `${name}.csr`);
    const ext = path.join(dir, `${name}.ext`);
    await writeFile(ext, 'basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n' +
      'subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n');
    await openssl(['req', '-out', csr, ...newKeyArgs(opts.ec), '-nodes', '-keyout', key, '-subj', subj], dir);
    await openssl(['x509', '-req', '-sha256', '-days', days, '-CA', opts.parent.cert, '-CAkey', opts.parent.key,
      '-set_serial', String(opts.serial ?? 1000), '-in', csr, '-out', cert, '-extfile', ext], dir);
  }
  return { name, subj, ...(await readPair(cert, key)) };
}

/**
 * Leaf signed by `ca`: `openssl req -out <name>.csr -newkey rsa:2048 -nodes -keyout <name>.key
 * -subj "/CN=…/O=…"` then `openssl x509 -req -sha256 -days 365 -CA … -set_serial N`. Without
 * SANs or EKU the certificate is CN-only, exactly like the Istio task's.
 */
export async function makeLeaf(dir: string, ca: Ca, name: string, opts: LeafOptions): Promise<KeyPair> {
  await mkdir(dir, { recursive: true });
  const cert = path.join(dir, `${name}.crt`);
  const key = path.join(dir, `${name}.key`);
  const csr = path.join(dir, `${name}.csr`);
  const subj = `/CN=${opts.cn}${opts.o !== undefined ? `/O=${opts.o}` : ''}`;
  await openssl(['req', '-out', csr, ...newKeyArgs(opts.ec), '-nodes', '-keyout', key, '-subj', subj], dir);

  const extLines: string[] = [];
  if (opts.sans !== undefined && opts.sans.length > 0) extLines.push(`subjectAltName=${opts.sans.join(',')}`);
  if (opts.extendedKeyUsage !== undefined && opts.extendedKeyUsage.length > 0) {
    extLines.push(`extendedKeyUsage=${opts.extendedKeyUsage.join(',')}`);
  }

  let notBefore = opts.notBefore;
  let notAfter = opts.notAfter;
  if (opts.expired === true) {
    const day = 24 * 3600 * 1000;
    notBefore ??= new Date(Date.now() - 30 * day);
    notAfter ??= new Date(Date.now() - day);
  }

  if (notBefore === undefined && notAfter === undefined) {
    const args = ['x509', '-req', '-sha256', '-days', String(opts.days ?? 365), '-CA', ca.cert, '-CAkey', ca.key,
      '-set_serial', String(opts.serial), '-in', csr, '-out', cert];
    if (extLines.length > 0) {
      const ext = path.join(dir, `${name}.ext`);
      await writeFile(ext, `${extLines.join('\n')}\n`);
      args.push('-extfile', ext);
    }
    await openssl(args, dir);
  } else {
    // `openssl x509` (3.0) cannot set a start date, `openssl ca` can; it needs a tiny database.
    const caDir = path.join(dir, `${name}.ca`);
    await mkdir(caDir, { recursive: true });
    await writeFile(path.join(caDir, 'index.txt'), '');
    const conf = path.join(caDir, 'ca.cnf');
    await writeFile(conf, [
      '[ca]', 'default_ca = tlsgate_test', '',
      '[tlsgate_test]', `database = ${path.join(caDir, 'index.txt')}`, `new_certs_dir = ${caDir}`, `serial = ${path.join(caDir, 'serial')}`,
      'default_md = sha256', 'policy = policy_any', 'unique_subject = no', 'copy_extensions = none',
      'x509_extensions = leaf_ext', '',
      '[policy_any]', 'commonName = supplied', 'organizationName = optional', '',
      '[leaf_ext]', ...(extLines.length > 0 ? extLines : ['basicConstraints=CA:FALSE']), '',
    ].join('\n'));
    const hex = opts.serial.toString(16);
    await writeFile(path.join(caDir, 'serial'), `${hex.length % 2 === 1 ? `0${hex}` : hex}\n`);
    const start = notBefore ?? new Date(Date.now() - 60_000);
    const end = notAfter ?? new Date(start.getTime() + (opts.days ?? 365) * 24 * 3600 * 1000);
    await openssl(['ca', '-batch', '-notext', '-preserveDN', '-config', conf, '-cert', ca.cert, '-keyfile', ca.key,
      '-in', csr, '-out', cert, '-startdate', asn1Time(start), '-enddate', asn1Time(end)], caDir);
  }
  return readPair(cert, key);
}

/** YYYYMMDDHHMMSSZ (GeneralizedTime, accepted by `openssl ca -startdate`). */
function asn1Time(d: Date): string {
  return d.toISOString().replace(/[-:T]/g, '').replace(/\.\d+Z$/, 'Z');
}

/** Concatenates PEM texts into one bundle (e.g. leaf + intermediate for a full chain). */
export function bundle(...pems: readonly string[]): string {
  return pems.map((p) => (p.endsWith('\n') ? p : `${p}\n`)).join('');
}

function firstCert(pem: string): X509Certificate {
  return new X509Certificate(pem);
}

/**
 * base64(sha256(DER SubjectPublicKeyInfo)), the value Istio's `verifyCertificateSpki` expects
 * (same as `openssl x509 -pubkey | openssl pkey -pubin -outform der | openssl dgst -sha256 -binary | base64`).
 */
export function spkiSha256Base64(certPem: string): string {
  const der = firstCert(certPem).publicKey.export({ type: 'spki', format: 'der' });
  return createHash('sha256').update(der).digest('base64');
}

/** Lowercase hex sha256 of the certificate DER, the value for `verifyCertificateHash`. */
export function certSha256Hex(certPem: string): string {
  return createHash('sha256').update(firstCert(certPem).raw).digest('hex');
}

/** Same digest in the colon-separated uppercase form (`AB:CD:…`), which Istio also accepts. */
export function certSha256Colons(certPem: string): string {
  return firstCert(certPem).fingerprint256;
}

export type SecretType = 'kubernetes.io/tls' | 'Opaque' | (string & {});

/**
 * A v1 Secret manifest with base64 `data`, as `kubectl create secret tls|generic … -o yaml` would
 * write it. Keys are quoted so names like `tls.crt` and `ca.crt` stay plain strings.
 */
export function writeSecretYaml(
  name: string,
  namespace: string,
  type: SecretType,
  data: Record<string, string>,
): string {
  const lines = ['apiVersion: v1', 'kind: Secret', 'metadata:', `  name: ${JSON.stringify(name)}`,
    `  namespace: ${JSON.stringify(namespace)}`, `type: ${JSON.stringify(type)}`, 'data:'];
  for (const [key, value] of Object.entries(data)) {
    lines.push(`  ${JSON.stringify(key)}: ${Buffer.from(value, 'utf8').toString('base64')}`);
  }
  return `${lines.join('\n')}\n`;
}
