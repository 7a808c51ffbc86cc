// DestinationRule connectionPool.tcp.tcpKeepalive on upstream connections, as the kernel has it.
// In process: the cluster manager's own dials (plain and TLS), read back with getsockopt. Through
// the CLI: the native relay's three dials (a passthrough connection JS routed, the next one the
// relay routed by itself, a plain TCP route), seen from outside in /proc/net/tcp: the keep-alive timer
// starts at `time` and restarts at `interval` after the first probe. A cluster without the field
// gets no keep-alive at all, as Envoy's clusters get none unless asked.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { mkdir, readFile, rm, writeFile } from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import type { Cluster } from '../../src/model/snapshot.js';
import { nativeRelayAvailable, nativeRelayUnavailableReason, socketKeepalive } from '../../src/runtime/chain/native-relay.js';
import { ClusterManager } from '../../src/runtime/upstream/cluster-manager.js';
import { certDir, makeCa, makeLeaf } from '../helpers/certs.js';
import { freePorts, sleep } from '../helpers/ports.js';
import { localServiceEntry } from '../helpers/recording-telemetry.js';
import { startTlsgate, type Gateway } from '../helpers/tlsgate.js';
import { plainCluster, startHolder, startTcpEcho, type Holder, type TcpServer } from '../helpers/upstreams.js';
import { captureHello, dial, promMetric as metric, until } from '../helpers/tls-wire.js';

const SKIP = nativeRelayAvailable() ? false : `native relay not built: ${nativeRelayUnavailableReason()}`;
const osDefault = (name: string): number => Number(readFileSync(`/proc/sys/net/ipv4/tcp_keepalive_${name}`, 'utf8').trim());

/**
 * The keep-alive timers (ms left) of the established IPv4 sockets dialling `port`, one per
 * socket, null where none runs: /proc/net/tcp's `tr:tm->when`, where timer 2 on an established
 * socket is keep-alive and the time left is in USER_HZ (100) ticks.
 */
async function keepaliveTimers(port: number): Promise<(number | null)[]> {
  const rows = (await readFile('/proc/net/tcp', 'utf8')).split('\n').slice(1).map((l) => l.trim().split(/\s+/));
  return rows.filter((f) => f.length > 5 && f[3] === '01' && parseInt(f[2]!.split(':')[1]!, 16) === port).map((f) => {
    const [tr, when] = f[5]!.split(':') as [string, string];
    return tr === '02' ? parseInt(when, 16) * 10 : null;
  });
}

