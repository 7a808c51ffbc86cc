/**
 * Shared material and peers for the pki tests: certificates minted per run, a TLS server on
 * 127.0.0.1 that runs checkPeerCertificate after each handshake, and node / openssl clients.
 */
import { spawn } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import tls from 'node:tls';
import type { DownstreamTlsContext } from '../../../src/model/snapshot.js';
import { serverSocketOptions } from '../../../src/runtime/pki/context-cache.js';
import { checkPeerCertificate, handshakeVerification, type PeerCheck } from '../../../src/runtime/pki/verify.js';
import { createCa, issueCert, writePemFiles, type CertificateAuthority, type IssuedCert } from '../../../src/pki/mint.js';

export interface Pems extends IssuedCert {
  certPath: string;
  keyPath: string;
}

export interface Fixture {
  dir: string;
  ca: CertificateAuthority;
  caPath: string;
  otherCa: CertificateAuthority;
  server: Pems; // EC, localhost + 127.0.0.1
  serverRsa: Pems;
  client: Pems; // from ca: URI spiffe://cluster.local/ns/app/sa/client, DNS client.example.com
  rogue: Pems; // from otherCa
  cleanup(): Promise<void>;
}

async function pems(dir: string, name: string, p: IssuedCert): Promise<Pems> {
  const { certPath, keyPath } = await writePemFiles(dir, name, p, { writeChain: true });
  return { ...p, certPath, keyPath: keyPath! };
}

export async function makeFixture(): Promise<Fixture> {
  const dir = await mkdtemp(join(tmpdir(), 'tlsgate-pki-'));
  const ca = await createCa({ commonName: 'tlsgate test root', organization: 'tlsgate' });
  const otherCa = await createCa({ commonName: 'someone else' });
  const { certPath: caPath } = await writePemFiles(dir, 'ca', { certPem: ca.certPem });
  return {
    dir,
    ca,
    caPath,
    otherCa,
    server: await pems(dir, 'server', await issueCert(ca, { commonName: 'localhost', dnsNames: ['localhost'], ips: ['127.0.0.1'], server: true })),
    serverRsa: await pems(dir, 'server-rsa', await issueCert(ca, { commonName: 'localhost', dnsNames: ['localhost'], server: true, keyType: 'RSA' })),
    client: await pems(dir, 'client', await issueCert(ca, { commonName: 'client', uris: ['spiffe://cluster.local/ns/app/sa/client'], dnsNames: ['client.example.com'], client: true })),
    rogue: await pems(dir, 'rogue', await issueCert(otherCa, { commonName: 'rogue', uris: ['spiffe://cluster.local/ns/app/sa/client'], client: true })),
    cleanup: () => rm(dir, { recursive: true, force: true }),
  };
}

export function downstream(over: Partial<DownstreamTlsContext> = {}): DownstreamTlsContext {
  return {
    mode: 'SIMPLE',
    certificates: ['server'],
    requestClientCertificate: false,
    requireClientCertificate: false,
    allowInvalidClientCertificate: false,
    matchSubjectAltNames: [],
    verifyCertificateSpki: [],
    verifyCertificateHash: [],
    minVersion: 'TLSv1.2',
    maxVersion: 'TLSv1.3',
    cipherSuites: [],
    ecdhCurves: [],
    alpn: [],
    ...over,
  };
}

export function mutual(over: Partial<DownstreamTlsContext> = {}): DownstreamTlsContext {
  return downstream({ mode: 'MUTUAL', validationCa: 'ca', requestClientCertificate: true, requireClientCertificate: true, ...over });
}

export interface TestServer {
  port: number;
  /** One entry per completed handshake: what checkPeerCertificate decided. */
  checks: PeerCheck[];
  /** Handshake failures seen by the server. */
  errors: string[];
  close(): Promise<void>;
}

/**
 * A TLS server that answers "ok <protocol> <cipher>\n" when checkPeerCertificate accepts and
 * destroys the connection when it refuses.
 * - 'sni': tls.createServer with SNICallback handing out `ctx` (node computes `authorized`);
 * - 'manual': net server + new tls.TLSSocket(serverSocketOptions(...)), as the runtime listener does.
 */
