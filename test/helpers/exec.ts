// Running real peers (curl, openssl, mariadb …) from tests. Children are tracked by PID so a test
// process that ends early still takes its own children with it, and only those.
import { spawn, type ChildProcess } from 'node:child_process';
import { X509Certificate } from 'node:crypto';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';

const liveChildren = new Set<ChildProcess>();
let exitHookInstalled = false;

/** Remembers a child so it is SIGKILLed (by its PID) if this test process exits first. */
export function trackChild(child: ChildProcess): void {
  if (!exitHookInstalled) {
    exitHookInstalled = true;
    process.on('exit', () => {
      for (const c of liveChildren) {
        if (c.pid !== undefined && c.exitCode === null && c.signalCode === null) {
          try {
            process.kill(c.pid, 'SIGKILL');
          } catch {
            // already gone
          }
        }
      }
    });
  }
  liveChildren.add(child);
  child.once('exit', () => liveChildren.delete(child));
}

/** Sends a signal to one child by PID; false if it had already exited. */
export function killChild(child: ChildProcess, signal: NodeJS.Signals = 'SIGTERM'): boolean {
  if (child.pid === undefined || child.exitCode !== null || child.signalCode !== null) return false;
  try {
    process.kill(child.pid, signal);
    return true;
  } catch {
    return false;
  }
}

/** Resolves with the exit code (null when ended by a signal) once the child has exited. */
export function waitForExit(child: ChildProcess): Promise<number | null> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve(child.exitCode);
  return new Promise((resolve) => child.once('exit', (code) => resolve(code)));
}

/** Signal, then SIGKILL if the child is still there after graceMs. Returns the exit code. */
export async function stopChild(
  child: ChildProcess,
  signal: NodeJS.Signals = 'SIGTERM',
  graceMs = 10_000,
): Promise<number | null> {
  const exited = waitForExit(child);
  if (!killChild(child, signal)) return exited;
  let timer: NodeJS.Timeout | undefined;
  const timedOut = new Promise<'timeout'>((resolve) => {
    timer = setTimeout(() => resolve('timeout'), graceMs);
  });
  const first = await Promise.race([exited, timedOut]);
  clearTimeout(timer);
  if (first !== 'timeout') return first;
  killChild(child, 'SIGKILL');
  return exited;
}

export interface RunOptions {
  input?: string | Buffer;
  /** Default 30 s; the child is SIGKILLed by PID when it is exceeded. */
  timeoutMs?: number;
  env?: NodeJS.ProcessEnv;
  cwd?: string;
  /** Cap on collected stdout and stderr, each (default 16 MiB); the rest is dropped. */
  maxBytes?: number;
}

export interface RunResult {
  /** Exit code; null when the child ended by a signal (for instance on timeout). */
  code: number | null;
  signal: NodeJS.Signals | null;
  timedOut: boolean;
  stdout: string;
  stderr: string;
  stdoutBytes: Buffer;
}

/**
 * Runs a command to completion. Never rejects because of the exit status; rejects only when the
 * command cannot be started at all (for instance ENOENT), so a missing tool is loud.
 */
export function run(cmd: string, args: readonly string[], opts: RunOptions = {}): Promise<RunResult> {
  const timeoutMs = opts.timeoutMs ?? 30_000;
  const maxBytes = opts.maxBytes ?? 16 * 1024 * 1024;
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, {
      cwd: opts.cwd,
      env: opts.env ?? process.env,
      stdio: ['pipe', 'pipe', 'pipe'],
    });
    trackChild(child);
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    let outLen = 0;
    let errLen = 0;
    let timedOut = false;
    child.stdout.on('data', (chunk: Buffer) => {
      if (outLen < maxBytes) out.push(chunk.subarray(0, maxBytes - outLen));
      outLen += chunk.length;
    });
    child.stderr.on('data', (chunk: Buffer) => {
      if (errLen < maxBytes) err.push(chunk.subarray(0, maxBytes - errLen));
      errLen += chunk.length;
    });
    // A child that exits before reading its input makes stdin emit EPIPE; that is not our error.
    child.stdin.on('error', () => {});
    const timer = setTimeout(() => {
      timedOut = true;
      killChild(child, 'SIGKILL');
    }, timeoutMs);
    child.once('error', (e) => {
      clearTimeout(timer);
      reject(new Error(`cannot run ${cmd}: ${e.message}`));
    });
    child.once('close', (code, signal) => {
      clearTimeout(timer);
      const stdoutBytes = Buffer.concat(out);
      resolve({
        code,
        signal,
        timedOut,
        stdout: stdoutBytes.toString('utf8'),
        stderr: Buffer.concat(err).toString('utf8'),
        stdoutBytes,
      });
    });
    if (opts.input !== undefined) child.stdin.end(opts.input);
    else child.stdin.end();
  });
}

// ---------------------------------------------------------------------------------------------
// curl

