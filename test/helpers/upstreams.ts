// Upstreams written in Node for integration tests: an HTTP(S)/h2 echo server in the spirit of
// httpbin, a TCP echo, a server-first (banner) TCP server and a TCP server that holds every
// connection open. All bind 127.0.0.1 on port 0.
import { X509Certificate } from 'node:crypto';
import { readFileSync } from 'node:fs';
import http from 'node:http';
import http2 from 'node:http2';
import https from 'node:https';
import net from 'node:net';
import tls from 'node:tls';
import type { Cluster } from '../../src/model/snapshot.js';

/** PEM text, or a path to a PEM file. */
export type PemSource = string;

function pem(source: PemSource): string {
  return source.includes('-----BEGIN') ? source : readFileSync(source, 'utf8');
}

export interface UpstreamTls {
  cert: PemSource;
  key: PemSource;
  /** CA used to verify client certificates. */
  ca?: PemSource;
  requestCert?: boolean;
  /** Default: true when requestCert and ca are set (a real mTLS upstream), false otherwise. */
  rejectUnauthorized?: boolean;
  /** Restrict ALPN (default for h2: ['h2', 'http/1.1'], for http/1: ['http/1.1']). */
  alpn?: string[];
  minVersion?: tls.SecureVersion;
  maxVersion?: tls.SecureVersion;
}

export interface EchoReply {
  server: string;
  method: string;
  url: string;
  headers: http.IncomingHttpHeaders;
  httpVersion: string;
  sni: string | null;
  alpn: string | null;
  tlsVersion: string | null;
  /** One-line subject of the client certificate ('CN=client.example.com, O=client organization'); null if none. */
  clientCertSubject: string | null;
  clientCertIssuer: string | null;
  /** subjectAltName of the client certificate as node prints it ('URI:spiffe://…, DNS:…'). */
  clientCertSan: string | null;
  remotePort: number | null;
  body: string;
}

export interface EchoServer {
  port: number;
  /** Requests answered so far. */
  readonly requests: number;
  /** Accepted TCP connections so far. */
  readonly connections: number;
  /** Every reply, in order (capped at 1000). */
  readonly replies: readonly EchoReply[];
  close(): Promise<void>;
}

const MAX_BODY = 1024 * 1024;
const MAX_DELAY_MS = 10_000;
const TEAPOT = "\n    -=[ I'm a teapot ]=-\n\n       _...._\n     .'  _ _ `.\n    | .\"` ^ `\". _,\n    \\_;`\"---\"`|//\n      |       ;/\n      \\_     _/\n        `\"\"\"`\n";

function dnOneLine(dn: string): string {
  return dn.split('\n').filter((l) => l !== '').join(', ');
}

type AnyRequest = http.IncomingMessage | http2.Http2ServerRequest;
type AnyResponse = http.ServerResponse | http2.Http2ServerResponse;

/**
 * Answers every request with a JSON {@link EchoReply}. `/status/<code>` answers with that status
 * (`/status/418` with a teapot body, like httpbin), `/delay/<ms>` waits first (at most 10 s).
 * The reply also carries the header `x-echo-server: <name>` to tell endpoints apart.
 */
