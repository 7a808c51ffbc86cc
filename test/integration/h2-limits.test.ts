/**
 * Downstream request header limits over HTTP/2 (docs/security.md), against a real tlsgate
 * terminating TLS, with a node:http2 client:
 * - more header fields than --max-request-headers: the stream is reset (ENHANCE_YOUR_CALM);
 * - a header block over --max-request-header-bytes: 431 on the requests a client sends with its
 *   preface (before it acknowledged our SETTINGS), a reset afterwards;
 * and each time the same session, and the gateway, serve the next request.
 */
import assert from 'node:assert/strict';
import { mkdir, writeFile } from 'node:fs/promises';
import http2 from 'node:http2';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { certDir, makeCa, makeLeaf, type Ca, type KeyPair } from '../helpers/certs.js';
import { freePort } from '../helpers/ports.js';
import { startTlsgate, type Gateway } from '../helpers/tlsgate.js';

const HOST = 'h2.example.com';
const MAX_FIELDS = 50;
const MAX_BYTES = 8_192;
const { NGHTTP2_ENHANCE_YOUR_CALM } = http2.constants;

let dir: string;
let ca: Ca;
let leaf: KeyPair;
let gw: Gateway;
let port: number;

before(async () => {
  dir = await certDir('tlsgate-h2-limits-');
  ca = await makeCa(dir, 'ca', '/O=h2 limits/CN=h2-limits-ca');
  leaf = await makeLeaf(dir, ca, 'gw', { cn: HOST, sans: [`DNS:${HOST}`], serial: 2 });
  port = await freePort();
  const cfg = path.join(dir, 'config');
  await mkdir(cfg);
  await writeFile(path.join(cfg, 'config.yaml'), `apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  servers:
  - port: {number: ${port}, name: https, protocol: HTTPS}
    hosts: [${HOST}]
    tls: {mode: SIMPLE, serverCertificate: ${leaf.cert}, privateKey: ${leaf.key}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: vs}
spec:
  hosts: [${HOST}]
  gateways: [gw]
  http: [{directResponse: {status: 200, body: {string: served}}}]
`);
  gw = await startTlsgate({
    configPaths: [cfg],
    args: ['--max-request-headers', String(MAX_FIELDS), '--max-request-header-bytes', String(MAX_BYTES)],
  });
});

after(async () => {
  await gw?.stop();
});

interface Outcome { status?: number; body: string; rstCode: number }

function connect(): http2.ClientHttp2Session {
  // The client's own send limit is raised so the gateway, not the client, decides.
  const c = http2.connect(`https://127.0.0.1:${port}`, { servername: HOST, ca: ca.certPem, maxSendHeaderBlockLength: 1 << 20 });
  c.on('error', () => {});
  return c;
}

function request(c: http2.ClientHttp2Session, headers: http2.OutgoingHttpHeaders = {}): Promise<Outcome> {
  return new Promise((resolve) => {
    const s = c.request({ ':path': '/', ':authority': HOST, ...headers });
    let status: number | undefined;
    let body = '';
    s.setEncoding('utf8');
    s.on('response', (h) => { status = Number(h[':status']); });
    s.on('data', (d: string) => { body += d; });
    s.on('error', () => {});
    s.on('close', () => resolve({ ...(status !== undefined ? { status } : {}), body, rstCode: s.rstCode ?? 0 }));
    s.end();
  });
}

/** `n` distinct header fields besides the pseudo-headers. */
function fields(n: number): http2.OutgoingHttpHeaders {
  return Object.fromEntries(Array.from({ length: n }, (_, i) => [`x-field-${i}`, 'v']));
}

/** One field whose size (name + value + 32, as HTTP/2 counts it) brings the block over `bytes`. */
function bigField(bytes: number): http2.OutgoingHttpHeaders {
  return { 'x-big': 'a'.repeat(bytes) };
}

/** Resolves once the session has the gateway's SETTINGS (and so has acknowledged them). */
async function settled(c: http2.ClientHttp2Session): Promise<void> {
  const r = await request(c);
  assert.equal(r.status, 200);
  assert.equal(c.remoteSettings.maxHeaderListSize, MAX_BYTES, 'the gateway advertises its limit in SETTINGS');
}

describe('HTTP/2 request header limits', () => {
  it(`${MAX_FIELDS} fields are served; ${MAX_FIELDS + 1} reset the stream; the session serves the next request`, async () => {
    const c = connect();
    try {
      await settled(c);
      const ok = await request(c, fields(MAX_FIELDS));
      assert.deepEqual(ok, { status: 200, body: 'served', rstCode: 0 });
      const over = await request(c, fields(MAX_FIELDS + 1));
      assert.equal(over.status, undefined, 'no response to a refused stream');
      assert.equal(over.rstCode, NGHTTP2_ENHANCE_YOUR_CALM);
      assert.deepEqual(await request(c), { status: 200, body: 'served', rstCode: 0 });
      assert.equal(c.destroyed || c.closed, false, 'the session stays open');
    } finally {
      c.close();
    }
  });

  it('too many fields on the first request of a session are refused the same way', async () => {
    const c = connect();
    try {
      const over = await request(c, fields(MAX_FIELDS * 3));
      assert.equal(over.status, undefined);
      assert.equal(over.rstCode, NGHTTP2_ENHANCE_YOUR_CALM);
      assert.deepEqual(await request(c), { status: 200, body: 'served', rstCode: 0 });
    } finally {
      c.close();
    }
  });

  it('an oversized header block sent with the preface gets 431 and is logged; the session goes on', async () => {
    const c = connect();
    try {
      // Sent at once: the client has not seen (so not acknowledged) the gateway's SETTINGS yet.
      const over = await request(c, bigField(MAX_BYTES + 1_000));
      assert.equal(over.status, 431);
      assert.equal(over.rstCode, 0);
      const e = await gw.waitForAccessLog((x) => x.status === 431 && x.reason === 'request_headers_too_large');
      assert.equal(e.listener !== undefined, true);
      assert.deepEqual(await request(c), { status: 200, body: 'served', rstCode: 0 });
    } finally {
      c.close();
    }
  });

  it('an oversized header block after SETTINGS were acknowledged resets the stream; a block just under the limit is served', async () => {
    const c = connect();
    try {
      await settled(c);
      const over = await request(c, bigField(MAX_BYTES + 1_000));
      assert.equal(over.status, undefined);
      assert.equal(over.rstCode, NGHTTP2_ENHANCE_YOUR_CALM);
      // Pseudo-headers and the field's own 32 octets count too: leave room for them.
      const under = await request(c, bigField(MAX_BYTES - 512));
      assert.deepEqual(under, { status: 200, body: 'served', rstCode: 0 });
    } finally {
      c.close();
    }
  });

  it('after all of that the gateway serves a new session', async () => {
    const c = connect();
    try {
      assert.deepEqual(await request(c), { status: 200, body: 'served', rstCode: 0 });
      assert.ok(gw.running);
    } finally {
      c.close();
    }
  });
});