export interface CurlResult {
  /** curl's exit code (0 ok, 35 TLS handshake, 56 recv failure, 60 peer cert …). */
  code: number | null;
  /** HTTP status of the last response; 0 when none arrived. */
  status: number;
  /** Negotiated HTTP version as curl reports it: '1.1', '2' … ('0' when none). */
  httpVersion: string;
  body: string;
  /** Headers of the last response (after redirects / 100-continue), names lowercased; repeats joined with ', '. */
  headers: Record<string, string>;
  /** Raw header block(s) exactly as received. */
  rawHeaders: string;
  /** curl's `-w '%{json}'` write-out (ssl_verify_result, remote_port, time_* …) when it parsed. */
  info: Record<string, unknown>;
  stderr: string;
}

/** `--resolve host:port:127.0.0.1`, the curl equivalent of Istio's `--resolve "$HOST:$PORT:$INGRESS_HOST"`. */
export function resolveArgs(host: string, port: number, address = '127.0.0.1'): string[] {
  return ['--resolve', `${host}:${port}:${address}`];
}

/**
 * Runs curl with the caller's arguments (URL, --resolve, --cacert, --cert/--key, --http2,
 * -H, --data …). The helper owns -s/-S, -o, -D and -w to collect the body, headers and status;
 * callers should not pass those. Never rejects on curl or HTTP errors.
 */
