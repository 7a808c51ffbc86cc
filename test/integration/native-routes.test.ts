// Learned routes against the real CLI: once JS has routed a ClientHello to a plain TCP proxy, the
// native relay routes the next connections naming the same SNI by itself. Real TLS clients and
// upstreams on 127.0.0.1; what is checked is that those connections behave and are accounted as
// JS-routed ones are: the upstream's own certificate and echo, access-log lines with the same
// fields and exact byte counts, weighted splits, ROUND_ROBIN order, maxConnections counted across
// both paths (the shared active counts), a ClientHello dripped one byte at a time, a reload that
// moves the SNI, the relay thread that serves learned routes (what it hands to JS, a listener it
// stops, concurrent clients and reloads leaving the shared counts exact), TLSGATE_RELAY_THREAD=0
// and TLSGATE_NATIVE_ROUTES=0. Skipped when the addon is not built.
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdir, readdir, readFile, rm, unlink, writeFile } from 'node:fs/promises';
import net from 'node:net';
import tls from 'node:tls';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { certDir, makeCa, makeLeaf, type Ca } from '../helpers/certs.js';
import { freePorts, sleep } from '../helpers/ports.js';
import { startTlsgate, type Gateway } from '../helpers/tlsgate.js';
import { startHolder, startTcpEcho, type Holder, type TcpServer } from '../helpers/upstreams.js';
import { nativeRelayAvailable, nativeRelayUnavailableReason } from '../../src/runtime/chain/native-relay.js';
import { accessEntry, alpnExt, captureHello, dial, ext, frameHandshake, helloMsg, promMetric as metric, sniExt, tlsExchange, until, within, type Exchange } from '../helpers/tls-wire.js';

const SKIP = nativeRelayAvailable() ? false : `native relay not built: ${nativeRelayUnavailableReason()}`;

/** A TLS exchange through the gateway, offering ALPN (the access log carries what was offered). */
const exchange = (port: number, servername: string, ca: string, line?: string): Promise<Exchange> =>
  tlsExchange(port, servername, ca, line, ['h2', 'http/1.1']);

const entryFor = (gw: Gateway, down: string): Promise<Record<string, unknown>> => accessEntry(gw, down, 'tcp');

/** The addon's relay thread in process `pid`: its id and the CPU time it has run (ns), or undefined. */
async function relayThread(pid: number): Promise<{ tid: string; runNs: number } | undefined> {
  for (const tid of await readdir(`/proc/${pid}/task`)) {
    const comm = await readFile(`/proc/${pid}/task/${tid}/comm`, 'utf8').catch(() => '');
    if (comm.trim() !== 'tlsgate-relay') continue;
    const sched = await readFile(`/proc/${pid}/task/${tid}/schedstat`, 'utf8');
    return { tid, runNs: Number(sched.split(' ')[0]) };
  }
  return undefined;
}

/** A counter once it has stopped moving: the same value twice, 300 ms apart (records come in batches). */
async function settled(read: () => Promise<number>): Promise<number> {
  let v = await read();
  for (let i = 0; i < 20; i++) {
    await sleep(300);
    const w = await read();
    if (w === v) return v;
    v = w;
  }
  return v;
}

/** Resolves with everything read once the peer closed or ended its side (or rejects after `ms`). */
function closedWith(s: net.Socket, ms = 5_000): Promise<Buffer> {
  const got: Buffer[] = [];
  s.on('data', (b: Buffer) => got.push(b));
  const done = new Promise<Buffer>((resolve) => {
    s.once('end', () => resolve(Buffer.concat(got)));
    s.once('close', () => resolve(Buffer.concat(got)));
  });
  return within(done, ms, 'the gateway closing the connection');
}

function serviceEntry(name: string, host: string, ports: number[]): string {
  return `apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ${name}}
spec:
  hosts: [${host}]
  location: MESH_EXTERNAL
  ports: [{number: 443, name: p, protocol: TLS}]
  resolution: STATIC
  endpoints: [${ports.map((p) => `{address: 127.0.0.1, ports: {p: ${p}}}`).join(', ')}]
`;
}

