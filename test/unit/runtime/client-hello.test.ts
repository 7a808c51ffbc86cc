import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { readFileSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import tls from 'node:tls';
import { promisify } from 'node:util';
import {
  parseClientHello,
  readClientHello,
  RECORD_HEADER_LENGTH,
  type ClientHelloInfo,
  type ClientHelloResult,
  type ParseState,
} from '../../../src/runtime/listener/client-hello.js';
import { ALERT_UNRECOGNIZED_NAME, AlertDescription, tlsAlert } from '../../../src/runtime/listener/tls-alert.js';
import { alpnExt, ext, frameHandshake as frame, helloMsg, sniExt, u16, u24, u8 } from '../../helpers/tls-wire.js';

const execFileP = promisify(execFile);
const FIXTURES = new URL('../../../../test/fixtures/client-hello/', import.meta.url);
const MAX = 16384;

function fixture(name: string): Buffer {
  return Buffer.from(readFileSync(new URL(`${name}.hex`, FIXTURES), 'utf8').trim(), 'hex');
}

function asTls<T extends ParseState | ClientHelloResult>(st: T): Extract<T, ClientHelloInfo> {
  assert.equal(st.kind, 'tls', `expected tls, got ${JSON.stringify(st.kind === 'malformed' ? st : st.kind)}`);
  return st as Extract<T, ClientHelloInfo>;
}

// ---------- builders for synthetic hellos ----------

function versionsExt(vs: number[]): Buffer {
  return ext(43, Buffer.concat([u8(vs.length * 2), ...vs.map(u16)]));
}
/** A ClientHello handshake message (header included). */
/** Strip the record layer of a single-record capture. */
function unframe(wire: Buffer): Buffer {
  return wire.subarray(5, 5 + wire.readUInt16BE(3));
}

// ---------- parser: captured hellos ----------

const expected: Record<string, { sni?: string; alpn: string[]; versions: number[]; helloLength: number }> = {
  'openssl-sni-alpn': { sni: 'a.example.com', alpn: ['h2', 'http/1.1'], versions: [0x0304, 0x0303, 0x0302, 0x0301], helloLength: 332 },
  curl: { sni: 'curl.example.com', alpn: ['h2', 'http/1.1'], versions: [0x0304, 0x0303, 0x0302, 0x0301], helloLength: 512 },
  'openssl-no-sni': { alpn: [], versions: [0x0304, 0x0303, 0x0302, 0x0301], helloLength: 292 },
  'node-sni-alpn': { sni: 'node.example.com', alpn: ['h2', 'http/1.1'], versions: [0x0304, 0x0303], helloLength: 387 },
  'node-large': { sni: 'big.example.com', alpn: [], versions: [0x0304, 0x0303], helloLength: 2906 },
};

test('captured hellos parse to the fields the client sent', () => {
  for (const [name, want] of Object.entries(expected)) {
    const wire = fixture(name);
    const st = asTls(parseClientHello(wire, MAX));
    assert.equal(st.sni, want.sni, name);
    if (name !== 'node-large') assert.deepEqual(st.alpn, want.alpn, name);
    assert.deepEqual(st.supportedVersions, want.versions, name);
    assert.equal(st.helloLength, want.helloLength, name);
    assert.equal(st.legacyVersion, 0x0303, name);
    assert.equal(st.ech, false, name);
    assert.equal('sni' in st, want.sni !== undefined, `${name}: sni key present only when sent`);
  }
  const big = asTls(parseClientHello(fixture('node-large'), MAX));
  assert.ok(fixture('node-large').length > 2000);
  assert.equal(big.alpn.length, 12);
  assert.ok(big.alpn.every((p, i) => p.startsWith(`proto-${String(i).padStart(3, '0')}-`)));
});

test('mixed-case SNI on the wire is lower-cased', () => {
  const wire = fixture('node-sni-alpn');
  assert.ok(wire.includes(Buffer.from('Node.Example.COM')), 'the capture really carries mixed case');
  assert.equal(asTls(parseClientHello(wire, MAX)).sni, 'node.example.com');
});

test('every proper prefix of a captured hello needs more bytes', () => {
  for (const name of Object.keys(expected)) {
    const wire = fixture(name);
    for (let n = 0; n < wire.length; n++) {
      const st = parseClientHello(wire.subarray(0, n), MAX);
      assert.equal(st.kind, 'need-more', `${name} prefix ${n}`);
    }
  }
});

test('a hello re-framed into two records parses the same', () => {
  for (const name of Object.keys(expected)) {
    const msg = unframe(fixture(name));
    const cut = Math.floor(msg.length / 2);
    const two = frame(msg, cut + 1);
    assert.equal(two.readUInt16BE(3), cut + 1);
    const whole = parseClientHello(fixture(name), MAX);
    assert.deepEqual(parseClientHello(two, MAX), whole, name);
    for (let n = 0; n < two.length; n++) assert.equal(parseClientHello(two.subarray(0, n), MAX).kind, 'need-more');
  }
});

test('pathological framing: 1-byte records still parse, and framing counts against the cap', () => {
  const msg = unframe(fixture('openssl-sni-alpn'));
  const tiny = frame(msg, 1);
  assert.equal(tiny.length, msg.length * 6);
  assert.equal(asTls(parseClientHello(tiny, 65536)).sni, 'a.example.com');
  // helloLength + 5 bytes per extra record > maxBytes
  assert.deepEqual(parseClientHello(tiny, msg.length + 100), { kind: 'too-large' });
  // handshake header split over four records
  const hdrSplit = Buffer.concat([frame(msg.subarray(0, 1)), frame(msg.subarray(1, 3)), frame(msg.subarray(3))]);
  assert.equal(asTls(parseClientHello(hdrSplit, MAX)).sni, 'a.example.com');
});

test('bytes after the hello (CCS, early data) do not change the answer', () => {
  const wire = Buffer.concat([fixture('curl'), Buffer.from([20, 3, 3, 0, 1, 1]), Buffer.from([23, 3, 3, 0, 3, 1, 2, 3])]);
  assert.equal(asTls(parseClientHello(wire, MAX)).sni, 'curl.example.com');
});

// ---------- parser: not-tls / too-large / malformed ----------

test('not-tls is decided from the first byte or two', () => {
  assert.deepEqual(parseClientHello(Buffer.from('G'), MAX), { kind: 'not-tls' });
  assert.deepEqual(parseClientHello(Buffer.from('GET / HTTP/1.1\r\n'), MAX), { kind: 'not-tls' });
  assert.deepEqual(parseClientHello(Buffer.from([0x80, 0x2e, 0x01, 0x03, 0x01]), MAX), { kind: 'not-tls' }, 'SSLv2 hello');
  assert.deepEqual(parseClientHello(Buffer.from([0x16, 0x02]), MAX), { kind: 'not-tls' });
  assert.deepEqual(parseClientHello(Buffer.from([0x00]), MAX), { kind: 'not-tls' });
  assert.deepEqual(parseClientHello(Buffer.from([0x16]), MAX), { kind: 'need-more' });
  assert.deepEqual(parseClientHello(Buffer.alloc(0), MAX), { kind: 'need-more' });
});

test('too-large is decided from the handshake header, without the body', () => {
  const huge = Buffer.from([0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0xff, 0xff, 0xff]);
  assert.deepEqual(parseClientHello(huge, MAX), { kind: 'too-large' });
  const head = fixture('node-large').subarray(0, 9);
  assert.deepEqual(parseClientHello(head, 2905), { kind: 'too-large' });
  assert.deepEqual(parseClientHello(head, 2906), { kind: 'need-more' });
  assert.equal(parseClientHello(fixture('node-large'), 2906).kind, 'tls');
});

test('malformed framing and fields are reported, not thrown', () => {
  const cases: Array<[string, Buffer, string]> = [
    ['server hello', Buffer.from([22, 3, 3, 0, 4, 2, 0, 0, 0]), 'handshake type 2'],
    ['empty record', Buffer.from([22, 3, 1, 0, 0]), 'empty handshake record'],
    ['oversized record', Buffer.from([22, 3, 1, 0x40, 0x01]), 'exceeds 16384'],
    ['interleaved alert', Buffer.concat([frame(unframe(fixture('curl')).subarray(0, 100)), Buffer.from([21, 3, 3, 0, 2, 2, 40])]), 'content type 21'],
    ['bad SNI byte', frame(helloMsg([sniExt('a/b.example.com')])), 'host_name contains byte 0x2f'],
    ['SNI with space', frame(helloMsg([sniExt('a b')])), 'host_name contains byte 0x20'],
    ['SNI NUL', frame(helloMsg([sniExt(Buffer.from([0x61, 0, 0x62]))])), 'byte 0x00'],
    ['SNI empty label', frame(helloMsg([sniExt('a..b')])), 'empty label'],
    ['SNI leading dot', frame(helloMsg([sniExt('.a')])), 'empty label'],
    ['SNI two trailing dots', frame(helloMsg([sniExt('a.example.com..')])), 'empty label'],
    ['SNI empty', frame(helloMsg([sniExt('')])), 'out of range'],
    ['SNI too long', frame(helloMsg([sniExt('a'.repeat(254))])), 'out of range'],
    ['two SNI extensions', frame(helloMsg([sniExt('a'), sniExt('b')])), 'duplicate server_name'],
    ['empty ALPN name', frame(helloMsg([ext(16, Buffer.from([0, 2, 0, 0x61]))])), 'empty ALPN'],
    ['odd supported_versions', frame(helloMsg([ext(43, Buffer.from([3, 3, 4, 3]))])), 'supported_versions'],
    ['extension overrun', frame(helloMsg([Buffer.from([0, 99, 0, 50, 1])])), 'overruns'],
  ];
  for (const [name, wire, detail] of cases) {
    const st = parseClientHello(wire, MAX);
    assert.equal(st.kind, 'malformed', name);
    assert.ok((st as { detail: string }).detail.includes(detail), `${name}: ${(st as { detail: string }).detail}`);
  }
});

test('synthetic hellos: ECH, IDN/underscore names, trailing dot, no extensions', () => {
  const ech = asTls(parseClientHello(frame(helloMsg([sniExt('public.example.net'), ext(0xfe0d, Buffer.alloc(40, 1))])), MAX));
  assert.equal(ech.ech, true);
  assert.equal(ech.sni, 'public.example.net', 'routes on the outer SNI');
  const mesh = asTls(parseClientHello(frame(helloMsg([sniExt('outbound_.9080_.v1_.Reviews.default.svc.cluster.local')])), MAX));
  assert.equal(mesh.sni, 'outbound_.9080_.v1_.reviews.default.svc.cluster.local');
  assert.equal(asTls(parseClientHello(frame(helloMsg([sniExt('xn--bcher-kva.example.')])), MAX)).sni, 'xn--bcher-kva.example');
  const bare = asTls(parseClientHello(frame(helloMsg([], 0x0301)), MAX));
  assert.deepEqual(bare, { kind: 'tls', alpn: [], ech: false, legacyVersion: 0x0301, supportedVersions: [], helloLength: bare.helloLength });
  const names = asTls(parseClientHello(frame(helloMsg([alpnExt(['istio-peer-exchange', 'istio']), versionsExt([0x0a0a, 0x0304])])), MAX));
  assert.deepEqual(names.alpn, ['istio-peer-exchange', 'istio']);
  assert.deepEqual(names.supportedVersions, [0x0a0a, 0x0304]);
});

// ---------- live sockets ----------

const LISTENED = ['data', 'end', 'close', 'error'] as const;

interface Served {
  port: number;
  result: Promise<ClientHelloResult>;
  close: () => Promise<void>;
}

/** A server that runs readClientHello on its first connection, then hands the socket to `after`. */
async function serveOnce(
  opts: { timeoutMs: number; maxBytes: number },
  after: (s: net.Socket, r: ClientHelloResult, listenersBefore: number[]) => void = (s) => s.destroy(),
): Promise<Served> {
  const srv = net.createServer();
  const sockets = new Set<net.Socket>();
  srv.on('connection', (s) => {
    sockets.add(s);
    s.on('error', () => {});
  });
  const result = new Promise<ClientHelloResult>((resolve) => {
    srv.once('connection', (s) => {
      const before = LISTENED.map((e) => s.listenerCount(e));
      void readClientHello(s, opts).then((r) => {
        resolve(r);
        after(s, r, before);
      });
    });
  });
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  const port = (srv.address() as net.AddressInfo).port;
  return {
    port,
    result,
    close: () =>
      new Promise<void>((r) => {
        for (const s of sockets) s.destroy();
        srv.close(() => r());
      }),
  };
}

/** Run a real client binary with a hard deadline; kill it by its own PID if it lingers. */
function runClient(cmd: string, args: string[], deadlineMs = 10_000): Promise<{ code: number | null; out: string }> {
  return new Promise((resolve) => {
    const p = spawn(cmd, args, { stdio: ['pipe', 'pipe', 'pipe'] });
    let out = '';
    p.stdout.on('data', (d: Buffer) => (out += d.toString()));
    p.stderr.on('data', (d: Buffer) => (out += d.toString()));
    p.on('error', (e) => {
      out += String(e);
    });
    const t = setTimeout(() => p.kill('SIGKILL'), deadlineMs);
    t.unref();
    p.on('close', (code) => {
      clearTimeout(t);
      resolve({ code, out });
    });
  });
}

const LIVE = { timeoutMs: 10_000, maxBytes: MAX };

test('live: openssl s_client with SNI and ALPN', async () => {
  const srv = await serveOnce(LIVE);
  const client = runClient('openssl', ['s_client', '-connect', `127.0.0.1:${srv.port}`, '-servername', 'a.example.com', '-alpn', 'h2,http/1.1']);
  const r = asTls(await srv.result);
  await client;
  await srv.close();
  assert.equal(r.sni, 'a.example.com');
  assert.deepEqual(r.alpn, ['h2', 'http/1.1']);
  assert.ok(r.supportedVersions.includes(0x0304));
});

test('live: openssl s_client -noservername has no SNI', async () => {
  const srv = await serveOnce(LIVE);
  const client = runClient('openssl', ['s_client', '-connect', `127.0.0.1:${srv.port}`, '-noservername']);
  const r = asTls(await srv.result);
  await client;
  await srv.close();
  assert.equal(r.sni, undefined);
  assert.deepEqual(r.alpn, []);
});

test('live: curl --resolve', async () => {
  const srv = await serveOnce(LIVE);
  const client = runClient('curl', ['-sk', '--max-time', '8', '--resolve', `curl.example.com:${srv.port}:127.0.0.1`, `https://curl.example.com:${srv.port}/`]);
  const r = asTls(await srv.result);
  await client;
  await srv.close();
  assert.equal(r.sni, 'curl.example.com');
  assert.deepEqual(r.alpn, ['h2', 'http/1.1']);
});

function nodeClient(port: number, servername: string, ALPNProtocols: string[]): tls.TLSSocket {
  const c = tls.connect({ host: '127.0.0.1', port, servername, ALPNProtocols, rejectUnauthorized: false });
  c.on('error', () => {});
  return c;
}

const bigAlpn = Array.from({ length: 12 }, (_, i) => `proto-${String(i).padStart(3, '0')}-${'x'.repeat(200)}`);

test('live: node tls.connect, normal and post-quantum-sized (> 2000 bytes) hellos', async () => {
  for (const [name, alpn] of [['node.example.com', ['h2', 'http/1.1']], ['big.example.com', bigAlpn]] as const) {
    const srv = await serveOnce(LIVE);
    const c = nodeClient(srv.port, name, [...alpn]);
    const r = asTls(await srv.result);
    c.destroy();
    await srv.close();
    assert.equal(r.sni, name);
    assert.deepEqual(r.alpn, alpn);
    assert.equal(r.bytes.length, r.helloLength + RECORD_HEADER_LENGTH);
    if (name === 'big.example.com') assert.ok(r.bytes.length > 2000, `hello is ${r.bytes.length} bytes`);
  }
});

/** Connect with plain TCP and write `bytes` in pieces of `step`, yielding to the loop between. */
async function rawClient(port: number, bytes: Buffer, step: number, end = false): Promise<net.Socket> {
  const c = net.connect(port, '127.0.0.1');
  c.on('error', () => {});
  await new Promise<void>((r) => c.once('connect', () => r()));
  c.setNoDelay(true);
  for (let i = 0; i < bytes.length && !c.destroyed; i += step) {
    c.write(bytes.subarray(i, i + step));
    await new Promise<void>((r) => setImmediate(r));
  }
  if (end && !c.destroyed) c.end();
  return c;
}

test('live: the large hello written one byte at a time yields the SNI and every byte', async () => {
  const wire = fixture('node-large');
  const srv = await serveOnce(LIVE);
  const c = await rawClient(srv.port, wire, 1);
  const r = asTls(await srv.result);
  c.destroy();
  await srv.close();
  assert.equal(r.sni, 'big.example.com');
  assert.ok(r.bytes.equals(wire));
});

test('live: a hello split across two records and many segments', async () => {
  const two = frame(unframe(fixture('curl')), 200);
  const srv = await serveOnce(LIVE);
  const c = await rawClient(srv.port, two, 7);
  const r = asTls(await srv.result);
  c.destroy();
  await srv.close();
  assert.equal(r.sni, 'curl.example.com');
  assert.ok(r.bytes.equals(two));
});

test('live: truncated hello then FIN => closed, with the bytes read so far', async () => {
  const part = fixture('openssl-sni-alpn').subarray(0, 100);
  assert.equal(parseClientHello(part, MAX).kind, 'need-more');
  const srv = await serveOnce(LIVE);
  const c = await rawClient(srv.port, part, 50, true);
  const r = await srv.result;
  c.destroy();
  await srv.close();
  assert.equal(r.kind, 'closed');
  assert.ok(r.bytes.equals(part));
});

test('live: random bytes => not-tls', async () => {
  const junk = Buffer.from('4f7a19c3d2e8b6a5', 'hex');
  const srv = await serveOnce(LIVE);
  const c = await rawClient(srv.port, junk, junk.length);
  const r = await srv.result;
  c.destroy();
  await srv.close();
  assert.equal(r.kind, 'not-tls');
  assert.ok(junk.subarray(0, r.bytes.length).equals(r.bytes) && r.bytes.length > 0);
});

test('live: a 16 MB hello claim => too-large without waiting for the body or the timeout', async () => {
  const head = Buffer.from([0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0xff, 0xff, 0xff]);
  // a timeout far beyond the test's own: 'timeout' would mean we waited for bytes.
  const srv = await serveOnce({ timeoutMs: 600_000, maxBytes: MAX });
  const c = await rawClient(srv.port, head, 1);
  const r = await srv.result;
  c.destroy();
  await srv.close();
  assert.equal(r.kind, 'too-large');
  assert.ok(r.bytes.equals(head));
});

test('live: buffering stays within maxBytes + one record header (+ the last read)', async () => {
  // A legal 2906-byte hello in 100-byte records: its framing pushes it past a 3000-byte budget.
  const wire = frame(unframe(fixture('node-large')), 100);
  const maxBytes = 3000;
  const srv = await serveOnce({ timeoutMs: 10_000, maxBytes });
  const c = await rawClient(srv.port, wire, 64);
  const r = await srv.result;
  c.destroy();
  await srv.close();
  assert.equal(r.kind, 'too-large');
  assert.ok(r.bytes.length <= maxBytes + RECORD_HEADER_LENGTH + 64, `buffered ${r.bytes.length}`);
  assert.ok(wire.subarray(0, r.bytes.length).equals(r.bytes));
});

test('live: silent connection => timeout; listeners are removed and the socket is paused', async () => {
  let counts: number[] = [];
  let before: number[] = [];
  const srv = await serveOnce({ timeoutMs: 200, maxBytes: MAX }, (s, _r, b) => {
    before = b;
    counts = LISTENED.map((e) => s.listenerCount(e));
    assert.equal(s.isPaused(), true);
    s.destroy();
  });
  const c = net.connect(srv.port, '127.0.0.1');
  c.on('error', () => {});
  const r = await srv.result;
  c.destroy();
  await srv.close();
  assert.equal(r.kind, 'timeout');
  assert.equal(r.bytes.length, 0);
  assert.deepEqual(counts, before);
});

test('live: an already-destroyed socket => closed', async () => {
  const srv = await serveOnce(LIVE);
  const c = net.connect(srv.port, '127.0.0.1');
  c.on('error', () => {});
  c.destroy();
  const r = await readClientHello(c, LIVE);
  await srv.close();
  assert.equal(r.kind, 'closed');
  assert.equal(c.listenerCount('data'), 0);
});

// ---------- replay into a TLSSocket ----------

async function selfSigned(): Promise<{ key: Buffer; cert: Buffer; cleanup: () => Promise<void> }> {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'tlsgate-ch-'));
  await execFileP('openssl', [
    'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-subj', '/CN=x', '-days', '1',
    '-keyout', path.join(dir, 'key.pem'), '-out', path.join(dir, 'cert.pem'),
  ]);
  const key = await readFile(path.join(dir, 'key.pem'));
  const cert = await readFile(path.join(dir, 'cert.pem'));
  return { key, cert, cleanup: () => rm(dir, { recursive: true, force: true }) };
}