describe('connectionPool.tcp.tcpKeepalive', { skip: SKIP }, () => {
  let dir: string;
  before(async () => { dir = await certDir('tlsgate-keepalive-'); });
  after(async () => { await rm(dir, { recursive: true, force: true }); });

  describe('the cluster manager\'s dials (in process, getsockopt)', () => {
    let plain: TcpServer;
    let tlsUp: TcpServer;
    let caPem: string;
    before(async () => {
      const ca = await makeCa(dir, 'ca', '/O=keepalive/CN=ka-ca');
      caPem = ca.certPem;
      const leaf = await makeLeaf(dir, ca, 'up', { cn: 'up.test', sans: ['DNS:up.test'], serial: 2 });
      plain = await startTcpEcho();
      tlsUp = await startTcpEcho({ tls: { cert: leaf.cert, key: leaf.key } });
    });
    after(async () => { await plain?.close(); await tlsUp?.close(); });

    const dialed = async (c: Cluster) => {
      const cm = new ClusterManager({ up: c }, { secrets: (n) => (n === 'ca' ? { caPem } : undefined) });
      try {
        const { socket } = await cm.connectTcp('up');
        // Set once connected: the 'connect' listener ran before the dial was handed over.
        const ka = socketKeepalive(socket);
        socket.destroy();
        return ka;
      } finally {
        await cm.close(0);
      }
    };

    it('all three values on a plain and a TLS upstream; none without the field; one value alone leaves the others at the OS default', async () => {
      const ka = { timeS: 45, intervalS: 6, probes: 4 };
      assert.deepEqual(await dialed(plainCluster(plain.port, { tcpKeepalive: ka })), { on: true, ...ka });
      const tlsCluster = plainCluster(tlsUp.port, {
        tcpKeepalive: ka,
        tls: {
          mode: 'SIMPLE', sni: 'up.test', autoSni: false, validationCa: 'ca', subjectAltNames: [], autoSanValidation: true,
          insecureSkipVerify: false, alpn: [], minVersion: 'TLSv1.2', maxVersion: 'TLSv1.3',
        },
      });
      assert.deepEqual(await dialed(tlsCluster), { on: true, ...ka });
      assert.equal((await dialed(plainCluster(plain.port)))?.on, false);
      assert.deepEqual(await dialed(plainCluster(plain.port, { tcpKeepalive: { probes: 2 } })),
        { on: true, timeS: osDefault('time'), intervalS: osDefault('intvl'), probes: 2 });
    });
  });

  describe('the native relay\'s dials (CLI, /proc/net/tcp)', () => {
    let gw: Gateway;
    let P: number;
    let T: number;
    const up: Record<'ka' | 'plain' | 'tcp', Holder> = {} as never;
    let helloKa: Buffer;
    let helloPlain: Buffer;

    before(async () => {
      for (const k of ['ka', 'plain', 'tcp'] as const) up[k] = await startHolder();
      helloKa = await captureHello('ka.example.com');
      helloPlain = await captureHello('plain.example.com');
      [P, T] = await freePorts(2) as [number, number];
      const cfg = path.join(dir, 'config');
      await mkdir(cfg, { recursive: true });
      const dr = (name: string, host: string) => `apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ${name}}
spec:
  host: ${host}
  trafficPolicy: {connectionPool: {tcp: {tcpKeepalive: {time: 2s, interval: 7s, probes: 4}}}}
`;
      await writeFile(path.join(cfg, 'gw.yaml'), [`apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  servers:
  - port: {number: ${P}, name: tls, protocol: TLS}
    tls: {mode: PASSTHROUGH}
    hosts: [ka.example.com, plain.example.com]
  - port: {number: ${T}, name: tcp, protocol: TCP}
    hosts: ["*"]
`, `apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: pass}
spec:
  hosts: [ka.example.com, plain.example.com]
  gateways: [gw]
  tls:
  - match: [{sniHosts: [ka.example.com]}]
    route: [{destination: {host: ka.upstream.local}}]
  - match: [{sniHosts: [plain.example.com]}]
    route: [{destination: {host: plain.upstream.local}}]
`, `apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: tcp}
spec:
  hosts: ["*"]
  gateways: [gw]
  tcp:
  - route: [{destination: {host: tcp.upstream.local}}]
`,
      localServiceEntry('ka', 'ka.upstream.local', up.ka.port, 'TLS'),
      localServiceEntry('plain', 'plain.upstream.local', up.plain.port, 'TLS'),
      localServiceEntry('tcp', 'tcp.upstream.local', up.tcp.port, 'TCP'),
      dr('ka', 'ka.upstream.local'), dr('tcp', 'tcp.upstream.local')].join('---\n'));
      gw = await startTlsgate({ configPaths: [cfg], args: ['--relay', 'native', '--drain-timeout', '1s'] });
    });
    after(async () => {
      await gw?.stop();
      for (const h of Object.values(up)) h?.close();
    });

    it('a timer from `time` on every dial of the clusters that ask, restarted at `interval` after a probe; no timer for the cluster that does not', { timeout: 30_000 }, async () => {
      const held: net.Socket[] = [];
      const open = async (port: number, bytes: Buffer | undefined, to: Holder, n: number) => {
        const s = await dial(port);
        held.push(s);
        if (bytes) s.write(bytes);
        await until(`upstream connection ${n}`, () => (to.conns.length >= n ? true : undefined), 5_000);
        return `127.0.0.1:${s.localPort}`;
      };
      try {
        // The first ka.example.com connection is routed by JS (the addon dials), the second by the
        // relay from its learned route; then plain.example.com, and the TCP port.
        await open(P, helloKa, up.ka, 1);
        await open(P, helloKa, up.ka, 2);
        await until('the second routed by the relay', async () => ((await metric(gw, 'native_routed_connections_total')) === 1 ? true : undefined));
        await open(P, helloPlain, up.plain, 1);
        await open(T, undefined, up.tcp, 1);
        const t0 = Date.now();
        const atStart = { ka: await keepaliveTimers(up.ka.port), tcp: await keepaliveTimers(up.tcp.port), plain: await keepaliveTimers(up.plain.port) };
        assert.equal(atStart.ka.length, 2);
        assert.ok(atStart.ka.every((t) => t !== null && t <= 2_000), `ka at start: ${JSON.stringify(atStart.ka)}`);
        assert.ok(atStart.tcp.length === 1 && atStart.tcp[0] !== null && atStart.tcp[0] <= 2_000, `tcp at start: ${JSON.stringify(atStart.tcp)}`);
        assert.deepEqual(atStart.plain, [null]);
        // Past `time` (2 s): a probe went out and was answered; the next is `interval` (7 s) away.
        await sleep(Math.max(0, 3_500 - (Date.now() - t0)));
        const later = [...await keepaliveTimers(up.ka.port), ...await keepaliveTimers(up.tcp.port)];
        assert.equal(later.length, 3);
        assert.ok(later.every((t) => t !== null && t > 2_000 && t <= 7_000), `after the first probe: ${JSON.stringify(later)}`);
        assert.deepEqual(await keepaliveTimers(up.plain.port), [null]);
      } finally {
        for (const s of held) s.destroy();
      }
    });
  });
});