export async function startServer(ctx: tls.SecureContext, tlsCtx: DownstreamTlsContext, style: 'sni' | 'manual' = 'sni'): Promise<TestServer> {
  const checks: PeerCheck[] = [];
  const errors: string[] = [];
  const onSecure = (sock: tls.TLSSocket, authorized: boolean, authorizationError?: string) => {
    const r = checkPeerCertificate(sock.getPeerX509Certificate(), tlsCtx, authorized, authorizationError);
    checks.push(r);
    if (r.ok) sock.end(`ok ${sock.getProtocol()} ${sock.getCipher().name}\n`);
    else sock.destroy();
  };
  const sockets = new Set<net.Socket>();
  let server: net.Server;
  if (style === 'sni') {
    const opts = serverSocketOptions(tlsCtx, ctx);
    const srv = tls.createServer({
      SNICallback: (_name, cb) => cb(null, ctx),
      requestCert: opts.requestCert,
      rejectUnauthorized: opts.rejectUnauthorized,
    });
    srv.on('secureConnection', (sock) => {
      sock.on('error', () => {});
      onSecure(sock, sock.authorized, sock.authorizationError ? String(sock.authorizationError) : undefined);
    });
    srv.on('tlsClientError', (e: Error & { code?: string }) => errors.push(e.code ?? e.message));
    server = srv;
  } else {
    server = net.createServer((raw) => {
      raw.on('error', () => {});
      const sock = new tls.TLSSocket(raw, serverSocketOptions(tlsCtx, ctx));
      sock.on('error', (e: Error & { code?: string }) => errors.push(e.code ?? e.message));
      sock.on('secure', () => {
        const v = handshakeVerification(sock);
        onSecure(sock, v.authorized, v.authorizationError);
      });
    });
  }
  server.on('connection', (s: net.Socket) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as net.AddressInfo).port;
  return {
    port,
    checks,
    errors,
    close: () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  };
}

export interface ClientResult {
  data: string;
  error?: string;
  protocol?: string | null;
  reused?: boolean;
  session?: Buffer;
}

/** Connects with node's TLS client and collects what the server sent, or the error. */
export function nodeClient(port: number, opts: tls.ConnectionOptions = {}): Promise<ClientResult> {
  return new Promise((resolve) => {
    let data = '';
    let error: string | undefined;
    let session: Buffer | undefined;
    let protocol: string | null | undefined;
    let reused: boolean | undefined;
    const sock = tls.connect({ host: '127.0.0.1', port, servername: 'localhost', ...opts });
    const timer = setTimeout(() => {
      error ??= 'timeout';
      sock.destroy();
    }, 10_000);
    timer.unref();
    sock.setEncoding('utf8');
    sock.on('secureConnect', () => {
      protocol = sock.getProtocol();
      reused = sock.isSessionReused();
    });
    sock.on('session', (s: Buffer) => (session = s));
    sock.on('data', (d: string) => (data += d));
    sock.on('error', (e: Error & { code?: string }) => (error ??= e.code ?? e.message));
    sock.on('close', () => {
      clearTimeout(timer);
      resolve({ data, error, protocol, reused, session });
    });
  });
}

/** Runs `openssl s_client` against 127.0.0.1:port; returns the exit code and all output. */
export function sClient(port: number, args: string[]): Promise<{ code: number | null; out: string }> {
  return new Promise((resolve) => {
    const p = spawn('openssl', ['s_client', '-connect', `127.0.0.1:${port}`, '-servername', 'localhost', '-ign_eof', ...args], {
      stdio: ['pipe', 'pipe', 'pipe'],
    });
    let out = '';
    p.stdout.on('data', (d: Buffer) => (out += d.toString()));
    p.stderr.on('data', (d: Buffer) => (out += d.toString()));
    p.stdin.end(); // EOF on stdin: s_client hangs up once the server closes or after the handshake
    const timer = setTimeout(() => p.kill('SIGKILL'), 15_000);
    timer.unref();
    p.on('error', (e) => (out += `spawn error: ${e.message}`));
    p.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, out });
    });
  });
}

/** Runs a command with stdin text; returns stdout (for the openssl pipelines). */
export function run(cmd: string, args: string[], input?: Buffer | string): Promise<{ code: number | null; stdout: Buffer; stderr: string }> {
  return new Promise((resolve) => {
    const p = spawn(cmd, args, { stdio: ['pipe', 'pipe', 'pipe'] });
    const chunks: Buffer[] = [];
    let stderr = '';
    p.stdout.on('data', (d: Buffer) => chunks.push(d));
    p.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    p.on('error', (e) => (stderr += e.message));
    const timer = setTimeout(() => p.kill('SIGKILL'), 15_000);
    timer.unref();
    p.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout: Buffer.concat(chunks), stderr });
    });
    p.stdin.end(input);
  });
}