export async function startEchoServer(opts: { tls?: UpstreamTls; h2?: boolean; name?: string } = {}): Promise<EchoServer> {
  const name = opts.name ?? 'echo';
  const replies: EchoReply[] = [];
  const sockets = new Set<net.Socket>();
  const sessions = new Set<http2.Http2Session>();
  const timers = new Set<NodeJS.Timeout>();
  let requests = 0;
  let connections = 0;

  const handler = (req: AnyRequest, res: AnyResponse): void => {
    const chunks: Buffer[] = [];
    let size = 0;
    req.on('error', () => {});
    req.on('data', (chunk: Buffer) => {
      size += chunk.length;
      if (size <= MAX_BODY) chunks.push(chunk);
    });
    req.on('end', () => {
      requests++;
      // The h2 compat request's .socket is a proxy over the stream; the session holds the real socket.
      const socket = ('stream' in req && req.stream !== undefined
        ? (req.stream.session?.socket ?? null)
        : (req.socket ?? null)) as tls.TLSSocket | net.Socket | null;
      const tlsSocket = socket !== null && 'encrypted' in socket && socket.encrypted ? (socket as tls.TLSSocket) : null;
      let subject: string | null = null;
      let issuer: string | null = null;
      let san: string | null = null;
      const raw = tlsSocket?.getPeerCertificate?.()?.raw;
      if (raw !== undefined && raw.length > 0) {
        const cert = new X509Certificate(raw);
        subject = dnOneLine(cert.subject);
        issuer = dnOneLine(cert.issuer);
        san = cert.subjectAltName ?? null;
      }
      const reply: EchoReply = {
        server: name,
        method: req.method ?? '',
        url: req.url ?? '',
        headers: req.headers as http.IncomingHttpHeaders,
        httpVersion: req.httpVersion,
        sni: typeof (tlsSocket as { servername?: unknown } | null)?.servername === 'string'
          ? ((tlsSocket as unknown as { servername: string }).servername)
          : null,
        alpn: tlsSocket !== null && typeof tlsSocket.alpnProtocol === 'string' ? tlsSocket.alpnProtocol : null,
        tlsVersion: tlsSocket?.getProtocol?.() ?? null,
        clientCertSubject: subject,
        clientCertIssuer: issuer,
        clientCertSan: san,
        remotePort: socket?.remotePort ?? null,
        body: Buffer.concat(chunks).toString('utf8'),
      };
      if (replies.length < 1000) replies.push(reply);

      const url = reply.url;
      const statusMatch = /^\/status\/(\d{3})(?:[/?]|$)/.exec(url);
      const delayMatch = /^\/delay\/(\d+)(?:[/?]|$)/.exec(url);
      const status = statusMatch ? Number(statusMatch[1]) : 200;
      const send = (): void => {
        if (res.destroyed) return;
        if (status === 418) {
          res.writeHead(418, { 'content-type': 'text/plain', 'x-more-info': 'http://tools.ietf.org/html/rfc2324', 'x-echo-server': name });
          res.end(TEAPOT);
          return;
        }
        const body = JSON.stringify(reply);
        const noBody = status === 204 || status === 304 || reply.method === 'HEAD';
        res.writeHead(status, { 'content-type': 'application/json', 'x-echo-server': name });
        if (noBody) res.end();
        else res.end(body);
      };
      if (delayMatch) {
        const timer = setTimeout(() => {
          timers.delete(timer);
          send();
        }, Math.min(Number(delayMatch[1]), MAX_DELAY_MS));
        timers.add(timer);
      } else {
        send();
      }
    });
  };

  let server: net.Server;
  if (opts.h2 === true) {
    if (opts.tls !== undefined) {
      server = http2.createSecureServer(
        { ...tlsServerOptions(opts.tls, ['h2', 'http/1.1']), allowHTTP1: true },
        handler as (req: http2.Http2ServerRequest, res: http2.Http2ServerResponse) => void,
      );
    } else {
      server = http2.createServer(handler as (req: http2.Http2ServerRequest, res: http2.Http2ServerResponse) => void);
    }
    (server as http2.Http2Server).on('session', (session: http2.Http2Session) => {
      sessions.add(session);
      session.on('error', () => {});
      session.once('close', () => sessions.delete(session));
    });
  } else if (opts.tls !== undefined) {
    server = https.createServer(tlsServerOptions(opts.tls, ['http/1.1']), handler as http.RequestListener);
  } else {
    server = http.createServer(handler as http.RequestListener);
  }
  server.on('connection', (socket: net.Socket) => {
    connections++;
    sockets.add(socket);
    socket.on('error', () => {});
    socket.once('close', () => sockets.delete(socket));
  });
  // Handshake failures are expected in negative tests; they must not crash the test process.
  server.on('tlsClientError', () => {});
  server.on('clientError', (_err: Error, socket: net.Socket) => socket.destroy());

  const port = await listenLocal(server);
  return {
    port,
    get requests() {
      return requests;
    },
    get connections() {
      return connections;
    },
    replies,
    close: () => closeServer(server, sockets, () => {
      for (const t of timers) clearTimeout(t);
      for (const s of sessions) s.destroy();
    }),
  };
}

