/**
 * `npm start`: the demo command starts on a fresh tree, and the curl commands it prints for the
 * ingress SIMPLE path and the mesh path work as printed. It uses the demo's fixed ports (8080,
 * 8443, 15001, 15006, 15101, 15443, 18080, 18443, 18444) and a test-specific admin port; when a
 * fixed port is taken the test is skipped with the port named. With Chromium present it also
 * takes a screenshot of the demo's dashboard (UPDATE_SCREENSHOT=1 refreshes the README's docs/dashboard.png).
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir } from 'node:fs/promises';
import path from 'node:path';
import { after, it } from 'node:test';
import { run, stopChild, trackChild, waitForExit } from '../helpers/exec.js';
import { canConnect, freePort } from '../helpers/ports.js';
import { CLI_MAIN, REPO_ROOT } from '../helpers/tlsgate.js';

const FIXED = [8080, 8443, 15001, 15006, 15101, 15443, 18080, 18443, 18444];
const CHROMIUM = '/usr/bin/chromium';

let child: ReturnType<typeof spawn> | undefined;
after(async () => {
  if (child && child.exitCode === null) await stopChild(child);
});

/** The command printed right after the line that mentions `marker`'s mode, found by a fragment of it. */
function commandWith(out: string, fragment: string): string {
  const line = out.split('\n').find((l) => l.trim().startsWith('curl ') && l.includes(fragment));
  assert.ok(line, `no printed curl command contains ${fragment}:\n${out}`);
  return line.trim();
}

it('npm start: the demo runs, its printed SIMPLE and mesh commands work, Ctrl-C stops it', async (t) => {
  for (const p of FIXED) {
    if (await canConnect(p, '127.0.0.1', 300)) { t.skip(`demo port 127.0.0.1:${p} is in use`); return; }
  }
  const adminPort = await freePort();
  child = spawn(process.execPath, [CLI_MAIN, 'demo', '--admin-port', String(adminPort)], { cwd: REPO_ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
  trackChild(child);
  let out = '';
  let err = '';
  child.stdout!.setEncoding('utf8').on('data', (d: string) => { if (out.length < 1 << 20) out += d; });
  child.stderr!.setEncoding('utf8').on('data', (d: string) => { if (err.length < 1 << 20) err += d; });
  const deadline = Date.now() + 30_000;
  while (!out.includes('Ctrl-C stops everything') && child.exitCode === null && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
  assert.ok(out.includes('Ctrl-C stops everything'), `the demo did not come up:\n${out}\n${err}`);
  assert.ok(out.includes(`Dashboard: http://127.0.0.1:${adminPort}/`));
  assert.doesNotMatch(err, /warning|error/i, err);

  // 1. SIMPLE at the ingress gateway, exactly as printed (run from the repository root).
  const simple = commandWith(out, 'https://app.example.local:8443/');
  const r1 = await run('sh', ['-c', simple], { cwd: REPO_ROOT, timeoutMs: 10_000 });
  assert.equal(r1.code, 0, r1.stderr);
  const j1 = JSON.parse(r1.stdout) as { headers: Record<string, string> };
  assert.equal(j1.headers['host'], 'app.example.local:8443');
  // The gateway terminated TLS and went on in Istio mTLS: httpbin's sidecar saw the gateway's identity.
  assert.match(j1.headers['x-forwarded-client-cert'] ?? '', /URI=spiffe:\/\/cluster\.local\/ns\/istio-system\/sa\/istio-ingressgateway-service-account$/);

  // 4. The mesh path: sleep's sidecar -> ISTIO_MUTUAL -> httpbin's sidecar -> the app.
  const mesh = commandWith(out, 'http://httpbin.foo.svc.cluster.local:8000/');
  const r2 = await run('sh', ['-c', mesh], { cwd: REPO_ROOT, timeoutMs: 10_000 });
  assert.equal(r2.code, 0, r2.stderr);
  const j2 = JSON.parse(r2.stdout) as { headers: Record<string, string> };
  assert.match(j2.headers['x-forwarded-client-cert'] ?? '', /^By=spiffe:\/\/cluster\.local\/ns\/foo\/sa\/httpbin;.*URI=spiffe:\/\/cluster\.local\/ns\/default\/sa\/sleep$/);

  // The README's picture: the demo's dashboard with traffic and an explained path.
  if (existsSync(CHROMIUM)) {
    const double = commandWith(out, 'https://tls-app.demo.local/');
    const r3 = await run('sh', ['-c', double], { cwd: REPO_ROOT, timeoutMs: 10_000 });
    assert.equal(r3.code, 0, r3.stderr);
    assert.equal((JSON.parse(r3.stdout) as { app: string }).app, 'tls-app.demo.local');
    let pw: typeof import('playwright-core') | undefined;
    try { pw = await import('playwright-core'); } catch { pw = undefined; }
    if (pw) {
      const browser = await pw.chromium.launch({ executablePath: CHROMIUM, headless: true, timeout: 20_000,
        args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run'] });
      try {
        const page = await browser.newPage({ viewport: { width: 1400, height: 1100 } });
        await page.goto(`http://127.0.0.1:${adminPort}/`, { timeout: 15_000 });
        await page.waitForSelector('body[data-loaded="true"]', { timeout: 10_000 });
        await page.waitForSelector('#conn-status.live', { timeout: 10_000 });
        // All four proxies are on the map, and the double-encryption hop is marked as such.
        assert.equal(await page.locator('#map-diagram section.proxy').count(), 4);
        assert.ok(await page.locator('#map-diagram .badge[data-mark="tls-in-mtls"]').count() >= 2);
        await page.fill('#ex-target', 'https://app.example.local:8443/headers');
        await page.press('#ex-target', 'Enter');
        await page.waitForSelector('#map-diagram .hop.on-path', { timeout: 5000 });
        // Let the page's own smooth scroll to the path finish, then frame the lit listener.
        await page.waitForTimeout(1000);
        await page.evaluate(() => {
          const el = document.querySelector('#map-diagram h4.on-path');
          if (el) window.scrollTo(0, el.getBoundingClientRect().top + window.scrollY - 60);
        });
        await mkdir(path.join(REPO_ROOT, 'test-artifacts'), { recursive: true });
        // The README's screenshot is refreshed only on request: a test run never edits tracked files.
        if (process.env['UPDATE_SCREENSHOT'] === '1') await page.screenshot({ path: path.join(REPO_ROOT, 'docs', 'dashboard.png') });
        await page.screenshot({ path: path.join(REPO_ROOT, 'test-artifacts', 'demo-dashboard.png'), fullPage: true });
      } finally {
        await browser.close();
      }
    }
  }

  // Ctrl-C (SIGINT to this PID) stops every proxy and app; the process exits 0 and frees the ports.
  child.kill('SIGINT');
  const code = await Promise.race([waitForExit(child), new Promise<'timeout'>((r) => setTimeout(() => r('timeout'), 10_000))]);
  assert.equal(code, 0, `exit: ${String(code)}\n${err}`);
  assert.equal(await canConnect(8443, '127.0.0.1', 300), false);
  assert.equal(await canConnect(adminPort, '127.0.0.1', 300), false);
});
