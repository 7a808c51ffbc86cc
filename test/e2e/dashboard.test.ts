/**
 * The dashboard end to end: one `tlsgate run` serving a demo-like config (HTTP, SIMPLE, MUTUAL and
 * PASSTHROUGH on one port, TLS origination, an auto-mTLS mesh cluster, an ISTIO_MUTUAL egress
 * server carrying TLS inside mTLS), real curl traffic, then
 *   - the /api and /events endpoints over plain HTTP (always), and
 *   - the page in headless Chromium (Debian `chromium` driven by playwright-core; skipped with a
 *     message when either is missing): map markings, counters moving after a curl, certificate
 *     expiry, an explain query drawing its path, keyboard reachability. Screenshots go to
 *     test-artifacts/ (the demo test refreshes docs/dashboard.png with UPDATE_SCREENSHOT=1).
 */
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { createCa, issueCert } from '../../src/pki/mint.js';
import { curl } from '../helpers/exec.js';
import { freePorts } from '../helpers/ports.js';
import { REPO_ROOT, runCli, startTlsgate, type Gateway } from '../helpers/tlsgate.js';
import { startEchoServer, type EchoServer } from '../helpers/upstreams.js';

const CHROMIUM = '/usr/bin/chromium';
const ARTIFACTS = path.join(REPO_ROOT, 'test-artifacts');

type Json = Record<string, any>; // eslint-disable-line @typescript-eslint/no-explicit-any

async function getJson(port: number, p: string): Promise<{ status: number; body: Json }> {
  return new Promise((resolve, reject) => {
    const req = http.get({ host: '127.0.0.1', port, path: p, agent: false, timeout: 5000 }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => {
        try { resolve({ status: res.statusCode ?? 0, body: JSON.parse(Buffer.concat(chunks).toString('utf8')) as Json }); } catch (e) { reject(e as Error); }
      });
      res.on('error', reject);
    });
    req.on('timeout', () => req.destroy(new Error(`GET ${p} timed out`)));
    req.on('error', reject);
  });
}

/** Reads server-sent events from /events until `want` returns true or the time is up. */
function readEvents(port: number, want: (event: string, data: Json) => boolean, timeoutMs = 8000): Promise<{ event: string; data: Json }[]> {
  return new Promise((resolve, reject) => {
    const seen: { event: string; data: Json }[] = [];
    let buf = '';
    const req = http.get({ host: '127.0.0.1', port, path: '/events', agent: false }, (res) => {
      assert.equal(res.headers['content-type'], 'text/event-stream');
      res.setEncoding('utf8');
      res.on('data', (chunk: string) => {
        buf += chunk;
        if (buf.length > 4 << 20) { req.destroy(); reject(new Error('event stream too large')); return; }
        let i: number;
        while ((i = buf.indexOf('\n\n')) >= 0) {
          const block = buf.slice(0, i);
          buf = buf.slice(i + 2);
          const ev = /^event: (.*)$/m.exec(block)?.[1];
          const data = /^data: (.*)$/m.exec(block)?.[1];
          if (!ev || data === undefined) continue;
          const item = { event: ev, data: JSON.parse(data) as Json };
          seen.push(item);
          if (want(item.event, item.data)) { clearTimeout(timer); req.destroy(); resolve(seen); return; }
        }
      });
      res.on('error', () => {});
    });
    req.on('error', () => {});
    const timer = setTimeout(() => { req.destroy(); reject(new Error(`no matching event within ${timeoutMs} ms; saw ${seen.map((s) => s.event).join(',')}`)); }, timeoutMs);
  });
}

