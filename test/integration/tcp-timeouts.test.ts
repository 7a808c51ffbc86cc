/**
 * TCP proxy timeouts (issue 3) with real sockets on 127.0.0.1, for a plain TCP route and a TLS
 * passthrough route:
 * - idle timeout: a connection with no bytes either way is closed after it (reason idle_timeout);
 *   one exchanging bytes every 300 ms for 3 s is not;
 * - connect timeout (DestinationRule connectionPool.tcp.connectTimeout): an upstream that never
 *   answers the SYN closes the client after it (reason upstream_connect_timeout).
 *
 * The unanswered SYN, on loopback only: a listener whose process never accepts (its event loop is
 * blocked) and whose accept queue is full; Linux then drops further SYNs, so connect() hangs.
 *
 * The data plane runs in this process; the idle timeout comes from the destinations'
 * DestinationRule (connectionPool.tcp.idleTimeout: 1s). Every case runs once per TCP relay
 * (`run --relay`, process-wide): js, and native when the addon is built.
 */
import assert from 'node:assert/strict';
import { mkdir, writeFile } from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import tls from 'node:tls';
import { loadConfig } from '../../src/config/load.js';
import { translate } from '../../src/model/translate/index.js';
import { setRelayMode } from '../../src/runtime/chain/native-relay.js';
import { DataPlane } from '../../src/runtime/lifecycle.js';
import { certDir, makeCa, makeLeaf, type Ca, type KeyPair } from '../helpers/certs.js';
import { freePorts, sleep } from '../helpers/ports.js';
import { startTcpEcho, type TcpServer } from '../helpers/upstreams.js';
import { startBlackhole } from '../helpers/blackhole.js';
import { RecordingTelemetry, localServiceEntry } from '../helpers/recording-telemetry.js';

const IDLE_MS = 1_000;
const CONNECT_TIMEOUT_MS = 500;

/** The relay modes this build can run (`run --relay`): js always; native when the addon is built. */
function relayModes(): { name: string; set(): void }[] {
  const modes = [{ name: '--relay js', set: () => { setRelayMode('js'); } }];
  // 'auto' (the default) picks the native relay when the addon is built; otherwise it is js again.
  if (setRelayMode('auto') === 'native') modes.push({ name: '--relay auto (native)', set: () => { setRelayMode('auto'); } });
  setRelayMode('js');
  return modes;
}

let dir: string;
let ca: Ca;
let passCert: KeyPair;
let echo: TcpServer;
let tlsEcho: TcpServer;
let blackhole: Awaited<ReturnType<typeof startBlackhole>>;
let dataPlane: DataPlane;
const telemetry = new RecordingTelemetry();
let P_TCP: number, P_PASS: number, P_TCP_CT: number, P_PASS_CT: number;