function tlsServerOptions(t: UpstreamTls, defaultAlpn: string[]): tls.TlsOptions {
  const requestCert = t.requestCert ?? false;
  return {
    cert: pem(t.cert),
    key: pem(t.key),
    ca: t.ca !== undefined ? pem(t.ca) : undefined,
    requestCert,
    rejectUnauthorized: t.rejectUnauthorized ?? (requestCert && t.ca !== undefined),
    ALPNProtocols: t.alpn ?? defaultAlpn,
    minVersion: t.minVersion,
    maxVersion: t.maxVersion,
  };
}

function listenLocal(server: net.Server): Promise<number> {
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      server.off('error', reject);
      const address = server.address();
      if (address === null || typeof address === 'string') reject(new Error('no TCP address'));
      else resolve(address.port);
    });
  });
}

function closeServer(server: net.Server, sockets: Set<net.Socket>, extra?: () => void): Promise<void> {
  return new Promise((resolve) => {
    extra?.();
    server.close(() => resolve());
    for (const s of sockets) s.destroy();
  });
}

export interface TcpServer {
  port: number;
  /** Accepted connections so far. */
  readonly connections: number;
  /** Bytes received over all connections. */
  readonly bytesReceived: number;
  close(): Promise<void>;
}

export interface TcpServerOptions {
  /** Terminate TLS first, then echo the plaintext. */
  tls?: UpstreamTls;
}

/** Echoes every byte back. */
export function startTcpEcho(opts: TcpServerOptions = {}): Promise<TcpServer> {
  return startTcp(opts, (socket) => socket.pipe(socket));
}

/** Sends `banner` as soon as a connection is accepted (like MySQL or SMTP), then echoes. */
export function startServerFirst(opts: TcpServerOptions & { banner: string | Buffer }): Promise<TcpServer> {
  return startTcp(opts, (socket) => {
    socket.write(opts.banner);
    socket.pipe(socket);
  });
}

async function startTcp(opts: TcpServerOptions, onSocket: (socket: net.Socket) => void): Promise<TcpServer> {
  const sockets = new Set<net.Socket>();
  let connections = 0;
  let bytesReceived = 0;
  const accept = (socket: net.Socket): void => {
    socket.on('error', () => {});
    socket.on('data', (chunk: Buffer) => {
      bytesReceived += chunk.length;
    });
    onSocket(socket);
  };
  const server = opts.tls !== undefined
    ? tls.createServer(tlsServerOptions(opts.tls, opts.tls.alpn ?? []), accept)
    : net.createServer(accept);
  server.on('connection', (socket: net.Socket) => {
    connections++;
    sockets.add(socket);
    socket.on('error', () => {});
    socket.once('close', () => sockets.delete(socket));
  });
  server.on('tlsClientError', () => {});
  const port = await listenLocal(server);
  return {
    port,
    get connections() {
      return connections;
    },
    get bytesReceived() {
      return bytesReceived;
    },
    close: () => closeServer(server, sockets),
  };
}

/** A plain TCP upstream that keeps every connection open (until the client's FIN) and records what each received. */
export interface Holder { port: number; conns: { socket: net.Socket; bytes: Buffer[] }[]; close(): void }

export async function startHolder(): Promise<Holder> {
  const conns: Holder['conns'] = [];
  const server = net.createServer({ allowHalfOpen: true }, (socket) => {
    socket.on('error', () => {});
    const c = { socket, bytes: [] as Buffer[] };
    socket.on('data', (b: Buffer) => c.bytes.push(b));
    socket.on('end', () => socket.end());
    conns.push(c);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return { port: (server.address() as net.AddressInfo).port, conns, close: () => { server.close(); for (const c of conns) c.socket.destroy(); } };
}

/** A static cluster ('up', host up.test) with one plain endpoint at `address`:`port`, for dials through a ClusterManager. */
export function plainCluster(port: number, over: Partial<Cluster> = {}, address = '127.0.0.1'): Cluster {
  return {
    name: 'up', serviceHost: 'up.test', servicePort: port, discovery: 'STATIC',
    endpoints: [{ address, port, weight: 1, labels: {} }],
    lbPolicy: 'ROUND_ROBIN', connectTimeoutMs: 2_000, httpProtocol: 'http1', limits: {},
    ...over,
  };
}