export async function curl(args: readonly string[], opts: RunOptions = {}): Promise<CurlResult> {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'tlsgate-curl-'));
  try {
    const bodyFile = path.join(dir, 'body');
    const headerFile = path.join(dir, 'headers');
    const res = await run(
      'curl',
      ['-sS', '--max-time', String(Math.ceil((opts.timeoutMs ?? 20_000) / 1000)), '-o', bodyFile, '-D', headerFile,
        '-w', '%{json}', ...args],
      { ...opts, timeoutMs: (opts.timeoutMs ?? 20_000) + 5_000 },
    );
    const body = await readFile(bodyFile, 'utf8').catch(() => '');
    const rawHeaders = await readFile(headerFile, 'utf8').catch(() => '');
    let info: Record<string, unknown> = {};
    try {
      info = JSON.parse(res.stdout) as Record<string, unknown>;
    } catch {
      info = {};
    }
    const status = typeof info.http_code === 'number' ? info.http_code : Number(info.http_code ?? 0) || 0;
    return {
      code: res.code,
      status,
      httpVersion: typeof info.http_version === 'string' ? info.http_version : '0',
      body,
      headers: parseLastHeaderBlock(rawHeaders),
      rawHeaders,
      info,
      stderr: res.stderr,
    };
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

function parseLastHeaderBlock(raw: string): Record<string, string> {
  const blocks = raw.split(/\r?\n\r?\n/).filter((b) => b.trim() !== '');
  const last = blocks.at(-1) ?? '';
  const headers: Record<string, string> = {};
  for (const line of last.split(/\r?\n/).slice(1)) {
    const colon = line.indexOf(':');
    if (colon <= 0) continue;
    const name = line.slice(0, colon).trim().toLowerCase();
    const value = line.slice(colon + 1).trim();
    headers[name] = name in headers ? `${headers[name]}, ${value}` : value;
  }
  return headers;
}

// ---------------------------------------------------------------------------------------------
// openssl s_client

export interface SClientOptions {
  port: number;
  host?: string;
  servername?: string;
  /** Sends no SNI at all (openssl sends the -connect host otherwise only if it is a name). */
  noServername?: boolean;
  alpn?: string | readonly string[];
  cert?: string;
  key?: string;
  cafile?: string;
  /** e.g. ['-tls1_2'], ['-verify_return_error'], ['-verify_hostname', 'x'] */
  extraArgs?: readonly string[];
  /** Bytes written after the handshake; stdin is then closed, which ends s_client. */
  input?: string | Buffer;
  /**
   * Keep reading until the server closes (adds -ign_eof). Needed to see a TLS 1.3 alert that
   * the server sends after the client's Finished (for instance a rejected client certificate).
   */
  waitForClose?: boolean;
  timeoutMs?: number;
}

export interface PeerCertInfo {
  /** One-line form as `openssl x509 -noout -subject` prints it, e.g. 'CN = httpbin.example.com, O = httpbin organization'. */
  subject: string;
  issuer: string;
  /** node:crypto view of the leaf: subjectAltName, fingerprint256, validTo … */
  x509: X509Certificate;
  pem: string;
}

export interface SClientResult {
  code: number | null;
  stdout: string;
  stderr: string;
  /** A cipher was negotiated (the handshake completed from the client's point of view). */
  handshake: boolean;
  /** 'TLSv1.3', 'TLSv1.2' … */
  protocol?: string;
  cipher?: string;
  /** Negotiated ALPN protocol; undefined when none was negotiated. */
  alpn?: string;
  /** Leaf certificate the server presented, if any. */
  peerCert?: PeerCertInfo;
  /** All certificates the server sent, leaf first (needs -showcerts, which the helper passes). */
  peerChainPem: string[];
  /** 'Verify return code: N (text)'. */
  verifyCode?: number;
  verifyText?: string;
  /** A TLS alert was received from the peer (or the connection failed with an SSL alert). */
  alertReceived: boolean;
  alertNumber?: number;
  /** e.g. 'certificate required', 'handshake failure', 'unrecognized name'. */
  alertDescription?: string;
  /** The server asked for a client certificate. */
  clientCertRequested: boolean;
  /** The TCP connect itself failed (refused, unreachable). */
  connectError: boolean;
}

const PEM_RE = /-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g;

export async function opensslSClient(opts: SClientOptions): Promise<SClientResult> {
  const host = opts.host ?? '127.0.0.1';
  const args = ['s_client', '-connect', `${host}:${opts.port}`, '-showcerts'];
  if (opts.servername !== undefined) args.push('-servername', opts.servername);
  if (opts.noServername === true) args.push('-noservername');
  if (opts.alpn !== undefined) args.push('-alpn', typeof opts.alpn === 'string' ? opts.alpn : opts.alpn.join(','));
  if (opts.cert !== undefined) args.push('-cert', opts.cert);
  if (opts.key !== undefined) args.push('-key', opts.key);
  if (opts.cafile !== undefined) args.push('-CAfile', opts.cafile);
  if (opts.waitForClose === true) args.push('-ign_eof');
  args.push(...(opts.extraArgs ?? []));
  const res = await run('openssl', args, { input: opts.input ?? '', timeoutMs: opts.timeoutMs ?? 15_000 });
  return { code: res.code, stdout: res.stdout, stderr: res.stderr, ...parseSClient(res.stdout, res.stderr) };
}

export function parseSClient(
  stdout: string,
  stderr: string,
): Omit<SClientResult, 'code' | 'stdout' | 'stderr'> {
  const all = `${stdout}\n${stderr}`;
  const cipherLine = /^New, (\S+), Cipher is (\S+)/m.exec(stdout);
  const handshake = cipherLine !== null && cipherLine[2] !== '(NONE)';
  const protocol = /^\s*Protocol\s*:\s*(\S+)/m.exec(stdout)?.[1] ?? (handshake ? cipherLine?.[1] : undefined);
  const alpnMatch = /^ALPN protocol: (.+)$/m.exec(stdout);
  const verify = /Verify return code: (\d+) \(([^)]*)\)/.exec(stdout);
  const peerChainPem = stdout.match(PEM_RE) ?? [];
  let peerCert: PeerCertInfo | undefined;
  if (peerChainPem.length > 0) {
    const pem = `${peerChainPem[0]}\n`;
    const x509 = new X509Certificate(pem);
    peerCert = { subject: opensslOneLine(x509.subject), issuer: opensslOneLine(x509.issuer), x509, pem };
  }
  const alertNumber = /SSL alert number (\d+)/.exec(all)?.[1];
  // OpenSSL names most alerts 'tlsv1 alert <name>', a few without the word (e.g. 'tlsv1 unrecognized name' for 112).
  const alertDescription = (/(?:sslv3|tlsv1|tlsv13) alert ([a-z ]+?)(?::|$)/m.exec(all) ??
    /tlsv1 (unrecognized name|unsupported extension|certificate unobtainable|bad certificate status response|bad certificate hash value)(?::|$)/m.exec(all))?.[1]?.trim();
  return {
    handshake,
    protocol,
    cipher: handshake ? cipherLine?.[2] : undefined,
    alpn: alpnMatch?.[1]?.trim(),
    peerCert,
    peerChainPem: peerChainPem.map((p) => `${p}\n`),
    verifyCode: verify ? Number(verify[1]) : undefined,
    verifyText: verify?.[2],
    alertReceived: alertNumber !== undefined || alertDescription !== undefined,
    alertNumber: alertNumber !== undefined ? Number(alertNumber) : undefined,
    alertDescription,
    clientCertRequested: /Acceptable client certificate CA names|Requested Signature Algorithms|Client Certificate Types/.test(stdout),
    connectError: /connect:errno=|BIO_connect:/.test(all),
  };
}

/** node:crypto prints DNs one attribute per line; openssl's one-line form joins them with ', ' and ' = '. */
export function opensslOneLine(dn: string | undefined): string {
  // An empty subject (SPIFFE workload certificates) comes back from node:crypto as undefined.
  return (dn ?? '')
    .split('\n')
    .filter((l) => l !== '')
    .map((l) => {
      const eq = l.indexOf('=');
      return eq < 0 ? l : `${l.slice(0, eq)} = ${l.slice(eq + 1)}`;
    })
    .join(', ');
}

/** `openssl x509 -noout -subject -issuer` on PEM text, as the Istio tasks pipe it. */
export async function opensslSubjectIssuer(pem: string): Promise<{ subject: string; issuer: string }> {
  const res = await run('openssl', ['x509', '-noout', '-subject', '-issuer'], { input: pem });
  if (res.code !== 0) throw new Error(`openssl x509 failed: ${res.stderr}`);
  return {
    subject: /^subject=\s*(.*)$/m.exec(res.stdout)?.[1] ?? '',
    issuer: /^issuer=\s*(.*)$/m.exec(res.stdout)?.[1] ?? '',
  };
}