before(async () => {
  dir = await certDir('tlsgate-tcp-timeouts-');
  ca = await makeCa(dir, 'ca', '/O=tcp timeouts/CN=timeouts-ca');
  passCert = await makeLeaf(dir, ca, 'pass', { cn: 'pass.example.com', sans: ['DNS:pass.example.com', 'DNS:ct.example.com'], serial: 2 });
  echo = await startTcpEcho();
  tlsEcho = await startTcpEcho({ tls: { cert: passCert.cert, key: passCert.key } });
  blackhole = await startBlackhole();
  [P_TCP, P_PASS, P_TCP_CT, P_PASS_CT] = await freePorts(4) as [number, number, number, number];
  const cfg = path.join(dir, 'config');
  await mkdir(cfg);
  await writeFile(path.join(cfg, 'config.yaml'), `apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  servers:
  - {port: {number: ${P_TCP}, name: tcp, protocol: TCP}, hosts: ["*"]}
  - {port: {number: ${P_TCP_CT}, name: tcp-ct, protocol: TCP}, hosts: ["*"]}
  - port: {number: ${P_PASS}, name: pass, protocol: TLS}
    hosts: [pass.example.com]
    tls: {mode: PASSTHROUGH}
  - port: {number: ${P_PASS_CT}, name: pass-ct, protocol: TLS}
    hosts: [ct.example.com]
    tls: {mode: PASSTHROUGH}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: tcp}
spec:
  hosts: ["*"]
  gateways: [gw]
  tcp:
  - match: [{port: ${P_TCP}}]
    route: [{destination: {host: echo.local, port: {number: ${echo.port}}}}]
  - match: [{port: ${P_TCP_CT}}]
    route: [{destination: {host: blackhole.local, port: {number: ${blackhole.port}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: pass}
spec:
  hosts: [pass.example.com, ct.example.com]
  gateways: [gw]
  tls:
  - match: [{port: ${P_PASS}, sniHosts: [pass.example.com]}]
    route: [{destination: {host: tlsecho.local, port: {number: ${tlsEcho.port}}}}]
  - match: [{port: ${P_PASS_CT}, sniHosts: [ct.example.com]}]
    route: [{destination: {host: blackhole.local, port: {number: ${blackhole.port}}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: blackhole}
spec:
  host: blackhole.local
  trafficPolicy:
    connectionPool:
      tcp: {connectTimeout: ${CONNECT_TIMEOUT_MS}ms}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo}
spec:
  host: echo.local
  trafficPolicy:
    connectionPool:
      tcp: {idleTimeout: ${IDLE_MS}ms}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: tlsecho}
spec:
  host: tlsecho.local
  trafficPolicy:
    connectionPool:
      tcp: {idleTimeout: ${IDLE_MS}ms}
---
${localServiceEntry('echo', 'echo.local', echo.port)}---
${localServiceEntry('tlsecho', 'tlsecho.local', tlsEcho.port, 'TLS')}---
${localServiceEntry('blackhole', 'blackhole.local', blackhole.port)}`);
  const loaded = await loadConfig([cfg]);
  const { snapshot, diagnostics } = translate(loaded.resources, { bindAddress: '127.0.0.1' });
  const errors = [...loaded.diagnostics, ...diagnostics].filter((d) => d.severity === 'error');
  assert.deepEqual(errors, []);
  dataPlane = new DataPlane({ telemetry });
  const applied = await dataPlane.apply(snapshot);
  assert.ok(applied.ok, applied.errors.join('; '));
});

after(async () => {
  await dataPlane?.close();
  await echo?.close();
  await tlsEcho?.close();
  await blackhole?.close();
});

/** `since`: when the client started connecting (its access-log entry is recorded after that). */
type Client = { socket: net.Socket; localPort: number; closed: Promise<number>; received(): string; since: number };

/** A client through the gateway: plain TCP, or TLS with SNI (passthrough: the upstream terminates). */
async function connect(port: number, servername?: string): Promise<Client> {
  const since = Date.now();
  let data = '';
  let socket: net.Socket;
  if (servername) {
    const t = tls.connect({ host: '127.0.0.1', port, servername, ca: ca.certPem });
    await new Promise<void>((resolve, reject) => { t.once('secureConnect', resolve); t.once('error', reject); });
    socket = t;
  } else {
    socket = net.connect(port, '127.0.0.1');
    await new Promise<void>((resolve, reject) => { socket.once('connect', resolve); socket.once('error', reject); });
  }
  socket.on('error', () => {});
  socket.setEncoding('utf8');
  socket.on('data', (d: string) => { data += d; });
  const closed = new Promise<number>((resolve) => socket.once('close', () => resolve(Date.now())));
  return { socket, localPort: socket.localPort!, closed, received: () => data, since };
}

/** Sends `text` and waits for its echo (bounded). */
async function roundTrip(c: Client, text: string): Promise<void> {
  const want = c.received() + text;
  c.socket.write(text);
  const deadline = Date.now() + 5_000;
  while (c.received() !== want) {
    if (Date.now() > deadline) throw new Error(`no echo of ${JSON.stringify(text)} (got ${JSON.stringify(c.received())})`);
    await sleep(10);
  }
}

