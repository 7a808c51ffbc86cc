/**
 * Live operations against the real CLI: config edits applied without dropping requests, an
 * in-flight transfer surviving an edit, a broken edit keeping the last good config, certificate
 * rotation (plain rewrite and the Kubernetes `..data` symlink swap), SIGHUP, SIGTERM drain.
 */
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import * as http from 'node:http';
import * as net from 'node:net';
import { createHash } from 'node:crypto';
import { mkdtemp, writeFile, mkdir, symlink, rename, rm } from 'node:fs/promises';
import * as os from 'node:os';
import * as path from 'node:path';
import { freePort, sleep } from '../helpers/ports.js';
import { startTlsgate, type Gateway } from '../helpers/tlsgate.js';
import { makeCa, makeLeaf } from '../helpers/certs.js';
import { opensslSClient } from '../helpers/exec.js';

const cleanups: (() => Promise<unknown> | void)[] = [];
after(async () => {
  for (const c of cleanups.reverse()) await c();
});

/** An upstream that answers with its name, or streams 8 MiB slowly on /big. */
async function startUpstream(name: string): Promise<{ port: number; close(): void; delayed: Promise<void> }> {
  let markDelayed: () => void = () => {};
  const delayed = new Promise<void>((r) => { markDelayed = r; });
  const big = Buffer.alloc(8 * 1024 * 1024, 7);
  const server = http.createServer((req, res) => {
    if (req.url === '/big') {
      res.writeHead(200, { 'content-length': big.length });
      let off = 0;
      const step = () => {
        if (off >= big.length) return res.end();
        const chunk = big.subarray(off, off + 512 * 1024);
        off += chunk.length;
        if (res.write(chunk)) setTimeout(step, 60); else res.once('drain', () => setTimeout(step, 60));
      };
      step();
      return;
    }
    if (req.url?.startsWith('/delay/')) {
      markDelayed();
      setTimeout(() => res.end(`${name} delayed\n`), Number(req.url.slice(7)));
      return;
    }
    res.end(`${name}\n`);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return { port: (server.address() as { port: number }).port, close: () => { server.closeAllConnections(); server.close(); }, delayed };
}

function config(port: number, upstreamPort: number, body?: string): string {
  const action = body !== undefined
    ? `  - match: [{uri: {prefix: /direct}}]\n    directResponse: {status: 200, body: {string: "${body}"}}\n`
    : '';
  return `apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  servers:
  - port: {number: ${port}, name: http, protocol: HTTP}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: vs}
spec:
  hosts: ["*"]
  gateways: [gw]
  http:
${action}  - route: [{destination: {host: up.local, port: {number: 80}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: up}
spec:
  hosts: [up.local]
  ports: [{number: 80, name: http, protocol: HTTP, targetPort: ${upstreamPort}}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.1}]
`;
}

function get(port: number, p: string, agent?: http.Agent): Promise<{ status: number; body: Buffer }> {
  return new Promise((resolve, reject) => {
    const req = http.get({ host: '127.0.0.1', port, path: p, agent: agent ?? false, timeout: 15000 }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks) }));
      res.on('error', reject);
    });
    req.on('error', reject);
    req.on('timeout', () => req.destroy(new Error('timeout')));
  });
}

async function waitFor(pred: () => Promise<boolean>, ms = 15000): Promise<void> {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if (await pred()) return;
    await sleep(50);
  }
  assert.fail('condition not met in time');
}

async function generation(gw: Gateway): Promise<{ generation: number; lastApply: { ok: boolean; message: string } }> {
  return JSON.parse((await gw.admin('/config_dump')).body);
}

