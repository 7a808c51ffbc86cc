// nginx as a real peer (TLS upstream, stream proxy) for integration tests. Everything it writes
// (pid, logs, temp files) stays in a temp dir, so it runs as root without touching /var.
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { stopChild, trackChild, waitForExit } from './exec.js';
import { waitForPort } from './ports.js';

const NGINX_CANDIDATES = ['/usr/sbin/nginx', '/usr/local/sbin/nginx', '/usr/local/nginx/sbin/nginx'];
const STREAM_MODULE_CANDIDATES = [
  '/usr/lib/nginx/modules/ngx_stream_module.so',
  '/usr/lib64/nginx/modules/ngx_stream_module.so',
  '/usr/local/nginx/modules/ngx_stream_module.so',
];

export function nginxBinary(): string | undefined {
  return NGINX_CANDIDATES.find((p) => existsSync(p));
}

export interface StartNginxOptions {
  /** Contents of the `http {}` block (server blocks, upstreams, maps …). */
  http?: string;
  /** Contents of the `stream {}` block; the stream module is loaded when it is a dynamic module. */
  stream?: string;
  /** Ports to wait for; default: every `listen <addr>:<port>` / `listen <port>` found in the blocks. */
  ports?: number[];
  /** Default 10 s. */
  startTimeoutMs?: number;
}

export interface Nginx {
  pid: number;
  /** Ports it was waited on (the ones it listens on). */
  ports: number[];
  port: number;
  dir: string;
  confPath: string;
  errorLog(): Promise<string>;
  accessLog(): Promise<string>;
  /** SIGQUIT (graceful), SIGKILL after 5 s; removes the temp dir. Returns the exit code. */
  stop(): Promise<number | null>;
}

/** Ports named by `listen` directives in an nginx config fragment. */
export function listenPorts(conf: string): number[] {
  const ports = new Set<number>();
  for (const m of conf.matchAll(/\blisten\s+(?:[^\s;:]+:)?(\d+)\b/g)) ports.add(Number(m[1]));
  return [...ports];
}