describe('dashboard: /api, /events and the page in headless Chromium', () => {
  let dir: string;
  let gw: Gateway;
  let plain: EchoServer;
  let tlsApp: EchoServer;
  let pHttp: number, pTls: number, pEgress: number, pMesh: number;
  let certs: string;

  before(async () => {
    dir = await mkdtemp(path.join(os.tmpdir(), 'tlsgate-dashboard-'));
    certs = path.join(dir, 'certs');
    await mkdir(certs);
    const ca = await createCa({ commonName: 'dashboard test CA', keyType: 'EC' });
    await writeFile(path.join(certs, 'ca.crt'), ca.certPem);
    for (const host of ['app.test.local', 'mtls.test.local', 'tls.test.local']) {
      const c = await issueCert(ca, { commonName: host, dnsNames: [host], server: true, keyType: 'EC', days: 20 });
      await writeFile(path.join(certs, `${host}.crt`), c.chainPem);
      await writeFile(path.join(certs, `${host}.key`), c.keyPem, { mode: 0o600 });
    }
    const client = await issueCert(ca, { commonName: 'client.test.local', client: true, keyType: 'EC' });
    await writeFile(path.join(certs, 'client.crt'), client.certPem);
    await writeFile(path.join(certs, 'client.key'), client.keyPem, { mode: 0o600 });
    const init = await runCli(['ca', 'init', '--dir', path.join(dir, 'meshca')]);
    assert.equal(init.code, 0, init.stderr);
    plain = await startEchoServer({ name: 'plain' });
    tlsApp = await startEchoServer({ name: 'tls-app', tls: { cert: path.join(certs, 'tls.test.local.crt'), key: path.join(certs, 'tls.test.local.key') } });
    [pHttp, pTls, pEgress, pMesh] = await freePorts(4) as [number, number, number, number];
    const conf = path.join(dir, 'conf');
    await mkdir(conf);
    await writeFile(path.join(conf, 'demo.yaml'), `apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: http, namespace: istio-system}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: ${pHttp}, name: http, protocol: HTTP}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: ingress, namespace: istio-system}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: ${pTls}, name: https-app, protocol: HTTPS}
    hosts: [app.test.local]
    tls: {mode: SIMPLE, serverCertificate: ../certs/app.test.local.crt, privateKey: ../certs/app.test.local.key}
  - port: {number: ${pTls}, name: https-mtls, protocol: HTTPS}
    hosts: [mtls.test.local]
    tls: {mode: MUTUAL, serverCertificate: ../certs/mtls.test.local.crt, privateKey: ../certs/mtls.test.local.key, caCertificates: ../certs/ca.crt}
  - port: {number: ${pTls}, name: tls, protocol: TLS}
    hosts: [tls.test.local]
    tls: {mode: PASSTHROUGH}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: egress, namespace: istio-system}
spec:
  selector: {istio: egressgateway}
  servers:
  - port: {number: ${pEgress}, name: tls-mtls, protocol: TLS}
    hosts: [tls.test.local]
    tls: {mode: ISTIO_MUTUAL}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: istio-system}
spec:
  hosts: ["*"]
  gateways: [http]
  http:
  - match: [{uri: {prefix: /origin}}]
    route: [{destination: {host: origin.test.local, port: {number: 80}}}]
  - match: [{uri: {prefix: /mesh}}]
    route: [{destination: {host: httpbin.foo.svc.cluster.local, port: {number: 8000}}}]
  - route: [{destination: {host: plain.test.local, port: {number: 80}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web-tls, namespace: istio-system}
spec:
  hosts: [app.test.local, mtls.test.local]
  gateways: [ingress]
  http:
  - route: [{destination: {host: plain.test.local, port: {number: 80}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: passthrough, namespace: istio-system}
spec:
  hosts: [tls.test.local]
  gateways: [ingress]
  tls:
  - match: [{port: ${pTls}, sniHosts: [tls.test.local]}]
    route: [{destination: {host: tls.test.local, port: {number: 443}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: egress-tcp, namespace: istio-system}
spec:
  hosts: [tls.test.local]
  gateways: [egress]
  tcp:
  - match: [{port: ${pEgress}}]
    route: [{destination: {host: tls.test.local, port: {number: 443}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: plain, namespace: istio-system}
spec:
  hosts: [plain.test.local]
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP, targetPort: ${plain.port}}]
  endpoints: [{address: 127.0.0.1}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: tls-app, namespace: istio-system}
spec:
  hosts: [tls.test.local]
  resolution: STATIC
  ports: [{number: 443, name: tls, protocol: TLS, targetPort: ${tlsApp.port}}]
  endpoints: [{address: 127.0.0.1}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: origin, namespace: istio-system}
spec:
  hosts: [origin.test.local]
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP, targetPort: ${tlsApp.port}}]
  endpoints: [{address: 127.0.0.1}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: origin, namespace: istio-system}
spec:
  host: origin.test.local
  trafficPolicy:
    tls: {mode: SIMPLE, sni: tls.test.local, caCertificates: ../certs/ca.crt}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: httpbin, namespace: foo}
spec:
  hosts: [httpbin.foo.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 8000, name: http, protocol: HTTP}]
  endpoints: [{address: 127.0.0.1, ports: {http: ${pMesh}}, labels: {security.istio.io/tlsMode: istio}}]
`);
    gw = await startTlsgate({ configPaths: [conf], args: ['--ca-dir', path.join(dir, 'meshca'), '--service-account', 'istio-ingressgateway-service-account'] });
  });

  after(async () => {
    await gw?.stop();
    await plain?.close();
    await tlsApp?.close();
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  const simple = () => curl(['--cacert', path.join(certs, 'ca.crt'), '--resolve', `app.test.local:${pTls}:127.0.0.1`, `https://app.test.local:${pTls}/hello`]);

  it('/api/overview maps every mode with its TLS marking and certificates', async () => {
    const { status, body } = await getJson(gw.adminPort, '/api/overview');
    assert.equal(status, 200);
    const p = body['proxies'][0];
    assert.ok(p.generation >= 1);
    const chains = p.map.listeners.find((l: Json) => l.port === pTls).chains;
    const chainFor = (sni: string) => chains.find((c: Json) => c.serverNames.includes(sni));
    assert.equal(chainFor('app.test.local').mark, 'terminated');
    assert.equal(chainFor('app.test.local').certs[0].sans[0], 'DNS:app.test.local');
    assert.equal(chainFor('mtls.test.local').mark, 'terminated-mutual');
    assert.equal(chainFor('tls.test.local').mark, 'passthrough');
    const egress = p.map.listeners.find((l: Json) => l.port === pEgress).chains[0];
    assert.equal(egress.mark, 'mtls');
    assert.equal(egress.routes[0].mark, 'tls-in-mtls');
    const cluster = (name: string) => p.map.clusters.find((c: Json) => c.name === name);
    assert.equal(cluster('outbound|80||origin.test.local').mark, 'originated');
    assert.equal(cluster('outbound|8000||httpbin.foo.svc.cluster.local').mark, 'mtls');
    assert.equal(cluster('outbound|80||plain.test.local').mark, 'plaintext');
    // 20-day server certificates: "soon" (under 30 days), with their expiry.
    const leaf = p.certs.find((c: Json) => c.role === 'leaf' && c.sans.includes('DNS:app.test.local'));
    assert.equal(leaf.level, 'soon');
    assert.ok(leaf.secondsLeft > 19 * 86400 && leaf.secondsLeft <= 20 * 86400, String(leaf.secondsLeft));
    assert.equal(p.applies[0].trigger, 'start');
    assert.equal(body['marks']['tls-in-mtls'], 'client TLS inside Istio mTLS (double encryption)');
  });

  it('/events streams stats whose counters move after a curl, and the access-log entry with SNI', async () => {
    const before = await getJson(gw.adminPort, '/api/stats');
    const route = (s: Json) => (Object.values(s)[0] as Json).routes.find((r: Json) => r.route === 'istio-system/web-tls#http[0]');
    const n0 = route(before.body)?.requests ?? 0;
    const events = readEvents(gw.adminPort, (ev, d) => ev === 'log' && d.entries.some((e: Json) => e.entry.path === '/hello'));
    await new Promise((r) => setTimeout(r, 300));
    const r = await simple();
    assert.equal(r.status, 200, r.stderr);
    const seen = await events;
    const log = seen.filter((s) => s.event === 'log').flatMap((s) => s.data['entries']).find((e: Json) => e.entry.path === '/hello');
    assert.equal(log.entry.sni, 'app.test.local');
    assert.equal(log.entry.reason, 'ok');
    assert.ok(seen.some((s) => s.event === 'stats'));
    const after = await getJson(gw.adminPort, '/api/stats');
    assert.equal(route(after.body).requests, n0 + 1);
    // A handshake refused for lack of a client certificate is counted by reason.
    const m = await curl(['--cacert', path.join(certs, 'ca.crt'), '--resolve', `mtls.test.local:${pTls}:127.0.0.1`, `https://mtls.test.local:${pTls}/`]);
    assert.equal(m.status, 0);
    // The server sees the missing certificate after curl gave up (TLS 1.3): poll briefly.
    let l: Json = {};
    for (let i = 0; i < 50; i++) {
      const s2 = await getJson(gw.adminPort, '/api/stats');
      l = (Object.values(s2.body)[0] as Json).listeners[`127.0.0.1_${pTls}`];
      if (Object.keys(l['handshakeFailures']).length > 0) break;
      await new Promise((res) => setTimeout(res, 100));
    }
    assert.ok((l['handshakeFailures']['client_cert_required'] ?? 0) >= 1, JSON.stringify(l));
    const logs = await getJson(gw.adminPort, '/api/logs?limit=10');
    assert.ok(logs.body['entries'].some((e: Json) => e.path === '/hello'));
  });

  it('/api/explain runs explain() over the live snapshot and names the hops', async () => {
    const r = await getJson(gw.adminPort, `/api/explain?target=${encodeURIComponent(`https://app.test.local:${pTls}/x`)}`);
    assert.equal(r.status, 200);
    assert.equal(r.body['explanation'].outcome, 'forwarded');
    assert.deepEqual(r.body['path'].map((x: string) => x.split(':')[0]), ['L', 'C', 'R', 'K', 'E']);
    const pass = await getJson(gw.adminPort, `/api/explain?sni=tls.test.local&port=${pTls}`);
    assert.equal(pass.body['explanation'].tls.action, 'passthrough');
    const bad = await getJson(gw.adminPort, '/api/explain?target=ftp://x');
    assert.equal(bad.status, 400);
    assert.match(bad.body['error'], /URL/);
  });

  it('the existing admin endpoints are unchanged', async () => {
    const cd = await getJson(gw.adminPort, '/config_dump');
    assert.ok(Array.isArray(cd.body['listeners']));
    const ready = await gw.admin('/ready');
    assert.equal(ready.status, 200);
    const page = await gw.admin('/');
    assert.equal(page.status, 200);
    assert.match(page.headers['content-type'] ?? '', /text\/html/);
    assert.match(String(page.headers['content-security-policy']), /default-src 'none'/);
    assert.doesNotMatch(page.body, /(src|href)="(https?:)?\/\//i, 'no external asset in the page (works offline)');
  });

  it('the page in headless Chromium: map, live counters, certificates, explain path', async (t) => {
    if (!existsSync(CHROMIUM)) { t.skip(`${CHROMIUM} is not installed (apt-get install chromium); the /api tests above still ran`); return; }
    let pw: typeof import('playwright-core');
    try { pw = await import('playwright-core'); } catch { t.skip('playwright-core is not installed (npm ci)'); return; }
    await mkdir(ARTIFACTS, { recursive: true });
    const browser = await pw.chromium.launch({
      executablePath: CHROMIUM, headless: true, timeout: 20_000,
      args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run'],
    });
    try {
      const page = await browser.newPage({ viewport: { width: 1440, height: 1000 } });
      const external: string[] = [];
      page.on('request', (req) => { if (!req.url().startsWith(gw.adminUrl)) external.push(req.url()); });
      const errors: string[] = [];
      page.on('pageerror', (e) => errors.push(e.message));
      await page.goto(`${gw.adminUrl}/`, { timeout: 15_000 });
      await page.waitForSelector('body[data-loaded="true"]', { timeout: 10_000 });
      await page.waitForSelector('#conn-status.live', { timeout: 10_000 });

      // Each mode shows with its marking, on the hop it belongs to.
      const markOf = (hopSelector: string) => page.locator(`${hopSelector} .badge`).first().getAttribute('data-mark');
      const chainBy = async (text: string) => page.locator(`#map-diagram .listener[id$="-${pTls}"] .hop.chain`, { hasText: text }).first();
      assert.equal(await (await chainBy('SNI app.test.local')).locator('.badge').getAttribute('data-mark'), 'terminated');
      assert.equal(await (await chainBy('SNI mtls.test.local')).locator('.badge').getAttribute('data-mark'), 'terminated-mutual');
      assert.equal(await (await chainBy('SNI tls.test.local')).locator('.badge').first().getAttribute('data-mark'), 'passthrough');
      assert.equal(await markOf('#map-diagram [data-hop="K:outbound|80||origin.test.local"]'), 'originated');
      assert.equal(await markOf('#map-diagram [data-hop="K:outbound|8000||httpbin.foo.svc.cluster.local"]'), 'mtls');
      assert.equal(await page.locator('#map-diagram .hop.route .badge[data-mark="tls-in-mtls"]').count(), 1);
      // The certificate served at the SIMPLE chain, with its time left.
      const served = await (await chainBy('SNI app.test.local')).locator('.cert').first().textContent();
      assert.match(served ?? '', /serves: DNS:app\.test\.local .*(19|20) d left/);
      // The certificates table: expiry shown and coloured by time left (under 30 days: "soon").
      const row = page.locator('#cert-list tr', { hasText: 'DNS:app.test.local' }).first();
      assert.match((await row.textContent()) ?? '', /\d{4}-\d\d-\d\d .*UTC.*d left/);
      assert.equal(await row.locator('.left').getAttribute('class'), 'left lvl-soon');

      // Counters move after a curl (SSE pushes stats every second).
      const stat = page.locator('[data-rstats$="|istio-system/web-tls#http[0]"]').first();
      const before = Number(/^(\d+) requests/.exec((await stat.textContent()) ?? '')?.[1] ?? 0);
      for (let i = 0; i < 3; i++) assert.equal((await simple()).status, 200);
      await page.waitForFunction((n: number) => {
        const m = /^(\d+) requests/.exec(document.querySelector('[data-rstats$="|istio-system/web-tls#http[0]"]')?.textContent ?? '');
        return m !== null && Number(m[1]) >= n + 3;
      }, before, { timeout: 8000 });
      await page.waitForSelector('#log-body tr:has-text("/hello")', { timeout: 5000 });
      assert.match((await page.locator('#log-body tr', { hasText: '/hello' }).first().textContent()) ?? '', /app\.test\.local/);
      await page.screenshot({ path: path.join(ARTIFACTS, 'dashboard-live.png'), fullPage: true });

      // Explain draws its path on the map: listener, chain, route, cluster, endpoint.
      await page.fill('#ex-target', `https://app.test.local:${pTls}/x`);
      await page.press('#ex-target', 'Enter');
      await page.waitForSelector('#map-diagram .hop.on-path', { timeout: 5000 });
      const onPath = await page.$$eval('#map-diagram .hop.on-path', (els) => els.map((e) => e.getAttribute('data-hop')));
      assert.ok(onPath.includes('K:outbound|80||plain.test.local'), onPath.join(' '));
      assert.ok(onPath.some((h) => h?.startsWith('R:') && h.endsWith('web-tls#http[0]')), onPath.join(' '));
      assert.match((await page.locator('#explain-result').textContent()) ?? '', /TLS terminated here \(SIMPLE/);
      await page.locator('#map-diagram .hop.on-path').first().screenshot({ path: path.join(ARTIFACTS, 'dashboard-explain-hop.png') });
      await page.screenshot({ path: path.join(ARTIFACTS, 'dashboard-explain.png'), fullPage: true });

      // Keyboard: Tab reaches the explain box, and arrow keys move along a path.
      await page.focus('#map-diagram .hop.chain');
      await page.keyboard.press('ArrowRight');
      assert.equal(await page.evaluate(() => document.activeElement?.classList.contains('route')), true);
      // The same map as a table (text alternative).
      await page.click('#view-table');
      assert.ok(await page.locator('#map-table tr', { hasText: 'client TLS inside Istio mTLS' }).count() >= 1);
      await page.screenshot({ path: path.join(ARTIFACTS, 'dashboard-table.png'), fullPage: true });
      assert.deepEqual(external, [], 'the page asked nothing outside the admin server');
      assert.deepEqual(errors, []);
    } finally {
      await browser.close();
    }
  });
});