test('edits apply live: 20 route changes under a request loop, an 8 MiB transfer across an edit, a broken edit then a fix', async () => {
  const up = await startUpstream('up');
  cleanups.push(() => up.close());
  const dir = await mkdtemp(path.join(os.tmpdir(), 'tlsgate-reload-'));
  cleanups.push(() => rm(dir, { recursive: true, force: true }));
  const port = await freePort();
  const file = path.join(dir, 'gw.yaml');
  await writeFile(file, config(port, up.port, 'v0'));
  const gw = await startTlsgate({ configPaths: [dir] });
  cleanups.push(() => gw.stop());

  // The in-flight transfer starts on generation 1.
  const big = get(port, '/big');

  // A keep-alive request loop runs while the route changes 20 times.
  const agent = new http.Agent({ keepAlive: true, maxSockets: 4 });
  cleanups.push(() => agent.destroy());
  let stop = false;
  let ok = 0;
  const failures: string[] = [];
  const loop = (async () => {
    while (!stop) {
      try {
        const r = await get(port, '/direct', agent);
        if (r.status === 200 && /^v\d+$/.test(r.body.toString())) ok++;
        else failures.push(`${r.status} ${r.body.toString().slice(0, 50)}`);
      } catch (e) {
        failures.push((e as Error).message);
      }
    }
  })();
  try {
    for (let i = 1; i <= 20; i++) {
      await writeFile(file, config(port, up.port, `v${i}`));
      await waitFor(async () => (await get(port, '/direct')).body.toString() === `v${i}`).catch(async (e: Error) => {
        const dump = await gw.admin('/config_dump').then((r) => r.body.slice(0, 400), (x: Error) => x.message);
        const ops = gw.logs().filter((l) => !l.includes('"method"')).slice(-20);
        throw new Error(`edit v${i} not applied: ${e.message}\nconfig_dump: ${dump}\n${ops.join('\n')}`);
      });
    }
  } finally {
    stop = true; // the request loop must end even when an assertion fails
    await loop;
  }
  assert.deepEqual(failures, []);
  assert.ok(ok > 20, `the loop made progress (${ok} requests)`);
  const g = await generation(gw);
  assert.ok(g.generation >= 21, `generation ${g.generation}`);

  const done = await big;
  assert.equal(done.status, 200);
  assert.equal(done.body.length, 8 * 1024 * 1024);
  assert.equal(createHash('sha256').update(done.body).digest('hex'), createHash('sha256').update(Buffer.alloc(8 * 1024 * 1024, 7)).digest('hex'));

  // A broken edit keeps the last good config; /ready stays 200; the error shows on /config_dump.
  await writeFile(file, config(port, up.port, 'v20') + '\nthis: [is not yaml\n');
  await waitFor(async () => (await generation(gw)).lastApply.ok === false);
  assert.equal((await get(port, '/direct')).body.toString(), 'v20');
  assert.equal((await gw.admin('/ready')).status, 200);
  const dump = JSON.parse((await gw.admin('/config_dump')).body);
  assert.match(dump.lastApply.message, /rejected/);
  assert.ok(dump.lastApply.diagnostics.some((d: { code: string }) => d.code === 'TG1002'));
  // The fix applies.
  await writeFile(file, config(port, up.port, 'fixed'));
  await waitFor(async () => (await get(port, '/direct')).body.toString() === 'fixed');

  // Metrics report the generation and the last apply.
  const metrics = (await gw.admin('/stats/prometheus')).body;
  assert.match(metrics, /tlsgate_config_generation \d+/);
  assert.match(metrics, /tlsgate_config_last_apply_success 1/);
  assert.match(metrics, /tlsgate_requests_total\{/);
});

test('certificate rotation without restart: plain rewrite and the ..data symlink swap; SIGHUP reloads', async () => {
  const certs = await mkdtemp(path.join(os.tmpdir(), 'tlsgate-rot-certs-'));
  cleanups.push(() => rm(certs, { recursive: true, force: true }));
  const ca = await makeCa(certs, 'ca', '/O=example Inc./CN=example.com');
  const a = await makeLeaf(certs, ca, 'a', { cn: 'rotate.example.com', o: 'first', serial: 1 });
  const b = await makeLeaf(certs, ca, 'b', { cn: 'rotate.example.com', o: 'second', serial: 2 });
  const c = await makeLeaf(certs, ca, 'c', { cn: 'rotate.example.com', o: 'third', serial: 3 });

  // Kubernetes mounted-secret layout: tls.crt -> ..data/tls.crt, ..data -> ..v1
  const mount = await mkdtemp(path.join(os.tmpdir(), 'tlsgate-rot-mount-'));
  cleanups.push(() => rm(mount, { recursive: true, force: true }));
  await mkdir(path.join(mount, '..v1'));
  await writeFile(path.join(mount, '..v1', 'tls.crt'), a.certPem);
  await writeFile(path.join(mount, '..v1', 'tls.key'), a.keyPem, { mode: 0o600 });
  await symlink('..v1', path.join(mount, '..data'));
  await symlink('..data/tls.crt', path.join(mount, 'tls.crt'));
  await symlink('..data/tls.key', path.join(mount, 'tls.key'));

  const dir = await mkdtemp(path.join(os.tmpdir(), 'tlsgate-rot-cfg-'));
  cleanups.push(() => rm(dir, { recursive: true, force: true }));
  const port = await freePort();
  await writeFile(path.join(dir, 'gw.yaml'), `apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  servers:
  - port: {number: ${port}, name: https, protocol: HTTPS}
    hosts: [rotate.example.com]
    tls: {mode: SIMPLE, serverCertificate: ${mount}/tls.crt, privateKey: ${mount}/tls.key}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: vs}
spec:
  hosts: [rotate.example.com]
  gateways: [gw]
  http: [{directResponse: {status: 200, body: {string: ok}}}]
`);
  const gw = await startTlsgate({ configPaths: [dir] });
  cleanups.push(() => gw.stop());
  const subject = async () => (await opensslSClient({ port, servername: 'rotate.example.com', cafile: ca.cert })).peerCert?.subject ?? '';
  assert.match(await subject(), /O ?= ?first/);

  // An open TLS connection is not disturbed by the rotation.
  const held = await opensslHeld(port);

  // The Kubernetes way: write a new dir, swap the ..data link atomically.
  await mkdir(path.join(mount, '..v2'));
  await writeFile(path.join(mount, '..v2', 'tls.crt'), b.certPem);
  await writeFile(path.join(mount, '..v2', 'tls.key'), b.keyPem, { mode: 0o600 });
  await symlink('..v2', path.join(mount, '..data_tmp'));
  await rename(path.join(mount, '..data_tmp'), path.join(mount, '..data'));
  await waitFor(async () => /O ?= ?second/.test(await subject()));

  // An invalid pair (key of another cert) is refused; the old pair keeps serving.
  await writeFile(path.join(mount, '..v2', 'tls.key'), c.keyPem, { mode: 0o600 });
  await waitFor(async () => (await generation(gw)).lastApply.ok === false);
  assert.match(await subject(), /O ?= ?second/);

  // A plain rewrite of both files, then SIGHUP for good measure.
  await writeFile(path.join(mount, '..v2', 'tls.crt'), c.certPem);
  await writeFile(path.join(mount, '..v2', 'tls.key'), c.keyPem, { mode: 0o600 });
  process.kill(gw.pid, 'SIGHUP');
  await waitFor(async () => /O ?= ?third/.test(await subject()));

  // The connection opened before the rotations still works.
  assert.equal(await held.request(), 'ok');
  held.close();
});

/** A TLS connection held open across rotations, able to send one HTTP request later. */
async function opensslHeld(port: number): Promise<{ request(): Promise<string>; close(): void }> {
  const tls = await import('node:tls');
  const sock = tls.connect({ host: '127.0.0.1', port, servername: 'rotate.example.com', rejectUnauthorized: false, ALPNProtocols: ['http/1.1'] });
  await new Promise<void>((resolve, reject) => { sock.once('secureConnect', () => resolve()); sock.once('error', reject); });
  return {
    request: () => new Promise((resolve, reject) => {
      let data = '';
      sock.on('data', (d: Buffer) => {
        data += d.toString();
        const m = /\r\n\r\n([\s\S]*)$/.exec(data);
        if (m && m[1] === 'ok') resolve('ok');
      });
      sock.once('error', reject);
      sock.write('GET / HTTP/1.1\r\nhost: rotate.example.com\r\n\r\n');
    }),
    close: () => sock.destroy(),
  };
}

test('SIGTERM drains: /ready turns 503, an in-flight request completes, exit 0', async () => {
  const up = await startUpstream('slow');
  cleanups.push(() => up.close());
  const dir = await mkdtemp(path.join(os.tmpdir(), 'tlsgate-drain-'));
  cleanups.push(() => rm(dir, { recursive: true, force: true }));
  const port = await freePort();
  await writeFile(path.join(dir, 'gw.yaml'), config(port, up.port));
  const gw = await startTlsgate({ configPaths: [dir], args: ['--drain-grace', '300ms', '--drain-timeout', '10s'] });
  const inflight = get(port, '/delay/1200');
  inflight.catch(() => {}); // examined below; no unhandled rejection meanwhile
  await up.delayed; // the request is at the upstream: it is in flight through the gateway
  const exit = gw.stop('SIGTERM');
  await sleep(100);
  const ready = await gw.admin('/ready').catch((e: Error) => { throw new Error(`admin unreachable during the drain: ${e.message}\n${gw.logs().slice(-30).join('\n')}`); });
  assert.equal(ready.status, 503);
  const r = await inflight.catch((e: Error) => { throw new Error(`in-flight request failed: ${e.message}\n${gw.logs().slice(-30).join('\n')}`); });
  assert.equal(r.status, 200);
  assert.equal(r.body.toString(), 'slow delayed\n');
  assert.equal(await exit, 0);
  // After the drain the port is closed.
  await assert.rejects(get(port, '/'));
});

test('an apply the runtime refuses (a new port it cannot bind) leaves the upstream clusters as they were', async () => {
  const a = await startUpstream('a');
  const b = await startUpstream('b');
  cleanups.push(() => a.close(), () => b.close());
  const dir = await mkdtemp(path.join(os.tmpdir(), 'tlsgate-refused-'));
  cleanups.push(() => rm(dir, { recursive: true, force: true }));
  const port = await freePort();
  const file = path.join(dir, 'gw.yaml');
  await writeFile(file, config(port, a.port));
  const gw = await startTlsgate({ configPaths: [dir] });
  cleanups.push(() => gw.stop());
  assert.equal((await get(port, '/')).body.toString(), 'a\n');
  const before = (await generation(gw)).generation;

  // The new config moves up.local to b and adds a port someone else holds: the bind fails.
  const blocker = net.createServer();
  await new Promise<void>((r) => blocker.listen(0, '0.0.0.0', r));
  cleanups.push(() => new Promise<void>((r) => blocker.close(() => r())));
  const taken = (blocker.address() as net.AddressInfo).port;
  await writeFile(file, `${config(port, b.port)}---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: extra}
spec:
  servers:
  - port: {number: ${taken}, name: http2, protocol: HTTP}
    hosts: ["*"]
`);
  await waitFor(async () => (await generation(gw)).lastApply.ok === false);
  const g = await generation(gw);
  assert.match(g.lastApply.message, /cannot bind/);
  assert.equal(g.generation, before);
  // Still the old endpoint: the refused config changed nothing.
  for (let i = 0; i < 5; i++) assert.equal((await get(port, '/')).body.toString(), 'a\n');
});
