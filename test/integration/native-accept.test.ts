// Native accept against the real CLI: the relay addon accepts a TLS-inspecting listener and reads
// the ClientHello itself; a hello routed to a plain TCP upstream is dialled and relayed by the
// addon, everything else becomes a Node socket ("adopted"). Every case runs twice, with native
// accept on and with TLSGATE_NATIVE_ACCEPT=0 (Node accepts), and the two must behave the same:
// SNI passthrough with exact byte counts, a hello written one byte at a time, unknown / missing
// SNI, termination and passthrough on one port, hostile first bytes, a PROXY v2 header toward the
// upstream, a client half-close, the hello timeout, --max-connections for relayed and adopted
// connections (refusal, then the slots come back), a reload to a server-speaks-first TCP port,
// and --workers 2. Skipped when the addon is not built.
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { lookup } from 'node:dns/promises';
import { once } from 'node:events';
import { mkdir, rm, writeFile } from 'node:fs/promises';
import https from 'node:https';
import net from 'node:net';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import tls from 'node:tls';
import { certDir, makeCa, makeLeaf, type Ca, type KeyPair } from '../helpers/certs.js';
import { freePorts, sleep } from '../helpers/ports.js';
import { startTlsgate, type Gateway } from '../helpers/tlsgate.js';
import { localServiceEntry } from '../helpers/recording-telemetry.js';
import { startServerFirst, startTcpEcho, type TcpServer } from '../helpers/upstreams.js';
import { nativeRelayAvailable, nativeRelayUnavailableReason } from '../../src/runtime/chain/native-relay.js';
import { decodeSslTlvs, parseProxyHeader } from '../../src/runtime/listener/proxy-protocol.js';
import { accessEntry, captureHello, dial, promMetric as metric, tlsExchange, until, within } from '../helpers/tls-wire.js';

const SKIP = nativeRelayAvailable() ? false : `native relay not built: ${nativeRelayUnavailableReason()}`;

interface Mode { label: string; slug: string; env: NodeJS.ProcessEnv }
// Both modes use the native relay and native connect; only who accepts differs.
const MODES: readonly Mode[] = [
  { label: 'native accept', slug: 'native', env: { TLSGATE_NATIVE_ACCEPT: '1', TLSGATE_NATIVE_CONNECT: '1' } },
  { label: 'Node accept (TLSGATE_NATIVE_ACCEPT=0)', slug: 'node', env: { TLSGATE_NATIVE_ACCEPT: '0', TLSGATE_NATIVE_CONNECT: '1' } },
];
const BANNER = '220 tlsgate-test ready\r\n';

// ---------------------------------------------------------------- small tools

const downOf = (s: net.Socket): string => `127.0.0.1:${s.localPort}`;

/** Everything the socket receives until the gateway ends it (FIN or reset); rejects after `ms`. */
function untilClosed(s: net.Socket, ms = 5_000): Promise<{ data: Buffer; ms: number }> {
  const started = Date.now();
  const chunks: Buffer[] = [];
  s.on('data', (c: Buffer) => { if (chunks.length < 64) chunks.push(c); });
  return within(new Promise((resolve) => {
    const done = () => resolve({ data: Buffer.concat(chunks), ms: Date.now() - started });
    if (s.destroyed || s.readableEnded) done();
    s.once('end', done);
    s.once('close', done);
  }), ms, 'the gateway closing the connection');
}

/** The gateway ended its side (FIN: our sockets are half-open capable) or the socket closed. */
function endedOrClosed(s: net.Socket): Promise<void> {
  return new Promise((resolve) => { s.once('end', resolve); s.once('close', resolve); });
}

/**
 * `hello` grown by a padding extension (RFC 7685) of `pad` bytes, its handshake message cut into
 * records of at most 16 KiB: a large, multi-record ClientHello that is still valid.
 */
function paddedHello(hello: Buffer, pad: number): Buffer {
  const body = Buffer.from(hello.subarray(9)); // after the record header (5) and handshake header (4)
  let off = 2 + 32; // legacy_version, random
  off += 1 + body[off]!; // session id
  off += 2 + body.readUInt16BE(off); // cipher suites
  off += 1 + body[off]!; // compression methods
  const padding = Buffer.alloc(4 + pad);
  padding.writeUInt16BE(21, 0);
  padding.writeUInt16BE(pad, 2);
  const grown = Buffer.concat([body, padding]);
  grown.writeUInt16BE(body.readUInt16BE(off) + padding.length, off);
  const msg = Buffer.concat([Buffer.from([1, grown.length >> 16, (grown.length >> 8) & 0xff, grown.length & 0xff]), grown]);
  const records: Buffer[] = [];
  for (let i = 0; i < msg.length; i += 16384) {
    const frag = msg.subarray(i, i + 16384);
    records.push(Buffer.from([0x16, hello[1]!, hello[2]!, frag.length >> 8, frag.length & 0xff]), frag);
  }
  return Buffer.concat(records);
}

function httpsGet(port: number, servername: string, ca: string): Promise<{ status: number; body: string }> {
  return within(new Promise((resolve, reject) => {
    const req = https.get({ host: '127.0.0.1', port, servername, ca, path: '/', headers: { host: servername }, agent: false }, (res) => {
      let body = '';
      res.on('data', (c: Buffer) => { body += c.toString(); });
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
      res.on('error', reject);
    });
    req.on('error', reject);
  }), 5_000, `GET https://${servername}`);
}