test('replay: unshift(bytes) then new TLSSocket completes a real handshake', async () => {
  const { key, cert, cleanup } = await selfSigned();
  let serverSide: tls.TLSSocket | undefined;
  const srv = await serveOnce(LIVE, (s, r) => {
    // This is the documented hand-off: put the consumed bytes back, then wrap.
    s.unshift(r.bytes);
    serverSide = new tls.TLSSocket(s, { isServer: true, key, cert, ALPNProtocols: ['h2'] });
    serverSide.on('error', () => {});
    serverSide.on('data', (d: Buffer) => serverSide!.write(`echo:${d.toString()}`));
  });
  const client = tls.connect({ host: '127.0.0.1', port: srv.port, servername: 'replay.example.com', ALPNProtocols: ['h2', 'http/1.1'], ca: cert, checkServerIdentity: () => undefined });
  client.on('error', () => {});
  const r = asTls(await srv.result);
  await new Promise<void>((res, rej) => {
    client.once('secureConnect', () => res());
    client.once('error', rej);
  });
  assert.equal(client.authorized, true, String(client.authorizationError));
  assert.equal(client.alpnProtocol, 'h2');
  client.write('ping');
  const echoed = await new Promise<string>((res) => client.once('data', (d: Buffer) => res(d.toString())));
  client.destroy();
  serverSide?.destroy();
  await srv.close();
  await cleanup();
  assert.equal(r.sni, 'replay.example.com');
  assert.equal(echoed, 'echo:ping');
});