export async function startNginx(opts: StartNginxOptions): Promise<Nginx> {
  const bin = nginxBinary();
  if (bin === undefined) throw new Error(`nginx not found (looked in ${NGINX_CANDIDATES.join(', ')}); run .ci/run or apt-get install nginx`);
  const dir = await mkdtemp(path.join(os.tmpdir(), 'tlsgate-nginx-'));
  await mkdir(path.join(dir, 'tmp'), { recursive: true });
  const q = (p: string): string => JSON.stringify(path.join(dir, p));
  const streamModule = STREAM_MODULE_CANDIDATES.find((p) => existsSync(p));
  const lines: string[] = [];
  if (opts.stream !== undefined && streamModule !== undefined) lines.push(`load_module ${streamModule};`);
  // One process, in the foreground: stopping it by PID cannot leave orphaned workers behind.
  lines.push(
    'daemon off;',
    'master_process off;',
    `pid ${q('nginx.pid')};`,
    `error_log ${q('error.log')} info;`,
    'events { worker_connections 1024; }',
  );
  if (opts.http !== undefined) {
    lines.push(
      'http {',
      `  access_log ${q('access.log')};`,
      `  client_body_temp_path ${q('tmp/body')};`,
      `  proxy_temp_path ${q('tmp/proxy')};`,
      `  fastcgi_temp_path ${q('tmp/fastcgi')};`,
      `  uwsgi_temp_path ${q('tmp/uwsgi')};`,
      `  scgi_temp_path ${q('tmp/scgi')};`,
      '  default_type application/octet-stream;',
      opts.http,
      '}',
    );
  }
  if (opts.stream !== undefined) lines.push('stream {', opts.stream, '}');
  const confPath = path.join(dir, 'nginx.conf');
  await writeFile(confPath, `${lines.join('\n')}\n`);

  const ports = opts.ports ?? listenPorts(`${opts.http ?? ''}\n${opts.stream ?? ''}`);
  const child = spawn(bin, ['-e', path.join(dir, 'error.log'), '-p', dir, '-c', confPath], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  trackChild(child);
  let output = '';
  const collect = (chunk: Buffer): void => {
    if (output.length < 64 * 1024) output += chunk.toString('utf8');
  };
  child.stdout.on('data', collect);
  child.stderr.on('data', collect);
  const spawned = new Promise<void>((resolve, reject) => {
    child.once('spawn', resolve);
    child.once('error', reject);
  });
  await spawned;

  const errorLog = (): Promise<string> => readFile(path.join(dir, 'error.log'), 'utf8').catch(() => '');
  const exited = waitForExit(child).then((code) => ({ code }));
  try {
    const ready = Promise.all(ports.map((p) => waitForPort(p, opts.startTimeoutMs ?? 10_000)));
    const first = await Promise.race([ready.then(() => 'ready' as const), exited]);
    if (first !== 'ready') throw new Error(`nginx exited with ${first.code} before listening`);
  } catch (e) {
    await stopChild(child, 'SIGKILL', 2_000);
    const log = await errorLog();
    await rm(dir, { recursive: true, force: true });
    throw new Error(`${(e as Error).message}\n${output}\n${log}`);
  }
  return {
    pid: child.pid ?? -1,
    ports,
    port: ports[0] ?? -1,
    dir,
    confPath,
    errorLog,
    accessLog: () => readFile(path.join(dir, 'access.log'), 'utf8').catch(() => ''),
    async stop() {
      const code = await stopChild(child, 'SIGQUIT', 5_000);
      await rm(dir, { recursive: true, force: true });
      return code;
    },
  };
}

export interface NginxTlsServerOptions {
  port: number;
  cert: string;
  key: string;
  serverName: string;
  /** CA bundle for client certificates (ssl_client_certificate). */
  clientCa?: string;
  verifyClient?: 'on' | 'optional' | 'optional_no_ca';
  /** e.g. 'TLSv1.2 TLSv1.3' (default). */
  protocols?: string;
  http2?: boolean;
}

/**
 * A TLS server block whose every response is JSON echoing what nginx saw:
 * `{ssl_server_name, ssl_client_s_dn, ssl_client_i_dn, ssl_client_verify, ssl_protocol, alpn,
 * host, request_uri, server_port}`. Values go in unescaped, which is fine for the DNs these tests
 * mint; the XFCC request header comes back as the `x-echo-xfcc` response header instead, since
 * it contains quotes.
 */
export function nginxTlsServer(o: NginxTlsServerOptions): string {
  const body = [
    '{"ssl_server_name":"$ssl_server_name"',
    '"ssl_client_s_dn":"$ssl_client_s_dn"',
    '"ssl_client_i_dn":"$ssl_client_i_dn"',
    '"ssl_client_verify":"$ssl_client_verify"',
    '"ssl_protocol":"$ssl_protocol"',
    '"alpn":"$ssl_alpn_protocol"',
    '"host":"$host"',
    '"request_uri":"$request_uri"',
    '"server_port":"$server_port"',
    '"session_reused":"$ssl_session_reused"}',
  ].join(',');
  const lines = [
    'server {',
    `  listen 127.0.0.1:${o.port} ssl${o.http2 === true ? ' http2' : ''};`,
    `  server_name ${o.serverName};`,
    `  ssl_certificate ${JSON.stringify(o.cert)};`,
    `  ssl_certificate_key ${JSON.stringify(o.key)};`,
    `  ssl_protocols ${o.protocols ?? 'TLSv1.2 TLSv1.3'};`,
  ];
  if (o.clientCa !== undefined) lines.push(`  ssl_client_certificate ${JSON.stringify(o.clientCa)};`);
  if (o.verifyClient !== undefined) lines.push(`  ssl_verify_client ${o.verifyClient};`);
  lines.push(
    '  location / {',
    '    default_type application/json;',
    '    add_header x-echo-xfcc $http_x_forwarded_client_cert always;',
    `    return 200 '${body}\\n';`,
    '  }',
    '}',
  );
  return lines.join('\n');
}

/** A stream server that terminates TLS and proxies the plaintext to 127.0.0.1:upstreamPort. */
export function nginxStreamTlsProxy(o: {
  port: number;
  cert: string;
  key: string;
  upstreamPort: number;
  clientCa?: string;
  verifyClient?: 'on' | 'optional';
  protocols?: string;
}): string {
  const lines = [
    'server {',
    `  listen 127.0.0.1:${o.port} ssl;`,
    `  ssl_certificate ${JSON.stringify(o.cert)};`,
    `  ssl_certificate_key ${JSON.stringify(o.key)};`,
    // nginx 1.22's stream default leaves TLS 1.3 off; match the http helper instead.
    `  ssl_protocols ${o.protocols ?? 'TLSv1.2 TLSv1.3'};`,
  ];
  if (o.clientCa !== undefined) lines.push(`  ssl_client_certificate ${JSON.stringify(o.clientCa)};`);
  if (o.verifyClient !== undefined) lines.push(`  ssl_verify_client ${o.verifyClient};`);
  lines.push(`  proxy_pass 127.0.0.1:${o.upstreamPort};`, '}');
  return lines.join('\n');
}