/** Resolves with the close time, or undefined if the socket is still open after `ms`. */
function closedWithin(c: Client, ms: number): Promise<number | undefined> {
  return Promise.race([c.closed, sleep(ms).then(() => undefined)]);
}

const routes = [
  { name: 'TCP route', port: () => P_TCP, ctPort: () => P_TCP_CT, sni: undefined, ctSni: undefined },
  { name: 'TLS passthrough route', port: () => P_PASS, ctPort: () => P_PASS_CT, sni: 'pass.example.com', ctSni: 'ct.example.com' },
] as const;

for (const mode of relayModes()) {
  describe(`TCP timeouts (${mode.name})`, () => {
    before(() => mode.set());

    for (const r of routes) {
      it(`${r.name}: an idle connection is closed after the idle timeout (idle_timeout)`, async () => {
        const c = await connect(r.port(), r.sni);
        await roundTrip(c, 'hello');
        const lastActivity = Date.now();
        const closedAt = await closedWithin(c, 10_000);
        assert.ok(closedAt !== undefined, 'the idle connection is still open after 10 s');
        // Not before the timeout (a little slack for timer granularity).
        assert.ok(closedAt - lastActivity >= IDLE_MS - 100, `closed ${closedAt - lastActivity} ms after the last byte`);
        const e = await telemetry.entryFor(c.localPort, 5_000, c.since);
        assert.equal(e.reason, 'idle_timeout');
        assert.equal(e.kind, 'tcp');
        assert.ok(Number(e.upstreamBytesReceived) > 0, 'bytes came back from the upstream before the timeout');
      });

      it(`${r.name}: a connection exchanging bytes every 300 ms for 3 s stays open`, async () => {
        const c = await connect(r.port(), r.sni);
        const started = Date.now();
        let n = 0;
        while (Date.now() - started < 3_000) {
          await roundTrip(c, `ping ${n++}\n`);
          assert.equal(await closedWithin(c, 300), undefined, `closed while active (after ${Date.now() - started} ms)`);
        }
        assert.ok(n >= 5, `only ${n} round trips`);
        assert.equal(c.received(), Array.from({ length: n }, (_, i) => `ping ${i}\n`).join(''));
        // Ended by the client, not by the gateway.
        c.socket.end();
        await closedWithin(c, 5_000);
        const e = await telemetry.entryFor(c.localPort, 5_000, c.since);
        assert.equal(e.reason, 'ok');
      });

      it(`${r.name}: an upstream that never answers the SYN closes the client after connectTimeout (upstream_connect_timeout)`, async () => {
        const started = Date.now();
        // Passthrough: the client's handshake never completes (its ClientHello goes nowhere), so
        // connect at the TCP level and send a ClientHello by hand through a TLS socket on it.
        let c: Client;
        if (r.ctSni) {
          const raw = net.connect(r.ctPort(), '127.0.0.1');
          await new Promise<void>((resolve, reject) => { raw.once('connect', resolve); raw.once('error', reject); });
          const localPort = raw.localPort!;
          const t = tls.connect({ socket: raw, servername: r.ctSni, ca: ca.certPem });
          t.on('error', () => {});
          raw.on('error', () => {});
          const closed = new Promise<number>((resolve) => raw.once('close', () => resolve(Date.now())));
          c = { socket: raw, localPort, closed, received: () => '', since: started };
        } else {
          c = await connect(r.ctPort());
          c.socket.write('anyone there?');
        }
        const closedAt = await closedWithin(c, 10_000);
        assert.ok(closedAt !== undefined, 'the client is still open 10 s after connecting');
        assert.ok(closedAt - started >= CONNECT_TIMEOUT_MS - 100, `closed ${closedAt - started} ms after connecting`);
        const e = await telemetry.entryFor(c.localPort, 5_000, c.since);
        assert.equal(e.reason, 'upstream_connect_timeout');
        assert.equal(e.upstream, undefined);
        assert.equal(e.bytesSent, 0, 'nothing was sent to the client');
      });
    }
  });
}