// ---------- alerts ----------

test('tlsAlert builds a fatal alert record', () => {
  assert.deepEqual([...tlsAlert(ALERT_UNRECOGNIZED_NAME)], [21, 3, 3, 0, 2, 2, 112]);
  assert.deepEqual([...tlsAlert(AlertDescription.handshakeFailure, 0x0301)], [21, 3, 1, 0, 2, 2, 40]);
  assert.deepEqual([...tlsAlert(0x150, 0x9999)], [21, 3, 3, 0, 2, 2, 0x50], 'masked, never thrown');
});

test('openssl s_client reports an unrecognized_name alert sent after its hello', async () => {
  const srv = await serveOnce(LIVE, (s) => {
    s.end(tlsAlert(ALERT_UNRECOGNIZED_NAME));
  });
  const client = runClient('openssl', ['s_client', '-connect', `127.0.0.1:${srv.port}`, '-servername', 'nobody.example.com']);
  const r = asTls(await srv.result);
  const { code, out } = await client;
  await srv.close();
  assert.equal(r.sni, 'nobody.example.com');
  assert.notEqual(code, 0);
  // OpenSSL 3.0 prints e.g. "...:SSL routines:ssl3_read_bytes:tlsv1 unrecognized name:...:SSL alert number 112"
  assert.match(out, /tlsv1 unrecognized name/);
  assert.match(out, /SSL alert number 112/);
});