/** PASSTHROUGH on one port; `routes` maps an SNI to its route's destinations (host, weight). */
function gateway(port: number, routes: Record<string, [string, number][]>): string {
  const snis = Object.keys(routes);
  return `apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  servers:
  - port: {number: ${port}, name: tls, protocol: TLS}
    tls: {mode: PASSTHROUGH}
    hosts: [${snis.join(', ')}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: pass}
spec:
  hosts: [${snis.join(', ')}]
  gateways: [gw]
  tls:
${snis.map((sni) => `  - match: [{sniHosts: [${sni}]}]
    route: [${routes[sni]!.map(([host, weight]) => `{destination: {host: ${host}}, weight: ${weight}}`).join(', ')}]
`).join('')}`;
}

describe('learned routes (native relay)', { skip: SKIP }, () => {
  let dir: string;
  let ca: Ca;
  const echo: Record<'a' | 'b' | 'r1' | 'r2', TcpServer> = {} as never;
  let holder: Holder;
  let helloHold: Buffer;
  let helloDrip: Buffer;
  let gw: Gateway;
  let P: number;
  let cfg: string;
  const L = (): string => `127.0.0.1_${P}`;
  const native = (): Promise<number> => metric(gw, 'native_routed_connections_total', { listener: L() });

  const services = (): string => [
    serviceEntry('a', 'a.upstream.local', [echo.a.port]),
    serviceEntry('b', 'b.upstream.local', [echo.b.port]),
    serviceEntry('rr', 'rr.upstream.local', [echo.r1.port, echo.r2.port]),
    serviceEntry('hold', 'hold.upstream.local', [holder.port]),
    `apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: rr}
spec:
  host: rr.upstream.local
  trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: hold}
spec:
  host: hold.upstream.local
  trafficPolicy: {connectionPool: {tcp: {maxConnections: 2}}}
`,
  ].join('---\n');

  const mainRoutes = (aTo: string): Record<string, [string, number][]> => ({
    'a.example.com': [[aTo, 100]],
    'w.example.com': [['a.upstream.local', 75], ['b.upstream.local', 25]],
    'rr.example.com': [['rr.upstream.local', 100]],
    'hold.example.com': [['hold.upstream.local', 100]],
    'drip.example.com': [['hold.upstream.local', 100]],
  });

  before(async () => {
    dir = await mkdirTemp();
    ca = await makeCa(dir, 'ca', '/O=learned routes/CN=lr-upstream-ca');
    for (const [i, name] of (['a', 'b', 'r1', 'r2'] as const).entries()) {
      const leaf = await makeLeaf(dir, ca, name, { cn: `${name}.upstream`, sans: ['DNS:a.example.com', 'DNS:w.example.com', 'DNS:rr.example.com', 'DNS:x.example.com'], serial: 10 + i });
      echo[name] = await startTcpEcho({ tls: { cert: leaf.cert, key: leaf.key } });
    }
    holder = await startHolder();
    helloHold = await captureHello('hold.example.com');
    helloDrip = await captureHello('drip.example.com');
    [P] = await freePorts(1) as [number];
    cfg = path.join(dir, 'config');
    await mkdir(cfg, { recursive: true });
    await writeFile(path.join(cfg, 'services.yaml'), services());
    await writeFile(path.join(cfg, 'main.yaml'), gateway(P, mainRoutes('a.upstream.local')));
    gw = await startTlsgate({ configPaths: [cfg], args: ['--relay', 'native', '--drain-timeout', '1s'] });
  });

  after(async () => {
    await gw?.stop();
    holder?.close();
    await Promise.all(Object.values(echo).map((e) => e.close()));
    await rm(dir, { recursive: true, force: true });
  });

  async function mkdirTemp(): Promise<string> {
    return certDir('tlsgate-native-routes-');
  }

  it('the first connection for an SNI is routed by JS, the next ones by the relay: same upstream, same access-log fields, exact bytes', async () => {
    const before = await native();
    const runs: Exchange[] = [];
    for (let i = 0; i < 10; i++) runs.push(await exchange(P, 'a.example.com', ca.certPem, `line ${i}\n`));
    for (const [i, x] of runs.entries()) assert.deepEqual([x.cn, x.reply], ['a.upstream', `line ${i}\n`]);
    assert.equal(await until('9 native routes counted', async () => ((await native()) - before >= 9 ? (await native()) - before : undefined)), 9);
    const entries = await Promise.all(runs.map((x) => entryFor(gw, x.down)));
    const fixed = (e: Record<string, unknown>) => ({ ...e, time: undefined, downstream: undefined, durationMs: undefined,
      bytesReceived: undefined, bytesSent: undefined, upstreamBytesSent: undefined, upstreamBytesReceived: undefined });
    for (const [i, e] of entries.entries()) {
      // The JS-routed first line and the relay-routed ones carry the same fields and values.
      assert.deepEqual(fixed(e), fixed(entries[0]!), `entry ${i}`);
      assert.deepEqual([e.bytesReceived, e.bytesSent, e.upstreamBytesSent, e.upstreamBytesReceived], [runs[i]!.written, runs[i]!.read, runs[i]!.written, runs[i]!.read]);
      assert.equal(typeof e.durationMs, 'number');
    }
    assert.deepEqual([entries[0]!.reason, entries[0]!.sni, entries[0]!.alpn, entries[0]!.upstream], ['ok', 'a.example.com', 'h2,http/1.1', `127.0.0.1:${echo.a.port}`]);
    assert.equal(await metric(gw, 'tcp_connections_total', { listener: L(), reason: 'ok' }) >= 10, true);
    assert.equal(await until('no open connection left', async () => ((await metric(gw, 'downstream_connections_active', { listener: L() })) === 0 ? 0 : undefined)), 0);
  });

  it('relay-routed connections log the ALPN lists as offered: 20 different lists (more than the relay\'s table of 16), again after the table turned over, none, and an ECH extension', { timeout: 60_000 }, async () => {
    await exchange(P, 'a.example.com', ca.certPem); // learned
    const lists = Array.from({ length: 20 }, (_, i) => (i % 2 === 0 ? [`p${i}`, 'http/1.1'] : [`proto-${i}`]));
    const offered = [...lists, lists[0]!, lists[17]!, lists[3]!, []];
    const runs: Exchange[] = [];
    for (const alpn of offered) runs.push(await tlsExchange(P, 'a.example.com', ca.certPem, 'x\n', alpn.length ? alpn : undefined));
    // An outer ClientHello with ECH (routed on its outer SNI): the upstream refuses the synthetic hello, the log still says so.
    const raw = await dial(P);
    const down = `127.0.0.1:${raw.localPort}`;
    const closed = closedWith(raw);
    raw.write(frameHandshake(helloMsg([sniExt('a.example.com'), alpnExt(['h2']), ext(0xfe0d, Buffer.from([0, 0, 1, 0, 1, 7, 0, 0, 0, 0]))])));
    await closed;
    raw.destroy();
    const entries = await Promise.all(runs.map((x) => entryFor(gw, x.down)));
    assert.deepEqual(entries.map((e) => e.alpn), offered.map((l) => (l.length ? l.join(',') : undefined)));
    assert.ok(entries.every((e) => e.sni === 'a.example.com' && e.reason === 'ok' && e.downstream === runs[entries.indexOf(e)]!.down));
    const ech = await entryFor(gw, down);
    assert.deepEqual([ech.sni, ech.alpn, ech.ech, ech.upstream], ['a.example.com', 'h2', true, `127.0.0.1:${echo.a.port}`]);
    assert.equal(entries[0]!.ech, undefined);
  });

  it('weights 75/25 hold for relay-routed connections', { timeout: 60_000 }, async () => {
    const n = 160;
    const seen = { a: 0, b: 0 };
    for (let i = 0; i < n; i++) {
      const x = await exchange(P, 'w.example.com', ca.certPem);
      if (x.cn === 'a.upstream') seen.a++;
      else if (x.cn === 'b.upstream') seen.b++;
      else assert.fail(`unexpected upstream ${x.cn}`);
    }
    // Binomial(160, 0.25): mean 40, sd 5.5; these bounds are more than 4 sd wide.
    assert.ok(seen.b >= 17 && seen.b <= 63, `b got ${seen.b} of ${n}`);
    assert.equal(seen.a + seen.b, n);
  });

  it('ROUND_ROBIN over two endpoints alternates on relay-routed connections', { timeout: 30_000 }, async () => {
    const order: string[] = [];
    const before = await native();
    for (let i = 0; i < 13; i++) order.push((await exchange(P, 'rr.example.com', ca.certPem)).cn);
    await until('12 native routes', async () => ((await native()) - before >= 12 ? true : undefined));
    const relayed = order.slice(1);
    for (let i = 1; i < relayed.length; i++) assert.notEqual(relayed[i], relayed[i - 1], `order ${order.join(' ')}`);
    assert.deepEqual(new Set(relayed), new Set(['r1.upstream', 'r2.upstream']));
  });

  it('maxConnections 2 counts JS- and relay-routed connections together: the third is refused, a slot freed is used again', { timeout: 30_000 }, async () => {
    const start = holder.conns.length;
    // The tests before may still have records on their way (batches up to 100 ms apart).
    const nativeBefore = await settled(native);
    const held: net.Socket[] = [];
    const hold = async (): Promise<net.Socket> => {
      const s = await dial(P);
      s.write(helloHold);
      held.push(s);
      return s;
    };
    try {
      await hold(); // JS routes it and teaches the relay
      await until('first upstream connection', () => (holder.conns.length >= start + 1 ? true : undefined));
      await hold(); // the relay routes it
      await until('second upstream connection', () => (holder.conns.length >= start + 2 ? true : undefined));
      // Counted when the relay's batch of records reaches JS (up to 100 ms later).
      assert.equal(await until('the second counted as relay-routed', async () => ((await native()) > nativeBefore ? (await native()) - nativeBefore : undefined)), 1);
      // The cluster is at 2: the relay declines, JS refuses with upstream_overflow.
      const third = await dial(P);
      const down3 = `127.0.0.1:${third.localPort}`;
      third.write(helloHold);
      const closed = new Promise((resolve) => { third.once('close', resolve); third.once('end', resolve); });
      await within(closed, 5_000, 'the third connection closed');
      assert.equal((await entryFor(gw, down3)).reason, 'upstream_overflow');
      assert.equal(holder.conns.length, start + 2);
      // One held connection ends; the next one is routed by the relay again.
      held.shift()!.destroy();
      await until('the slot freed', async () => {
        const s = await hold();
        const ok = await Promise.race([
          until('upstream', () => (holder.conns.length >= start + 3 ? true : undefined), 1_000).then(() => true, () => false),
          new Promise<boolean>((resolve) => s.once('close', () => resolve(false))),
        ]);
        return ok ? true : undefined;
      });
      assert.equal(holder.conns.length, start + 3);
      // Every byte of the hello reached the upstream.
      assert.ok(Buffer.concat(holder.conns[start + 2]!.bytes).equals(helloHold));
    } finally {
      for (const s of held) s.destroy();
    }
  });

  it('a learned SNI whose ClientHello arrives one byte at a time is routed by the relay once it is whole', { timeout: 30_000 }, async () => {
    // The held connections of the test before are gone (the cluster's count is back under its limit).
    await until('no open connection left', async () => ((await metric(gw, 'downstream_connections_active', { listener: L() })) === 0 ? true : undefined));
    // Teach the relay drip.example.com, then drip the same hello.
    const first = await dial(P);
    first.write(helloDrip);
    const start = holder.conns.length;
    await until('taught', () => (holder.conns.length > start ? true : undefined));
    first.destroy();
    const before = await settled(native);
    const s = await dial(P);
    try {
      for (let i = 0; i < helloDrip.length; i++) {
        s.write(helloDrip.subarray(i, i + 1));
        await sleep(1);
      }
      const up = await until('dripped hello upstream', () => {
        const c = holder.conns[start + 1];
        return c !== undefined && Buffer.concat(c.bytes).length >= helloDrip.length ? c : undefined;
      });
      assert.ok(Buffer.concat(up.bytes).equals(helloDrip));
      assert.equal(await until('counted', async () => ((await native()) > before ? (await native()) - before : undefined)), 1);
    } finally {
      s.destroy();
    }
  });

  it('on a listener with learned routes, a hello cut short and a FIN that arrive together are closed at once and logged', async () => {
    assert.ok(await native() > 0, 'the listener has learned routes by now');
    const s = await dial(P);
    const down = `127.0.0.1:${s.localPort}`;
    const closed = new Promise<void>((resolve) => { s.once('close', () => resolve()); s.once('end', () => resolve()); });
    // The gateway is stopped while the bytes and the FIN arrive, so it sees both in one wake-up.
    process.kill(gw.pid, 'SIGSTOP');
    try {
      s.end(helloHold.subarray(0, 60));
      await sleep(100);
    } finally {
      process.kill(gw.pid, 'SIGCONT');
    }
    const started = Date.now();
    // The gateway runs with the default 15 s hello timeout: closed on the FIN, not at the timeout.
    await within(closed, 5_000, 'the gateway closing the connection');
    assert.ok(Date.now() - started < 5_000);
    const e = await until('refusal logged', () => gw.accessLogs().find((x) => x.downstream === down));
    assert.equal(e.reason, 'downstream_closed_early');
    s.destroy();
  });

  it('learned routes run on the relay thread: it exists once a route is learned, and it is what relays the connections', async () => {
    await exchange(P, 'a.example.com', ca.certPem);
    const t0 = await until('the relay thread', () => relayThread(gw.pid));
    const before = await native();
    for (let i = 0; i < 20; i++) assert.equal((await exchange(P, 'a.example.com', ca.certPem)).cn, 'a.upstream');
    await until('20 native routes', async () => ((await native()) - before >= 20 ? true : undefined));
    const t1 = await relayThread(gw.pid);
    assert.equal(t1?.tid, t0.tid);
    // Accepting, dialling and relaying 20 TLS exchanges is CPU time of that thread.
    assert.ok(t1!.runNs > t0.runNs, `relay thread ran ${t1!.runNs - t0.runNs} ns`);
  });

  it('on the relay thread, an SNI not learned yet, an unknown SNI, no SNI and bytes that are not TLS go to JS, which routes or refuses them as before', async () => {
    await exchange(P, 'a.example.com', ca.certPem);
    await until('the listener accepting on the relay thread', () => relayThread(gw.pid));
    // A route JS has not taught the relay yet: handed to JS, routed, then learned.
    const first = await exchange(P, 'rr.example.com', ca.certPem);
    assert.ok(['r1.upstream', 'r2.upstream'].includes(first.cn));
    assert.equal((await entryFor(gw, first.down)).reason, 'ok');
    const probe = async (bytes: Buffer): Promise<{ data: Buffer; reason: unknown }> => {
      const s = await dial(P);
      const down = `127.0.0.1:${s.localPort}`;
      const closed = closedWith(s);
      s.write(bytes);
      const data = await closed;
      s.destroy();
      return { data, reason: (await accessEntry(gw, down)).reason };
    };
    const unknown = await probe(await captureHello('nobody.example.com'));
    assert.equal(unknown.reason, 'no_sni_match');
    assert.equal(unknown.data[0], 0x15, 'a TLS alert');
    assert.equal((await probe(await captureHello(undefined))).reason, 'no_sni');
    const noise = randomBytes(300);
    noise[0] = 0x47;
    const notTls = await probe(noise);
    assert.deepEqual([notTls.reason, notTls.data.length], ['not_tls', 0]);
    // And the learned SNIs still go straight through.
    assert.equal((await exchange(P, 'a.example.com', ca.certPem)).cn, 'a.upstream');
  });

  it('a listener on the relay thread stops accepting when a reload removes its port; its open connection goes on and is still logged', { timeout: 30_000 }, async () => {
    const [P2] = await freePorts(1) as [number];
    const extra = path.join(cfg, 'extra.yaml');
    const generation = async (): Promise<number> => (JSON.parse((await gw.admin('/config_dump')).body) as { generation: number }).generation;
    let gen = await generation();
    await writeFile(extra, gateway(P2, { 'x.example.com': [['a.upstream.local', 100]] }).replace(/name: gw\b/, 'name: gw2').replace('gateways: [gw]', 'gateways: [gw2]').replace('name: pass', 'name: pass2'));
    await until('the new port', async () => ((await generation()) > gen ? true : undefined));
    const L2 = `127.0.0.1_${P2}`;
    await exchange(P2, 'x.example.com', ca.certPem); // JS routes it and teaches the relay
    assert.equal((await exchange(P2, 'x.example.com', ca.certPem)).cn, 'a.upstream');
    await until('a native route on the new port', async () => ((await metric(gw, 'native_routed_connections_total', { listener: L2 })) >= 1 ? true : undefined));
    // A connection routed by the relay thread, kept open across the reload.
    const held = tls.connect({ host: '127.0.0.1', port: P2, servername: 'x.example.com', ca: ca.certPem });
    held.on('error', () => {});
    await within(new Promise((r) => held.once('secureConnect', r)), 5_000, 'held handshake');
    const down = `127.0.0.1:${held.localPort}`;
    gen = await generation();
    await unlink(extra);
    await until('the port removed', async () => ((await generation()) > gen ? true : undefined));
    await until('connections refused', () => new Promise<boolean | undefined>((resolve) => {
      const s = net.connect({ host: '127.0.0.1', port: P2 });
      s.once('error', () => resolve(true));
      s.once('connect', () => { s.destroy(); resolve(undefined); });
    }));
    // Open connections outlive their listener (a reload does not cut them).
    held.write('still here\n');
    const echoed = await within(new Promise<string>((r) => held.once('data', (b: Buffer) => r(b.toString()))), 5_000, 'echo after the reload');
    assert.equal(echoed, 'still here\n');
    const closed = within(new Promise((r) => held.once('close', r)), 5_000, 'the held connection closing');
    held.end();
    await closed;
    // The client port may have served an earlier test's connection: the line is the one on L2.
    const e = await until('the held connection logged', () => gw.accessLogs().filter((x) => x.downstream === down && x.listener === L2 && x.kind === 'tcp').at(-1));
    assert.deepEqual([e.reason, e.sni, e.upstream], ['ok', 'x.example.com', `127.0.0.1:${echo.a.port}`]);
  });

  it('under concurrent load and reloads, every connection is logged once and the active counts both threads keep stay exact: afterwards maxConnections 2 admits two, refuses the third', { timeout: 60_000 }, async () => {
    const generation = async (): Promise<number> => (JSON.parse((await gw.admin('/config_dump')).body) as { generation: number }).generation;
    let stop = false;
    // Reloads: a.example.com flips between two upstreams; every apply forgets the learned routes.
    const reloads = (async () => {
      for (let i = 0; i < 6; i++) {
        await sleep(200);
        const gen = await generation();
        await writeFile(path.join(cfg, 'main.yaml'), gateway(P, mainRoutes(i % 2 === 0 ? 'b.upstream.local' : 'a.upstream.local')));
        await until(`reload ${i + 1} applied`, async () => ((await generation()) > gen ? true : undefined), 20_000);
      }
    })();
    let exchanges = 0;
    let holds = 0;
    // Every client connection's address: each must have its access-log line, also when a reload
    // forgot its route while the relay's records of it were still on their way to JS.
    const downs: string[] = [];
    const worker = async (k: number): Promise<void> => {
      while (!stop) {
        if (k % 2 === 0) {
          const sni = ['a.example.com', 'w.example.com', 'rr.example.com'][exchanges % 3]!;
          const x = await exchange(P, sni, ca.certPem, `k${k}\n`);
          assert.ok(['a.upstream', 'b.upstream', 'r1.upstream', 'r2.upstream'].includes(x.cn), `${sni} reached ${x.cn}`);
          assert.equal(x.reply, `k${k}\n`);
          downs.push(x.down);
          exchanges++;
        } else {
          // The held cluster: admitted or refused (upstream_overflow), then closed by the client.
          const c = await dial(P);
          downs.push(`127.0.0.1:${c.localPort}`);
          c.write(helloHold);
          await sleep(2 + (holds % 7) * 3);
          c.destroy();
          holds++;
        }
      }
    };
    const workers = Array.from({ length: 12 }, (_, k) => worker(k));
    await reloads;
    stop = true;
    await Promise.all(workers);
    assert.ok(exchanges >= 30 && holds >= 30, `${exchanges} exchanges, ${holds} held connections`);
    await writeFile(path.join(cfg, 'main.yaml'), gateway(P, mainRoutes('a.upstream.local')));
    await until('back to the first config', async () => ((await exchange(P, 'a.example.com', ca.certPem)).cn === 'a.upstream' ? true : undefined));
    await until('no open connection left', async () => ((await metric(gw, 'downstream_connections_active', { listener: L() })) === 0 ? true : undefined));
    const want = new Map<string, number>();
    for (const d of downs) want.set(d, (want.get(d) ?? 0) + 1);
    const missingLines = (): [string, number][] => {
      const logged = new Map<string, number>();
      for (const e of gw.accessLogs()) if (e.kind === 'tcp' || e.kind === 'connection') logged.set(String(e.downstream), (logged.get(String(e.downstream)) ?? 0) + 1);
      return [...want].filter(([d, n]) => (logged.get(d) ?? 0) < n);
    };
    // The relay's last batch of records may still be on its way (up to 100 ms): a lost line never comes.
    for (const deadline = Date.now() + 5_000; missingLines().length > 0 && Date.now() < deadline;) await sleep(50);
    const missing = missingLines();
    assert.deepEqual(missing, [], `${missing.length} of ${downs.length} connections without an access-log line`);
    // The hold cluster's count is back to exactly 0: two connections are admitted, the third refused.
    const start = holder.conns.length;
    const held: net.Socket[] = [];
    try {
      for (let i = 0; i < 2; i++) {
        const c = await dial(P);
        c.write(helloHold);
        held.push(c);
        await until(`held connection ${i + 1} upstream`, () => (holder.conns.length >= start + i + 1 ? true : undefined));
      }
      const third = await dial(P);
      const down3 = `127.0.0.1:${third.localPort}`;
      const closed = closedWith(third);
      third.write(helloHold);
      await closed;
      third.destroy();
      assert.equal((await entryFor(gw, down3)).reason, 'upstream_overflow');
      assert.equal(holder.conns.length, start + 2);
    } finally {
      for (const c of held) c.destroy();
    }
  });

  it('a reload that sends the SNI elsewhere takes effect for the very next connection', { timeout: 30_000 }, async () => {
    assert.equal((await exchange(P, 'a.example.com', ca.certPem)).cn, 'a.upstream'); // learned
    const gen = JSON.parse((await gw.admin('/config_dump')).body) as { generation: number };
    await writeFile(path.join(cfg, 'main.yaml'), gateway(P, mainRoutes('b.upstream.local')));
    await until('new generation', async () => ((JSON.parse((await gw.admin('/config_dump')).body) as { generation: number }).generation > gen.generation ? true : undefined));
    for (let i = 0; i < 3; i++) assert.equal((await exchange(P, 'a.example.com', ca.certPem)).cn, 'b.upstream');
  });

  /** A second gateway with the same config on a port of its own, started with `env` (and `args`). */
  async function variant(name: string, env: Record<string, string>, args: string[] = []): Promise<{ gw: Gateway; port: number }> {
    const [port] = await freePorts(1) as [number];
    const c2 = path.join(dir, name);
    await mkdir(c2, { recursive: true });
    await writeFile(path.join(c2, 'services.yaml'), services());
    await writeFile(path.join(c2, 'main.yaml'), gateway(port, mainRoutes('a.upstream.local')));
    return { gw: await startTlsgate({ configPaths: [c2], env, args: ['--relay', 'native', ...args] }), port };
  }

  /** Four exchanges with a.example.com on `port`, each reaching a.upstream. */
  async function fourToA(port: number): Promise<Exchange[]> {
    const runs: Exchange[] = [];
    for (let i = 0; i < 4; i++) runs.push(await exchange(port, 'a.example.com', ca.certPem));
    assert.ok(runs.every((x) => x.cn === 'a.upstream'));
    return runs;
  }

  describe('TLSGATE_RELAY_THREAD=0', () => {
    let unthreaded: Gateway;
    let Q: number;
    before(async () => {
      ({ gw: unthreaded, port: Q } = await variant('config-unthreaded', { TLSGATE_RELAY_THREAD: '0' }));
    });
    after(async () => { await unthreaded?.stop(); });

    it('learned routes run on Node\'s loop: no relay thread, the same routing and access log', async () => {
      const runs = await fourToA(Q);
      await until('3 native routes', async () => ((await metric(unthreaded, 'native_routed_connections_total')) === 3 ? true : undefined));
      assert.equal(await relayThread(unthreaded.pid), undefined);
      const entries = await Promise.all(runs.map((x) => entryFor(unthreaded, x.down)));
      assert.deepEqual(entries.map((e) => [e.reason, e.sni, e.upstream, e.bytesReceived]), runs.map((x) => ['ok', 'a.example.com', `127.0.0.1:${echo.a.port}`, x.written]));
    });
  });

  describe('over IPv6', () => {
    let v6: Gateway;
    let Q: number;
    before(async () => {
      ({ gw: v6, port: Q } = await variant('config-v6', {}, ['--bind-address', '::1']));
    });
    after(async () => { await v6?.stop(); });

    it('relay-routed connections from [::1] log both addresses as the JS-routed first one does', async () => {
      const runs: Exchange[] = [];
      for (let i = 0; i < 4; i++) runs.push(await tlsExchange(Q, 'a.example.com', ca.certPem, `six ${i}\n`, ['h2'], '::1'));
      assert.deepEqual(runs.map((x) => [x.cn, x.reply, x.down.startsWith('::1:')]), [0, 1, 2, 3].map((i) => ['a.upstream', `six ${i}\n`, true]));
      await until('3 native routes', async () => ((await metric(v6, 'native_routed_connections_total')) === 3 ? true : undefined));
      const entries = await Promise.all(runs.map((x) => accessEntry(v6, x.down, 'tcp')));
      assert.deepEqual(entries.map((e) => [e.reason, e.downstream, e.listener, e.alpn, e.upstream]),
        runs.map((x) => ['ok', x.down, `::1_${Q}`, 'h2', `127.0.0.1:${echo.a.port}`]));
    });
  });

  describe('stopped at once', () => {
    let sg: Gateway;
    let Q: number;
    before(async () => {
      ({ gw: sg, port: Q } = await variant('config-stop', {}, ['--drain-timeout', '1s']));
    });
    after(async () => { await sg?.stop(); });

    // The relay's records reach JS in batches: a connection that starts a moment before SIGTERM
    // forgets the learned routes has its START and END records still on their way.
    it('SIGTERM the moment a relay-routed connection reached its upstream: the connection is closed and still logged', { timeout: 30_000 }, async () => {
      const hold = async (): Promise<{ s: net.Socket; down: string; closed: Promise<Buffer> }> => {
        const n = holder.conns.length;
        const s = await dial(Q);
        const closed = closedWith(s, 10_000);
        s.write(helloHold);
        // Polled closely: SIGTERM must come before the relay's next batch of records (up to 100 ms).
        const deadline = Date.now() + 5_000;
        while (!(holder.conns.length > n && Buffer.concat(holder.conns[n]!.bytes).length >= helloHold.length)) {
          if (Date.now() > deadline) assert.fail('the holder did not get the hello within 5 s');
          await sleep(1);
        }
        return { s, down: `127.0.0.1:${s.localPort}`, closed };
      };
      const first = await hold();
      first.s.destroy();
      // Logged once JS routed it, and so learned.
      await entryFor(sg, first.down);
      const second = await hold();
      try {
        assert.equal(await sg.stop('SIGTERM'), 0);
        await second.closed;
        const e = await entryFor(sg, second.down);
        assert.deepEqual([e.sni, e.upstream, e.bytesReceived], ['hold.example.com', `127.0.0.1:${holder.port}`, helloHold.length]);
      } finally {
        second.s.destroy();
      }
    });
  });

  describe('TLSGATE_NATIVE_ROUTES=0', () => {
    let off: Gateway;
    let Q: number;
    before(async () => {
      ({ gw: off, port: Q } = await variant('config-off', { TLSGATE_NATIVE_ROUTES: '0' }));
    });
    after(async () => { await off?.stop(); });

    it('JS routes every connection; the access log is the same', async () => {
      const runs = await fourToA(Q);
      const entries = await Promise.all(runs.map((x) => entryFor(off, x.down)));
      assert.deepEqual(entries.map((e) => [e.reason, e.sni, e.alpn, e.upstream, e.bytesReceived]), runs.map((x) => ['ok', 'a.example.com', 'h2,http/1.1', `127.0.0.1:${echo.a.port}`, x.written]));
      assert.equal(await metric(off, 'native_routed_connections_total'), 0);
      assert.equal(await metric(off, 'tls_inspector_sni_found_total', { listener: `127.0.0.1_${Q}` }), 4);
    });
  });
});