interface Recorded { size: number; chunks: Buffer[]; ended: Promise<Buffer>; socket: net.Socket }
interface Recorder { port: number; conns: Recorded[]; close(): void }

/** A plain TCP upstream recording each connection's bytes; on the client's FIN it answers `got <n>` and closes. */
async function startRecorder(): Promise<Recorder> {
  const conns: Recorded[] = [];
  const server = net.createServer({ allowHalfOpen: true }, (socket) => {
    socket.on('error', () => {});
    const r: Recorded = { size: 0, chunks: [], socket, ended: Promise.resolve(Buffer.alloc(0)) };
    r.ended = new Promise((resolve) => {
      socket.on('data', (c: Buffer) => { if (r.size < 1 << 20) { r.chunks.push(c); r.size += c.length; } });
      socket.once('end', () => { const all = Buffer.concat(r.chunks); socket.end(`got ${all.length}\n`); resolve(all); });
    });
    conns.push(r);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return { port: (server.address() as net.AddressInfo).port, conns, close: () => { server.close(); for (const c of conns) c.socket.destroy(); } };
}

const entryFor = accessEntry;

async function configGeneration(gw: Gateway): Promise<{ generation: number; lastApply: { ok: boolean } }> {
  return JSON.parse((await gw.admin('/config_dump')).body) as { generation: number; lastApply: { ok: boolean } };
}

// ---------------------------------------------------------------- config

/** A MESH_EXTERNAL ServiceEntry for `host` with the endpoint 127.0.0.1. */
function serviceEntry(host: string, port: number, protocol: 'TLS' | 'TCP'): string {
  return localServiceEntry(host.split('.')[0]!, host, port, protocol);
}

/** One port: PASSTHROUGH for each `sni → upstream host`, and SIMPLE termination of term.example.com to echo.local. */
function sharedPort(name: string, port: number, pass: Record<string, string>, term: KeyPair): string {
  const hosts = Object.keys(pass);
  return `apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: ${name}}
spec:
  servers:
  - port: {number: ${port}, name: tls-pass, protocol: TLS}
    tls: {mode: PASSTHROUGH}
    hosts: [${hosts.join(', ')}]
  - port: {number: ${port}, name: tls-term, protocol: TLS}
    tls: {mode: SIMPLE, serverCertificate: ${term.cert}, privateKey: ${term.key}}
    hosts: [term.example.com]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ${name}-pass}
spec:
  hosts: [${hosts.join(', ')}]
  gateways: [${name}]
  tls:
${hosts.map((h) => `  - match: [{sniHosts: [${h}]}]\n    route: [{destination: {host: ${pass[h]}}}]\n`).join('')}---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ${name}-term}
spec:
  hosts: [term.example.com]
  gateways: [${name}]
  tcp: [{route: [{destination: {host: echo.local}}]}]
`;
}

/** The reloaded port: TLS PASSTHROUGH of a.example.com, or a plain TCP server toward the banner upstream. */
/** An HTTPS port: term.example.com terminated with a direct response, b.example.com passed through. */
function httpsPort(port: number, term: KeyPair): string {
  return `apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: web}
spec:
  servers:
  - port: {number: ${port}, name: https-term, protocol: HTTPS}
    tls: {mode: SIMPLE, serverCertificate: ${term.cert}, privateKey: ${term.key}}
    hosts: [term.example.com]
  - port: {number: ${port}, name: https-pass, protocol: HTTPS}
    tls: {mode: PASSTHROUGH}
    hosts: [b.example.com]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web-http}
spec:
  hosts: [term.example.com]
  gateways: [web]
  http: [{directResponse: {status: 200, body: {string: "terminated over https"}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web-pass}
spec:
  hosts: [b.example.com]
  gateways: [web]
  tls:
  - match: [{sniHosts: [b.example.com]}]
    route: [{destination: {host: b.upstream.local}}]
`;
}

function reloadConfig(port: number, kind: 'passthrough' | 'tcp'): string {
  const server = kind === 'passthrough'
    ? `  - port: {number: ${port}, name: tls, protocol: TLS}\n    tls: {mode: PASSTHROUGH}\n    hosts: [a.example.com]\n`
    : `  - port: {number: ${port}, name: tcp, protocol: TCP}\n    hosts: ["*"]\n`;
  const routes = kind === 'passthrough'
    ? `  hosts: [a.example.com]\n  gateways: [reload]\n  tls:\n  - match: [{sniHosts: [a.example.com]}]\n    route: [{destination: {host: a.upstream.local}}]\n`
    : `  hosts: ["*"]\n  gateways: [reload]\n  tcp: [{route: [{destination: {host: banner.local}}]}]\n`;
  return `apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: reload}
spec:
  servers:
${server}---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reload}
spec:
${routes}`;
}

// ---------------------------------------------------------------- the tests

describe('native accept', { skip: SKIP }, () => {
  let dir: string;
  let upstreamCa: Ca;
  let gatewayCa: Ca;
  let termCert: KeyPair;
  let tlsA: TcpServer;
  let tlsB: TcpServer;
  let echo: TcpServer;
  let banner: TcpServer;
  let rec: Recorder;
  let hold: Recorder;
  const hellos: Record<'rec' | 'pp' | 'dns' | 'hold' | 'unknown' | 'none', Buffer> = {} as never;
  /** What each mode saw, compared at the end. */
  const seen = new Map<string, { passthrough: Record<string, unknown>[]; reasons: Record<string, unknown> }>();

  before(async () => {
    dir = await certDir('tlsgate-native-accept-');
    upstreamCa = await makeCa(dir, 'upstream-ca', '/O=native accept upstreams/CN=na-upstream-ca');
    gatewayCa = await makeCa(dir, 'gateway-ca', '/O=native accept gateway/CN=na-gateway-ca');
    const a = await makeLeaf(dir, upstreamCa, 'a', { cn: 'a.example.com', sans: ['DNS:a.example.com'], serial: 2 });
    const b = await makeLeaf(dir, upstreamCa, 'b', { cn: 'b.example.com', sans: ['DNS:b.example.com'], serial: 3 });
    termCert = await makeLeaf(dir, gatewayCa, 'term', { cn: 'term.example.com', sans: ['DNS:term.example.com'], serial: 4 });
    tlsA = await startTcpEcho({ tls: { cert: a.cert, key: a.key } });
    tlsB = await startTcpEcho({ tls: { cert: b.cert, key: b.key } });
    echo = await startTcpEcho();
    banner = await startServerFirst({ banner: BANNER });
    rec = await startRecorder();
    hold = await startRecorder();
    hellos.rec = await captureHello('rec.example.com');
    hellos.pp = await captureHello('pp.example.com');
    hellos.dns = await captureHello('dns.example.com');
    hellos.hold = await captureHello('hold.example.com');
    hellos.unknown = await captureHello('unknown.example.com');
    hellos.none = await captureHello(undefined);
  });

  after(async () => {
    rec?.close();
    hold?.close();
    await Promise.all([tlsA?.close(), tlsB?.close(), echo?.close(), banner?.close()]);
    await rm(dir, { recursive: true, force: true });
  });

  /** Every upstream the configs name (a.upstream.local, …), with pp.upstream.local asking for PROXY v2. */
  const services = (): string => [
    serviceEntry('a.upstream.local', tlsA.port, 'TLS'), serviceEntry('b.upstream.local', tlsB.port, 'TLS'),
    serviceEntry('rec.upstream.local', rec.port, 'TLS'), serviceEntry('pp.upstream.local', rec.port, 'TLS'),
    serviceEntry('hold.upstream.local', hold.port, 'TLS'), serviceEntry('echo.local', echo.port, 'TCP'),
    serviceEntry('banner.local', banner.port, 'TCP'),
    // A name to resolve: the addon cannot dial it, so the connection is adopted and Node dials.
    serviceEntry('dns.upstream.local', rec.port, 'TLS').replace('resolution: STATIC', 'resolution: DNS').replace('127.0.0.1', 'localhost'),
    `apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: pp
  annotations:
    tlsgate.io/proxy-protocol: v2
spec:
  host: pp.upstream.local
`,
  ].join('---\n');

  async function configDir(name: string, files: Record<string, string>): Promise<string> {
    const cfg = path.join(dir, name);
    await mkdir(cfg, { recursive: true });
    await writeFile(path.join(cfg, 'services.yaml'), services());
    for (const [f, text] of Object.entries(files)) await writeFile(path.join(cfg, f), text);
    return cfg;
  }

  for (const mode of MODES) {
    describe(mode.label, () => {
      let gw: Gateway;
      let P: number;
      let R: number;
      let H: number;
      let cfg: string;
      const reasons: Record<string, unknown> = {};
      const passthrough: Record<string, unknown>[] = [];

      before(async () => {
        [P, R, H] = await freePorts(3) as [number, number, number];
        cfg = await configDir(`main-${mode.slug}`, {
          'main.yaml': sharedPort('main', P, {
            'a.example.com': 'a.upstream.local', 'b.example.com': 'b.upstream.local',
            'rec.example.com': 'rec.upstream.local', 'pp.example.com': 'pp.upstream.local', 'dns.example.com': 'dns.upstream.local',
          }, termCert),
          'reload.yaml': reloadConfig(R, 'passthrough'),
          'https.yaml': httpsPort(H, termCert),
        });
        gw = await startTlsgate({
          configPaths: [cfg], env: mode.env,
          args: ['--relay', 'native', '--client-hello-timeout', '10s', '--drain-timeout', '1s'],
        });
        seen.set(mode.label, { passthrough, reasons });
      });
      after(async () => { await gw?.stop(); });

      it('starts on the native relay, with no listener falling back to Node accept', async () => {
        const serving = await gw.waitForLog((l) => l.includes('tlsgate serving'));
        assert.equal((JSON.parse(serving) as { relay: string }).relay, 'native');
        assert.ok(!gw.logs().some((l) => l.includes('native accept unavailable')), gw.logs().join('\n'));
      });

      it('SNI passthrough to two TLS upstreams: their certificates, echo, exact access-log bytes', async () => {
        for (const [host, up] of [['a.example.com', tlsA], ['b.example.com', tlsB]] as const) {
          const connectionsBefore = up.connections;
          const x = await tlsExchange(P, host, upstreamCa.certPem, `hello ${host}\n`);
          assert.equal(x.cn, host);
          assert.equal(x.issuer, 'na-upstream-ca');
          assert.ok(x.authorized, 'the upstream certificate verifies against the upstream CA');
          assert.equal(x.reply, `hello ${host}\n`);
          assert.equal(up.connections, connectionsBefore + 1);
          const e = await entryFor(gw, x.down, 'tcp');
          const short = host.split('.')[0]!;
          assert.equal(e.reason, 'ok');
          assert.equal(e.sni, host);
          assert.equal(e.listener, `127.0.0.1_${P}`);
          assert.equal(e.cluster, `outbound|${up.port}||${short}.upstream.local`);
          assert.match(String(e.route), /main-pass/);
          assert.equal(e.upstream, `127.0.0.1:${up.port}`);
          // Passthrough: every byte the client wrote went upstream, and everything back reached it.
          assert.deepEqual([e.bytesReceived, e.bytesSent, e.upstreamBytesSent, e.upstreamBytesReceived], [x.written, x.read, x.written, x.read]);
          assert.ok(x.written > 200 && x.read > 500, `wire bytes ${x.written}/${x.read}`);
          passthrough.push(e);
        }
      });

      it('a ClientHello written one byte at a time routes before any FIN; the upstream gets it byte for byte', { timeout: 30_000 }, async () => {
        const hello = hellos.rec;
        const n = rec.conns.length;
        const s = await dial(P);
        const down = downOf(s);
        for (let i = 0; i < hello.length; i++) {
          s.write(hello.subarray(i, i + 1));
          await sleep(1);
        }
        // Well inside the 10 s hello timeout: routed because the hello was complete, not because it ended.
        const up = await until('upstream connection with the whole hello', () =>
          rec.conns.length > n && rec.conns[n]!.size >= hello.length ? rec.conns[n] : undefined, 5_000);
        const reply = untilClosed(s);
        s.end();
        assert.ok((await within(up.ended, 5_000, 'upstream FIN')).equals(hello));
        assert.equal((await reply).data.toString(), `got ${hello.length}\n`);
        const e = await entryFor(gw, down, 'tcp');
        assert.equal(e.reason, 'ok');
        assert.equal(e.sni, 'rec.example.com');
        assert.deepEqual([e.bytesReceived, e.upstreamBytesSent, e.bytesSent], [hello.length, hello.length, `got ${hello.length}\n`.length]);
      });

      it('unknown SNI: an unrecognized_name alert, then the close; no SNI: counted as sni_not_found', async () => {
        const s = await dial(P);
        const down = downOf(s);
        s.write(hellos.unknown);
        const { data } = await untilClosed(s);
        // alert record: 15 03 0x 00 02, level fatal (2), description 112 unrecognized_name
        assert.ok(data.length >= 7, `got ${data.toString('hex')}`);
        assert.deepEqual([data[0], data[1], data[3], data[4], data[5], data[6]], [0x15, 0x03, 0x00, 0x02, 0x02, 112]);
        const e = await entryFor(gw, down, 'connection');
        assert.equal(e.sni, 'unknown.example.com');
        reasons.unknownSni = e.reason;
        assert.equal(e.reason, 'no_sni_match');

        const notFound = await metric(gw, 'tls_inspector_sni_not_found_total', { listener: `127.0.0.1_${P}` });
        const s2 = await dial(P);
        const down2 = downOf(s2);
        s2.write(hellos.none);
        const closed = await untilClosed(s2);
        assert.equal(closed.data.length > 0 ? closed.data[0] : 0x15, 0x15, 'nothing but an alert comes back');
        const e2 = await entryFor(gw, down2, 'connection');
        assert.equal(e2.sni, undefined);
        reasons.noSni = e2.reason;
        assert.equal(e2.reason, 'no_sni');
        await until('tls_inspector_sni_not_found_total to move', async () =>
          (await metric(gw, 'tls_inspector_sni_not_found_total', { listener: `127.0.0.1_${P}` })) === notFound + 1 ? true : undefined, 3_000);
      });

      it('termination (SIMPLE) and PASSTHROUGH share the port: each SNI gets its own certificate, both at once', async () => {
        const [term, pass] = await Promise.all([
          tlsExchange(P, 'term.example.com', gatewayCa.certPem, 'terminated here\n'),
          tlsExchange(P, 'a.example.com', upstreamCa.certPem, 'passed through\n'),
        ]);
        assert.deepEqual([term.cn, term.issuer, term.authorized, term.reply], ['term.example.com', 'na-gateway-ca', true, 'terminated here\n']);
        assert.deepEqual([pass.cn, pass.issuer, pass.authorized, pass.reply], ['a.example.com', 'na-upstream-ca', true, 'passed through\n']);
        const e = await entryFor(gw, term.down, 'tcp');
        assert.equal(e.reason, 'ok');
        assert.equal(e.sni, 'term.example.com');
        assert.equal(e.tlsVersion, 'TLSv1.3');
        assert.equal(e.cluster, `outbound|${echo.port}||echo.local`);
        // Plaintext both ways upstream: the line, and its echo.
        // Terminated: plaintext byte counts, the line each way.
        assert.deepEqual([e.bytesReceived, e.bytesSent, e.upstreamBytesSent, e.upstreamBytesReceived], Array(4).fill('terminated here\n'.length));
        const p = await entryFor(gw, pass.down, 'tcp');
        assert.equal(p.sni, 'a.example.com');
        assert.equal(p.tlsVersion, undefined);
      });

      it('HTTPS: termination with an HTTP route and PASSTHROUGH on one port', async () => {
        const res = await httpsGet(H, 'term.example.com', gatewayCa.certPem);
        assert.deepEqual(res, { status: 200, body: 'terminated over https' });
        const e = await until('the HTTP access-log entry', () =>
          gw.accessLogs().find((x) => x.listener === `127.0.0.1_${H}` && x.status === 200));
        assert.equal(e.sni, 'term.example.com');
        assert.equal(e.authority, 'term.example.com');
        const pass = await tlsExchange(H, 'b.example.com', upstreamCa.certPem);
        assert.deepEqual([pass.cn, pass.issuer, pass.reply], ['b.example.com', 'na-upstream-ca', 'ping\n']);
      });

      it('a 40 kB ClientHello over three records reaches the upstream byte for byte', async () => {
        const big = paddedHello(hellos.rec, 40_000);
        assert.ok(big.length > 40_000 && big[5 + 16384] === 0x16, 'three records');
        const n = rec.conns.length;
        const s = await dial(P);
        const down = downOf(s);
        s.write(big);
        const up = await until('upstream connection with the whole hello', () =>
          rec.conns.length > n && rec.conns[n]!.size >= big.length ? rec.conns[n] : undefined, 5_000);
        const reply = untilClosed(s);
        s.end();
        assert.ok((await within(up.ended, 5_000, 'upstream FIN')).equals(big));
        assert.equal((await reply).data.toString(), `got ${big.length}\n`);
        const e = await entryFor(gw, down, 'tcp');
        assert.deepEqual([e.reason, e.sni, e.bytesReceived, e.upstreamBytesSent], ['ok', 'rec.example.com', big.length, big.length]);
      });

      it('40 concurrent connections, each hello followed by its own bytes: every reply matches its client', async () => {
        const results = await Promise.all(Array.from({ length: 40 }, async (_, i) => {
          const s = await dial(P);
          const reply = untilClosed(s, 10_000);
          s.end(Buffer.concat([hellos.rec, randomBytes(i * 13)]));
          return { want: `got ${hellos.rec.length + i * 13}\n`, got: (await reply).data.toString() };
        }));
        for (const r of results) assert.equal(r.got, r.want);
      });

      it('hostile first bytes (not TLS, a 16 MB hello claim, a truncated hello then FIN) are closed; the gateway keeps serving', async () => {
        const probe = async (bytes: Buffer, fin: boolean) => {
          const s = await dial(P);
          const down = downOf(s);
          s.write(bytes);
          if (fin) s.end();
          const closed = await untilClosed(s);
          s.destroy();
          return { data: closed.data, entry: await entryFor(gw, down, 'connection') };
        };
        const noise = randomBytes(300);
        noise[0] = 0x47; // anything but a handshake record
        const notTls = await probe(noise, false);
        assert.equal(notTls.data.length, 0);
        reasons.notTls = notTls.entry.reason;
        assert.equal(notTls.entry.reason, 'not_tls');

        // A handshake header claiming 0xFFFFFF bytes, and a little of it.
        const huge = await probe(Buffer.concat([Buffer.from([0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0xff, 0xff, 0xff]), randomBytes(200)]), false);
        assert.equal(huge.data[0], 0x15, 'a handshake_failure alert first');
        assert.equal(huge.data[6], 40);
        reasons.tooLarge = huge.entry.reason;
        assert.equal(huge.entry.reason, 'client_hello_too_large');

        const truncated = await probe(hellos.rec.subarray(0, 60), true);
        assert.equal(truncated.data.length, 0);
        reasons.truncatedFin = truncated.entry.reason;
        assert.equal(truncated.entry.reason, 'downstream_closed_early');

        // A reset mid-hello: counted and logged as an early close in both modes.
        const connections = await metric(gw, 'downstream_connections_total', { listener: `127.0.0.1_${P}` });
        const r = await dial(P);
        const rDown = downOf(r);
        r.write(hellos.rec.subarray(0, 60));
        await sleep(50);
        r.resetAndDestroy();
        await until('the reset connection counted', async () =>
          (await metric(gw, 'downstream_connections_total', { listener: `127.0.0.1_${P}` })) > connections ? true : undefined, 5_000);
        reasons.resetMidHello = (await entryFor(gw, rDown, 'connection')).reason;
        assert.equal(reasons.resetMidHello, 'downstream_closed_early');

        assert.ok(await metric(gw, 'tls_inspector_tls_not_found_total') >= 1);
        assert.ok(await metric(gw, 'tls_inspector_client_hello_too_large_total') >= 1);
        assert.ok(gw.running);
        const good = await tlsExchange(P, 'b.example.com', upstreamCa.certPem, 'still serving\n');
        assert.equal(good.reply, 'still serving\n');
      });

      it('PROXY v2 toward the upstream: the real client address and SNI, then the exact ClientHello', async () => {
        const n = rec.conns.length;
        const s = await dial(P);
        const down = downOf(s);
        s.write(hellos.pp);
        const up = await until('upstream connection', () => rec.conns[n], 5_000);
        const h = await until('a whole PROXY header and hello', () => {
          const st = parseProxyHeader(Buffer.concat(up.chunks));
          return st.kind === 'proxy' && up.size >= st.headerLength + hellos.pp.length ? st : undefined;
        }, 5_000);
        assert.equal(h.version, 2);
        assert.equal(h.command, 'PROXY');
        assert.deepEqual(h.source, { address: '127.0.0.1', port: s.localPort });
        assert.deepEqual(h.destination, { address: '127.0.0.1', port: P });
        assert.equal(decodeSslTlvs(h.tlvs).authority, 'pp.example.com');
        const reply = untilClosed(s);
        s.end();
        const all = await within(up.ended, 5_000, 'upstream FIN');
        assert.ok(all.subarray(h.headerLength).equals(hellos.pp), 'the hello follows the header, byte for byte');
        assert.equal((await reply).data.toString(), `got ${all.length}\n`);
        const e = await entryFor(gw, down, 'tcp');
        assert.equal(e.reason, 'ok');
        assert.deepEqual([e.bytesReceived, e.upstreamBytesSent], [hellos.pp.length, h.headerLength + hellos.pp.length]);
      });

      it('a client that sends its hello and half-closes at once: the upstream gets both, and its reply still arrives', async () => {
        const n = rec.conns.length;
        const s = await dial(P);
        const down = downOf(s);
        const reply = untilClosed(s);
        s.end(hellos.rec);
        const up = await until('upstream connection', () => rec.conns[n], 5_000);
        assert.ok((await within(up.ended, 5_000, 'upstream FIN')).equals(hellos.rec));
        assert.equal((await reply).data.toString(), `got ${hellos.rec.length}\n`);
        const e = await entryFor(gw, down, 'tcp');
        assert.equal(e.reason, 'ok');
        assert.equal(e.sni, 'rec.example.com');
        assert.deepEqual([e.bytesReceived, e.bytesSent, e.upstreamBytesSent, e.upstreamBytesReceived],
          [hellos.rec.length, `got ${hellos.rec.length}\n`.length, hellos.rec.length, `got ${hellos.rec.length}\n`.length]);
      });

      it('passthrough to a DNS-named endpoint (adopted, Node dials): the upstream gets the hello; access-log bytes exact', async (t) => {
        const names = await lookup('localhost', { all: true });
        if (names.some((a) => a.address !== '127.0.0.1')) {
          t.skip(`localhost resolves to ${names.map((a) => a.address).join(', ')}; the upstream listens on 127.0.0.1 only`);
          return;
        }
        const n = rec.conns.length;
        const s = await dial(P);
        const down = downOf(s);
        s.write(hellos.dns);
        const up = await until('upstream connection with the whole hello', () =>
          rec.conns.length > n && rec.conns[n]!.size >= hellos.dns.length ? rec.conns[n] : undefined, 5_000);
        const reply = untilClosed(s);
        s.end();
        assert.ok((await within(up.ended, 5_000, 'upstream FIN')).equals(hellos.dns));
        const answer = `got ${hellos.dns.length}\n`;
        assert.equal((await reply).data.toString(), answer);
        const e = await entryFor(gw, down, 'tcp');
        assert.equal(e.reason, 'ok');
        assert.equal(e.sni, 'dns.example.com');
        assert.equal(e.upstream, `127.0.0.1:${rec.port}`);
        assert.deepEqual([e.bytesReceived, e.bytesSent, e.upstreamBytesSent, e.upstreamBytesReceived],
          [hellos.dns.length, answer.length, hellos.dns.length, answer.length]);
      });

      // Last on this gateway: it rewrites the config.
      it('reload: the PASSTHROUGH port becomes a plain TCP port whose upstream speaks first, and back', { timeout: 30_000 }, async () => {
        const first = await tlsExchange(R, 'a.example.com', upstreamCa.certPem);
        assert.equal(first.cn, 'a.example.com');
        // A passthrough connection open across both swaps keeps working.
        const open = tls.connect({ host: '127.0.0.1', port: R, servername: 'a.example.com', ca: upstreamCa.certPem });
        open.on('error', () => {});
        try {
          await within(once(open, 'secureConnect'), 5_000, 'handshake');
          const echoLine = async (line: string) => {
            const got = within(once(open, 'data'), 5_000, 'echo on the open connection');
            open.write(line);
            assert.equal(String((await got)[0]), line);
          };
          await echoLine('before\n');

          const apply = async (kind: 'passthrough' | 'tcp') => {
            const g0 = (await configGeneration(gw)).generation;
            await writeFile(path.join(cfg, 'reload.yaml'), reloadConfig(R, kind));
            await until('the edit applied', async () => {
              const g = await configGeneration(gw);
              return g.generation > g0 && g.lastApply.ok ? true : undefined;
            }, 15_000);
          };
          await apply('tcp');
          // Nothing sent: the banner must come from the upstream, through the port Node took back.
          const s = await dial(R);
          const got = await within(new Promise<string>((resolve) => {
            let text = '';
            s.on('data', (c: Buffer) => { text += c.toString(); if (text.length >= BANNER.length) resolve(text); });
          }), 2_000, 'the banner');
          assert.equal(got, BANNER);
          s.destroy();
          await echoLine('across the swap\n');
          // The main port was reconfigured by the same reload and still serves.
          assert.equal((await tlsExchange(P, 'a.example.com', upstreamCa.certPem)).cn, 'a.example.com');

          await apply('passthrough');
          assert.equal((await tlsExchange(R, 'a.example.com', upstreamCa.certPem, 'again\n')).reply, 'again\n');
          await echoLine('after both swaps\n');
        } finally {
          open.destroy();
        }
      });

      describe('limits: --max-connections 3, --client-hello-timeout 600ms', () => {
        let lg: Gateway;
        let L: number;
        const overflow = () => metric(lg, 'downstream_connections_refused_total', { listener: `127.0.0.1_${L}`, reason: 'listener_overflow' });

        before(async () => {
          [L] = await freePorts(1) as [number];
          const lcfg = await configDir(`limits-${mode.slug}`, { 'limits.yaml': sharedPort('limits', L, { 'hold.example.com': 'hold.upstream.local' }, termCert) });
          lg = await startTlsgate({
            configPaths: [lcfg], env: mode.env,
            args: ['--relay', 'native', '--max-connections', '3', '--client-hello-timeout', '600ms', '--drain-timeout', '1s'],
          });
        });
        after(async () => { await lg?.stop(); });

        it('silent, stopped mid-hello, or dripping a byte every 100 ms: closed at the hello timeout and logged', async () => {
          for (const [what, bytes] of [['silent', undefined], ['partial hello', hellos.hold.subarray(0, 20)], ['dripping hello', undefined]] as const) {
            const s = await dial(L);
            const down = downOf(s);
            if (bytes) s.write(bytes);
            // One byte every 100 ms: bytes arriving do not push the deadline back.
            let drip: NodeJS.Timeout | undefined;
            let i = 0;
            if (what === 'dripping hello') drip = setInterval(() => { if (i < 60 && !s.destroyed) s.write(hellos.hold.subarray(i, ++i)); }, 100);
            const closed = await untilClosed(s, 6_000).finally(() => clearInterval(drip));
            assert.equal(closed.data.length, 0, what);
            assert.ok(closed.ms >= 500, `${what}: closed after ${closed.ms} ms, before the 600 ms timeout`);
            const e = await entryFor(lg, down, 'connection');
            reasons[`helloTimeout ${what}`] = e.reason;
            assert.equal(e.reason, 'client_hello_timeout');
            // The entry covers the connection from its accept, not from the moment it was given up on.
            assert.ok(typeof e.durationMs === 'number' && e.durationMs >= 500, `${what}: logged durationMs ${String(e.durationMs)}`);
          }
        });

        /** One connection: 'held' once it works end to end, 'closed' when the gateway ends it first. */
        type Attempt = { outcome: 'held' | 'closed' | 'timeout'; close(): void; closed: Promise<unknown>; down: string };

        const holdPassthrough = async (): Promise<Attempt> => {
          const n = hold.conns.length;
          const s = await dial(L);
          const down = downOf(s);
          const closed = endedOrClosed(s);
          s.write(hellos.hold);
          const outcome = await new Promise<Attempt['outcome']>((resolve) => {
            const poll = setInterval(() => { if (hold.conns.length > n && hold.conns[n]!.size >= hellos.hold.length) done('held'); }, 10);
            const timer = setTimeout(() => done('timeout'), 5_000);
            const done = (o: Attempt['outcome']) => { clearInterval(poll); clearTimeout(timer); resolve(o); };
            s.once('end', () => done('closed'));
            s.once('close', () => done('closed'));
            s.resume();
          });
          return { outcome, close: () => s.destroy(), closed, down };
        };

        const holdTerminated = async (): Promise<Attempt> => {
          const raw = await dial(L);
          const down = downOf(raw);
          const s = tls.connect({ socket: raw, servername: 'term.example.com', ca: gatewayCa.certPem });
          s.on('error', () => {});
          // The TLSSocket owns the connection now: its events are the ones that fire.
          const closed = endedOrClosed(s);
          const outcome = await new Promise<Attempt['outcome']>((resolve) => {
            const timer = setTimeout(() => done('timeout'), 5_000);
            const done = (o: Attempt['outcome']) => { clearTimeout(timer); resolve(o); };
            s.once('secureConnect', () => { s.write('held\n'); s.once('data', () => done('held')); });
            void closed.then(() => done('closed'));
          });
          return { outcome, close: () => { s.destroy(); raw.destroy(); }, closed, down };
        };

        /** A slot freed by a close is seen by the gateway a moment later: retry while refused. */
        const holdWithRetry = async (attempt: () => Promise<Attempt>): Promise<Attempt> => {
          const deadline = Date.now() + 10_000;
          for (;;) {
            const a = await attempt();
            if (a.outcome === 'held') return a;
            a.close();
            if (a.outcome === 'timeout' || Date.now() > deadline) assert.fail(`no slot came back: ${a.outcome}`);
            await sleep(50);
          }
        };

        const limitRound = async (attempt: () => Promise<Attempt>, upstreamCount: () => number) => {
          const held: Attempt[] = [];
          try {
            for (let round = 0; round < 2; round++) {
              for (let i = 0; i < 3; i++) held.push(await holdWithRetry(attempt));
              const refusedBefore = await overflow();
              const ups = upstreamCount();
              const fourth = await attempt();
              fourth.close();
              assert.equal(fourth.outcome, 'closed', `round ${round}: the 4th connection`);
              // Counted, refused before any routing: no upstream connection and no access-log entry.
              await until('listener_overflow counted', async () => (await overflow()) > refusedBefore ? true : undefined, 5_000);
              assert.equal(upstreamCount(), ups);
              assert.equal(lg.accessLogs().filter((e) => e.downstream === fourth.down).length, 0);
              // Closing the held ones gives the three slots back (round 1 proves nothing leaked).
              for (const h of held.splice(0)) h.close();
            }
          } finally {
            for (const h of held) h.close();
          }
        };

        it('fast path (passthrough to a plain upstream): 3 held, the 4th refused and counted, then 3 again', { timeout: 60_000 }, async () => {
          await limitRound(holdPassthrough, () => hold.conns.length);
        });

        it('adopted (terminated on the same port): 3 held, the 4th refused and counted, then 3 again', { timeout: 60_000 }, async () => {
          await limitRound(holdTerminated, () => echo.connections);
        });

        // Last on this gateway: it stops it.
        it('SIGTERM: a relayed and an adopted connection still open are closed after --drain-timeout, logged, exit 0', { timeout: 30_000 }, async () => {
          const pass = await holdWithRetry(holdPassthrough);
          const term = await holdWithRetry(holdTerminated);
          try {
            assert.equal(await lg.stop('SIGTERM'), 0);
            await within(pass.closed, 5_000, 'the relayed client closed');
            await within(term.closed, 5_000, 'the adopted client closed');
            const logged = async (down: string) => (await entryFor(lg, down, 'tcp')).reason;
            assert.deepEqual([await logged(pass.down), await logged(term.down)], ['ok', 'ok']);
          } finally {
            pass.close();
            term.close();
          }
        });
      });

      describe('--workers 2', () => {
        let wg: Gateway;
        let W: number;
        before(async () => {
          [W] = await freePorts(1) as [number];
          const wcfg = await configDir(`workers-${mode.slug}`, { 'workers.yaml': sharedPort('workers', W, { 'a.example.com': 'a.upstream.local' }, termCert) });
          wg = await startTlsgate({ configPaths: [wcfg], env: mode.env, args: ['--relay', 'native', '--workers', '2', '--drain-timeout', '1s'] });
        });
        after(async () => { await wg?.stop(); });

        it('20 sequential passthrough connections all reach the upstream and are logged', { timeout: 60_000 }, async () => {
          const workers = JSON.parse((await wg.admin('/workers')).body) as { ready: boolean }[];
          assert.equal(workers.length, 2);
          assert.ok(workers.every((w) => w.ready));
          const before = tlsA.connections;
          const downs: string[] = [];
          for (let i = 0; i < 20; i++) {
            const x = await tlsExchange(W, 'a.example.com', upstreamCa.certPem, `n${i}\n`);
            assert.deepEqual([x.cn, x.reply], ['a.example.com', `n${i}\n`]);
            downs.push(x.down);
          }
          assert.equal(tlsA.connections, before + 20);
          const entries = await until('20 access-log entries', () => {
            const mine = wg.accessLogs().filter((e) => e.kind === 'tcp' && e.listener === `127.0.0.1_${W}`);
            return mine.length >= 20 ? mine : undefined;
          });
          assert.deepEqual([...new Set(entries.map((e) => e.reason))], ['ok']);
          assert.equal(new Set(entries.map((e) => e.downstream)).size, new Set(downs).size);
        });
      });
    });
  }

  it('both modes logged the same things', () => {
    const [a, b] = MODES.map((m) => seen.get(m.label));
    assert.ok(a && b, 'both modes ran');
    assert.deepEqual(a.reasons, b.reasons);
    assert.equal(a.passthrough.length, 2);
    assert.equal(b.passthrough.length, 2);
    for (let i = 0; i < 2; i++) {
      const x: Record<string, unknown> = a.passthrough[i]!;
      const y: Record<string, unknown> = b.passthrough[i]!;
      assert.deepEqual(Object.keys(x).sort(), Object.keys(y).sort());
      for (const k of ['kind', 'sni', 'route', 'cluster', 'upstream', 'reason']) assert.equal(x[k], y[k], k);
      // The same TLS exchange with the same certificates: the same wire bytes, give or take a few.
      for (const k of ['bytesReceived', 'bytesSent']) {
        assert.ok(Math.abs(Number(x[k]) - Number(y[k])) <= 64, `${k}: ${String(x[k])} vs ${String(y[k])}`);
      }
    }
  });
});
